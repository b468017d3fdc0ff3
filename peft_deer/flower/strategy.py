"""The DEeR Flower `Strategy`: one Flower round is one phase (one DP release) of the method's schedule.

Everything algorithmic is the core's `FederatedServer`: the schedule, client sampling, the budget
check, exact aggregation of the trained factor, clipping, regulated noise and accounting. This class
only turns a phase into messages and replies into checked `ClientUpdate`s; a reply that fails a
check is dropped from its phase with a logged reason, and the phase goes on with the others.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from ..federated import (
    ClientUpdate,
    FederatedServer,
    InvalidClientUpdate,
    Phase,
    PhaseRelease,
    build_whiteners,
    check_privatized_update,
    iter_phases,
)
from .protocol import (
    NoiseTerms,
    RecordReport,
    TrainInstruction,
    read_record_report,
    read_update_reply,
    state_to_record,
    train_message,
)
from .run_config import DeploymentOptions
from .site_accounting import SiteRecordLevel

logger = logging.getLogger("flwr")


class TooFewClients(RuntimeError):
    """A phase ended with fewer valid updates than the deployment requires; nothing was released."""


class DeerStrategy(Strategy):
    """Phases of `server.method` over the SuperNodes in `nodes` (client id -> Flower node id).

    `configure_train(r, ...)` / `aggregate_train(r, ...)` handle release r (1-based) of the run; the
    DEeR ServerApp calls them through `release_phase`, between its budget checks, validation and
    checkpoints. `dropped` lists every dropped update as {round, phase, client, reason}. `run_key` goes
    to the sites with every train message (they file their record-level accountants under it). Under
    record-level DP `server.record` is a `SiteRecordLevel`: each valid reply's accountant report goes
    into the ledger, and a reply without one is dropped.
    """

    def __init__(
        self,
        server: FederatedServer,
        nodes: dict[int, int],
        rounds: int,
        options: DeploymentOptions,
        run_key: str = "",
    ) -> None:
        if server.record is not None and not isinstance(server.record, SiteRecordLevel):
            server.record = SiteRecordLevel(server.record)
        self.server = server
        self.nodes = dict(nodes)
        self.options = options
        self.run_key = run_key
        self.phases: list[Phase] = list(iter_phases(server.method, rounds))
        self.dropped: list[dict] = []
        self._sent: dict[int, list[int]] = {}  # release number -> client ids sampled for it
        self._waited_s: float | None = None  # how long the last phase's send_and_receive actually waited
        self.last_updates: list[ClientUpdate] = []
        self.last_release: PhaseRelease | None = None

    # -- the Strategy interface: one Flower round = one release --------------------------------------
    def phase_of(self, server_round: int) -> Phase:
        if not 1 <= server_round <= len(self.phases):
            raise ValueError(f"server round {server_round} is outside the run's {len(self.phases)} releases")
        return self.phases[server_round - 1]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One train message per sampled client whose SuperNode is connected (the global adapter is the
        server's own state; `arrays` and `config` are not used)."""
        phase = self.phase_of(server_round)
        participants = self.server.participants(phase)
        absent = [c for c in participants if c not in self.nodes]
        for c in absent:
            self._drop(phase, c, "no SuperNode holds this client")
        sent = [c for c in participants if c in self.nodes]
        self._sent[server_round] = participants
        state, shares = self.server.global_state, self.server.share_divisor(self.noise_shares(len(participants)))
        dp = self.server.dp
        noise = NoiseTerms.of(dp, self.server.spec.noise) if dp and dp.noise_placement == "distributed" else None
        return [
            train_message(
                self.nodes[c], TrainInstruction(state, phase.round, phase.index, c, shares, self.run_key, noise)
            )
            for c in sent
        ]

    def noise_shares(self, sampled: int) -> int:
        """k, the noise floor: the server accepts no fewer than k updates, and with distributed noise each
        client adds 1/d of the noise variance, d = k - t (`FederatedServer.share_divisor`: t colluding sites
        still face sigma), so every release carries at least the full noise whoever drops out."""
        return max(1, min(self.options.min_clients_per_phase, sampled))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check every reply, drop the invalid ones, release the phase through the core server."""
        phase = self.phase_of(server_round)
        participants = self._sent.pop(server_round)
        client_of_node = {n: c for c, n in self.nodes.items()}
        shapes = {k: self.server.global_state[k].shape for k in self.server.trained_keys(phase)}
        dp = self.server.dp
        privatized = dp is not None and dp.noise_placement == "distributed"
        needed = self.noise_shares(len(participants))  # the noise floor k and the fewest updates released
        divisor = self.server.share_divisor(needed)  # each update's noise share: sigma^2 C^2 / d
        whiteners = (
            build_whiteners(
                self.server.layout, self.server.global_state, list(shapes), self.server.spec.noise, dp.regulator_ridge
            )
            if privatized
            else None
        )
        updates: dict[int, ClientUpdate] = {}
        reports: dict[int, RecordReport] = {}
        for reply in replies:
            client = client_of_node.get(reply.metadata.src_node_id)
            if client is None or client not in participants:
                logger.warning("ignoring a reply from node %s, not asked in this phase", reply.metadata.src_node_id)
                continue
            try:
                update = read_update_reply(reply, client, shapes)
                if privatized:
                    check_privatized_update(update, whiteners, self.server.spec.noise, dp, divisor)
                if self.server.record is not None:
                    reports[client] = read_record_report(reply, client)
            except InvalidClientUpdate as err:
                self._drop(phase, client, str(err))
                continue
            updates[client] = update
        for c in participants:
            if c in self.nodes and c not in updates and not self._was_dropped(phase, c):
                self._drop(phase, c, self._no_reply_reason())
        if len(updates) < needed:
            raise TooFewClients(
                f"round {phase.round + 1} phase {''.join(phase.factors)}: {len(updates)} valid updates of "
                f"{len(participants)} sampled (< min-clients-per-phase {needed}); nothing released. "
                "Resume with resume=true once the SuperNodes are back."
            )
        ordered = [updates[c] for c in sorted(updates)]
        if self.server.record is not None:
            self.server.record.expect(reports)
        release = self.server.finish_phase(phase, ordered, needed if privatized else None)
        self.last_updates, self.last_release = ordered, release
        metrics = {"participants": len(ordered), "dropped": len(participants) - len(ordered)}
        if release.effective_noise_multiplier is not None:
            metrics["effective-noise-multiplier"] = release.effective_noise_multiplier
        return state_to_record(self.server.global_state), MetricRecord(metrics)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """No federated evaluation: the ServerApp validates on its own held-out split after each round."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        dp = self.server.dp
        expected = self.server.clients_per_phase
        if dp is not None and dp.noise_placement == "distributed" and self.noise_shares(expected) < expected:
            logger.warning(
                "distributed noise with min-clients-per-phase=%d < %d clients per phase: each client adds 1/%d of "
                "the noise variance, so a full release carries %.2gx the noise it needs; set "
                "min-clients-per-phase to the number of sites you expect to reply",
                self.options.min_clients_per_phase,
                expected,
                self.server.share_divisor(self.noise_shares(expected)),
                expected / self.server.share_divisor(self.noise_shares(expected)),
            )
        logger.info(
            "DeerStrategy: method=%s, %d releases, %d clients on %d SuperNodes, DP=%s",
            self.server.method,
            len(self.phases),
            self.server.num_clients,
            len(self.nodes),
            "none"
            if dp is None
            else f"client-level sigma={dp.noise_multiplier:.4g} C={dp.clip_norm:g} noise={dp.noise_placement}",
        )

    # -- used by the ServerApp -----------------------------------------------------------------------
    def release_phase(self, grid: Grid):
        """The `release_phase` callable for `peft_deer.run.run_phases`."""

        def release(phase: Phase, participants: list[int]) -> tuple[list[ClientUpdate], PhaseRelease]:
            server_round = self.phases.index(phase) + 1
            messages = list(self.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid))
            t0 = time.monotonic()
            replies = grid.send_and_receive(messages, timeout=self.options.reply_timeout_s) if messages else []
            self._waited_s = time.monotonic() - t0
            self.aggregate_train(server_round, replies)
            return self.last_updates, self.last_release

        return release

    def deployment_ledger(self) -> dict:
        """What the privacy ledger adds for a deployment: transport and, with distributed noise, how it holds.

        Which clients were dropped (or sampled) is not in it: see `private_ledger`.
        """
        dp = self.server.dp
        ledger: dict = {"transport": "flower", "dropped_updates_count": len(self.dropped)}
        if dp is not None and dp.noise_placement == "distributed":
            k = self.noise_shares(self.server.clients_per_phase)
            d = self.server.share_divisor(k)
            ledger["client_noise"] = (
                "seeded from the run seed: the server can remove it (testing only, no distributed guarantee)"
                if self.server.randomness.reproducible
                else f"drawn by each client from OS entropy; each update carries 1/{d} of the noise variance "
                f"(d = k - t, k = min-clients-per-phase, t = collusion-threshold {self.server.collusion_threshold}), "
                "and no release is made from fewer than k updates, so each carries at least the accounted noise"
            )
            ledger["neighbouring_relation"] = (
                "add/remove one client's entire data, given which clients reply (the roster of replies is "
                "treated as fixed; with dropouts the noise variance, at least sigma^2 C^2, depends on it)"
            )
            ledger["secure_aggregation"] = False
            ledger["note_distributed"] = (
                "without secure aggregation the server sees each client's update with its noise share only "
                f"(sigma/sqrt({k})); the guarantee against the server itself needs SecAgg+"
            )
        return ledger

    def private_ledger(self) -> dict:
        """Server-private facts of the deployment: every dropped update with its client and reason."""
        return {"dropped_updates": list(self.dropped), "missed_phases": self.missed_phases()}

    def missed_phases(self) -> dict[str, int]:
        """{client id: phases whose update from it was dropped or never came} (server-private)."""
        missed: dict[str, int] = {}
        for d in self.dropped:
            missed[str(d["client"])] = missed.get(str(d["client"]), 0) + 1
        return dict(sorted(missed.items(), key=lambda kv: int(kv[0])))

    def _no_reply_reason(self) -> str:
        """The actual wait: Flower returns before reply-timeout-s when a node is known to be gone."""
        timeout = self.options.reply_timeout_s
        if self._waited_s is None:
            return f"no reply within {timeout:g} s"
        return f"no reply (the wait ended after {self._waited_s:.1f} s; reply-timeout-s {timeout:g})"

    def _drop(self, phase: Phase, client: int, reason: str) -> None:
        logger.warning(
            "round %d phase %s: dropped client %d: %s", phase.round + 1, "".join(phase.factors), client, reason
        )
        self.dropped.append({"round": phase.round, "phase": phase.index, "client": client, "reason": reason})

    def _was_dropped(self, phase: Phase, client: int) -> bool:
        return any(
            d["round"] == phase.round and d["phase"] == phase.index and d["client"] == client for d in self.dropped
        )


__all__ = ["DeerStrategy", "TooFewClients"]
