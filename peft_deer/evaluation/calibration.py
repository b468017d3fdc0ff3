"""Temperature scaling: one scalar T > 0 that turns a classifier's logits into calibrated probabilities.

Calibrated probabilities are softmax(logits / T) (Guo et al., "On calibration of modern neural networks",
ICML 2017). T is fitted on a held-out split by minimising the negative log-likelihood (NLL); T > 1 softens
an over-confident model, T < 1 sharpens an under-confident one. Dividing every logit by the same T > 0
keeps the argmax, and for two classes P(class 1) = sigmoid((z_1 - z_0) / T) is an increasing function of
the logit margin, so binary AUC and the ranking of images are unchanged (one-vs-rest AUC of more classes
can move slightly).

The fit: with beta = 1 / T the mean NLL, mean_i(logsumexp(beta * z_i) - beta * z_i[y_i]), is convex in
beta and its derivative, mean_i(E_{softmax(beta * z_i)}[z_i] - z_i[y_i]), increases with beta. Bisection
on the sign of that derivative (in log beta, a fixed number of steps) finds the minimum deterministically;
T is kept in [T_MIN, T_MAX]. Degenerate validation sets (`TemperatureFit.reason` says which) keep T = 1
or a bound, never a T whose NLL exceeds that of T = 1.

Only the server's own validation split is used: fitting T is post-processing of the DP release and costs
no privacy budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

T_MIN, T_MAX = 1e-2, 1e3  # bounds on the temperature
ECE_BINS = 15  # equal-width bins on [0, 1] of the top-class probability
BISECTION_STEPS = 80  # log-beta interval 13.8 wide -> 1e-23 after 80 halvings: well below float64 spacing
ECE_DEFINITION = (
    f"expected calibration error: {ECE_BINS} equal-width bins on [0, 1] of the top-class probability (max over "
    "classes); sum over bins of (images in bin / N) * |accuracy of the argmax in bin - mean top-class probability|"
)


@dataclass(frozen=True)
class TemperatureFit:
    """A fitted temperature. `reason`: how it was chosen (the minimum, or why T = 1 / a bound was kept).

    nll_before / nll_after: mean validation NLL in nats at T = 1 and at `temperature`.
    """

    temperature: float
    reason: str
    nll_before: float
    nll_after: float


def _as_logits(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    if z.ndim != 2 or z.shape[1] < 2:
        raise ValueError(f"logits of shape {z.shape} are not (N, num_classes >= 2)")
    if len(y) != len(z):
        raise ValueError(f"{len(y)} labels but {len(z)} rows of logits")
    if len(y) and (y.min() < 0 or y.max() >= z.shape[1]):
        raise ValueError(f"labels {sorted(set(y.tolist()))} outside 0..{z.shape[1] - 1}")
    if not np.isfinite(z).all():
        raise ValueError("logits hold NaN or infinity; the model's outputs are broken, not calibratable")
    return z - z.max(axis=1, keepdims=True), y  # the row shift changes neither softmax nor NLL


def check_temperature(value: object) -> float:
    """`value` as a float temperature; ValueError ("temperature V is not a positive finite number") otherwise.

    One check for every place a temperature arrives: a run file, a Flower message, a caller of `softmax_t`."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise ValueError(f"temperature {value!r} is not a positive finite number")
    return float(value)


def softmax_t(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / temperature) over the last axis, float64; `logits` (N, K) -> (N, K)."""
    z = np.asarray(logits, dtype=np.float64) / check_temperature(temperature)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood (nats) of integer `labels` (N,) under softmax(logits / temperature)."""
    z, y = _as_logits(logits, labels)
    if not len(y):
        return math.nan
    zt = z / temperature
    lse = np.log(np.exp(zt - zt.max(axis=1, keepdims=True)).sum(axis=1)) + zt.max(axis=1)
    return float(np.mean(lse - zt[np.arange(len(y)), y]))


def _slope(z: np.ndarray, y: np.ndarray, beta: float) -> float:
    """d NLL / d beta at beta = 1 / T: mean over images of E_softmax(beta z)[z] - z[label]."""
    p = softmax_t(z, 1.0 / beta)
    return float(np.mean((p * z).sum(axis=1) - z[np.arange(len(y)), y]))


