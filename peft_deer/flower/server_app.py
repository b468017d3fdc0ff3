"""The DEeR `ServerApp`: the same run as `deer-fed`, with the clients on Flower SuperNodes.

It runs the simulation's lifecycle (`peft_deer.run.run_experiment`: the same build, phase loop with
budget stop, validation on the server's held-out split, best adapter, checkpoints, `resume`, and
outputs) with a `FlowerTransport`: it waits for `num-clients` SuperNodes, learns which client id each
holds, and lets `DeerStrategy` move the messages (with `secure-aggregation=true`, `SecAggDeerStrategy`
carries each phase through SecAgg+ and the server sees only the sum of the sites' privatized updates).
The outputs land in `output-dir` in the simulation's layout, so `python -m app --adapter
OUTPUT_DIR/adapter` serves a Flower-trained adapter unchanged. After the run every site evaluates the
final adapter on its own held-out images; the per-site table goes to `server-private/site_evaluation.*`
(not DP-covered; the model card says so).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from ..federated import AdapterState
from ..federated.head_refit import ClassStats
from ..run import PRIVATE_DIR, Experiment, Host, ReleasePhase, SettingsMismatch, SetupFailed, Transport, run_experiment
from ..run.privacy import refit_multiplier
from ..run.refit import RefitRequest
from .protocol import SiteCounts, SiteEvaluated, evaluate_message, hello_message, read_hello_reply, read_site_counts
from .refit import gather_statistics
from .run_config import DeploymentOptions, parse_run_config
from .secagg import SecAggDeerStrategy
from .secagg_refit import secagg_statistics
from .site_accounting import SiteRecordLevel
from .site_evaluation import add_model_card_note, site_table, split_reports, write_site_evaluation
from .strategy import DeerStrategy

logger = logging.getLogger("flwr")
app = ServerApp()


def discover_clients(grid: Grid, num_clients: int, options: DeploymentOptions) -> dict[int, int]:
    """Wait for `num_clients` SuperNodes and map each announced client id to its node id.

    Raises RuntimeError if they do not all connect in `node_wait_s`, or if two announce one id.
    """
    deadline = time.monotonic() + options.node_wait_s
    while len(nodes := sorted(grid.get_node_ids())) < num_clients:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"only {len(nodes)} of num-clients={num_clients} SuperNodes connected within {options.node_wait_s:g} s"
            )
        time.sleep(1.0)
    replies = list(grid.send_and_receive([hello_message(n) for n in nodes], timeout=options.reply_timeout_s))
    clients: dict[int, int] = {}
    for reply in sorted(replies, key=lambda r: r.metadata.src_node_id):
        try:
            client_id, num_examples = read_hello_reply(reply)
        except ValueError as err:
            logger.warning("%s; its client takes no part", err)
            continue
        if client_id in clients:
            raise RuntimeError(
                f"SuperNodes {clients[client_id]} and {reply.metadata.src_node_id} both hold client {client_id}"
            )
        clients[client_id] = reply.metadata.src_node_id
        announced = "no count announced (DP)" if num_examples is None else f"announces {num_examples} images"
        logger.info("client %d is SuperNode %d (%s)", client_id, reply.metadata.src_node_id, announced)
    missing = sorted(set(range(num_clients)) - set(clients))
    if missing:
        logger.warning("no SuperNode holds clients %s: they are dropped whenever sampled", missing)
    return clients


def evaluate_sites(
    grid: Grid,
    nodes: dict[int, int],
    state: AdapterState,
    threshold: float | None,
    options: DeploymentOptions,
    temperature: float = 1.0,
) -> tuple[list[SiteCounts | SiteEvaluated], list[str]]:
    """Ask every site to evaluate `state` on its own held-out images, with probabilities softmax(logits /
    temperature) and `threshold`: (the counts, or under DP that a site kept them; one reason per failed site)."""
    messages = [evaluate_message(nodes[c], state, threshold, temperature) for c in sorted(nodes)]
    counts, failed = [], []
    for reply in grid.send_and_receive(messages, timeout=options.reply_timeout_s):
        try:
            counts.append(read_site_counts(reply))
        except ValueError as err:
            logger.warning("%s", err)
            failed.append(str(err))
    missing = len(messages) - len(counts) - len(failed)
    if missing:
        failed.append(f"{missing} sites did not answer within {options.reply_timeout_s:g} s")
    return counts, failed


def run_key(exp: Experiment, out: Path) -> str:
    """The key sites file their record-level accountants under: an HMAC of the run's DP secret and output
    directory, so the same for a run and its resumes (the secret is in the checkpoint), new for a new run
    (also with reproducible noise), and revealing nothing about the secret."""
    return exp.server.randomness.token_hex("flower-site-run-key", str(out))


class FlowerTransport(Transport):
    """Client updates from the sites: `DeerStrategy` sends each phase's train messages over `grid`; with
    `secure-aggregation=true` `SecAggDeerStrategy` runs each phase as one SecAgg+ workflow (needs `context`)."""

    with_client_data = False  # the sites hold the training images

    def __init__(self, grid: Grid, options: DeploymentOptions, context: Context | None = None) -> None:
        if options.secure_aggregation and context is None:
            raise ValueError("secure aggregation needs the ServerApp's Context (SecAgg+ runs a legacy workflow)")
        self.grid, self.options, self.context = grid, options, context
        self.nodes: dict[int, int] = {}
        self.strategy: DeerStrategy | SecAggDeerStrategy | None = None
        self.deer: DeerStrategy | None = None

    def before_start(self, exp: Experiment, out: Path) -> None:
        logger.info("DEeR run %s -> %s", exp.settings.federation.method, out)
        if self.options.secure_aggregation:  # the mechanism: a resume with another secagg-noise is refused
            exp.deployment_fingerprint["secagg-noise"] = self.options.secagg_noise
        server, m = exp.server, self.refit_multiplier(exp)
        if not exp.settings.federation.rounds and server.dp is not None and m is not None:  # the one release's m
            server.dp = dataclasses.replace(server.dp, noise_multiplier=m)
        if exp.server.record is not None:  # before a resume loads the ledger: it holds the sites' reports
            exp.server.record = SiteRecordLevel(exp.server.record)

    def release_phase(self, exp: Experiment, out: Path) -> ReleasePhase:
        self.nodes = discover_clients(self.grid, exp.settings.data.num_clients, self.options)
        rounds = exp.settings.federation.rounds
        deer = self.deer = DeerStrategy(exp.server, self.nodes, rounds, self.options, run_key(exp, out))
        deer.summary()
        if self.options.secure_aggregation:  # each phase through SecAgg+: the server sees only the sum
            self.strategy = SecAggDeerStrategy(deer, self.grid, self.context.run_id)
            return self.strategy.release_phase(self.grid, self.context)
        self.strategy = deer
        return deer.release_phase(self.grid)

    def refit_noise_floor(self, exp: Experiment) -> int:
        """k for the head refit's distributed shares: the training updates' noise floor over every site."""
        return self.deer.noise_shares(exp.settings.data.num_clients)

    def refit_multiplier(self, exp: Experiment) -> float | None:
        """m: `refit_multiplier`, calibrated for the Skellam ledger with SecAgg+'s integer shares."""
        integer = self.options.secure_aggregation and self.options.secagg_noise == "skellam"
        return refit_multiplier(exp.settings, integer_noise=integer)

    def refit_release(self, exp: Experiment, request: RefitRequest) -> ClassStats | tuple[ClassStats, dict]:
        """--head-refit stats: every site's noised statistics (`flower/refit.py`), summed; with secure aggregation
        the server sees only their sum (`flower/secagg_refit.py`)."""
        if self.options.secure_aggregation:
            return secagg_statistics(self.strategy, self.grid, self.context, request)
        return gather_statistics(self.deer, self.grid, request, self.options.reply_timeout_s)

    def ledgers(self) -> tuple[dict | None, dict | None]:
        return self.strategy.deployment_ledger(), self.strategy.private_ledger()

    def after_finalize(self, exp: Experiment, out: Path, summary: dict) -> None:
        """Every site evaluates the final adapter on its own held-out images (server-private table)."""
        threshold = summary["test"]["final"]["threshold"]
        temperature = summary["calibration"]["final"]["temperature"]
        state = exp.server.global_state
        reports, failed = evaluate_sites(self.grid, self.nodes, state, threshold, self.options, temperature)
        counts, kept = split_reports(reports)  # kept: sites that keep their counts under DP
        write_site_evaluation(out / PRIVATE_DIR, site_table(counts), threshold, failed, temperature, kept)
        evaluated = sorted([c.client_id for c in counts] + kept)
        absent = sorted(set(self.nodes) - set(evaluated))
        add_model_card_note(out, f"Sites that evaluated: {len(evaluated)} of {len(self.nodes)}"
                            + (f" (not: clients {absent})." if absent else "."), kept_at_site=bool(kept))  # fmt: skip
        total = len(getattr(self.strategy, "deer", self.strategy).phases)  # SecAgg+ wraps the DeerStrategy
        for client, missed in self.strategy.private_ledger().get("missed_phases", {}).items():
            logger.warning("client %s missed %d of %d phases (server-private/deployment.json)", client, missed, total)
        logger.info(
            "per-site evaluation: %d sites sent counts -> %s (server-private, not DP-covered), %d kept theirs",
            len(counts),
            out / PRIVATE_DIR,
            len(kept),
        )


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings, options = parse_run_config(context.run_config)
    settings = settings.replace(output_dir=str(Path(settings.output.output_dir).resolve()))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        outcome = run_experiment(settings, FlowerTransport(grid, options, context), Host(device, logger.info))
    except SetupFailed as failed:
        if isinstance(failed.error, SettingsMismatch):
            raise ValueError(f"deer-flower: {failed.error}") from None
        raise failed.error from None
    if outcome.stopped == "max-phases":
        logger.info("stopped after max-phases; continue with resume=true")
