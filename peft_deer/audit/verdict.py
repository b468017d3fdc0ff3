"""The verdict: the privacy profile the ledger claims, and whether the audit's error rates contradict it.

A ledger that accounts a mechanism as Gaussian releases with multiplier sigma (sample rate q, `steps`
compositions) claims (epsilon(delta'), delta')-DP at **every** delta', not only at the run's delta: its
accountant computes the whole curve. A test with false-positive and false-negative rates at most
(alpha, beta) -- the audit's Clopper-Pearson upper ends, one 95 % event -- proves
epsilon >= log((1 - delta' - beta) / alpha) at every delta' simultaneously. So the audit compares the
measured bound with the claimed epsilon on a grid of deltas from the run's delta to 0.5, and reports
`detected` when it exceeds the claim at any of them; a moderate delta' (where few thousand trials measure
the rates well) is where halved noise shows, while a bound at delta = 1e-5 would need ~ e^epsilon / 1e-5
trials. The claim compared with is the **tight** epsilon: exact for q = 1 (a composition of Gaussian
mechanisms is one Gaussian mechanism; analytic Gaussian, Balle & Wang 2018), else opacus's PRV
accountant's upper estimate (eps_error 0.01); the RDP ledger's (looser, larger) epsilon is reported beside it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant

from .bounds import (
    _SELECTION_LEVEL,
    _rates,
    clopper_pearson_upper,
    epsilon_from_rates,
    epsilon_lower_bound,
    gaussian_epsilon,
)

History = list[tuple[float, float, int]]  # opacus style: (noise multiplier, sample rate, steps)

GRID_POINTS = 16  # deltas of the profile test, log-spaced from the run's delta to 0.5
PRV_EPS_ERROR = 0.01


def delta_grid(delta: float) -> np.ndarray:
    """The run's delta first, then log-spaced deltas up to 0.5 (only delta itself when delta >= 0.5)."""
    if delta >= 0.5:
        return np.array([delta])
    return np.unique(np.geomspace(delta, 0.5, GRID_POINTS))


def tight_method(history: History) -> str:
    if all(q == 1 for _, q, _ in history):
        return "exact (q = 1: one Gaussian mechanism; analytic Gaussian, Balle & Wang 2018)"
    return f"opacus PRV (upper estimate, eps_error {PRV_EPS_ERROR})"


def merged(history: History) -> History:
    """Consecutive entries with the same (sigma, q) as one (PRV composes each entry separately)."""
    out: History = []
    for s, q, n in history:
        if out and out[-1][:2] == (s, q):
            out[-1] = (s, q, out[-1][2] + n)
        else:
            out.append((float(s), float(q), int(n)))
    return out


def tight_epsilons(history: History, deltas: np.ndarray) -> np.ndarray:
    """The tight epsilon of `history` at each delta: exact for q = 1, else opacus PRV's upper estimate."""
    history = merged(history)
    if all(q == 1 for _, q, _ in history):
        sigma = 1 / math.sqrt(sum(steps / s**2 for s, _, steps in history))
        return np.array([gaussian_epsilon(sigma, float(d)) for d in deltas])
    accountant = PRVAccountant()
    accountant.history = list(history)
    delta_error = float(np.min(deltas)) / 1000  # one composition, accurate enough for every delta
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        dprv = accountant._get_dprv(eps_error=PRV_EPS_ERROR, delta_error=delta_error)
        eps = [dprv.compute_epsilon(float(d), delta_error, PRV_EPS_ERROR)[2] for d in deltas]
    return np.maximum(0.0, np.asarray(eps, dtype=float))


