"""The distributed Skellam mechanism: integer noise whose sum is known exactly, for secure aggregation.

Secure aggregation sums integers modulo 2^b. Quantizing a Gaussian-noised float update (`quantization.py`)
makes the released sum sum_i Q(x_i + z_i), which is not a post-processing of the Gaussian mechanism's sum.
Here each site instead (Agarwal, Kairouz, Liu, NeurIPS 2021):
1. clips its update to L2 norm C in the whitened coordinates where the sensitivity is measured (the
   metric's, `mechanism.Whitener`) and scales it by `scale` s, so its norm is <= sC;
2. rounds every coordinate stochastically and unbiasedly to an integer (`stochastic_round`): a coordinate
   moves by less than 1, so the rounded vector has L2 norm <= sC + sqrt(d) (triangle inequality, always) and,
   being an integer vector, L1 norm <= min(sqrt(d) * L2, L2^2) (`rounded_sensitivity`);
3. adds integer Skellam noise of variance v_i per coordinate (Poisson(v_i/2) - Poisson(v_i/2)); a sum of
   independent Skellams is Skellam with the summed variance, so the sum of n shares is exactly
   Skellam(mu = sum v_i) on every coordinate, whatever the rounding did.
The server divides the unmasked integer sum by s and colours it back (un-whitens). Privacy of the integer
sum (add/remove one site) is `skellam_rdp` (ibid., Corollary 3.6; integer orders alpha > 1):
    eps(alpha) <= alpha D2^2 / (2 mu) + min(((2 alpha - 1) D2^2 + 6 D1) / (4 mu^2), 3 D1 / (2 mu)),
mu the variance of the summed noise, D2 / D1 the L2 / L1 sensitivities of step 2, all in integer units; it
tends to the Gaussian alpha D2^2 / (2 mu) as mu grows. Releases compose by adding RDP; (eps, delta) by
opacus's conversion (Balle et al. 2020). Client sampling is not used for amplification (conservative).
Range: a site's integers must lie in [-R, R] (the range the protocol clips to: flwr's SecAgg+ `clipping_range`
rho, with `quantization_range` 2 rho so that its quantization maps integers exactly; `plan_skellam`).
`range_failure_probability` bounds (Chernoff, union over sites and coordinates)
the chance that any entry leaves it; that probability is added to delta per release (`skellam_epsilon`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from opacus.accountants.analysis.rdp import get_privacy_spent

SKELLAM_ORDERS = tuple(range(2, 257))  # integer alphas (the corollary's statement)


class SkellamStream(Protocol):
    """The secret stream a site draws from (`randomness.stream(...)`, a `SecureStream`)."""

    def uniform(self, shape: Sequence[int]) -> torch.Tensor: ...

    def skellam(self, mu: float, shape: Sequence[int]) -> torch.Tensor: ...


def stochastic_round(x: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Unbiased rounding to int64: floor(x) + 1 with probability frac(x) (`uniforms` in [0, 1), x's shape)."""
    low = torch.floor(x.double())
    return (low + (uniforms.double() < (x.double() - low)).double()).long()


def skellam_share(x_scaled: torch.Tensor, share_variance: float, stream: SkellamStream) -> torch.Tensor:
    """One site's integer message: stochastic_round(x_scaled) + Skellam noise of variance `share_variance` per
    coordinate. `x_scaled` = s * (clipped, whitened update), L2 norm <= sC (the caller clips)."""
    if not share_variance > 0:
        raise ValueError(f"Skellam share variance {share_variance} must be > 0")
    rounded = stochastic_round(x_scaled, stream.uniform(tuple(x_scaled.shape)))
    return rounded + stream.skellam(share_variance / 2.0, tuple(x_scaled.shape)).long()


def rounded_sensitivity(scaled_clip: float, dim: int) -> tuple[float, float]:
    """(D2, D1) of one site's rounded vector: D2 = sC + sqrt(d), D1 = min(sqrt(d) D2, D2^2) (module docstring)."""
    if not scaled_clip > 0 or dim < 1:
        raise ValueError(f"scaled clip {scaled_clip} must be > 0 and dimension {dim} >= 1")
    l2 = scaled_clip + math.sqrt(dim)
    return l2, min(math.sqrt(dim) * l2, l2 * l2)


