"""Head refit from DP class statistics (issue 25): each hospital releases noisy per-class counts, feature
sums and second moments of its head-input features; the server fits a closed-form LDA head on them.

Features. x (D,) is the input of the classifier's Linear head. Every record is projected with a public map
the server owns, z = P (x - m) / s (`Projection`: P (k, D) orthonormal rows, PCA of the server's validation
features; m their mean; s a quantile of their projected norms), and clipped: z <- z * min(1, 1 / |z|),
so |z| <= 1 (`CLIP_RULE`). The dimension k is the lever: the noise grows with k^2, the signal does not.

Statistics of one hospital, per class c: n_c (count), s_c = sum z (k,), S_c = sum z z^T (k, k), as one
vector v = [n_c, s_c, vec(S_c)]_c (`ClassStats`).

- Record level: one record of class c changes only class c's block, by (1, z, z z^T), of squared L2 norm
  1 + |z|^2 + |z|^4 <= 3: sensitivity sqrt(3) (`RECORD_SENSITIVITY`), tight at |z| = 1. The hospital adds
  N(0, (sigma_refit sqrt(3))^2 I) to v itself: one Gaussian release, q = 1, 1 step, noise multiplier sigma_refit,
  composed in its record-level accountant. With a declared public size s_h the vector is first scaled by
  `weight` (sensitivity scales with it).
- Client level: the hospital's whole contribution is v / n_h = [p_c, p_c mu_c, p_c M_c]_c (class proportions,
  clipped class means, class mean second moments), of squared norm sum_c p_c^2 (1 + |mu_c|^2 + |M_c|_F^2)
  <= 3 sum_c p_c^2 <= 3: sensitivity sqrt(3) (`CLIENT_SENSITIVITY`) under add/remove one hospital; with weights
  other than 1/n_h the vector is clipped to sqrt(3) (`clip_contribution`). Noise N(0, (sigma_refit sqrt(3))^2 I)
  on the sum: one release at q = 1 in the client-level ledger. Each hospital then counts once, whatever its size.

The server sums the releases, clamps counts at a floor, builds class means and a shared covariance with
shrinkage Sigma_g = (1 - g) Sigma + g tr(Sigma)/k I (g chosen on the server's validation split), fits
W = Sigma_g^-1 mu_c, b = -1/2 mu_c^T Sigma_g^-1 mu_c + log pi_c (`fit_lda`), and maps the head back to the
input space: weight (C, D) = W P / s, bias = b - W P m / s (`head_in_input_space`). Without noise the
record-level refit is exactly LDA on the pooled (projected, clipped) features, whatever the label skew.
Engine-free: numpy, torch and opacus only.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from opacus.accountants import RDPAccountant
from sklearn.metrics import roc_auc_score

from .accountant import ReleaseAccountant
from .randomness import SecureStream

RECORD_SENSITIVITY = math.sqrt(3.0)
CLIENT_SENSITIVITY = math.sqrt(3.0)
CLIP_RULE = (
    "z = P (x - m) / s (0 if not finite), then z * min(1, 1 / |z|): every record's projected feature has norm <= 1"
)
SHRINKAGE_GRID: tuple[float, ...] = (0.0, 0.01, 0.03, 0.1, 0.3, 0.6, 1.0)
COUNT_FLOOR_FRACTION = 0.01  # a noisy class count is clamped to at least this share of the total


# ---------------------------------------------------------------------------------------------
# Projection (public: from data the server owns)


@dataclass(frozen=True)
class Projection:
    """The public map z = P (x - m) / s: `matrix` P (k, D), `center` m (D,), `scale` s > 0."""

    matrix: np.ndarray
    center: np.ndarray
    scale: float
    source: str = (
        "PCA of the server's validation-split head-input features (server-owned data), completed to an "
        "orthonormal basis past its rank"
    )

    @property
    def dims(self) -> int:
        return int(self.matrix.shape[0])

    def project(self, features: np.ndarray) -> np.ndarray:
        """(n, D) -> (n, k), not clipped (what the fitted head sees at inference)."""
        return (np.asarray(features, np.float64) - self.center) @ self.matrix.T / self.scale

    def clipped(self, features: np.ndarray) -> np.ndarray:
        """(n, D) -> (n, k) with every row of norm <= 1 (`CLIP_RULE`); a row that is not finite (NaN or inf features,
        or an overflowing projection) becomes 0, so one such record cannot turn the release into NaN."""
        with np.errstate(invalid="ignore", over="ignore"):
            z = self.project(features)
        z = np.where(np.isfinite(z).all(axis=1, keepdims=True), z, 0.0)
        peak = np.maximum(np.abs(z).max(axis=1, keepdims=True, initial=0.0), 1e-300)
        norms = peak * np.linalg.norm(z / peak, axis=1, keepdims=True)  # no overflow for |z| near the float max
        return z * np.minimum(1.0, 1.0 / np.maximum(norms, 1e-300))


def pca_projection(features: np.ndarray, dims: int, norm_quantile: float = 0.9) -> Projection:
    """PCA of `features` (n, D) to `dims` dimensions; the scale puts `norm_quantile` of the rows in the unit ball.

    `dims` may exceed the number of principal directions the rows give (min(n, D)): the rows of P are then the
    principal directions followed by an orthonormal completion (QR of [V, I]), so `dims` = D is a rotation that
    keeps everything (exact statistics without DP then give the centralized LDA whatever the validation size)."""
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"the projection needs at least 2 feature rows of shape (n, D), got {x.shape}")
    if not 1 <= dims <= x.shape[1]:
        raise ValueError(f"--refit-dims {dims} must be in [1, D = {x.shape[1]}] for features {x.shape}")
    center = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - center, full_matrices=False)
    if dims <= len(vt):
        matrix = vt[:dims]
    else:  # complete the principal directions to an orthonormal basis (Q's first columns span them, in order)
        q, _ = np.linalg.qr(np.concatenate([vt.T, np.eye(x.shape[1])], axis=1))
        matrix = q[:, :dims].T
    norms = np.linalg.norm((x - center) @ matrix.T, axis=1)
    scale = float(np.quantile(norms, norm_quantile))
    return Projection(matrix, center, scale if scale > 0 else 1.0)


# ---------------------------------------------------------------------------------------------
# Class statistics and their release


@dataclass(frozen=True)
class ClassStats:
    """Per-class counts (C,), sums (C, k), second moments (C, k, k), float64."""

    counts: np.ndarray
    sums: np.ndarray
    second: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return self.sums.shape  # (C, k)

    def vector(self) -> np.ndarray:
        """The released vector: [n_c, s_c, vec(S_c)] per class, concatenated."""
        c = len(self.counts)
        return np.concatenate([self.counts[:, None], self.sums, self.second.reshape(c, -1)], axis=1).reshape(-1)

    @classmethod
    def from_vector(cls, vector: np.ndarray, num_classes: int, dims: int) -> ClassStats:
        v = np.asarray(vector, np.float64).reshape(num_classes, 1 + dims + dims * dims)
        return cls(v[:, 0].copy(), v[:, 1 : 1 + dims].copy(), v[:, 1 + dims :].reshape(num_classes, dims, dims).copy())

    def __add__(self, other: ClassStats) -> ClassStats:
        return ClassStats(self.counts + other.counts, self.sums + other.sums, self.second + other.second)

    def scaled(self, factor: float) -> ClassStats:
        return ClassStats(self.counts * factor, self.sums * factor, self.second * factor)


def class_statistics(z: np.ndarray, labels: np.ndarray, num_classes: int) -> ClassStats:
    """Counts, sums and second moments per class of clipped features `z` (n, k) with labels (n,)."""
    z = np.asarray(z, np.float64)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if len(z) != len(labels):
        raise ValueError(f"{len(z)} feature rows but {len(labels)} labels")
    if len(labels) and not (labels.min() >= 0 and labels.max() < num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got {sorted(set(labels.tolist()))[:5]}")
    onehot = np.eye(num_classes)[labels]  # (n, C)
    return ClassStats(onehot.sum(axis=0), onehot.T @ z, np.einsum("nc,ni,nj->cij", onehot, z, z))


def clip_contribution(stats: ClassStats, bound: float) -> ClassStats:
    """`stats` scaled so that its vector's norm is <= `bound` (a projection: 1-Lipschitz in the vector)."""
    norm = float(np.linalg.norm(stats.vector()))
    return stats if norm <= bound else stats.scaled(bound / norm)


