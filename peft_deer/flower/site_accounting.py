"""Record-level DP in a deployment: each site keeps its own accountant; the server's ledger holds what they report.

A site (hospital) runs DP-SGD on its own patients (`peft_deer.federated.record_dp`, the simulation's
code) and is the authority on what it released: `SiteAccountant` keeps its opacus RDP history in the
site's state directory, filed under the run key (the same for a run and its resumes), so it survives a
restart of the SuperNode and counts every update the site sent, retries included. Each update's reply
carries that history (`protocol.RecordReport`); `SiteRecordLevel` is the server's `RecordLevel` whose
per-client histories are the sites' reports, so `privacy.json` lists every site's record-level epsilon.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path

from ..federated.record_dp import RecordAccountants, RecordLevel, record_sample_rate, record_steps
from ..run.io import write_json_atomic
from ..run.privacy import record_level
from ..settings import RunSettings
from .protocol import RecordReport

logger = logging.getLogger("flwr")


def site_record_level(settings: RunSettings, num_examples: int, public_size: int | None = None) -> RecordLevel | None:
    """The run's record-level DP-SGD settings as one site applies them: q, steps and sigma from this site's
    declared public size (`public_size`, default `record_dp.public_size(num_examples)`), exactly as `deer-fed`
    calibrates that client (None without record-level DP)."""
    record = record_level(settings, [num_examples], None if public_size is None else [public_size])
    if record is None:
        return None
    # RecordDP indexes multipliers and sizes by client id; this site only ever trains its own.
    k = settings.data.num_clients
    dp = dataclasses.replace(
        record.dp, noise_multipliers=record.dp.noise_multipliers * k, public_sizes=record.dp.public_sizes * k
    )
    return RecordLevel(dp, record.batch_size, record.local_epochs)


class SiteAccountant:
    """One site's record-level accountant for one run, persisted as JSON in `state_dir` after every step."""

    def __init__(self, state_dir: str | Path, run_key: str, client_id: int) -> None:
        if not re.fullmatch(r"[0-9a-f]{16,64}", run_key):
            raise ValueError(f"run key {run_key!r} is not a hex digest: the ServerApp is of another version")
        self.client_id = client_id
        self.path = Path(state_dir) / f"record-dp-{run_key}-client{client_id}.json"
        self.accountants = RecordAccountants()
        if self.path.is_file():
            self.accountants.load_state_dict(json.loads(self.path.read_text()))

    def step(self, record: RecordLevel, num_examples: int) -> RecordReport:
        """Account one DP-SGD client update (q and steps from the site's declared public size; `num_examples`
        only if it declared none); save; return the report for the server (public values only)."""
        sigma = record.dp.noise_multiplier(self.client_id)
        size = record.dp.public_size(self.client_id, num_examples)
        q = record_sample_rate(size, record.batch_size)
        steps = record_steps(size, record.batch_size, record.local_epochs)
        self.accountants.step(self.client_id, sigma, q, steps)
        write_json_atomic(self.path, self.accountants.state_dict())
        history = tuple(self.accountants.history[self.client_id])
        eps = self.accountants.epsilon(self.client_id, record.dp.delta, record.dp.accountant)
        return RecordReport(sigma, q, steps, history, eps, size if record.dp.public_sizes else None)

    def gaussian_release(self, record: RecordLevel, sigma: float, num_examples: int, step: bool = True) -> RecordReport:
        """Account one Gaussian release of this site's records (noise multiplier `sigma`, q = 1, 1 step: the head
        refit's statistics) unless `step` is False (an identical re-send: no new release); save; the report."""
        if step:
            self.accountants.step(self.client_id, sigma, 1.0, 1)
            write_json_atomic(self.path, self.accountants.state_dict())
        size = record.dp.public_size(self.client_id, num_examples)
        history = tuple(self.accountants.history.get(self.client_id, ()))
        eps = self.accountants.epsilon(self.client_id, record.dp.delta, record.dp.accountant)
        return RecordReport(sigma, 1.0, 1, history, eps, size if record.dp.public_sizes else None)


class SiteRecordLevel(RecordLevel):
    """The server's record-level ledger in a deployment: client k's history is what site k last reported.

    `expect(reports)` hands over the reports of a phase's valid replies; `FederatedServer.finish_phase`
    then calls `account(updates)` for the updates it aggregated. A report shorter than what the server
    already holds (the site lost its state directory) never lowers the ledger: the server then adds the
    update's own steps to its copy, and warns.
    """

    def __init__(self, record: RecordLevel) -> None:
        super().__init__(record.dp, record.batch_size, record.local_epochs)
        self.accountants.load_state_dict(record.accountants.state_dict())
        self.sigmas: dict[int, float] = dict(getattr(record, "sigmas", {}))
        self.public_sizes: dict[int, int] = dict(getattr(record, "public_sizes", {}))
        self._pending: dict[int, RecordReport] = {}

    def expect(self, reports: dict[int, RecordReport]) -> None:
        self._pending = dict(reports)

    def account(self, updates) -> None:
        self.account_clients(sorted(u.client_id for u in updates))

    def account_clients(self, client_ids: list[int]) -> None:
        """Take the pending report of each client whose update went into the release (secure aggregation:
        the server knows who survived, not their updates)."""
        history = self.accountants.history
        for client in sorted(client_ids):
            report = self._pending.pop(client)
            held = sum(n for _, _, n in history.get(client, []))
            if sum(n for _, _, n in report.history) >= held:
                history[client] = list(report.history)
            else:
                logger.warning(
                    "client %d reported a record-level history shorter than the ledger's (its state was lost?); "
                    "the ledger keeps its own and adds this update",
                    client,
                )
                self.accountants.step(client, report.sigma, report.sample_rate, report.steps)
            self.sigmas[client] = report.sigma
            if report.public_size is not None:
                self.public_sizes[client] = report.public_size
        self._pending = {}

    def ledger(self) -> dict:
        ledger = super().ledger()
        ledger["noise_multipliers"] = {str(c): s for c, s in sorted(self.sigmas.items())}
        ledger["public_sizes"] = {str(c): n for c, n in sorted(self.public_sizes.items())} or None
        ledger["calibration"] = f"by each site on its declared public size ({self.dp.calibration})"
        ledger["accountant"] = (
            f"opacus {self.dp.accountant.upper()} (calibration, epsilon; RDP and PRV both shown), one history per "
            "site, kept by the site across rounds and restarts and reported with every update"
        )
        return ledger

    def state_dict(self) -> dict:
        sizes = {str(c): n for c, n in self.public_sizes.items()}
        return {**super().state_dict(), "sigmas": {str(c): s for c, s in self.sigmas.items()}, "public_sizes": sizes}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.sigmas = {int(c): float(s) for c, s in state.get("sigmas", {}).items()}
        self.public_sizes = {int(c): int(n) for c, n in state.get("public_sizes", {}).items()}


__all__ = ["SiteAccountant", "SiteRecordLevel", "site_record_level"]
