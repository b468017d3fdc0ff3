"""Client update: train one client's copy of the adapter from the global state, return the delta.

`train_client` picks the trainer: plain local SGD here, or DP-SGD (`dp_sgd.py`) when the local
training carries record-level DP settings. A `ClientEngine` trains a list of clients of one phase;
`SequentialEngine` does it one by one, and a batched engine can replace it behind the same
`train_clients` call.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from peft import PeftModel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .adapter_state import AdapterLayout, AdapterState
from .dp_sgd import train_client_record
from .local_training import (
    ClientTask,
    ClientUpdate,
    LocalTraining,
    PhaseContext,
    autocast_for,
    begin_local_training,
    local_loss,
    make_optimizer,
)
from .schedule import Phase


class ClientEngine(Protocol):
    def train_clients(
        self,
        model: PeftModel,
        layout: AdapterLayout,
        global_state: AdapterState,
        phase: Phase,
        tasks: Sequence[ClientTask],
    ) -> list[ClientUpdate]: ...


def train_client(
    model: PeftModel,
    layout: AdapterLayout,
    global_state: AdapterState,
    phase: Phase,
    task: ClientTask,
    training: LocalTraining,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> ClientUpdate:
    """Train `task`'s client from `global_state` for E epochs on `phase`'s factor(s); return its delta.

    `loss_fn(logits, labels)` defaults to cross-entropy, logit-adjusted by the client's own label
    prior when `training.logit_adjustment` > 0. With `training.record_dp` set, the trainer is DP-SGD.
    """
    if loss_fn is None:
        loss_fn = local_loss(model, task, training)
    ctx = PhaseContext(model, layout, global_state, phase)
    if training.record_dp is not None:
        return train_client_record(ctx, task, training, loss_fn)
    return _train_client_plain(ctx, task, training, loss_fn)


def _train_client_plain(
    ctx: PhaseContext,
    task: ClientTask,
    training: LocalTraining,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> ClientUpdate:
    """E epochs of shuffled mini-batch steps with `training`'s optimizer (no DP inside the client)."""
    start, model, device = time.perf_counter(), ctx.model, ctx.device
    keys, params = begin_local_training(ctx)
    optimizer = make_optimizer([params[k] for k in keys], training)
    generator = torch.Generator().manual_seed(task.seed)
    loader = DataLoader(task.dataset, batch_size=training.batch_size, shuffle=True, generator=generator)
    torch.manual_seed(task.seed)  # dropout and any other stochastic layers
    autocast = autocast_for(device, training.mixed_precision)
    model.train()
    loss_sum, seen = 0.0, 0
    for _ in range(training.local_epochs):
        for pixel_values, labels in loader:
            pixel_values, labels = pixel_values.to(device), labels.to(device)
            with autocast:
                logits = model(pixel_values=pixel_values).logits
            loss = loss_fn(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * len(labels)
            seen += len(labels)
    return ClientUpdate(
        task.client_id,
        ctx.delta(params, keys),
        len(task.dataset),
        loss_sum / max(seen, 1),
        seen,
        time.perf_counter() - start,
    )


@dataclass
class SequentialEngine:
    """Trains the phase's clients one after another on the process's single model (the reference way)."""

    training: LocalTraining
    progress: bool = False

    def train_clients(
        self,
        model: PeftModel,
        layout: AdapterLayout,
        global_state: AdapterState,
        phase: Phase,
        tasks: Sequence[ClientTask],
    ) -> list[ClientUpdate]:
        bar = tqdm(
            tasks,
            desc=f"round {phase.round + 1} phase {''.join(phase.factors)}",
            unit="client",
            leave=False,
            disable=not self.progress,
        )
        return [train_client(model, layout, global_state, phase, t, self.training) for t in bar]
