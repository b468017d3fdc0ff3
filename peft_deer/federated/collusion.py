"""Distributed noise against participants: what t colluding sites still face, and shares calibrated for them.

With the distributed placement each of the sites in a release adds a Gaussian noise share of variance
sigma^2 C^2 / d (d the share divisor) and at least k shares (the noise floor) are in every released sum.
- Outsiders (the public, and the server under secure aggregation) face all shares: variance >= k sigma^2 C^2 / d,
  i.e. the noise multiplier sigma sqrt(k / d).
- t colluding sites (t >= 1; one participating site is t = 1) know their own t shares and can subtract them:
  the rest has variance >= (k - t) sigma^2 C^2 / d, i.e. the multiplier sigma sqrt((k - t) / d) (0 when t >= k:
  they know all the noise, no guarantee).
d = k (the shares of the outsiders' mechanism) leaves sigma sqrt((k - 1) / k) against a participant;
d = k - t (`share_divisor`) keeps sigma against any t colluders, and gives outsiders the larger
sigma sqrt(k / (k - t)) (more noise in the release: the price of the stronger trust model).
With d = k - t and t >= 1 the release's total noise, variance k sigma^2 C^2 / (k - t), depends on the number
of participants k, which an observer can estimate from the release: under Poisson client sampling (q < 1) the
target's participation is then not secret, and every adversary is accounted WITHOUT amplification by subsampling
(q = 1 in the accountant steps and in the calibration: `accounting_sample_rate`).
"""

from __future__ import annotations

import math


def share_divisor(noise_floor: int, colluders: int) -> int:
    """d = k - t: shares of variance sigma^2 C^2 / d leave t colluders facing sigma; ValueError unless 0 <= t < k."""
    if noise_floor < 1:
        raise ValueError(f"noise floor k={noise_floor} must be >= 1")
    if not 0 <= colluders < noise_floor:
        raise ValueError(
            f"--collusion-threshold {colluders} must be in [0, k) for a noise floor k={noise_floor}: "
            f"{colluders} colluders would know every noise share; raise min-clients-per-phase"
        )
    return noise_floor - colluders


def accounting_sample_rate(sample_rate: float, distributed: bool, colluders: int) -> float:
    """The client sampling rate the accountants (and the sigma calibration) use: 1.0 -- no amplification by
    subsampling -- when clients are Poisson-sampled (q < 1) with distributed noise sized for t >= 1 colluders
    (the total noise then reveals the number of participants, module docstring); else `sample_rate`."""
    return 1.0 if distributed and colluders >= 1 and sample_rate < 1 else sample_rate


def residual_multiplier(sigma: float, noise_floor: int, divisor: int, known_shares: int) -> float:
    """Noise multiplier of a release against an adversary who knows `known_shares` of its >= k shares
    (each of variance sigma^2 C^2 / d): sigma sqrt((k - known) / d); 0.0 when it knows them all."""
    if divisor < 1 or noise_floor < 1 or known_shares < 0:
        raise ValueError(f"bad share counts: k={noise_floor}, d={divisor}, known={known_shares}")
    return sigma * math.sqrt(max(0, noise_floor - known_shares) / divisor)


def adversary_multipliers(sigma: float, noise_floor: int, divisor: int, colluders: int) -> dict[str, float]:
    """The release's noise multiplier against each adversary (module docstring): outsiders (public and server
    under secure aggregation), one participating site, and `colluders` colluding sites."""
    return {
        "outsiders": residual_multiplier(sigma, noise_floor, divisor, 0),
        "one_site": residual_multiplier(sigma, noise_floor, divisor, 1),
        "colluders": residual_multiplier(sigma, noise_floor, divisor, colluders),
    }


__all__ = ["accounting_sample_rate", "adversary_multipliers", "residual_multiplier", "share_divisor"]
