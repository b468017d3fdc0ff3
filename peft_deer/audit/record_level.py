"""The record-level audit: one canary record in one client's DP-SGD."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset
from tqdm import tqdm

from ..federated.adapter_state import AdapterLayout, AdapterState, load_adapter_state
from ..federated.client import train_client
from ..federated.local_training import ClientTask, LocalTraining, set_phase_trainability
from ..federated.mechanism import build_whiteners
from ..federated.randomness import DPRandomness
from ..federated.record_dp import RecordDP, record_sample_rate, record_steps
from ..federated.schedule import Phase, iter_phases, method_spec
from ..federated.seeding import derive_seed
from .audit_settings import RECORD_TRIALS, AuditSettings
from .bounds import AuditResult
from .game import audit_context, balanced_worlds, check_common, dot, whitened
from .setting import build_audit_adapter
from .verdict import check_plant, judge


def _canary_gradient(
    model: nn.Module, layout: AdapterLayout, state: AdapterState, phase: Phase, x: torch.Tensor, y: torch.Tensor
) -> AdapterState:
    """The canary record's per-sample gradient of the phase's trained factor(s) at the initial state."""
    load_adapter_state(model, state)
    set_phase_trainability(model, phase)
    params = dict(model.named_parameters())
    keys = layout.trained_keys(phase.factors)
    loss = nn.functional.cross_entropy(model(pixel_values=x[None]).logits, y[None])
    grads = torch.autograd.grad(loss, [params[k] for k in keys])
    return {k: g.detach().float() for k, g in zip(keys, grads, strict=True)}


def run_record_audit(settings: AuditSettings | None = None, /, **overrides: Any) -> AuditResult:
    """Record-level audit: one client update of DP-SGD (`train_client` + `RecordDP`) with a canary record:
    `settings` (an `AuditSettings`; default: its defaults, `RECORD_TRIALS` trials) with `overrides` by field name.

    `noise_seed` (tests only): `dp_seed`s derived from it, unused by the adversary (see `run_client_audit`).
    `plant_noise_factor` F: DP-SGD runs with multiplier sigma * F (`RecordDP`, its real noise path) while the
    claimed epsilons keep sigma. `local_epochs` (default 1) sets the steps: local_epochs * int(1 / q).
    """
    audit = AuditSettings.of(settings, RECORD_TRIALS, **overrides)
    method, noise_multiplier, clip_norm, delta = audit.method, audit.noise_multiplier, audit.clip_norm, audit.delta
    trials, seed, noise_seed, reproducible_noise = audit.trials, audit.seed, audit.noise_seed, audit.reproducible_noise
    num_examples, batch_size, lr, local_epochs = audit.num_examples, audit.batch_size, audit.lr, audit.local_epochs
    rank, dim, frozen_scale, ridge = audit.rank, audit.dim, audit.frozen_scale, audit.regulator_ridge
    plant_noise_factor, progress = audit.plant_noise_factor, audit.progress
    check_common(method, noise_multiplier, clip_norm, trials, delta)
    check_plant(plant_noise_factor)
    if local_epochs < 1:
        raise ValueError(f"local epochs {local_epochs} must be >= 1")
    if num_examples < 2:
        raise ValueError(f"--record-examples {num_examples} must be >= 2")
    if not 1 <= batch_size <= num_examples:
        raise ValueError(f"--batch-size {batch_size} must be in [1, --record-examples={num_examples}]")
    if not lr > 0:
        raise ValueError(f"--lr {lr} must be > 0")
    if rank < 1 or dim < rank:
        raise ValueError(f"--rank {rank} must be in [1, --dim={dim}]")
    if not (frozen_scale > 0 and math.isfinite(frozen_scale)):
        raise ValueError(f"--frozen-scale {frozen_scale} must be finite and > 0")
    noise = method_spec(method).record_noise
    record = RecordDP(
        noise_multipliers=(noise_multiplier * plant_noise_factor,),
        clip_norm=clip_norm,
        delta=delta,
        noise=noise,
        regulator_ridge=ridge,
    )
    training = LocalTraining(
        local_epochs=local_epochs, batch_size=batch_size, lr=lr, momentum=0.0, weight_decay=0.0, record_dp=record
    )
    q = record_sample_rate(num_examples, batch_size)
    steps = record_steps(num_examples, batch_size, local_epochs)
    expected_batch = max(1, round(q * num_examples))
    start = time.perf_counter()
    with audit_context():
        model, layout, state = build_audit_adapter(method, rank, dim, frozen_scale, 1, 2, seed=seed)
        phase = next(iter_phases(method, 1))
        keys = layout.trained_keys(phase.factors)
        whiteners = build_whiteners(layout, state, keys, noise, ridge)
        # The canary: a large input along the frozen A's top right-singular vector, labelled against the
        # model's prediction; two classes keep its per-sample gradient's direction fixed while it trains.
        a = state[layout.lora[0].a_key]
        x = 50.0 * torch.linalg.svd(a.double()).Vh[0].float()
        for _ in range(60):  # the canary's gradient must be >= 10 C, so a clipping bug shows (module doc, 7)
            with torch.no_grad():
                load_adapter_state(model, state)
                y = model(pixel_values=x[None]).logits[0].argmin()
            grad = _canary_gradient(model, layout, state, phase, x, y)
            white = whitened(grad, whiteners)
            white_norm = math.sqrt(dot(white, white))
            if white_norm >= 10 * clip_norm:
                break
            x = 2 * x
        else:
            raise ValueError(f"--clip-norm {clip_norm}: the canary record's gradient cannot reach 10 x the clip norm")
        direction = {k: v / white_norm for k, v in white.items()}  # unit, whitened
        worlds = balanced_worlds(trials, seed)
        labels = torch.zeros(num_examples, dtype=torch.long)
        labels[0] = y
        zeros = torch.zeros(num_examples, dim)
        with_canary = zeros.clone()
        with_canary[0] = x
        datasets = {True: TensorDataset(with_canary, labels), False: TensorDataset(zeros, labels)}
        scale = expected_batch / lr  # delta = -lr / B * (sum of clipped per-sample grads + noise) per step
        stats = np.empty(trials)

        def update(canary_in: bool, dp_seed: int | None) -> AdapterState:
            secret = None if dp_seed is None else DPRandomness.from_seed(dp_seed)  # None: OS entropy
            task = ClientTask(0, datasets[canary_in], seed, dp_randomness=secret)
            return train_client(model, layout, state, phase, task, training).delta

        for i in tqdm(range(trials), desc=f"record audit {method}", unit="trial", disable=not progress):
            if reproducible_noise:
                public = derive_seed(seed, "record-trial", i)
                diff = {
                    k: v - w
                    for (k, v), w in zip(
                        update(bool(worlds[i]), public).items(), update(False, public).values(), strict=True
                    )
                }
                white_diff = whitened(diff, whiteners)
                stats[i] = math.sqrt(dot(white_diff, white_diff)) * scale / (noise_multiplier * clip_norm)
            else:
                # dp_seed None: fresh OS entropy, as in a real run
                hidden = None if noise_seed is None else derive_seed(noise_seed, "hidden-record-trial", i)
                delta_ = update(bool(worlds[i]), hidden)
                stats[i] = -dot(whitened(delta_, whiteners), direction) * scale / (noise_multiplier * clip_norm)
    seconds = time.perf_counter() - start
    claimed = [(noise_multiplier, q, steps)]  # the ledger's history: nominal sigma, planted factor or not
    result = judge(stats, worlds, delta, claimed, plant_noise_factor)
    return AuditResult(
        level="record",
        method=method,
        noise_multiplier=noise_multiplier,
        clip_norm=clip_norm,
        delta=delta,
        trials=trials,
        epsilon_nominal=result["epsilon_ledger"],
        **result,
        reproducible_noise=reproducible_noise,
        seconds=seconds,
        seconds_per_trial=seconds / trials,
        details={
            "noise": noise,
            "record_examples": num_examples,
            "batch_size": batch_size,
            "record_sample_rate": q,
            "steps": steps,
            "lr": lr,
            "frozen_scale": frozen_scale,
            "rank": rank,
            "dim": dim,
            "seed": seed,
        },
    )
