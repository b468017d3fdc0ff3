"""How finely secure aggregation may quantize privatized updates, and the error that leaves in their sum.

SecAgg+ (Flower) clips every entry of a client's update to [-rho, rho] and maps it to an integer in
[0, Q] by stochastic rounding (step 2 rho / Q), so that masked integer vectors can be summed modulo
2^32. A privatized update (`privatize_update`) of a trained parameter with metric M = L L^T is a
clipped part plus a noise share, and in the parameter's own (un-whitened) coordinates:
- clipped part: in whitened coordinates w (w = dB L, or L^T dA) the whole update has ||w|| <= C. A row
  of dB is a row of w times L^-1 (a column of dA is L^-T times a column of w), so every entry is at
  most C ||L^-1||_2 = C / sqrt(lambda_min(M)). (`reference` clips each matrix in factor space: C.)
- noise share: an entry is Gaussian with std (sigma C / sqrt(d)) sqrt((M^-1)_jj) <= sigma C ||L^-1||_2 / sqrt(d),
  d the share divisor (d = k - t: k the noise floor, t the collusion threshold; `collusion.share_divisor`).
Hence rho = C ||L^-1|| (1 + z sigma / sqrt(d)), where z is the Gaussian quantile that makes any of the
update's entries pass rho with probability below `tail` (union bound over its entries): nothing is
clipped silently except with that probability. Stochastic rounding moves each entry by less than one
step, so the sum of n dequantized updates is within n * 2 rho / Q of the exact sum in every entry.
Not proven private as such: the released sum is sum_i Q(x_i + z_i), not a post-processing of the Gaussian
sum that the ledger's epsilon accounts, and the range-clipping tail is a failure probability (n * tail per
release, `range_clipping_probability`) to add to delta. The exact construction is the Skellam mechanism
(`skellam.py`: quantize first, then add integer noise), SecAgg+ with `secagg-noise = "skellam"` (the
default; these Gaussian shares are an explicit opt-in whose ledger says "NO proof").
"""

from __future__ import annotations

import math
from statistics import NormalDist

import torch

from ..methods import NoiseKind
from .aggregate import ClientDP
from .mechanism import Whitener

DEFAULT_TAIL = 1e-9  # probability that any entry of one privatized update is clipped by the range
MODULUS = 2**32  # SecAgg+'s modulus: the masked sum of n integers in [0, Q] must stay below it


def inverse_cholesky_norm(whitener: Whitener) -> float:
    """||L^-1||_2 = 1 / sqrt(lambda_min(M)) of one trained parameter's metric (1 for the identity)."""
    if whitener.chol is None:
        return 1.0
    return float(1.0 / torch.linalg.svdvals(whitener.chol.double()).min())


def tail_quantile(num_entries: int, tail: float = DEFAULT_TAIL) -> float:
    """t with P(any of `num_entries` standard Gaussians exceeds t in absolute value) <= `tail` (union bound)."""
    if not 0 < tail < 1:
        raise ValueError(f"tail probability {tail} must be in (0, 1)")
    return NormalDist().inv_cdf(1.0 - tail / (2 * max(1, num_entries)))


def clipping_range(
    whiteners: dict[str, Whitener],
    shapes: dict[str, torch.Size],
    noise_kind: NoiseKind,
    dp: ClientDP,
    num_shares: int,
    tail: float = DEFAULT_TAIL,
) -> float:
    """rho: the entry range that holds a privatized update (clip C, noise share sigma C / sqrt(d), d =
    `num_shares`, the share divisor k - t) but with probability `tail` (module docstring). `whiteners` are the
    phase's, `shapes` its trained parameters'."""
    t = tail_quantile(sum(math.prod(s) for s in shapes.values()), tail)
    share = t * dp.noise_multiplier / math.sqrt(num_shares)
    rho = 0.0
    for key in shapes:
        inv = inverse_cholesky_norm(whiteners[key])
        clipped = inv if noise_kind == NoiseKind.REGULATED else 1.0  # reference/plain clip in factor space
        rho = max(rho, dp.clip_norm * (clipped + share * inv))
    return rho


def sum_error_bound(rho: float, quantization_range: int, num_updates: int) -> float:
    """Largest error of any entry of the dequantized sum of `num_updates` updates: n * 2 rho / Q."""
    return num_updates * 2.0 * rho / quantization_range


def range_clipping_probability(num_updates: int, tail: float = DEFAULT_TAIL) -> float:
    """P(any entry of any of `num_updates` privatized updates is clipped by the range) <= n * tail (union bound)."""
    return min(1.0, num_updates * tail)


def check_quantization_range(quantization_range: int, max_updates: int) -> None:
    """ValueError unless Q levels fit int32 (Flower rounds into int32) and n * Q < 2^32 (no wrap of the sum)."""
    if not 2 <= quantization_range < 2**31:
        raise ValueError(f"quantization-range {quantization_range} must be in [2, 2^31)")
    if max_updates * quantization_range >= MODULUS:
        raise ValueError(
            f"quantization-range {quantization_range} x {max_updates} sites >= 2^32: the masked sum would wrap; "
            f"use quantization-range <= {(MODULUS - 1) // max_updates}"
        )


__all__ = [
    "DEFAULT_TAIL",
    "MODULUS",
    "check_quantization_range",
    "clipping_range",
    "inverse_cholesky_norm",
    "range_clipping_probability",
    "sum_error_bound",
    "tail_quantile",
]