def skellam_rdp(alpha: int, l2: float, l1: float, mu: float) -> float:
    """RDP of order `alpha` of adding Skellam noise of variance `mu` to an integer query with sensitivities
    (L2 `l2`, L1 `l1`) (Agarwal, Kairouz, Liu 2021, Corollary 3.6)."""
    if alpha < 2 or int(alpha) != alpha:
        raise ValueError(f"order {alpha} must be an integer >= 2")
    if not mu > 0:
        raise ValueError(f"Skellam variance {mu} must be > 0")
    gauss = alpha * l2 * l2 / (2.0 * mu)
    return gauss + min(((2 * alpha - 1) * l2 * l2 + 6 * l1) / (4.0 * mu * mu), 3.0 * l1 / (2.0 * mu))


def skellam_tail(t: float, mu: float) -> float:
    """P(X >= t) for X ~ Skellam of variance mu, Chernoff: min_theta exp(mu (cosh theta - 1) - theta t)."""
    if t <= 0:
        return 1.0
    theta = math.asinh(t / mu)
    return min(1.0, math.exp(mu * (math.cosh(theta) - 1.0) - theta * t))


def range_failure_probability(scaled_clip: float, dim: int, share_variance: float, sites: int, bound: float) -> float:
    """Upper bound on P(any of `sites` messages has an entry outside [-bound, bound]): an entry is at most
    sC + 1 after rounding, plus its Skellam share (union bound over 2 sides, d entries, n sites)."""
    margin = bound - (scaled_clip + 1.0)
    return min(1.0, 2.0 * dim * sites * skellam_tail(margin, share_variance))


def skellam_epsilon(releases: Sequence[tuple[float, float, float]], delta: float, range_failure: float = 0.0) -> float:
    """epsilon at `delta` of composing releases [(D2, D1, mu)] (integer units), where each release's range
    failure probability `range_failure` is taken out of delta first (ValueError if nothing is left)."""
    spent = range_failure * len(releases)
    if not 0 < delta - spent < 1:
        raise ValueError(f"delta {delta:g} does not cover the range failures ({spent:.3g}); raise the range")
    if not releases:
        return 0.0
    rdp = [sum(skellam_rdp(a, l2, l1, mu) for l2, l1, mu in releases) for a in SKELLAM_ORDERS]
    eps, _ = get_privacy_spent(orders=list(SKELLAM_ORDERS), rdp=rdp, delta=delta - spent)
    return float(eps)


def skellam_variance_for(noise_multiplier: float, scaled_clip: float) -> float:
    """mu whose Gaussian part matches sigma: (sigma sC)^2 (the sum's noise in integer units)."""
    return (noise_multiplier * scaled_clip) ** 2


# The secure-aggregation wiring (`peft_deer.flower.secagg`, `secagg-noise = "skellam"`): the plan both sides
# derive from public terms, a site's integer message, the server's decoding, and the ledger's epsilon.

ROUNDING_RATIO = 100.0  # sC >= 100 sqrt(d): rounding costs at most 1 % of the clip norm (it is clipped away)
RANGE_FAILURE = 1e-9  # per release: chance that any entry of any message leaves [-rho, rho] (added to delta)


@dataclass(frozen=True)
class SkellamPlan:
    """One release's integer mechanism: scale s (integer units per whitened unit, sC = `scaled_clip`), each site's
    Skellam share variance, the entry range rho every message must stay in and its failure probability."""

    scale: float
    scaled_clip: float
    share_variance: float
    bound: int
    range_failure: float
    dim: int

    @property
    def sensitivity(self) -> tuple[float, float]:
        """(D2, D1) of one site's message: sites clip to C - sqrt(d)/s, so the rounded vector has L2 norm <= sC."""
        return rounded_sensitivity(self.scaled_clip - math.sqrt(self.dim), self.dim)


