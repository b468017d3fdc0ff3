"""Inputs unlike the training images: cheap pixel checks and a Mahalanobis guard on the head's input features.

`input_check` refuses what no scan looks like (a side under `MIN_SIDE` px, near-constant pixels). `OodGuard`
holds the mean and a Ledoit-Wolf-shrunk inverse covariance of the features the classification head reads,
fitted on one half of the run's **validation** split (never the training data: the adapter's DP guarantee
covers only what training released), and a threshold on the squared Mahalanobis distance: its
``1 - false_alarm`` quantile on the other half. A validation-like input is then refused with probability
about `false_alarm` (tested on Gaussian features against that rate). Stored as ``RUN_DIR/ood.npz``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["FALSE_ALARM", "MIN_SIDE", "OodGuard", "fit_guard", "input_check"]

MIN_SIDE = 8  # px: smaller images hold no anatomy
MIN_STD = 2.0  # grey levels (0..255): flatter images are blank
FALSE_ALARM = 0.01  # share of validation-like images the guard refuses


def input_check(pixels: np.ndarray) -> str | None:
    """Why decoded uint8 pixels cannot be a scan (tiny, near-constant), or None."""
    h, w = pixels.shape[:2]
    if min(h, w) < MIN_SIDE:
        return f"the image is {w} x {h} px, smaller than {MIN_SIDE} px on a side"
    std = float(np.asarray(pixels, dtype=np.float64).std())
    if std < MIN_STD:
        return f"the image is nearly uniform (pixel standard deviation {std:.2f} of 255)"
    return None


@dataclass(frozen=True)
class OodGuard:
    """Mahalanobis guard: squared distance of head-input features to the fitted mean > `threshold` -> unusual."""

    mean: np.ndarray  # (D,)
    precision: np.ndarray  # (D, D)
    threshold: float
    false_alarm: float
    n_fit: int
    n_calibration: int

    def distance(self, features: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distances (N,) of features (N, D)."""
        z = np.asarray(features, dtype=np.float64).reshape(len(features), -1) - self.mean
        return np.einsum("nd,de,ne->n", z, self.precision, z)

    def reason(self, distance: float) -> str | None:
        """Why an input at this distance is refused, or None."""
        if distance <= self.threshold:
            return None
        return (
            f"its features are far from the validation images (Mahalanobis² {distance:.3g} > {self.threshold:.3g}, "
            f"which {100 * self.false_alarm:g} % of validation images exceed)"
        )

    def describe(self) -> str:
        return (
            f"Mahalanobis distance of the head's input features, fitted on {self.n_fit} validation images and "
            f"calibrated on {self.n_calibration} others to a {100 * self.false_alarm:g} % false-alarm rate"
        )

    def save(self, path: Path) -> None:
        np.savez(
            path, mean=self.mean, precision=self.precision, threshold=self.threshold,
            false_alarm=self.false_alarm, n=np.array([self.n_fit, self.n_calibration]),
        )  # fmt: skip

    @classmethod
    def load(cls, path: Path) -> OodGuard:
        """The guard stored at `path`; ValueError (one line) when it is not one."""
        try:
            with np.load(path) as f:
                n_fit, n_cal = (int(v) for v in f["n"])
                guard = cls(f["mean"], f["precision"], float(f["threshold"]), float(f["false_alarm"]), n_fit, n_cal)
        except (OSError, KeyError, ValueError) as exc:
            raise ValueError(f"{path}: not an OOD guard file ({exc.__class__.__name__})") from None
        if guard.precision.shape != (guard.mean.size, guard.mean.size) or not np.isfinite(guard.threshold):
            raise ValueError(f"{path}: inconsistent OOD guard (mean {guard.mean.shape}, {guard.precision.shape})")
        return guard


def _ledoit_wolf(x: np.ndarray) -> np.ndarray:
    """Shrunk covariance of centred samples x (N, D) toward a scaled identity (Ledoit and Wolf 2004)."""
    n, d = x.shape
    s = x.T @ x / n
    mu = np.trace(s) / d
    d2 = float(np.sum((s - mu * np.eye(d)) ** 2))
    b_bar = (float(np.sum(np.sum(x**2, axis=1) ** 2)) - n * float(np.sum(s**2))) / n**2
    shrink = 1.0 if d2 <= 0 else min(max(b_bar, 0.0), d2) / d2
    return (1 - shrink) * s + shrink * mu * np.eye(d)


def fit_guard(fit: np.ndarray, calibration: np.ndarray, false_alarm: float = FALSE_ALARM) -> OodGuard:
    """A guard from features (N, D) to fit and features (M, D) of other in-distribution images to calibrate on."""
    if not 0 < false_alarm < 1:
        raise ValueError(f"false_alarm {false_alarm!r} is not in (0, 1)")
    fit = np.asarray(fit, dtype=np.float64).reshape(len(fit), -1)
    if len(fit) < 2 or len(calibration) < 1:
        raise ValueError(f"too few images to fit an OOD guard ({len(fit)} to fit, {len(calibration)} to calibrate)")
    mean = fit.mean(axis=0)
    cov = _ledoit_wolf(fit - mean)
    precision = np.linalg.pinv(cov + 1e-9 * max(np.trace(cov) / len(cov), 1e-12) * np.eye(len(cov)))
    guard = OodGuard(mean, precision, np.inf, false_alarm, len(fit), len(calibration))
    threshold = float(np.quantile(guard.distance(calibration), 1 - false_alarm, method="higher"))
    return OodGuard(mean, precision, threshold, false_alarm, len(fit), len(calibration))