def rdp_epsilon(history: History, delta: float) -> float:
    """opacus RDP epsilon of `history` at `delta` (what the project's ledgers report as 'epsilon')."""
    accountant = RDPAccountant()
    accountant.history = list(history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(accountant.get_epsilon(delta=delta))


@dataclass(frozen=True)
class Verdict:
    """The profile test's result at its most decisive delta (largest epsilon_lower - epsilon_tight)."""

    detected: bool
    delta: float
    epsilon_lower: float
    epsilon_tight: float
    threshold: float
    fpr_upper: float
    fnr_upper: float


def profile_test(stats: np.ndarray, is_in: np.ndarray, deltas: np.ndarray, claimed: np.ndarray) -> Verdict:
    """Does the measured bound exceed the `claimed` epsilons at any of `deltas`? (module doc)

    As in `epsilon_lower_bound`, the threshold is chosen on the first half of the trials (largest margin
    over the claim, rates at the stricter selection level) and the rates are measured on the second half.
    """
    stats, is_in = np.asarray(stats, dtype=float), np.asarray(is_in, dtype=bool)
    deltas, claimed = np.asarray(deltas, dtype=float), np.asarray(claimed, dtype=float)
    half = len(stats) // 2
    out1, in1 = stats[:half][~is_in[:half]], stats[:half][is_in[:half]]
    out2, in2 = stats[half:][~is_in[half:]], stats[half:][is_in[half:]]
    if min(len(out1), len(in1), len(out2), len(in2)) == 0:
        raise ValueError("each half of the trials needs both worlds; use more --trials")
    candidates = np.unique(np.concatenate([out1, in1]))
    fp, fn = _rates(out1, in1, candidates)
    alpha = clopper_pearson_upper(fp, len(out1), _SELECTION_LEVEL)[:, None]
    beta = clopper_pearson_upper(fn, len(in1), _SELECTION_LEVEL)[:, None]
    margin = (epsilon_from_rates(alpha, beta, deltas[None, :]) - claimed[None, :]).max(axis=1)
    threshold = float(candidates[int(np.argmax(margin))])
    fp2, fn2 = _rates(out2, in2, np.array([threshold]))
    fpr_up = float(clopper_pearson_upper(fp2[0], len(out2)))
    fnr_up = float(clopper_pearson_upper(fn2[0], len(in2)))
    lower = epsilon_from_rates(np.full(len(deltas), fpr_up), np.full(len(deltas), fnr_up), deltas)
    best = int(np.argmax(lower - claimed))
    return Verdict(
        detected=bool(lower[best] > claimed[best]),
        delta=float(deltas[best]),
        epsilon_lower=float(lower[best]),
        epsilon_tight=float(claimed[best]),
        threshold=threshold,
        fpr_upper=fpr_up,
        fnr_upper=fnr_up,
    )


def judge(stats: np.ndarray, is_in: np.ndarray, delta: float, claimed: History, plant_noise_factor: float) -> dict:
    """The result fields both levels share: the bound at `delta`, the claimed epsilons and the verdict."""
    bound = epsilon_lower_bound(stats, is_in, delta)
    deltas = delta_grid(delta)
    tight = tight_epsilons(claimed, deltas)
    verdict = profile_test(stats, is_in, deltas, tight)
    return {
        "epsilon_lower": bound.epsilon_lower,
        "epsilon_ledger": rdp_epsilon(claimed, delta),
        "epsilon_tight": float(tight[int(np.argmin(np.abs(deltas - delta)))]),
        "tight_method": tight_method(claimed),
        "plant_noise_factor": plant_noise_factor,
        "detected": verdict.detected,
        "detected_at_delta": verdict.delta,
        "epsilon_lower_at_delta": verdict.epsilon_lower,
        "epsilon_tight_at_delta": verdict.epsilon_tight,
        "threshold": bound.threshold,
        "fpr": bound.fpr,
        "fnr": bound.fnr,
        "fpr_upper": bound.fpr_upper,
        "fnr_upper": bound.fnr_upper,
    }


def check_plant(plant_noise_factor: float) -> None:
    if not (plant_noise_factor > 0 and math.isfinite(plant_noise_factor)):
        raise ValueError(f"--plant-noise-factor {plant_noise_factor} must be finite and > 0")
