"""Client-level DP mechanisms on a phase's updates: the metric M, clipping, and Gaussian noise.

Every trained parameter gets a `Whitener`: a Cholesky factor L (r, r) of its metric M = L L^T and
the side the update is multiplied on. In whitened coordinates u the norm is Frobenius and the noise
is isotropic, which is why the regulated mechanism is exactly the Gaussian mechanism (DESIGN 2.3):
- factor B (d_out, r), A frozen: M = s^2 A A^T + lambda I, u = dB L,     noise  n = sigma C Z L^-1
- factor A (r, d_in),  B frozen: M = s^2 B^T B + lambda I, u = L^T dA,   noise  n = sigma C L^-T Z
A `None` factor means the identity metric (plain noise, and the head in every method).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ..methods import NoiseKind
from .adapter_state import AdapterLayout, AdapterState
from .randomness import SecureStream


@dataclass(frozen=True)
class Whitener:
    """Metric of one trained parameter: `chol` (r, r) lower-triangular L with M = L L^T, or None (M = I).

    `side` is 'right' for a B factor (u = dB L) and 'left' for an A factor (u = L^T dA). `kernel_dims`
    is the number of trailing conv kernel dimensions, folded into the matrix (0 for Linear/Embedding).
    """

    chol: torch.Tensor | None
    side: str
    kernel_dims: int = 0

    def whiten(self, delta: torch.Tensor) -> torch.Tensor:
        """Coordinates u in which the metric norm is Frobenius (same shape as `delta`, leading dims batched)."""
        if self.chol is None:
            return delta
        d = self._matrix(delta)
        return (d @ self.chol if self.side == "right" else self.chol.T @ d).reshape(delta.shape)

    def color(self, z: torch.Tensor) -> torch.Tensor:
        """Map isotropic z to the parameter space: z L^-1 (right) or L^-T z (left)."""
        if self.chol is None:
            return z
        z2 = self._matrix(z)
        if self.side == "right":
            return torch.linalg.solve_triangular(self.chol, z2, upper=False, left=False).reshape(z.shape)
        return torch.linalg.solve_triangular(self.chol.T, z2, upper=True, left=True).reshape(z.shape)

    def _matrix(self, x: torch.Tensor) -> torch.Tensor:
        """Conv factor as matrix: A (.., r, c_in, *k) -> (.., r, c_in k); B (.., c_out, r, 1..) -> (.., c_out, r)."""
        return x.flatten(-1 - self.kernel_dims) if self.kernel_dims else x

    def max_eigenvalue(self) -> float:
        """Largest eigenvalue of M (1 for the identity metric)."""
        if self.chol is None:
            return 1.0
        return float(torch.linalg.matrix_norm(self.chol, ord=2) ** 2)


def factor_metric(frozen: torch.Tensor, frozen_factor: str, scaling: float, ridge: float) -> torch.Tensor:
    """Metric M (r, r): s^2 Y Y^T + ridge I for a frozen A = Y (r, d_in); s^2 Y^T Y + ridge I for B = Y (d_out, r)."""
    y = frozen.to(torch.float64)
    gram = y @ y.T if frozen_factor == "A" else y.T @ y
    return scaling**2 * gram + ridge * torch.eye(gram.shape[0], dtype=torch.float64)


def build_whiteners(
    layout: AdapterLayout, state: AdapterState, keys: Iterable[str], noise: NoiseKind, ridge: float
) -> dict[str, Whitener]:
    """Whiteners for the trained `keys` under noise kind PLAIN, REGULATED or REFERENCE.

    'regulated' uses M = s^2 Y Y^T (+ lambda I), the product-space metric; 'reference' uses the
    authors' unscaled Y^T Y (+ lambda I). Both need a single trained factor per module.
    """
    keys = list(keys)
    out: dict[str, Whitener] = {}
    for key in keys:
        found = layout.frozen_factor(key)
        if noise == NoiseKind.PLAIN or found is None:
            out[key] = Whitener(None, "right")
            continue
        module, trained = found
        frozen_factor = "B" if trained == "A" else "A"
        frozen_key = module.b_key if trained == "A" else module.a_key
        if frozen_key in keys:
            raise ValueError(f"noise={noise!r} needs one trained factor per module; {module.module} trains both")
        scaling = module.scaling if noise == NoiseKind.REGULATED else 1.0
        frozen = state[frozen_key].flatten(
            1
        )  # conv A (r, c_in, *k) -> (r, c_in k); conv B (c_out, r, 1..) -> (c_out, r)
        metric = factor_metric(frozen, frozen_factor, scaling, ridge)
        try:
            chol = torch.linalg.cholesky(metric)
        except torch.linalg.LinAlgError as err:
            raise ValueError(
                f"{module.module}: regulator metric is singular (frozen factor rank-deficient); "
                f"use a regulator ridge > 0 (got {ridge})"
            ) from err
        side = "right" if trained == "B" else "left"
        out[key] = Whitener(chol.to(torch.float32), side, kernel_dims=state[key].dim() - 2)
    return out


def metric_norm(update: AdapterState, whiteners: dict[str, Whitener]) -> float:
    """sqrt(sum over parameters of ||delta||_M^2): the norm clipping bounds."""
    total = sum(float(whiteners[k].whiten(v).double().square().sum()) for k, v in update.items())
    return math.sqrt(total)


def clip_update(update: AdapterState, whiteners: dict[str, Whitener], clip_norm: float) -> tuple[AdapterState, float]:
    """Scale the whole update so its metric norm is at most `clip_norm`; returns (clipped, norm before)."""
    norm = metric_norm(update, whiteners)
    factor = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: v * factor for k, v in update.items()}, norm


def clip_per_matrix(update: AdapterState, clip_norm: float) -> AdapterState:
    """The authors' clipping: every matrix to Frobenius norm `clip_norm` on its own (reference only)."""
    out = {}
    for k, v in update.items():
        norm = float(v.norm())
        out[k] = v * (min(1.0, clip_norm / norm) if norm > 0 else 1.0)
    return out


def sample_noise(
    whiteners: dict[str, Whitener],
    shapes: dict[str, torch.Size],
    std: float,
    stream: SecureStream,
) -> AdapterState:
    """Gaussian noise with covariance std^2 M^-1 per row (B) / column (A); isotropic for M = I.

    Costs O(r d) per module: no (d_out, d_in) matrix is drawn. Keys are drawn in sorted order from
    `stream` (the run's cryptographic stream for this draw, `DPRandomness.stream`).
    """
    noise = {}
    for key in sorted(shapes):
        noise[key] = whiteners[key].color(stream.normal(shapes[key], std))
    return noise


def reference_effective_multiplier(noise_multiplier: float, whiteners: dict[str, Whitener]) -> float:
    """True multiplier of the authors' release: sigma / sqrt(sum_j lambda_max(M_j)) (DESIGN 2.4).

    Matrix j is clipped to C in Frobenius norm and noised with covariance sigma^2 C^2 M_j^-1, so its
    weakest direction has multiplier sigma / sqrt(lambda_max(M_j)); Gaussian mechanisms on the
    same data compose like one with 1/sigma_eff^2 = sum_j 1/sigma_j^2.
    """
    return noise_multiplier / math.sqrt(sum(w.max_eigenvalue() for w in whiteners.values()))
