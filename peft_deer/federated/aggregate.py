"""Exact aggregation of one phase's client updates, with or without client-level DP.

Without DP the trained factor's deltas are averaged with example-count weights. With DP each
update is clipped, the clipped updates are summed in fp32 in client-id order, Gaussian noise is
added, and the sum is divided by the public denominator q * num_clients (DESIGN 2.3).

With the `distributed` placement each client privatizes its own update (`privatize_update`: clip,
then add 1/m of the noise variance), so under secure aggregation the server only ever sees a sum
that carries the full noise. A simulation runs that client step itself; a deployment receives
updates already privatized and only checks them (`check_privatized_update`) and sums; under secure
aggregation it receives only their sum and releases it with `privatized_sum`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..methods import NoiseKind
from .adapter_state import AdapterLayout, AdapterState
from .client_dp import ClientDP
from .local_training import ClientUpdate
from .mechanism import (
    Whitener,
    build_whiteners,
    clip_per_matrix,
    clip_update,
    metric_norm,
    reference_effective_multiplier,
    sample_noise,
)
from .randomness import DPRandomness, SecureStream


class InvalidClientUpdate(ValueError):
    """A client's update has the wrong keys, a wrong shape, or non-finite values."""

    def __init__(self, client_id: int, message: str) -> None:
        super().__init__(f"client {client_id}: {message}")
        self.client_id = client_id


@dataclass
class PhaseRelease:
    """What one phase released: the aggregated delta and the facts the ledger and metrics need."""

    delta: AdapterState
    participants: list[int]
    effective_noise_multiplier: float | None
    mean_update_norm: float
    clipped_fraction: float


def validate_updates(updates: list[ClientUpdate], shapes: dict[str, torch.Size]) -> None:
    """Raise `InvalidClientUpdate` unless every update has exactly `shapes`' keys, shapes and finite values."""
    for u in updates:
        missing, extra = set(shapes) - set(u.delta), set(u.delta) - set(shapes)
        if missing or extra:
            raise InvalidClientUpdate(
                u.client_id,
                f"update keys differ from the phase's trained parameters "
                f"(missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]})",
            )
        for key, value in u.delta.items():
            if value.shape != shapes[key]:
                raise InvalidClientUpdate(
                    u.client_id, f"{key} has shape {tuple(value.shape)}, expected {tuple(shapes[key])}"
                )
            if not torch.isfinite(value).all():
                raise InvalidClientUpdate(u.client_id, f"{key} has non-finite values (NaN/inf); nothing aggregated")
        if u.num_examples < 1:
            raise InvalidClientUpdate(u.client_id, f"num_examples={u.num_examples} must be >= 1")


# A privatized update's metric norm exceeds C + share_std * (sqrt(d) + this) with probability
# below exp(-this^2 / 2) ~ 1e-14 (Gaussian norm concentration): larger means it was not clipped.
_NORM_TAIL = 8.0  # see _privatized_norm_bound


def clip_client_update(
    delta: AdapterState, whiteners: dict[str, Whitener], noise_kind: NoiseKind, clip_norm: float
) -> tuple[AdapterState, float]:
    """Clip one client's whole update as the mechanism prescribes; returns (clipped, norm before clipping)."""
    if noise_kind == NoiseKind.REFERENCE:
        return clip_per_matrix(delta, clip_norm), _frobenius(delta)
    return clip_update(delta, whiteners, clip_norm)


def privatize_update(
    delta: AdapterState,
    whiteners: dict[str, Whitener],
    noise_kind: NoiseKind,
    dp: ClientDP,
    num_shares: int,
    stream: SecureStream,
) -> tuple[AdapterState, float]:
    """A client's share of the distributed Gaussian mechanism: clip, then add noise of std sigma*C/sqrt(m).

    `num_shares` m is the number of clients whose noise makes up the release; the sum of m privatized
    updates carries noise of covariance sigma^2 C^2 M^-1, as the central mechanism. `stream` must be
    secret from the server in a deployment (a `DPRandomness.secret()` stream). Returns (fp32 update, norm
    before clipping).
    """
    if num_shares < 1:
        raise ValueError(f"num_shares {num_shares} must be >= 1")
    clipped, norm = clip_client_update(delta, whiteners, noise_kind, dp.clip_norm)
    share_std = dp.noise_multiplier * dp.clip_norm / math.sqrt(num_shares)
    noise = sample_noise(whiteners, {k: v.shape for k, v in clipped.items()}, share_std, stream)
    return {k: clipped[k].float() + noise[k] for k in clipped}, norm