def hospital_contribution(
    z: np.ndarray, labels: np.ndarray, num_classes: int, weight: float = 1.0, bound: float | None = None
) -> ClassStats:
    """One hospital's statistics times `weight` (1 record level; 1 / n_h or 1 / s_h client level), clipped to
    `bound` when given. Its sensitivity: `weight` * sqrt(3) per record; <= `bound` (or sqrt(3) at weight 1/n_h)
    per hospital."""
    stats = class_statistics(z, labels, num_classes).scaled(weight)
    return stats if bound is None else clip_contribution(stats, bound)


def gaussian_release(stats: ClassStats, std: float, stream: SecureStream) -> ClassStats:
    """`stats` + N(0, std^2) on every entry of its vector (S_c noised entrywise: symmetrize after, in `fit_lda`)."""
    v = stats.vector()
    noise = stream.normal(v.shape, std=1.0, dtype=torch.float64).numpy() * std
    c, k = stats.shape
    return ClassStats.from_vector(v + noise, c, k)


# ---------------------------------------------------------------------------------------------
# Accounting


def gaussian_epsilon(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """opacus RDP epsilon of the history [(noise multiplier, q, steps)] at `delta`."""
    acc = RDPAccountant()
    acc.history = [tuple(h) for h in history]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(acc.get_epsilon(delta=delta))


def accountant_epsilon(history: Sequence[tuple[float, float, int]], delta: float, kind: str) -> float:
    """epsilon of the history under `kind` ('rdp' or 'prv', as `accountant.ReleaseAccountant` computes it)."""
    return gaussian_epsilon(history, delta) if kind == "rdp" else ReleaseAccountant(list(history)).epsilon(delta, kind)


def calibrate_with_refit(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    refit_multiplier: float | None,
    accountant: str = "rdp",
) -> float:
    """Smallest sigma (to 1 %) such that `steps` subsampled Gaussian steps at (sigma, q) composed with one refit
    release (refit_multiplier, q = 1) stay within `target_epsilon` under `accountant` ('rdp', or 'prv': opacus
    PRV's upper bound, searched below the RDP answer, which bounds it). None: no refit release."""
    extra = [] if refit_multiplier is None else [(float(refit_multiplier), 1.0, 1)]

    def eps(sigma: float, kind: str) -> float:
        return accountant_epsilon([(sigma, sample_rate, steps), *extra], delta, kind)

    if extra and accountant_epsilon(extra, delta, accountant) >= target_epsilon:
        share = accountant_epsilon(extra, delta, accountant)
        raise ValueError(
            f"the head refit alone spends epsilon {share:.3g} >= the target {target_epsilon:g}; raise "
            "--refit-noise-multiplier"
        )
    lo, hi = 1e-2, 1.0
    while eps(hi, "rdp") > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise ValueError(f"cannot reach epsilon {target_epsilon:g} over {steps} steps at q {sample_rate:g}")
    for kind in ("rdp", accountant) if accountant != "rdp" else ("rdp",):
        lo = lo if kind == "rdp" else hi / 2
        while hi / lo > 1.01:
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if eps(mid, kind) > target_epsilon else (lo, mid)
    return hi


# ---------------------------------------------------------------------------------------------
# The server's fit


@dataclass(frozen=True)
class LinearHead:
    """logits = features @ weight.T + bias: weight (C, k or D), bias (C,)."""

    weight: np.ndarray
    bias: np.ndarray

    def logits(self, features: np.ndarray) -> np.ndarray:
        return np.asarray(features, np.float64) @ self.weight.T + self.bias


def unit_scaled(head: LinearHead, features: np.ndarray) -> tuple[LinearHead, float]:
    """`head` times c > 0 so that its class-centred logits on `features` (n, D) have root mean square 1; returns
    (scaled head, c). Rankings and the argmax are unchanged (temperature calibration follows), but float32 logits
    can no longer saturate: an LDA head fitted on noisy statistics can reach |logits| ~ 1e6, where every softmax
    probability rounds to 0 or 1 and the test AUC collapses to 0.5."""
    z = head.logits(features)
    rms = float(np.sqrt(np.mean((z - z.mean(axis=1, keepdims=True)) ** 2)))
    c = 1.0 / rms if math.isfinite(rms) and rms > 0 else 1.0
    return LinearHead(head.weight * c, head.bias * c), c


def pooled_moments(stats: ClassStats, count_floor_fraction: float = COUNT_FLOOR_FRACTION):
    """(priors (C,), class means (C, k), within-class covariance (k, k)) of (noisy) summed statistics.

    Counts are clamped to >= `count_floor_fraction` of their total; the covariance is symmetrized and its
    eigenvalues clamped to >= 1e-6 tr/k (noise can make it indefinite). Covariance = (sum_c S_c - n_c mu_c mu_c^T) / N,
    the maximum-likelihood pooled estimate (scikit-learn's LDA convention)."""
    counts = np.asarray(stats.counts, np.float64)
    total = max(float(counts.clip(min=0).sum()), 1e-12)
    counts = np.maximum(counts, count_floor_fraction * total)
    n = float(counts.sum())
    means = stats.sums / counts[:, None]
    scatter = stats.second.sum(axis=0) - np.einsum("c,ci,cj->ij", counts, means, means)
    cov = (scatter + scatter.T) / (2 * n)
    vals, vecs = np.linalg.eigh(cov)
    floor = 1e-6 * max(float(np.abs(vals).mean()), 1e-12)
    cov = (vecs * np.maximum(vals, floor)) @ vecs.T
    return counts / n, means, cov


def fit_lda(stats: ClassStats, shrinkage: float, count_floor_fraction: float = COUNT_FLOOR_FRACTION) -> LinearHead:
    """Closed-form LDA in the projected space: W = Sigma_g^-1 mu_c, b = -1/2 mu_c^T Sigma_g^-1 mu_c + log pi_c."""
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"shrinkage {shrinkage} must be in [0, 1]")
    priors, means, cov = pooled_moments(stats, count_floor_fraction)
    k = cov.shape[0]
    shrunk = (1 - shrinkage) * cov + shrinkage * np.trace(cov) / k * np.eye(k)
    weight = np.linalg.solve(shrunk, means.T).T  # (C, k)
    bias = -0.5 * np.einsum("ck,ck->c", weight, means) + np.log(priors)
    return LinearHead(weight, bias)


