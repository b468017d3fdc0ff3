"""Privacy accounting with opacus (RDP and PRV): one `step` per release, calibration, delta checks."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from functools import lru_cache

from opacus.accountants import PRVAccountant, RDPAccountant
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
    """Smallest sigma (to 0.01 in epsilon) whose `releases` releases at rate q stay within target_epsilon.

    `accountant` 'rdp' (opacus RDP) or 'prv' (opacus PRV, tight: bisection on its *upper* bound, which
    includes the PRV's eps_error, so the returned sigma is conservative). Results are cached (PRV takes
    about a second per call). The budget stop must then use the same accountant (`ReleaseAccountant`).
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
        return get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=releases,
            accountant=accountant,
            epsilon_tolerance=0.01,
        )


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
