"""Record-level DP (DESIGN 2.6): the settings, calibration and accounting of DP-SGD inside clients.

A hospital protects each patient: every local step is Poisson-sampled over its actual records at rate
q = batch_size / s_k, every per-sample gradient is clipped to C and Gaussian noise of std sigma*C is added
to the sum (the trainer is `dp_sgd.py`). s_k is the hospital's *declared public size* (`public_size`: its
count floored to a coarse grid, or declared explicitly), never its exact count: q, the step count, sigma and
the FedAvg weight are functions of s_k and public settings only. The guarantee holds given the declaration:
declared explicitly and fixed in advance (`--record-public-sizes`, a site's `public-size`), one record more
or less changes nothing the run publishes; derived from the count, one record can move the declaration at a
grid edge (40 -> 39 records: 40 -> 30), so the unconditional statement needs declared sizes. Each client has its own
RDP history that persists across rounds and restarts; `merge_ledgers` adds the record-level guarantee to
the client-level ledger. Engine-free: no accelerate, flwr or gradio.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .. import defaults
from ..methods import NoiseKind
from .accountant import ReleaseAccountant, calibrate_noise_multiplier, check_accountant

# ---------------------------------------------------------------------------------------------
# Sampling and calibration


PUBLIC_SIZE_RULE = (
    "declared public size s = the record count floored to 2 significant figures on a grid at least 10 wide "
    "(57 -> 50, 117 -> 110, 1234 -> 1200; below 10 -> 1), unless declared explicitly; a derived size can change "
    "with one record at a grid edge (40 -> 39 records: 40 -> 30), so the guarantee holds given the declaration "
    "and needs sizes declared in advance to hold unconditionally"
)
DECLARED_RULE = "declared explicitly, fixed in advance (--record-public-sizes or a site's public-size)"


def public_size(num_examples: int) -> int:
    """The default declared public size of a client with `num_examples` records (`PUBLIC_SIZE_RULE`): floor to
    2 significant figures, in steps of max(10, 10^(digits - 2)); at least 1. Never above `num_examples`."""
    if num_examples < 1:
        raise ValueError(f"a client with record-level DP needs at least one example, not {num_examples}")
    step = 10 ** max(1, len(str(int(num_examples))) - 2)
    return max(1, num_examples // step * step)


def record_sample_rate(num_examples: int, batch_size: int) -> float:
    """Poisson rate q = batch_size / n (at most 1)."""
    if num_examples < 1:
        raise ValueError("a client with record-level DP needs at least one example")
    return min(1.0, batch_size / num_examples)


def record_steps(num_examples: int, batch_size: int, local_epochs: int) -> int:
    """DP-SGD steps of one client update: local_epochs * int(1/q) (opacus's Poisson sampler length)."""
    return local_epochs * int(1 / record_sample_rate(num_examples, batch_size))


def calibrate_record_sigmas(
    target_epsilon: float,
    delta: float,
    client_sizes: Sequence[int],
    batch_size: int,
    local_epochs: int,
    updates_per_client: int,
    accountant: str = "rdp",
) -> tuple[float, ...]:
    """Per-client calibration: sigma_k so that client k reaches `target_epsilon` after the planned run.

    The plan assumes client k takes part in every phase: `updates_per_client` = rounds * phases per
    round updates of `record_steps` steps each at rate q_k. (Clients sampled less often end below.)
    `accountant` 'rdp' or 'prv' (`calibrate_noise_multiplier`); the ledger's budget uses the same one.
    """
    cache: dict[tuple[float, int], float] = {}
    out = []
    for n in client_sizes:
        q = record_sample_rate(n, batch_size)
        steps = updates_per_client * record_steps(n, batch_size, local_epochs)
        if (q, steps) not in cache:
            cache[(q, steps)] = calibrate_noise_multiplier(target_epsilon, delta, q, steps, accountant)
        out.append(cache[(q, steps)])
    return tuple(out)


@dataclass(frozen=True, kw_only=True)
class RecordDP:
    """Record-level DP-SGD settings: per-client multipliers (indexed by client id), C, delta, noise kind.

    `noise` is 'regulated' (metric clipping, covariance sigma^2 C^2 M^-1; method deer) or 'plain'.
    `max_physical_batch_size` bounds memory with opacus's `BatchMemoryManager` (None: no split).
    `public_sizes` (indexed by client id) are the declared public sizes s_k that fix q_k, the steps and the
    FedAvg weight; empty: each client's exact count is used as if public (tests and the audit only).
    `accountant` ('rdp' or 'prv') calibrated the multipliers and gives the ledger's `epsilon_max`.
    `size_rule` says how the sizes were set (`DECLARED_RULE`); None: derived by `PUBLIC_SIZE_RULE`.
    """

    noise_multipliers: tuple[float, ...]
    clip_norm: float = defaults.CLIP_NORM
    delta: float = defaults.DELTA
    noise: NoiseKind = NoiseKind.PLAIN
    regulator_ridge: float = defaults.RIDGE
    max_physical_batch_size: int | None = None
    target_epsilon: float | None = None
    calibration: str = "per-client"
    public_sizes: tuple[int, ...] = ()
    accountant: str = "rdp"
    size_rule: str | None = None  # how `public_sizes` were set (the ledger's public_size_rule); None: derived

    def __post_init__(self) -> None:
        check_accountant(self.accountant)
        if not self.clip_norm > 0:
            raise ValueError(f"record-level clip norm {self.clip_norm} must be > 0")
        if not 0 < self.delta < 1:
            raise ValueError(f"record-level delta {self.delta} must be in (0, 1)")
        if any(not (s > 0 and math.isfinite(s)) for s in self.noise_multipliers):
            raise ValueError("record-level noise multipliers must be finite and > 0")
        if self.noise not in (NoiseKind.PLAIN, NoiseKind.REGULATED):
            raise ValueError(f"record-level noise {str(self.noise)!r} is not 'plain' or 'regulated'")
        object.__setattr__(self, "noise", NoiseKind(self.noise))  # a str 'plain' becomes NoiseKind.PLAIN
        if self.max_physical_batch_size is not None and self.max_physical_batch_size < 1:
            raise ValueError("--max-physical-batch-size must be >= 1")
        if any(int(n) != n or n < 1 for n in self.public_sizes):
            raise ValueError(f"declared public sizes {list(self.public_sizes)} must be integers >= 1")

    def noise_multiplier(self, client_id: int) -> float:
        return self.noise_multipliers[client_id]

    def public_size(self, client_id: int, exact: int) -> int:
        """Client `client_id`'s declared public size; `exact` (its record count) only when none is declared."""
        return int(self.public_sizes[client_id]) if self.public_sizes else exact


# ---------------------------------------------------------------------------------------------
# Accounting


class RecordAccountants:
    """One opacus history [(sigma, q, steps)] per client; JSON state, so it survives a restart."""

    def __init__(self) -> None:
        self.history: dict[int, list[tuple[float, float, int]]] = {}

    def step(self, client_id: int, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        h = self.history.setdefault(int(client_id), [])
        if h and h[-1][:2] == (noise_multiplier, sample_rate):
            h[-1] = (noise_multiplier, sample_rate, h[-1][2] + steps)
        else:
            h.append((noise_multiplier, sample_rate, steps))

    def epsilon(self, client_id: int, delta: float, kind: str = "rdp") -> float:
        """Client `client_id`'s epsilon at `delta` with opacus `kind` ('rdp', or 'prv': its upper bound; where
        PRV cannot evaluate the history, RDP, also a valid bound). Cached: opacus takes ~0.1-1 s per call."""
        acc = ReleaseAccountant(list(self.history.get(int(client_id), [])))
        if kind == "prv":
            try:
                return acc.epsilon(delta, "prv")
            except (ValueError, RuntimeError, OverflowError):
                pass
        return acc.epsilon(delta, "rdp")

    def epsilons(self, delta: float, kind: str = "rdp") -> dict[int, float]:
        return {c: self.epsilon(c, delta, kind) for c in sorted(self.history)}

    def state_dict(self) -> dict:
        return {"history": {str(c): [list(x) for x in h] for c, h in self.history.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.history = {int(c): [(float(s), float(q), int(n)) for s, q, n in h] for c, h in state["history"].items()}


class RecordLevel:
    """What the server keeps for record-level DP: the settings, the local plan and per-client accountants."""

    def __init__(self, dp: RecordDP, batch_size: int, local_epochs: int) -> None:
        self.dp, self.batch_size, self.local_epochs = dp, batch_size, local_epochs
        self.accountants = RecordAccountants()

    def account(self, updates) -> None:
        """Step the accountant of every client that returned an update (same on every process)."""
        for u in sorted(updates, key=lambda u: u.client_id):
            n = self.dp.public_size(u.client_id, u.num_examples)  # never the exact count when sizes are declared
            q = record_sample_rate(n, self.batch_size)
            steps = record_steps(n, self.batch_size, self.local_epochs)
            self.accountants.step(u.client_id, self.dp.noise_multiplier(u.client_id), q, steps)

    def account_clients(self, client_ids: list[int]) -> None:
        """Account a release whose updates the server never saw (secure aggregation): only a ledger fed by
        the sites' own accountants can (`peft_deer.flower.site_accounting.SiteRecordLevel`)."""
        raise TypeError("record-level accounting of a summed release needs the sites' own accountant reports")

    def epsilon_max(self) -> float:
        """The largest client epsilon with the calibration's accountant (`RecordDP.accountant`)."""
        eps = self.accountants.epsilons(self.dp.delta, self.dp.accountant)
        return max(eps.values(), default=0.0)

    def ledger(self) -> dict:
        both = {kind: self.accountants.epsilons(self.dp.delta, kind) for kind in ("rdp", "prv")}
        eps = both[self.dp.accountant]
        return {
            "mechanism": {
                NoiseKind.REGULATED: "regulated DP-SGD (per-sample metric clipping, noise sigma^2 C^2 M^-1)",
                NoiseKind.PLAIN: "DP-SGD (per-sample clipping, isotropic Gaussian noise)",
            }[self.dp.noise],
            "sampling": "poisson over the client's actual records (opacus DPDataLoader), q_k = batch_size / s_k, "
            "steps per update local_epochs * floor(1 / q_k), s_k its declared public size",
            "public_sizes": {str(c): int(n) for c, n in enumerate(self.dp.public_sizes)} or None,
            "sample_rates": {
                str(c): record_sample_rate(int(n), self.batch_size) for c, n in enumerate(self.dp.public_sizes)
            }
            or None,
            "public_size_rule": (self.dp.size_rule or PUBLIC_SIZE_RULE)
            if self.dp.public_sizes
            else "exact counts (no declared sizes)",
            "noise_multipliers": {str(c): s for c, s in enumerate(self.dp.noise_multipliers)},
            "calibration": self.dp.calibration,
            "clip_norm": self.dp.clip_norm,
            "regulator_ridge": self.dp.regulator_ridge if self.dp.noise == NoiseKind.REGULATED else None,
            "delta": self.dp.delta,
            "target_epsilon": self.dp.target_epsilon,
            "steps": {str(c): sum(n for _, _, n in h) for c, h in sorted(self.accountants.history.items())},
            "epsilon_per_client": {str(c): e for c, e in eps.items()},
            "epsilon_per_client_rdp": {str(c): e for c, e in both["rdp"].items()},
            "epsilon_per_client_prv": {str(c): e for c, e in both["prv"].items()},
            "epsilon_max": max(eps.values(), default=0.0),
            "accountant": f"opacus {self.dp.accountant.upper()} (calibration, epsilon), one per client; RDP and PRV "
            "both shown",
            "neighbouring_relation": (
                "add/remove one record (one patient's image) in one client's data, given the clients' declared "
                "public sizes s_k (q, steps, sigma and weights depend on them only; a size derived from the count "
                "can itself change with one record at a grid edge: see public_size_rule)"
            ),
            "trust_model": "each client is trusted with its own records; what leaves it is DP-SGD output",
        }

    def state_dict(self) -> dict:
        return {"accountants": self.accountants.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.accountants.load_state_dict(state["accountants"])


def merge_ledgers(client_ledger: dict, record: RecordLevel) -> dict:
    """The client-level ledger plus the record-level guarantee (level 'record' or 'client+record')."""
    rec = record.ledger()
    out = dict(client_ledger)
    if client_ledger.get("level") == "none":
        out.pop("note", None)
        out.update(
            level="record",
            mechanism=rec["mechanism"],
            epsilon=rec["epsilon_max"],
            delta=rec["delta"],
            trust_model=rec["trust_model"],
            neighbouring_relation=rec["neighbouring_relation"],
        )
    else:
        out["level"] = "client+record"
        out["record_epsilon_max"] = rec["epsilon_max"]
    out["record"] = rec
    return out


__all__ = [
    "RecordAccountants",
    "RecordDP",
    "RecordLevel",
    "PUBLIC_SIZE_RULE",
    "calibrate_record_sigmas",
    "merge_ledgers",
    "DECLARED_RULE",
    "public_size",
    "record_sample_rate",
    "record_steps",
]