def check_privatized_update(
    update: ClientUpdate, whiteners: dict[str, Whitener], noise_kind: NoiseKind, dp: ClientDP, num_shares: int
) -> None:
    """Raise `InvalidClientUpdate` if a client-privatized update is too large to have been clipped to C.

    The check is exact up to the noise: a clipped update plus its noise share has metric norm at most
    C + share_std * (sqrt(d) + 8) except with probability < 1e-14. Not defined for `reference` (skipped).
    """
    if noise_kind == NoiseKind.REFERENCE:
        return
    bound = _privatized_norm_bound(update.delta, dp, num_updates=1, num_shares=num_shares)
    norm = metric_norm(update.delta, whiteners)
    if not norm <= bound:
        raise InvalidClientUpdate(
            update.client_id,
            f"privatized update has metric norm {norm:.4g} > {bound:.4g} (C={dp.clip_norm:g} plus its noise "
            "share): it was not clipped as the run requires",
        )


def aggregate_phase(
    updates: list[ClientUpdate],
    layout: AdapterLayout,
    global_state: AdapterState,
    trained_keys: list[str],
    noise_kind: NoiseKind,
    dp: ClientDP | None,
    denominator: float,
    randomness: DPRandomness,
    phase_step: tuple[int, int],
    privatized_shares: int | None = None,
    share_divisor: int | None = None,
) -> PhaseRelease:
    """Aggregate `updates` of `trained_keys` into one delta (nothing else is touched).

    `denominator` is the public q * num_clients used with DP; without DP the weights are example
    counts. Noise draws from `randomness` for (round, phase[, client]), so any process count gives the
    same release. `privatized_shares` = k says the updates arrive privatized by their clients, each with
    1/k of the noise variance (distributed placement in a deployment): they are checked and summed,
    nothing is added. At least k must arrive (else ValueError: the release would carry less noise than
    sigma); r >= k give noise of std sigma * C * sqrt(r / k) >= sigma * C, accounted as sigma.
    `share_divisor` d: each privatized update carries noise variance sigma^2 C^2 / d (the simulation adds it so;
    received updates are checked against it); default k (received) or the number of updates (simulated).
    d = k - t keeps sigma against t colluding sites (`collusion.py`).
    """
    shapes = {k: global_state[k].shape for k in trained_keys}
    validate_updates(updates, shapes)
    if dp is not None and privatized_shares is not None:
        _check_noise_floor(len(updates), privatized_shares)
    updates = sorted(updates, key=lambda u: u.client_id)
    participants = [u.client_id for u in updates]
    if dp is None:
        total = sum(u.num_examples for u in updates)
        delta = {k: torch.zeros(s) for k, s in shapes.items()}
        for u in updates:
            for k in shapes:
                delta[k] += u.delta[k].float() * (u.num_examples / total)
        norms = [_frobenius(u.delta) for u in updates]
        return PhaseRelease(delta, participants, None, _mean(norms), 0.0)

    whiteners = build_whiteners(layout, global_state, trained_keys, noise_kind, dp.regulator_ridge)
    total = {k: torch.zeros(s) for k, s in shapes.items()}
    norms, clipped = [], 0
    std = dp.noise_multiplier * dp.clip_norm
    divisor = share_divisor or privatized_shares or len(updates)
    for u in updates:
        if privatized_shares is not None:
            check_privatized_update(u, whiteners, noise_kind, dp, divisor)
            private, norm = u.delta, math.nan  # the norm before clipping stays with the client
        elif dp.noise_placement == "distributed":
            # Simulate each client's own step: under secure aggregation only the sum is seen.
            stream = randomness.stream(*phase_step, u.client_id, "noise")
            private, norm = privatize_update(u.delta, whiteners, noise_kind, dp, divisor, stream)
        else:
            private, norm = clip_client_update(u.delta, whiteners, noise_kind, dp.clip_norm)
        norms.append(norm)
        clipped += norm > dp.clip_norm
        for k in shapes:
            total[k] += private[k].float()
    if dp.noise_placement == "central" and privatized_shares is None:
        stream = randomness.stream(*phase_step, "noise")
        for k, n in sample_noise(whiteners, shapes, std, stream).items():
            total[k] += n

    return _release(total, denominator, dp, noise_kind, whiteners, participants, norms, clipped)


