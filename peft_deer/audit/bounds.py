"""Audit results and statistics: Clopper-Pearson rates, the epsilon lower bound, the exact Gaussian epsilon."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.stats import beta, norm

CONFIDENCE = 0.95  # of epsilon_lower
_RATE_LEVEL = 1 - (1 - CONFIDENCE) / 2  # each of FPR, FNR: one-sided 97.5 % (two-sided 95 % interval)
_SELECTION_LEVEL = 0.999  # threshold selection on the first half: a stricter bound, robust to the tails


@dataclass
class AuditResult:
    """One audit: the lower bound, what the ledger claims, the verdict, and how they were obtained.

    epsilon_ledger is the RDP epsilon the ledger claims (JSON also as `epsilon_claimed_rdp`), epsilon_tight
    the tight epsilon of the same claimed mechanism (`tight_method`), both at `delta` and with the nominal
    multiplier even when the mechanism ran with noise x `plant_noise_factor`. `detected` is the profile
    test of `verdict` (at `detected_at_delta`, where it is most decisive), based on the tight epsilon.
    """

    level: str
    method: str
    noise_multiplier: float
    clip_norm: float
    delta: float
    trials: int
    epsilon_lower: float
    epsilon_ledger: float
    epsilon_nominal: float
    epsilon_tight: float
    tight_method: str
    plant_noise_factor: float
    detected: bool
    detected_at_delta: float
    epsilon_lower_at_delta: float  # the bound and the tight claim at detected_at_delta
    epsilon_tight_at_delta: float
    threshold: float
    fpr: float  # observed on the second half of the trials
    fnr: float
    fpr_upper: float  # Clopper-Pearson upper ends used in the bound
    fnr_upper: float
    reproducible_noise: bool
    seconds: float
    seconds_per_trial: float
    confidence: float = CONFIDENCE
    details: dict = field(default_factory=dict)  # level-specific settings (sample rate, releases, steps, ...)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(out.pop("details"))
        out["epsilon_claimed_rdp"] = self.epsilon_ledger
        return out


def clopper_pearson_upper(failures: np.ndarray | int, n: int, level: float = _RATE_LEVEL) -> np.ndarray:
    """One-sided upper confidence bound at `level` on a rate with `failures` out of `n` (Clopper-Pearson)."""
    k = np.asarray(failures, dtype=float)
    upper = beta.ppf(level, k + 1, np.maximum(n - k, 1e-12))
    return np.where(k >= n, 1.0, upper)


def epsilon_from_rates(fpr_up: np.ndarray, fnr_up: np.ndarray, delta: float) -> np.ndarray:
    """max(0, log((1 - delta - FNR)/FPR), log((1 - delta - FPR)/FNR)): the epsilon a test with these rates proves."""
    fpr_up, fnr_up = np.asarray(fpr_up, dtype=float), np.asarray(fnr_up, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.log(np.maximum(1 - delta - fnr_up, 0.0) / fpr_up)
        b = np.log(np.maximum(1 - delta - fpr_up, 0.0) / fnr_up)
    return np.maximum(0.0, np.nan_to_num(np.maximum(a, b), nan=0.0, neginf=0.0, posinf=0.0))


def _rates(out_stats: np.ndarray, in_stats: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False positives (out >= t) and false negatives (in < t) for each threshold t (the test says "in" at >= t)."""
    fp = len(out_stats) - np.searchsorted(np.sort(out_stats), thresholds, side="left")
    fn = np.searchsorted(np.sort(in_stats), thresholds, side="left")
    return fp, fn


@dataclass(frozen=True)
class Bound:
    epsilon_lower: float
    threshold: float
    fpr: float
    fnr: float
    fpr_upper: float
    fnr_upper: float


def epsilon_lower_bound(stats: np.ndarray, is_in: np.ndarray, delta: float) -> Bound:
    """Select a threshold on the first half of the trials, bound epsilon on the second half (module doc, 4)."""
    stats, is_in = np.asarray(stats, dtype=float), np.asarray(is_in, dtype=bool)
    half = len(stats) // 2
    first, second = slice(0, half), slice(half, None)
    out1, in1 = stats[first][~is_in[first]], stats[first][is_in[first]]
    out2, in2 = stats[second][~is_in[second]], stats[second][is_in[second]]
    if min(len(out1), len(in1), len(out2), len(in2)) == 0:
        raise ValueError("each half of the trials needs both worlds; use more --trials")
    candidates = np.unique(np.concatenate([out1, in1]))
    fp, fn = _rates(out1, in1, candidates)
    score = epsilon_from_rates(
        clopper_pearson_upper(fp, len(out1), _SELECTION_LEVEL),
        clopper_pearson_upper(fn, len(in1), _SELECTION_LEVEL),
        delta,
    )
    threshold = float(candidates[int(np.argmax(score))])
    fp2, fn2 = _rates(out2, in2, np.array([threshold]))
    fpr_up = float(clopper_pearson_upper(fp2[0], len(out2)))
    fnr_up = float(clopper_pearson_upper(fn2[0], len(in2)))
    eps = float(epsilon_from_rates(fpr_up, fnr_up, delta))
    return Bound(eps, threshold, float(fp2[0] / len(out2)), float(fn2[0] / len(in2)), fpr_up, fnr_up)


def gaussian_epsilon(sigma: float, delta: float) -> float:
    """Exact epsilon at `delta` of the Gaussian mechanism with noise multiplier `sigma` (Balle & Wang 2018).

    Solves Phi(-eps s + 1/(2s)) - e^eps Phi(-eps s - 1/(2s)) = delta (s = sigma, sensitivity 1) by bisection.
    """

    def delta_at(eps: float) -> float:
        return float(norm.cdf(-eps * sigma + 0.5 / sigma) - math.exp(eps + norm.logcdf(-eps * sigma - 0.5 / sigma)))

    if delta_at(0.0) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while delta_at(hi) > delta:
        lo, hi = hi, 2 * hi
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_at(mid) > delta else (lo, mid)
    return hi