def head_in_input_space(head: LinearHead, projection: Projection) -> LinearHead:
    """The head on x itself: W (P (x - m) / s) + b = (W P / s) x + (b - W P m / s)."""
    weight = head.weight @ projection.matrix / projection.scale
    return LinearHead(weight, head.bias - weight @ projection.center)


def validation_auc(labels: np.ndarray, logits: np.ndarray) -> float:
    """AUC of logits (N, C): binary on the class-1 margin, macro one-vs-rest for more classes."""
    labels = np.asarray(labels).reshape(-1)
    if logits.shape[1] == 2:
        return float(roc_auc_score(labels, logits[:, 1] - logits[:, 0]))
    z = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    return float(roc_auc_score(labels, probs, multi_class="ovr", average="macro", labels=list(range(logits.shape[1]))))


def choose_shrinkage(
    stats: ClassStats,
    projection: Projection,
    val_features: np.ndarray,
    val_labels: np.ndarray,
    grid: Sequence[float] = SHRINKAGE_GRID,
) -> tuple[float, dict[float, float]]:
    """The shrinkage of `grid` whose head has the best validation AUC (ties: the smaller one), and every AUC."""
    z = projection.project(val_features)
    scores = {float(g): validation_auc(val_labels, fit_lda(stats, g).logits(z)) for g in grid}
    best = max(scores.values())
    return min(g for g, s in scores.items() if s >= best - 1e-12), scores


__all__ = [
    "CLIENT_SENSITIVITY",
    "CLIP_RULE",
    "RECORD_SENSITIVITY",
    "SHRINKAGE_GRID",
    "ClassStats",
    "LinearHead",
    "Projection",
    "accountant_epsilon",
    "calibrate_with_refit",
    "choose_shrinkage",
    "class_statistics",
    "clip_contribution",
    "fit_lda",
    "gaussian_epsilon",
    "gaussian_release",
    "head_in_input_space",
    "hospital_contribution",
    "pca_projection",
    "pooled_moments",
    "unit_scaled",
    "validation_auc",
]