def privatized_sum(
    total: AdapterState,
    participants: list[int],
    layout: AdapterLayout,
    global_state: AdapterState,
    trained_keys: list[str],
    noise_kind: NoiseKind,
    dp: ClientDP,
    denominator: float,
    noise_shares: int,
) -> PhaseRelease:
    """Release the sum of the privatized updates of `participants` that the server only holds summed.

    Under secure aggregation each client clipped its update and added 1/k of the noise variance
    (`privatize_update`, k = `noise_shares`), and the server receives only `total`, the sum of the
    survivors' updates (fp32, `trained_keys` only). The release is `total / denominator` (uniform weights
    over the public denominator, as `aggregate_phase`). ValueError, nothing released, if fewer than k
    updates are in the sum (less noise than sigma), or if the sum has wrong keys, shapes, non-finite
    values or a metric norm no sum of clipped, noised updates reaches (a sum garbled in unmasking).
    """
    _check_noise_floor(len(participants), noise_shares)
    shapes = {k: global_state[k].shape for k in trained_keys}
    if set(total) != set(shapes) or any(total[k].shape != s for k, s in shapes.items()):
        raise ValueError(f"the summed update does not have the phase's trained parameters {sorted(shapes)[:3]}")
    if not all(torch.isfinite(v).all() for v in total.values()):
        raise ValueError("the summed update has non-finite values; nothing released")
    whiteners = build_whiteners(layout, global_state, trained_keys, noise_kind, dp.regulator_ridge)
    if noise_kind != NoiseKind.REFERENCE:
        bound = _privatized_norm_bound(total, dp, len(participants), noise_shares)
        norm = metric_norm(total, whiteners)
        if not norm <= bound:
            raise ValueError(
                f"the summed update has metric norm {norm:.4g} > {bound:.4g}, more than {len(participants)} clipped "
                "updates and their noise can give (garbled unmasking or an unclipped update); nothing released"
            )
    total = {k: v.float() for k, v in total.items()}
    norms = [math.nan] * len(participants)  # every norm before clipping stays with its client
    return _release(total, denominator, dp, noise_kind, whiteners, sorted(participants), norms, 0)


def _check_noise_floor(count: int, noise_shares: int) -> None:
    if count < noise_shares:
        raise ValueError(
            f"{count} privatized updates carry less noise than sigma: each holds 1/{noise_shares} "
            "of the noise variance; nothing released"
        )


def _privatized_norm_bound(delta: AdapterState, dp: ClientDP, num_updates: int, num_shares: int) -> float:
    """Metric norm a sum of n clipped updates, each with noise std sigma C / sqrt(k), passes with probability
    below exp(-8^2 / 2) ~ 1e-14 (Gaussian norm concentration; the noise std of the sum is sigma C sqrt(n/k))."""
    std = dp.noise_multiplier * dp.clip_norm * math.sqrt(num_updates / num_shares)
    dim = sum(v.numel() for v in delta.values())
    return num_updates * dp.clip_norm + std * (math.sqrt(dim) + _NORM_TAIL)


def _release(
    total: AdapterState,
    denominator: float,
    dp: ClientDP,
    noise_kind: NoiseKind,
    whiteners: dict[str, Whitener],
    participants: list[int],
    norms: list[float],
    clipped: int,
) -> PhaseRelease:
    """The release of a noised sum: divided by the public denominator, with its effective sigma."""
    delta = {k: v / denominator for k, v in total.items()}
    sigma_eff = (
        reference_effective_multiplier(dp.noise_multiplier, whiteners)
        if noise_kind == NoiseKind.REFERENCE
        else dp.noise_multiplier
    )
    # With privatized updates r >= k shares arrived: the noise has std sigma*C*sqrt(r/k) >= sigma*C. The
    # release is accounted at the floor sigma, so the budget holds whatever arrives and r stays unpublished.
    return PhaseRelease(delta, participants, sigma_eff, _mean(norms), clipped / max(1, len(participants)))


def _frobenius(delta: AdapterState) -> float:
    """sqrt(sum of squares) over all of an update's tensors (factor-space norm)."""
    return math.sqrt(sum(float(v.double().square().sum()) for v in delta.values()))


def _mean(values: list[float]) -> float:
    """Mean of the known values (NaN marks a norm only the client knows); NaN if none is known."""
    known = [v for v in values if not math.isnan(v)]
    return sum(known) / len(known) if known else math.nan
