"""The client-level audit: the canary client's worst-case clipped update through the project's own server."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..federated.accountant import check_delta
from ..federated.adapter_state import AdapterLayout, AdapterState
from ..federated.aggregate import ClientDP
from ..federated.local_training import ClientUpdate
from ..federated.mechanism import Whitener, build_whiteners
from ..federated.randomness import DPRandomness
from ..federated.schedule import NoiseKind, Phase, iter_phases, method_spec
from ..federated.seeding import derive_seed
from ..federated.server import FederatedServer
from .audit_settings import CLIENT_TRIALS, AuditSettings
from .bounds import AuditResult
from .game import audit_context, balanced_worlds, check_common, dot, whitened
from .setting import build_audit_adapter
from .verdict import check_plant, judge, rdp_epsilon

# The canary's raw update is this many times C: clipping brings it down to C, so the release's shift is C
# only if clipping works (a server that clips to 2C, or not at all, shows a larger shift: `detected`).
CANARY_SCALE = 10.0


def _fixed_direction(keys: Sequence[str], shapes: dict[str, torch.Size], norm_: float, seed: int) -> AdapterState:
    """A fixed random vector over `keys` with total Frobenius norm `norm_` (the canary's whitened update)."""
    g = torch.Generator().manual_seed(derive_seed(seed, "canary", *keys) % 2**62)
    u = {k: torch.randn(shapes[k], generator=g) for k in keys}
    total = math.sqrt(sum(float(v.square().sum()) for v in u.values()))
    return {k: v * (norm_ / total) for k, v in u.items()}


def canary_update(
    keys: Sequence[str],
    whiteners: dict[str, Whitener],
    noise_kind: NoiseKind,
    state: AdapterState,
    clip_norm: float,
    seed: int,
) -> AdapterState:
    """The canary client's raw update: CANARY_SCALE x C along the worst-case direction for `noise_kind`.

    Clipped to C it is the worst-case clipped update (module doc, 2); unclipped it is 10 times larger.
    """
    shapes = {k: state[k].shape for k in keys}
    clip_norm = CANARY_SCALE * clip_norm  # the raw size; the mechanism's clipping must bring it to C
    if noise_kind != NoiseKind.REFERENCE:
        u = _fixed_direction(keys, shapes, clip_norm, seed)
        return {k: whiteners[k].color(u[k]) for k in keys}
    out = {}
    for k in keys:
        w = whiteners[k]
        rows, cols = shapes[k]
        if w.chol is None:  # identity metric (head): any direction
            out[k] = torch.zeros(shapes[k])
            out[k][0, 0] = clip_norm
            continue
        metric = w.chol.double() @ w.chol.double().T
        top = torch.linalg.eigh(metric).eigenvectors[:, -1].float()  # unit eigenvector of lambda_max
        if w.side == "right":  # B (d_out, r): dB = C e v^T
            e = torch.zeros(rows)
            e[0] = 1.0
            out[k] = clip_norm * torch.outer(e, top)
        else:  # A (r, d_in): dA = C v e^T
            e = torch.zeros(cols)
            e[0] = 1.0
            out[k] = clip_norm * torch.outer(top, e)
    return out


@dataclass
class _ClientSetup:
    method: str
    layout: AdapterLayout
    state: AdapterState
    num_clients: int
    clients_per_phase: int
    dp: ClientDP
    phases: list[Phase]
    seed: int


@dataclass
class _Release:
    released_sum: AdapterState  # release.delta * denominator: the noisy sum of clipped updates
    whiteners: dict[str, Whitener]
    canary_white: AdapterState  # whitened canary update (its direction)
    effective_noise_multiplier: float


def _run_releases(setup: _ClientSetup, canary_in: bool, randomness: DPRandomness) -> list[_Release]:
    """One trial: `releases` releases of a fresh `FederatedServer`; client 0 is the canary when `canary_in`."""
    server = FederatedServer(
        method=setup.method,
        layout=setup.layout,
        global_state=dict(setup.state),  # add_delta never writes into these tensors: a shallow copy suffices
        num_clients=setup.num_clients,
        clients_per_phase=setup.clients_per_phase,
        dp=setup.dp,
        randomness=randomness,
    )
    denominator = server.sample_rate * server.num_clients
    out = []
    for phase in setup.phases:
        keys = server.trained_keys(phase)
        noise, ridge = server.spec.noise, setup.dp.regulator_ridge
        whiteners = build_whiteners(server.layout, server.global_state, keys, noise, ridge)
        canary = canary_update(keys, whiteners, server.spec.noise, server.global_state, setup.dp.clip_norm, setup.seed)
        zero = {k: torch.zeros_like(v) for k, v in canary.items()}
        updates = [
            ClientUpdate(c, canary if c == 0 else zero, num_examples=1)
            for c in server.participants(phase)
            if canary_in or c != 0
        ]
        release = server.finish_phase(phase, updates)
        out.append(
            _Release(
                {k: v * denominator for k, v in release.delta.items()},
                whiteners,
                whitened(canary, whiteners),  # the direction (clipping only rescales it): not the audit's clip
                float(release.effective_noise_multiplier),
            )
        )
    return out


def _projection_statistic(releases: list[_Release], sigma_c: float) -> float:
    """sum over releases of <whiten(sum), w> / (||w|| sigma C): N(0, T) without the canary (module doc, 3)."""
    total = 0.0
    for r in releases:
        w_norm = math.sqrt(dot(r.canary_white, r.canary_white))
        total += dot(whitened(r.released_sum, r.whiteners), r.canary_white) / (w_norm * sigma_c)
    return total


def _difference_statistic(real: list[_Release], rerun: list[_Release], sigma_c: float) -> float:
    """Seed known: sum over releases of ||whiten(real - rerun)|| / (sigma C); exactly 0 without the canary."""
    total = 0.0
    for r, s in zip(real, rerun, strict=True):
        diff = {k: r.released_sum[k] - s.released_sum[k] for k in r.released_sum}
        white = whitened(diff, r.whiteners)
        total += math.sqrt(dot(white, white)) / sigma_c
    return total


def run_client_audit(settings: AuditSettings | None = None, /, **overrides: Any) -> AuditResult:
    """Client-level audit of `method`'s mechanism through `FederatedServer` (module doc, 2-5): `settings`
    (an `AuditSettings`; default: its defaults, `CLIENT_TRIALS` trials) with `overrides` by field name.

    `plant_noise_factor` F: the server adds noise with multiplier sigma * F (its real noise path), while
    the claimed epsilons keep sigma: F < 1 plants a bug that the verdict (`detected`) should catch.

    `noise_seed` (tests only): the mechanism's randomness comes from `DPRandomness.from_seed` with seeds
    derived from it, which the adversary does NOT use -- statistically the same as secret noise, but the
    audit is deterministic. Without it (and without `reproducible_noise`) every trial draws a fresh secret.
    """
    audit = AuditSettings.of(settings, CLIENT_TRIALS, **overrides)
    method, noise_multiplier, clip_norm, delta = audit.method, audit.noise_multiplier, audit.clip_norm, audit.delta
    trials, seed, noise_seed, reproducible_noise = audit.trials, audit.seed, audit.noise_seed, audit.reproducible_noise
    num_clients, sample_rate, releases = audit.num_clients, audit.sample_rate, audit.releases
    rank, dim, frozen_scale, ridge = audit.rank, audit.dim, audit.frozen_scale, audit.regulator_ridge
    plant_noise_factor, progress = audit.plant_noise_factor, audit.progress
    check_common(method, noise_multiplier, clip_norm, trials, delta)
    check_plant(plant_noise_factor)
    if num_clients < 1:
        raise ValueError(f"--num-clients {num_clients} must be >= 1")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"--sample-rate {sample_rate} must be in (0, 1]")
    clients_per_phase = round(sample_rate * num_clients)
    if clients_per_phase < 1:
        raise ValueError(f"--sample-rate {sample_rate} x --num-clients {num_clients} rounds to 0 clients per phase")
    if releases < 1:
        raise ValueError(f"--releases {releases} must be >= 1")
    if rank < 1 or dim < rank:
        raise ValueError(f"--rank {rank} must be in [1, --dim={dim}]")
    if not (frozen_scale > 0 and math.isfinite(frozen_scale)):
        raise ValueError(f"--frozen-scale {frozen_scale} must be finite and > 0")
    with audit_context():
        check_delta(delta, num_clients)
    spec = method_spec(method)
    start = time.perf_counter()
    with audit_context():
        _, layout, state = build_audit_adapter(method, rank, dim, frozen_scale, seed=seed)
        rounds = -(-releases // spec.releases_per_round)
        setup = _ClientSetup(
            method,
            layout,
            state,
            num_clients,
            clients_per_phase,
            ClientDP(
                noise_multiplier=noise_multiplier * plant_noise_factor,
                clip_norm=clip_norm,
                regulator_ridge=ridge,
                delta=delta,
            ),
            list(itertools.islice(iter_phases(method, rounds), releases)),
            seed,
        )
        worlds = balanced_worlds(trials, seed)
        stats = np.empty(trials)
        min_sigma = [math.inf] * releases  # per release: the smallest effective multiplier of any trial
        sigma_c = noise_multiplier * clip_norm
        for i in tqdm(range(trials), desc=f"audit {method}", unit="trial", disable=not progress):
            if reproducible_noise:
                randomness = DPRandomness.from_seed(derive_seed(seed, "trial", i))  # public
                real = _run_releases(setup, bool(worlds[i]), randomness)
                rerun = _run_releases(setup, False, DPRandomness.from_seed(derive_seed(seed, "trial", i)))
                stats[i] = _difference_statistic(real, rerun, sigma_c)
            else:
                randomness = (
                    DPRandomness.secret()
                    if noise_seed is None
                    else DPRandomness.from_seed(derive_seed(noise_seed, "hidden-trial", i))
                )
                real = _run_releases(setup, bool(worlds[i]), randomness)
                stats[i] = _projection_statistic(real, sigma_c)
            for t, r in enumerate(real):
                min_sigma[t] = min(min_sigma[t], r.effective_noise_multiplier)
    seconds = time.perf_counter() - start
    q = setup.clients_per_phase / num_clients
    # what the ledger claims: the multipliers the server reports, without the planted factor
    claimed = [(s / plant_noise_factor, q, 1) for s in min_sigma]
    return AuditResult(
        level="client",
        method=method,
        noise_multiplier=noise_multiplier,
        clip_norm=clip_norm,
        delta=delta,
        trials=trials,
        epsilon_nominal=rdp_epsilon([(noise_multiplier, q, releases)], delta),
        **judge(stats, worlds, delta, claimed, plant_noise_factor),
        reproducible_noise=reproducible_noise,
        seconds=seconds,
        seconds_per_trial=seconds / trials,
        details={
            "noise": spec.noise,
            "sample_rate": clients_per_phase / num_clients,
            "num_clients": num_clients,
            "releases": releases,
            "effective_noise_multipliers": min_sigma,  # of the mechanism as run (planted factor included)
            "frozen_scale": frozen_scale,
            "rank": rank,
            "dim": dim,
            "seed": seed,
        },
    )
