"""Privacy accounting with opacus (RDP and PRV): one `step` per release, calibration, delta checks."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis.prv import (
    Domain,
    PoissonSubsampledGaussianPRV,
    TruncatedPrivacyRandomVariable,
    compose_heterogeneous,
    discretize,
)
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from opacus.accountants.utils import get_noise_multiplier


class PrivacyBudgetExceeded(RuntimeError):
    """The next release would push epsilon past the run's target."""


class WeakDeltaWarning(UserWarning):
    """delta is allowed but large enough to make the guarantee weak."""


def check_delta(delta: float, num_clients: int) -> None:
    """Client-level DP needs delta < 1/num_clients (else one client may be revealed outright).

    Warns (`WeakDeltaWarning`) above 1/(10 num_clients): (epsilon, delta)-DP allows a mechanism that
    publishes a randomly chosen client's whole data with probability delta per client, so with delta
    near 1/N one of the N clients is exposed with probability near N delta.
    """
    if not (math.isfinite(delta) and 0 < delta < 1.0 / num_clients):
        raise ValueError(
            f"--delta {delta:g} must be in (0, 1/num_clients) (= {1.0 / num_clients:.3g} for {num_clients} "
            "clients); use e.g. 1e-5"
        )
    if delta > 0.1 / num_clients:
        warnings.warn(
            f"--delta {delta:g} is above 1/(10 num_clients) = {0.1 / num_clients:.3g}: (epsilon, delta)-DP then "
            f"still allows exposing one of the {num_clients} clients outright with probability up to "
            f"{num_clients * delta:.2g}; use e.g. 1e-5",
            WeakDeltaWarning,
            stacklevel=2,
        )


ACCOUNTANTS = ("rdp", "prv")  # opacus RDP (Renyi, loose) and PRV (tight; its upper bound, eps_error included)


def check_accountant(kind: str) -> None:
    """ValueError unless `kind` names an accountant this package uses."""
    if kind not in ACCOUNTANTS:
        raise ValueError(f"accountant {kind!r} must be one of {', '.join(ACCOUNTANTS)}")


def calibrate_noise_multiplier(
    target_epsilon: float, delta: float, sample_rate: float, releases: int, accountant: str = "rdp"
) -> float:
    """Smallest sigma whose `releases` releases at rate q stay within target_epsilon.

    `accountant` 'rdp' (opacus RDP; to 0.01 in epsilon) or 'prv' (opacus PRV, tight: its *upper* bound, which
    includes the PRV's eps_error, so the returned sigma is conservative; within a relative 1e-3 of the smallest
    such sigma, `_calibrate_prv`). Results are cached on (epsilon, delta, q, releases, accountant). The budget
    stop must then use the same accountant (`ReleaseAccountant`).
    """
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"--epsilon {target_epsilon} must be finite and > 0")
    if releases < 1:
        raise ValueError(f"releases={releases} must be >= 1")
    check_accountant(accountant)
    return _calibrate(float(target_epsilon), float(delta), float(sample_rate), int(releases), accountant)


@lru_cache(maxsize=256)
def _calibrate(target_epsilon: float, delta: float, sample_rate: float, releases: int, accountant: str) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # opacus PRV logs divide-by-zero at q = 1
        if accountant == "prv":
            return _calibrate_prv(target_epsilon, delta, sample_rate, releases)
        return get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=releases,
            accountant=accountant,
            epsilon_tolerance=0.01,
        )


SIGMA_TOLERANCE = 1e-3  # PRV calibration: relative width of the final bracket [sigma_low, sigma_high]
RDP_ORDERS = tuple(range(2, 64))  # integer orders, a subset of opacus's default RDP orders (closed form, fast)
MAX_SIGMA = 1e6


def _rdp_integer_epsilon(sigma: float, sample_rate: float, steps: int, delta: float) -> float:
    """RDP epsilon at `RDP_ORDERS` only: at least opacus's RDP epsilon (fewer orders), computed in closed form."""
    rdp = compute_rdp(q=sample_rate, noise_multiplier=sigma, steps=steps, orders=list(RDP_ORDERS))
    return float(get_privacy_spent(orders=list(RDP_ORDERS), rdp=rdp, delta=delta)[0])


def _prv_domain(sigma: float, sample_rate: float, steps: int, eps_error: float, delta_error: float) -> Domain:
    """opacus PRV's discretisation domain (Gopi et al. 2021, remark 5.6, as `PRVAccountant._get_domain`) with its
    half-width L from RDP at `RDP_ORDERS`: L is an RDP epsilon, so this L is at least opacus's, and L falls with
    sigma, so the domain of `sigma` is safe for every larger sigma (same mesh: it depends on the steps only)."""
    tail = max(
        _rdp_integer_epsilon(sigma, sample_rate, steps, delta_error / 4),
        _rdp_integer_epsilon(sigma, sample_rate, 1, delta_error / (8 * steps)),
    )
    half = max(tail, eps_error) + 3
    return Domain.create_aligned(-half, half, eps_error / np.sqrt(steps * np.log(12 / delta_error) / 2))


def _prv_epsilon_on(domain: Domain, sigma: float, sample_rate: float, steps: int, delta: float) -> float:
    """opacus PRV's epsilon upper bound (eps_error 0.01, delta_error delta/1000, its defaults) on a given domain."""
    eps_error, delta_error = 0.01, delta / 1000
    prv = TruncatedPrivacyRandomVariable(PoissonSubsampledGaussianPRV(sample_rate, sigma), domain.t_min, domain.t_max)
    dprv = compose_heterogeneous(dprvs=[discretize(prv, domain)], num_self_compositions=[steps])
    return float(dprv.compute_epsilon(delta, delta_error, eps_error)[2])


