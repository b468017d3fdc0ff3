"""The DEeR `ServerApp`: the same run as `deer-fed`, with the clients on Flower SuperNodes.

It builds the run exactly as the simulation does (`peft_deer.experiment`), waits for `num-clients`
SuperNodes, learns which client id each holds, and runs the phase loop (`run_phases`: budget stop,
validation on the server's held-out split, best adapter, checkpoints, `resume`) with `DeerStrategy`
moving the messages. The outputs land in `output-dir` in the simulation's layout, so `python -m app
--adapter OUTPUT_DIR/adapter` serves a Flower-trained adapter unchanged. After the run every site
evaluates the final adapter on its own held-out images; the per-site table goes to
`server-private/site_evaluation.*` (not DP-covered; the model card says so).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from ..experiment import (
    PRIVATE_DIR,
    SettingsMismatch,
    build_experiment,
    final_line,
    finalize,
    prepare_output_dir,
    run_phases,
    start_or_resume,
)
from ..federated import AdapterState
from .protocol import SiteCounts, evaluate_message, hello_message, read_hello_reply, read_site_counts
from .run_config import DeploymentOptions, parse_run_config
from .secagg import SecAggDeerStrategy
from .site_accounting import SiteRecordLevel
from .site_evaluation import add_model_card_note, site_table, write_site_evaluation
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
        logger.info(
            "client %d is SuperNode %d (%d training images)", client_id, reply.metadata.src_node_id, num_examples
        )
    missing = sorted(set(range(num_clients)) - set(clients))
    if missing:
        logger.warning("no SuperNode holds clients %s: they are dropped whenever sampled", missing)
    return clients


def evaluate_sites(
    grid: Grid, nodes: dict[int, int], state: AdapterState, threshold: float | None, options: DeploymentOptions
) -> tuple[list[SiteCounts], list[str]]:
    """Ask every site to evaluate `state` on its own held-out images: (the counts, one reason per failed site)."""
    messages = [evaluate_message(nodes[c], state, threshold) for c in sorted(nodes)]
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


def run_key(exp, out: Path) -> str:
    """The key sites file their record-level accountants under: an HMAC of the run's DP secret and output
    directory, so the same for a run and its resumes (the secret is in the checkpoint), new for a new run
    (also with reproducible noise), and revealing nothing about the secret."""
    return f"{exp.server.randomness.seed('flower-site-run-key', str(out)):016x}"


@app.main()
def main(grid: Grid, context: Context) -> None:
    args, options = parse_run_config(context.run_config)
    args.output_dir = str(Path(args.output_dir).resolve())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    exp = build_experiment(args, device, with_client_data=False, say=logger.info)
    out = prepare_output_dir(args, prog="deer-flower")
    logger.info("DEeR run %s -> %s", args.method, out)
    exp.save_base_model()
    if exp.server.record is not None:  # before a resume loads the ledger: it holds the sites' reports
        exp.server.record = SiteRecordLevel(exp.server.record)
    try:
        progress = start_or_resume(exp, out, say=logger.info)
    except SettingsMismatch as err:
        raise ValueError(f"deer-flower: {err}") from err
    nodes = discover_clients(grid, args.num_clients, options)
    strategy = DeerStrategy(exp.server, nodes, args.rounds, options, run_key(exp, out))
    strategy.summary()
    releaser = strategy
    if options.secure_aggregation:  # each phase through SecAgg+: the server sees only the sum
        releaser = SecAggDeerStrategy(strategy, grid, context.run_id)
        release = releaser.release_phase(grid, context)
    else:
        release = strategy.release_phase(grid)
    stopped = run_phases(exp, out, progress, release, say=logger.info)
    if stopped == "max-phases":
        logger.info("stopped after max-phases; continue with resume=true")
        return
    summary = finalize(
        exp, out, progress, stopped, extra_privacy=releaser.deployment_ledger(), private_extra=releaser.private_ledger()
    )
    threshold = summary["test"]["final"]["threshold"]
    counts, failed = evaluate_sites(grid, nodes, exp.server.global_state, threshold, options)
    write_site_evaluation(out / PRIVATE_DIR, site_table(counts), threshold, failed)
    add_model_card_note(out)
    logger.info(
        "per-site evaluation of %d sites -> %s (server-private, not DP-covered)", len(counts), out / PRIVATE_DIR
    )
    logger.info(final_line(summary, out))