def fit_temperature(
    logits: np.ndarray, labels: np.ndarray, t_min: float = T_MIN, t_max: float = T_MAX
) -> TemperatureFit:
    """The T in [t_min, t_max] minimising the mean NLL of softmax(logits / T) on (logits (N, K), labels (N,)).

    Degenerate inputs keep T = 1 with the reason: no images, one class in `labels`, logits equal within every
    row (T changes nothing), or argmax right on every image (the NLL falls towards T -> 0 without a minimum:
    nothing supports sharpening). A minimum beyond a bound stops at that bound (the reason says so).
    """
    if not 0 < t_min <= 1 <= t_max:
        raise ValueError(f"temperature bounds [{t_min}, {t_max}] must be positive and contain 1")
    z, y = _as_logits(logits, labels)

    def keep(temperature: float, reason: str) -> TemperatureFit:
        before = nll(z, y) if len(y) else math.nan
        return TemperatureFit(float(temperature), reason, before, nll(z, y, temperature) if len(y) else math.nan)

    if not len(y):
        return keep(1.0, "no validation images: T = 1")
    if len(np.unique(y)) < 2:
        return keep(1.0, "validation labels hold one class: T = 1 (too little to calibrate)")
    if np.all(z == 0):  # after the row shift: every logit equals its row's maximum
        return keep(1.0, "the logits are equal within every image: T changes nothing, T = 1")
    others = np.where(np.arange(z.shape[1]) == y[:, None], -np.inf, z)
    if np.all(z[np.arange(len(y)), y] > others.max(axis=1)):
        return keep(1.0, "argmax is right on every validation image: the NLL falls as T -> 0, no minimum; T = 1")
    lo, hi = -math.log(t_max), -math.log(t_min)  # log beta
    if _slope(z, y, math.exp(lo)) >= 0:
        return keep(t_max, f"the NLL falls as T -> infinity (logits no better than chance): T at the bound {t_max:g}")
    if _slope(z, y, math.exp(hi)) <= 0:
        return keep(t_min, f"the NLL minimum lies below T = {t_min:g}: T at that bound")
    for _ in range(BISECTION_STEPS):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _slope(z, y, math.exp(mid)) < 0 else (lo, mid)
    temperature = math.exp(-(lo + hi) / 2)
    fit = keep(temperature, "minimum of the validation NLL")
    if fit.nll_after > fit.nll_before:  # only float rounding at a flat minimum can get here
        return keep(1.0, "the NLL is flat around T = 1: T = 1")
    return fit


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE (see `ECE_DEFINITION`) of class probabilities `probs` (N, K) against integer `labels` (N,); in [0, 1].

    The top-class probability p lands in bin ceil(p * bins) (bins (b-1)/bins < p <= b/bins); NaN with no images.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if probs.ndim != 2 or len(probs) != len(labels):
        raise ValueError(f"probabilities of shape {probs.shape} do not match {len(labels)} labels")
    if not len(labels):
        return math.nan
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    gap = np.bincount(index, weights=correct - confidence, minlength=bins)
    return float(np.abs(gap).sum() / len(labels))


def calibration_report(
    fit: TemperatureFit,
    val_logits: np.ndarray,
    val_labels: np.ndarray,
    test_logits: np.ndarray,
    test_labels: np.ndarray,
) -> dict[str, float | str | None]:
    """What a run publishes about its temperature: T, how it was fitted, and NLL / ECE at T = 1 ("before") and
    at T ("after") on the validation split (where T was fitted) and on the test split (never used to fit)."""
    t = fit.temperature
    return {
        "temperature": t,
        "fit": fit.reason,
        "method": "temperature scaling: probabilities = softmax(logits / temperature); temperature minimises "
        "the mean NLL on the server's validation split",
        "privacy": "post-processing of the DP release on the server's own validation split (no client data): "
        "epsilon unchanged",
        "ece": ECE_DEFINITION,
        "val_nll_before": fit.nll_before,
        "val_nll_after": fit.nll_after,
        "val_ece_before": expected_calibration_error(softmax_t(val_logits), val_labels),
        "val_ece_after": expected_calibration_error(softmax_t(val_logits, t), val_labels),
        "test_nll_before": nll(test_logits, test_labels),
        "test_nll_after": nll(test_logits, test_labels, t),
        "test_ece_before": expected_calibration_error(softmax_t(test_logits), test_labels),
        "test_ece_after": expected_calibration_error(softmax_t(test_logits, t), test_labels),
    }
