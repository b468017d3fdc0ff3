"""The server side of a simulated or deployed run: sampling, budget stop, aggregation, accounting.

`FederatedServer` holds only what must survive a restart (global adapter state, accountant
history, release log); `state_dict()` / `load_state_dict()` round-trip it exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .accountant import PrivacyBudgetExceeded, ReleaseAccountant, check_accountant, check_delta
from .adapter_state import AdapterLayout, AdapterState
from .aggregate import ClientDP, PhaseRelease, aggregate_phase, privatized_sum
from .collusion import accounting_sample_rate, adversary_multipliers, share_divisor
from .ledger import privacy_ledger
from .local_training import ClientUpdate
from .mechanism import build_whiteners, reference_effective_multiplier
from .randomness import DPRandomness
from .record_dp import RecordLevel
from .schedule import MethodSpec, NoiseKind, Phase, method_spec
from .server_optimizer import ServerOptimizer


@dataclass(kw_only=True)
class FederatedServer:
    """Global adapter and privacy state of one federated run of `method` over `num_clients` clients.

    `clients_per_phase` clients take part in each phase (each release): a fixed-size sample without
    DP, Poisson sampling at rate q = clients_per_phase / num_clients with DP (the sampling the
    accountant's amplification assumes), everyone when q = 1. Sampling and noise draw from
    `randomness` (a fresh OS secret unless given; see `randomness.py`). `optimizer` applies each
    release to the global adapter (default: add it, FedAvg); it only post-processes the release.
    `budget_accountant` ('rdp' or 'prv') is the accountant of the budget stop and of the ledger's `epsilon`:
    the one sigma was calibrated with (`calibrate_noise_multiplier`). `collusion_threshold` t: with
    distributed noise the ledger also states epsilon against t colluding sites (`collusion.py`), and
    `share_divisor(k)` gives the divisor that keeps sigma against them.
    """

    method: str
    layout: AdapterLayout
    global_state: AdapterState
    num_clients: int
    clients_per_phase: int
    dp: ClientDP | None = None
    randomness: DPRandomness = field(default_factory=DPRandomness.secret)
    record: RecordLevel | None = None  # record-level DP-SGD inside clients (DESIGN 2.6)
    optimizer: ServerOptimizer = field(default_factory=ServerOptimizer)
    budget_accountant: str = "prv"  # the settings' defaults (--accountant prv, --collusion-threshold 1)
    collusion_threshold: int = 1

    def __post_init__(self) -> None:
        self.spec: MethodSpec = method_spec(self.method)
        check_accountant(self.budget_accountant)
        if self.collusion_threshold < 0:
            raise ValueError(f"--collusion-threshold {self.collusion_threshold} must be >= 0")
        if self.num_clients < 1:
            raise ValueError(f"--num-clients {self.num_clients} must be >= 1")
        if not 1 <= self.clients_per_phase <= self.num_clients:
            raise ValueError(
                f"--clients-per-round {self.clients_per_phase} must be in [1, num_clients={self.num_clients}]"
            )
        if self.dp is not None:
            check_delta(self.dp.delta, self.num_clients)
        self.accountant = ReleaseAccountant()
        self.nominal_accountant = ReleaseAccountant()
        self.adversary_accountants = {who: ReleaseAccountant() for who in _ADVERSARIES}
        self.adversary_exposed = {who: False for who in _ADVERSARIES}  # knew every noise share of some release
        self.releases: list[dict] = []
        self.stopped_by_budget = False
        # Another mechanism's accountant for the budget stop: phase -> (epsilon if it were released, its name);
        # set by a transport whose release is not the Gaussian sum (SecAgg+ with Skellam shares). Not state.
        self.budget_probe: Callable[[Phase], tuple[float, str]] | None = None
        # The same for the head refit's client-level release: (vector length, noise multiplier, share divisor) ->
        # (epsilon if it were released, its name). Not state.
        self.refit_budget_probe: Callable[[int, float, int | None], tuple[float, str]] | None = None
        self.refit: dict | None = None  # the head refit's ledger entry, once made (`peft_deer.run.refit`)

    @property
    def sample_rate(self) -> float:
        return self.clients_per_phase / self.num_clients

    @property
    def accounting_rate(self) -> float:
        """q of every accountant step: `sample_rate`, or 1.0 (no amplification) with Poisson client sampling,
        distributed noise and t >= 1 (`collusion.accounting_sample_rate`: the total noise reveals k)."""
        distributed = self.dp is not None and self.dp.noise_placement == "distributed"
        return accounting_sample_rate(self.sample_rate, distributed, self.collusion_threshold)

    def participants(self, phase: Phase) -> list[int]:
        """Client ids taking part in `phase` (sorted), drawn from the run's randomness for (round, phase)."""
        if self.clients_per_phase == self.num_clients:
            return list(range(self.num_clients))
        u = self.randomness.stream(*phase.step, "sample").uniform(self.num_clients)
        if self.dp is not None:  # Poisson sampling at rate q (amplification by subsampling)
            return [int(i) for i in torch.nonzero(u < self.sample_rate).flatten()]
        return sorted(int(i) for i in torch.argsort(u)[: self.clients_per_phase])  # uniform without replacement

    def trained_keys(self, phase: Phase) -> list[str]:
        return self.layout.trained_keys(phase.factors)

    def effective_noise_multiplier(self, phase: Phase) -> float | None:
        """sigma the release of `phase` really has (smaller than nominal for `deer-reference`)."""
        if self.dp is None:
            return None
        if self.spec.noise != NoiseKind.REFERENCE:
            return self.dp.noise_multiplier
        keys = self.trained_keys(phase)
        whiteners = build_whiteners(self.layout, self.global_state, keys, NoiseKind.REFERENCE, self.dp.regulator_ridge)
        return reference_effective_multiplier(self.dp.noise_multiplier, whiteners)

    def check_budget(self, phase: Phase) -> None:
        """Raise `PrivacyBudgetExceeded` if releasing `phase` would pass the target epsilon (`budget_accountant`,
        or `budget_probe` where a transport set one)."""
        if self.dp is None or self.dp.target_epsilon is None:
            return
        if self.budget_probe is not None:
            eps, name = self.budget_probe(phase)
        else:
            sigma = self.effective_noise_multiplier(phase)
            eps = self.accountant.epsilon_after(sigma, self.accounting_rate, self.dp.delta, self.budget_accountant)
            name = self.budget_accountant.upper()
        if eps > self.dp.target_epsilon:
            self.stopped_by_budget = True
            raise PrivacyBudgetExceeded(
                f"round {phase.round} phase {phase.index}: releasing would reach epsilon={eps:.3f} ({name}) > "
                f"target {self.dp.target_epsilon}; stopped before it"
            )

    def finish_phase(
        self, phase: Phase, updates: list[ClientUpdate], privatized_shares: int | None = None
    ) -> PhaseRelease:
        """Validate and aggregate `updates`, step the global adapter with the release, account the release.

        On any invalid update nothing is aggregated, applied or accounted. `privatized_shares` k: the
        updates were clipped and noised by their clients, at least k of them (the noise floor), each share of
        variance sigma^2 C^2 / `share_divisor(k)` (see `aggregate_phase`). With distributed noise and no k,
        the simulation adds the shares itself, k = len(updates).
        """
        shares = None
        if self.dp is not None and self.dp.noise_placement == "distributed":  # >= k shares of variance sigma^2 C^2 / d
            k = privatized_shares if privatized_shares is not None else len(updates)
            shares = (k, self.share_divisor(k))
        release = aggregate_phase(
            updates,
            self.layout,
            self.global_state,
            self.trained_keys(phase),
            self.spec.noise,
            self.dp,
            denominator=self.sample_rate * self.num_clients,
            randomness=self.randomness,
            phase_step=phase.step,
            privatized_shares=privatized_shares,
            share_divisor=None if shares is None else shares[1],
        )
        if self.record is not None:
            self.record.account(updates)
        return self._apply(phase, release, shares=shares)

    def share_divisor(self, noise_floor: int) -> int:
        """d = k - t: distributed noise shares of variance sigma^2 C^2 / d keep sigma against t =
        `collusion_threshold` colluding sites (`collusion.py`); every site and simulated client sizes its share
        so. d = 1 (each share the full sigma^2 C^2) when k <= t: the t colluders may then know every share of
        the release, and the ledger states no guarantee against them."""
        if noise_floor <= self.collusion_threshold:
            return 1
        return share_divisor(noise_floor, self.collusion_threshold)

    def finish_summed_phase(
        self,
        phase: Phase,
        total: AdapterState,
        participants: list[int],
        noise_shares: int,
        facts: dict | None = None,
        noise_floor: int | None = None,
    ) -> PhaseRelease:
        """Release `total`, the sum of the privatized updates of `participants` (secure aggregation: no
        individual update reaches the server), each carrying 1/`noise_shares` of the noise variance; step the
        global adapter and account it as `finish_phase` does. `facts` (e.g. the quantization range) go into
        the release's record. `noise_floor` k (default `noise_shares`): the fewest shares any released sum
        holds; with `noise_shares` = k - t (`share_divisor`) t colluding sites still face sigma. Under
        record-level DP `self.record` must take the sites' own reports
        (`account_clients`). ValueError, nothing applied or accounted, if the sum cannot be released."""
        if self.dp is None or self.dp.noise_placement != "distributed":
            raise ValueError("a summed release needs client-level DP with the distributed noise placement")
        floor = noise_shares if noise_floor is None else noise_floor
        if len(participants) < floor:
            raise ValueError(f"{len(participants)} privatized updates are fewer than the noise floor k={floor}")
        release = privatized_sum(
            total,
            participants,
            self.layout,
            self.global_state,
            self.trained_keys(phase),
            self.spec.noise,
            self.dp,
            denominator=self.sample_rate * self.num_clients,
            noise_shares=noise_shares,
        )
        if self.record is not None:
            self.record.account_clients(sorted(participants))
        return self._apply(phase, release, facts, shares=(floor, noise_shares))

    def _apply(
        self, phase: Phase, release: PhaseRelease, facts: dict | None = None, shares: tuple[int, int] | None = None
    ) -> PhaseRelease:
        """Step the global adapter with `release`, account it and log it in `releases`. `shares` (k, d): the
        release is a sum of >= k distributed noise shares of variance sigma^2 C^2 / d each."""
        self.global_state = self.optimizer.step(self.global_state, release.delta, self.trained_keys(phase))
        record = {
            "round": phase.round,
            "phase": phase.index,
            "factors": "".join(phase.factors),
            "participants": len(release.participants),
            **(facts or {}),
        }
        if self.dp is not None:
            self.accountant.step(release.effective_noise_multiplier, self.accounting_rate)
            self.nominal_accountant.step(self.dp.noise_multiplier, self.accounting_rate)
            record["effective_noise_multiplier"] = release.effective_noise_multiplier
            if shares is not None:
                record["noise_shares"], record["share_divisor"] = shares
                self._account_adversaries(release.effective_noise_multiplier, *shares)
        self.releases.append(record)
        return release

    def _account_adversaries(self, sigma: float, noise_floor: int, divisor: int) -> None:
        t = self.collusion_threshold
        for who, multiplier in adversary_multipliers(sigma, noise_floor, divisor, t).items():
            if multiplier > 0:
                self.adversary_accountants[who].step(multiplier, self.accounting_rate)
            else:
                self.adversary_exposed[who] = True

    def adversary_epsilons(self) -> dict[str, dict]:
        """epsilon (RDP and PRV, at the run's delta) against each adversary of a distributed-noise run:
        outsiders (public; the server under secure aggregation), one participating site, t colluding sites
        (inf where they knew every share of a release); {} without distributed noise (`collusion.py`)."""
        if self.dp is None or self.dp.noise_placement != "distributed":
            return {}
        out = {}
        for who, label in _ADVERSARIES.items():
            if self.adversary_exposed[who]:
                out[label] = {"rdp": float("inf"), "prv": float("inf")}
                continue
            acc = self.adversary_accountants[who]
            out[label] = {"rdp": acc.epsilon(self.dp.delta, "rdp"), "prv": _prv_or_none(acc, self.dp.delta)}
        out[_ADVERSARIES["colluders"]]["t"] = self.collusion_threshold
        return out

    def epsilon(self) -> dict[str, float | None]:
        """epsilon so far at the run's delta: RDP and PRV (the budget uses `budget_accountant`); None without DP."""
        if self.dp is None:
            return {"rdp": None, "prv": None}
        return {
            "rdp": self.accountant.epsilon(self.dp.delta, "rdp"),
            "prv": _prv_or_none(self.accountant, self.dp.delta),
        }

    def ledger(self) -> dict:
        """The privacy ledger (`privacy.json`): what was released, under which mechanism, and its epsilon
        (worded in `ledger.py`)."""
        return privacy_ledger(self)

    def state_dict(self) -> dict:
        """Everything needed to continue the run exactly (tensors stay tensors)."""
        return {
            "global_state": {k: v.clone() for k, v in self.global_state.items()},
            "accountant": self.accountant.state_dict(),
            "nominal_accountant": self.nominal_accountant.state_dict(),
            "adversary_accountants": {w: a.state_dict() for w, a in self.adversary_accountants.items()},
            "adversary_exposed": dict(self.adversary_exposed),
            "releases": list(self.releases),
            "stopped_by_budget": self.stopped_by_budget,
            "record": None if self.record is None else self.record.state_dict(),
            "randomness": self.randomness.state_dict(),  # the run's DP secret: the checkpoint only
            "optimizer": self.optimizer.state_dict(),
            "refit": self.refit,
        }

    def load_state_dict(self, state: dict) -> None:
        self.global_state = {k: v.clone() for k, v in state["global_state"].items()}
        self.accountant.load_state_dict(state["accountant"])
        self.nominal_accountant.load_state_dict(state["nominal_accountant"])
        for who, acc_state in state.get("adversary_accountants", {}).items():
            self.adversary_accountants[who].load_state_dict(acc_state)
        self.adversary_exposed.update(state.get("adversary_exposed", {}))
        self.releases = list(state["releases"])
        self.stopped_by_budget = bool(state["stopped_by_budget"])
        if "randomness" not in state:
            raise ValueError("the checkpoint holds no DP randomness (written by an older version); start again")
        self.randomness = DPRandomness.from_state_dict(state["randomness"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.refit = state.get("refit")
        if self.record is not None:
            self.record.load_state_dict(state["record"])


_ADVERSARIES = {"outsiders": "outsiders", "one_site": "one_participating_site", "colluders": "t_colluding_sites"}


def _prv_or_none(accountant: ReleaseAccountant, delta: float) -> float | None:
    try:
        return accountant.epsilon(delta, "prv")
    except (ValueError, RuntimeError, OverflowError):
        return None


__all__ = ["FederatedServer", "PrivacyBudgetExceeded"]
