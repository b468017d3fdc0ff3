"""Exact aggregation of one phase's client updates, with or without client-level DP.

Without DP the trained factor's deltas are averaged with example-count weights. With DP each
update is clipped, the clipped updates are summed in fp32 in client-id order, Gaussian noise is
added, and the sum is divided by the public denominator q * num_clients (DESIGN 2.3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .adapter_state import AdapterLayout, AdapterState
from .client import ClientUpdate
from .mechanism import (
    build_whiteners,
    clip_per_matrix,
    clip_update,
    reference_effective_multiplier,
    sample_noise,
)
from .seeding import derive_seed


class InvalidClientUpdate(ValueError):
    """A client's update has the wrong keys, a wrong shape, or non-finite values."""

    def __init__(self, client_id: int, message: str) -> None:
        super().__init__(f"client {client_id}: {message}")
        self.client_id = client_id


@dataclass(frozen=True)
class ClientDP:
    """Client-level DP settings: sigma, clip norm C, ridge lambda, noise placement, delta, budget."""

    noise_multiplier: float
    clip_norm: float
    ridge: float = 1e-6
    placement: str = "central"
    delta: float = 1e-5
    target_epsilon: float | None = None

    def __post_init__(self) -> None:
        if not self.noise_multiplier > 0:
            raise ValueError(f"noise multiplier {self.noise_multiplier} must be > 0 with client-level DP")
        if not self.clip_norm > 0:
            raise ValueError(f"--clip-norm {self.clip_norm} must be > 0")
        if self.ridge < 0:
            raise ValueError(f"--regulator-ridge {self.ridge} must be >= 0")
        if self.placement not in ("central", "distributed"):
            raise ValueError(f"noise placement {self.placement!r} is not 'central' or 'distributed'")


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


def aggregate_phase(
    updates: list[ClientUpdate],
    layout: AdapterLayout,
    global_state: AdapterState,
    trained_keys: list[str],
    noise_kind: str,
    dp: ClientDP | None,
    denominator: float,
    seed: int,
    phase_step: tuple[int, int],
) -> PhaseRelease:
    """Aggregate `updates` of `trained_keys` into one delta (nothing else is touched).

    `denominator` is the public q * num_clients used with DP; without DP the weights are example
    counts. Noise is seeded from (seed, round, phase[, client]) so any process count gives the same release.
    """
    shapes = {k: global_state[k].shape for k in trained_keys}
    validate_updates(updates, shapes)
    updates = sorted(updates, key=lambda u: u.client_id)
    participants = [u.client_id for u in updates]
    if dp is None:
        total = sum(u.num_examples for u in updates)
        delta = {k: torch.zeros(s) for k, s in shapes.items()}
        for u in updates:
            for k in shapes:
                delta[k] += u.delta[k].float() * (u.num_examples / total)
        norms = [math.sqrt(sum(float(v.double().square().sum()) for v in u.delta.values())) for u in updates]
        return PhaseRelease(delta, participants, None, _mean(norms), 0.0)

    whiteners = build_whiteners(layout, global_state, trained_keys, noise_kind, dp.ridge)
    total = {k: torch.zeros(s) for k, s in shapes.items()}
    norms, clipped = [], 0
    for u in updates:
        if noise_kind == "reference":
            clipped_delta = clip_per_matrix(u.delta, dp.clip_norm)
            norm = math.sqrt(sum(float(v.double().square().sum()) for v in u.delta.values()))
        else:
            clipped_delta, norm = clip_update(u.delta, whiteners, dp.clip_norm)
        norms.append(norm)
        clipped += norm > dp.clip_norm
        for k in shapes:
            total[k] += clipped_delta[k].float()

    std = dp.noise_multiplier * dp.clip_norm
    if dp.placement == "distributed" and updates:
        # Each client adds std/sqrt(m): under secure aggregation only the sum (std^2 in all) is seen.
        draws = [(std / math.sqrt(len(updates)), derive_seed(seed, *phase_step, u.client_id, "noise")) for u in updates]
    else:
        draws = [(std, derive_seed(seed, *phase_step, "noise"))]
    for draw_std, draw_seed in draws:
        generator = torch.Generator().manual_seed(draw_seed)
        for k, n in sample_noise(whiteners, shapes, draw_std, generator).items():
            total[k] += n

    delta = {k: v / denominator for k, v in total.items()}
    sigma_eff = (
        reference_effective_multiplier(dp.noise_multiplier, whiteners)
        if noise_kind == "reference"
        else dp.noise_multiplier
    )
    return PhaseRelease(delta, participants, sigma_eff, _mean(norms), clipped / max(1, len(updates)))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