def _prv_epsilon(sigma: float, sample_rate: float, steps: int, delta: float) -> float:
    return _epsilon_of(((float(sigma), float(sample_rate), int(steps)),), float(delta), "prv")


def _rdp_sigma(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The smallest sigma (relative `SIGMA_TOLERANCE`) within target under RDP at `RDP_ORDERS` (bisection)."""

    def ok(sigma: float) -> bool:
        return _rdp_integer_epsilon(sigma, sample_rate, steps, delta) <= target_epsilon

    low, high = 0.0, 1.0
    while not ok(high):
        low, high = high, 2 * high
        if high > MAX_SIGMA:
            raise ValueError("The privacy budget is too low.")
    while high - low > SIGMA_TOLERANCE * high:
        mid = (low + high) / 2
        low, high = (low, mid) if ok(mid) else (mid, high)
    return high


def _calibrate_prv(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """Smallest sigma (relative tolerance `SIGMA_TOLERANCE`) whose opacus PRV epsilon (upper bound) is <= target.

    Bracket: the RDP sigma (`_rdp_sigma`, fast) from above (PRV <= RDP; checked, and moved up if not), 0.85 of it
    from below (moved down until above target). The PRV's discretisation domain is built once for the lower end
    (safe for every sigma above it, `_prv_domain`) and reused while the bracket shrinks: false position, probed
    just above and below (to close the bracket to the tolerance in a few evaluations), bisection as a fallback.
    The result is checked with opacus's own `PRVAccountant` (the ledger's and the budget stop's) and raised until
    that one is within target too.
    """
    eps_error, delta_error = 0.01, delta / 1000
    high = _rdp_sigma(target_epsilon, delta, sample_rate, steps)
    low = 0.85 * high
    domain = _prv_domain(low, sample_rate, steps, eps_error, delta_error)

    def excess(sigma: float) -> float:
        return _prv_epsilon_on(domain, sigma, sample_rate, steps, delta) - target_epsilon

    while (f_low := excess(low)) <= 0:  # PRV far below RDP: a lower sigma, and its (wider) domain
        high, low = low, 0.85 * low
        domain = _prv_domain(low, sample_rate, steps, eps_error, delta_error)
    while (f_high := excess(high)) > 0:  # RDP below PRV's upper bound (e.g. very few steps): move up
        low, f_low, high = high, f_high, 1.25 * high
    for _ in range(60):
        if high - low <= SIGMA_TOLERANCE * high:
            break
        guess = high - f_high * (high - low) / (f_high - f_low)  # false position
        for probe in (guess * (1 + SIGMA_TOLERANCE / 2), guess * (1 - SIGMA_TOLERANCE / 2)):
            if not low < probe < high or high - low <= SIGMA_TOLERANCE * high:
                probe = (low + high) / 2
            f = excess(probe)
            if f <= 0:
                high, f_high = probe, f
            else:
                low, f_low = probe, f
    while _prv_epsilon(high, sample_rate, steps, delta) > target_epsilon:  # opacus's own domain disagrees
        high *= 1 + SIGMA_TOLERANCE / 4
    return high


def _epsilon(history: list[tuple[float, float, int]], delta: float, kind: str) -> float:
    check_accountant(kind)
    if not history:
        return 0.0
    return _epsilon_of(tuple((float(s), float(q), int(n)) for s, q, n in history), float(delta), kind)


@lru_cache(maxsize=1024)  # PRV takes seconds for a long history; the budget stop asks again each release
def _epsilon_of(history: tuple[tuple[float, float, int], ...], delta: float, kind: str) -> float:
    accountant = RDPAccountant() if kind == "rdp" else PRVAccountant()
    accountant.history = list(history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # opacus PRV logs divide-by-zero at q = 1
        return float(accountant.get_epsilon(delta=delta))


@dataclass
class ReleaseAccountant:
    """Releases seen so far as opacus history [(sigma, q, count)]; epsilon on demand.

    State is the history list, so `state_dict()` is plain JSON and survives a restart.
    """

    history: list[tuple[float, float, int]] = field(default_factory=list)

    @property
    def releases(self) -> int:
        return sum(n for _, _, n in self.history)

    def step(self, noise_multiplier: float, sample_rate: float) -> None:
        if not noise_multiplier > 0 or not math.isfinite(noise_multiplier):
            raise ValueError(f"noise multiplier {noise_multiplier} must be finite and > 0")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample rate {sample_rate} must be in (0, 1]")
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            sigma, q, n = self.history[-1]
            self.history[-1] = (sigma, q, n + 1)
        else:
            self.history.append((noise_multiplier, sample_rate, 1))

    def epsilon(self, delta: float, kind: str = "rdp") -> float:
        """epsilon of all releases so far at `delta`; kind 'rdp' (opacus RDP) or 'prv' (opacus PRV, upper bound)."""
        return _epsilon(self.history, delta, kind)

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, delta: float, kind: str = "rdp") -> float:
        """epsilon (accountant `kind`) if one more release with (sigma, q) were made (for the budget stop)."""
        probe = ReleaseAccountant(list(self.history))
        probe.step(noise_multiplier, sample_rate)
        return probe.epsilon(delta, kind)

    def state_dict(self) -> dict:
        return {"history": [list(h) for h in self.history]}

    def load_state_dict(self, state: dict) -> None:
        self.history = [(float(s), float(q), int(n)) for s, q, n in state["history"]]