def plan_skellam(noise_multiplier: float, clip_norm: float, dim: int, divisor: int, sites: int) -> SkellamPlan:
    """The plan of a release of `dim` entries summed from <= `sites` messages, each share of variance
    (sigma sC)^2 / d: the summed noise of k shares is sigma sqrt(k/d) in units of the clip (as the Gaussian)."""
    if not (noise_multiplier > 0 and clip_norm > 0 and dim >= 1 and divisor >= 1 and sites >= 1):
        raise ValueError(f"bad Skellam plan terms: sigma={noise_multiplier}, C={clip_norm}, d={dim}, divisor={divisor}")
    scaled_clip = max(1024.0, ROUNDING_RATIO * math.sqrt(dim))
    variance = (noise_multiplier * scaled_clip) ** 2 / divisor
    bound = scaled_clip + 1.0
    while range_failure_probability(scaled_clip, dim, variance, sites, bound) > RANGE_FAILURE:
        bound += math.sqrt(variance) / 4
    bound = math.ceil(bound)
    failure = range_failure_probability(scaled_clip, dim, variance, sites, bound)
    return SkellamPlan(scaled_clip / clip_norm, scaled_clip, variance, bound, failure, dim)


def skellam_message(
    delta: dict[str, torch.Tensor], whiteners: dict, clip_norm: float, plan: SkellamPlan, stream: SkellamStream
) -> dict[str, torch.Tensor]:
    """A site's integer message (float64 holding integers, whitened coordinates, `delta`'s keys and shapes):
    clip the whitened update to C - sqrt(d)/s, scale by s, round stochastically, add its Skellam share."""
    whitened = {k: whiteners[k].whiten(delta[k].float()).double() for k in sorted(delta)}
    return skellam_encode(whitened, clip_norm, plan, stream)


def skellam_encode(
    parts: dict[str, torch.Tensor], clip_norm: float, plan: SkellamPlan, stream: SkellamStream
) -> dict[str, torch.Tensor]:
    """The integer message of a vector already in the mechanism's coordinates (`parts`, float64, joint L2 norm):
    clipped to C - sqrt(d)/s, scaled by s, stochastically rounded, plus the Skellam share (`skellam_message`'s
    last step; the head refit's statistics use it directly: their coordinates need no whitening)."""
    parts = {k: parts[k].double() for k in sorted(parts)}
    norm = math.sqrt(sum(float(u.square().sum()) for u in parts.values()))
    target = clip_norm - math.sqrt(plan.dim) / plan.scale
    factor = min(1.0, target / norm) if norm > 0 else 1.0
    return {k: skellam_share(u * factor * plan.scale, plan.share_variance, stream).double() for k, u in parts.items()}


def decode_skellam_sum(total: dict[str, torch.Tensor], whiteners: dict, scale: float) -> dict[str, torch.Tensor]:
    """The parameter-space sum from the unmasked integer sum: rounded to integers (it is one, up to float error),
    divided by s and coloured back (un-whitened)."""
    return {k: whiteners[k].color((torch.round(v.double()) / scale).float()) for k, v in total.items()}


def skellam_ledger(plans: Sequence[dict], delta: float, shares: Sequence[tuple[int, int]], t: int) -> dict:
    """epsilon of the Skellam releases (plans as logged: `SkellamPlan` fields; `shares` their (k, d)) against
    outsiders (all k shares) and t colluding sites (k - t shares; inf if none is left); each release's range
    failure comes out of delta."""
    out: dict = {}
    for who, known in (("outsiders", 0), ("t_colluding_sites", t)):
        releases, failure = [], 0.0
        for plan, (k, _) in zip(plans, shares, strict=True):
            if k - known < 1:
                releases = None
                break
            l2, l1 = rounded_sensitivity(plan["scaled_clip"] - math.sqrt(plan["dim"]), plan["dim"])
            releases.append((l2, l1, (k - known) * plan["share_variance"]))
            failure = max(failure, plan["range_failure"])
        out[who] = math.inf if releases is None else skellam_epsilon(releases, delta, failure)
    out["t_colluding_sites_t"] = t
    return out


__all__ = [
    "ROUNDING_RATIO",
    "SkellamPlan",
    "decode_skellam_sum",
    "plan_skellam",
    "skellam_encode",
    "skellam_ledger",
    "skellam_message",
    "SKELLAM_ORDERS",
    "range_failure_probability",
    "rounded_sensitivity",
    "skellam_epsilon",
    "skellam_rdp",
    "skellam_share",
    "skellam_tail",
    "skellam_variance_for",
    "stochastic_round",
]
