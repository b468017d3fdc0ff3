"""Client update: train one client's copy of the adapter from the global state, return the delta.

A client is data plus a seed, never a model: the process's single `PeftModel` is loaded with the
global adapter state, trained for E local epochs, and the trained parameters' delta is returned.
A `ClientEngine` trains a list of clients of one phase; `SequentialEngine` does it one by one, and
a batched engine can replace it behind the same `train_clients` call.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from peft import PeftModel
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .adapter_state import AdapterLayout, AdapterState, load_adapter_state
from .label_skew import adjusted_cross_entropy, logit_offsets
from .schedule import Phase


@dataclass(frozen=True)
class LocalTraining:
    """Local optimisation of one client: E epochs of mini-batch SGD (momentum, weight decay) or AdamW."""

    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 1e-4
    optimizer: str = "sgd"
    mixed_precision: str = "no"
    logit_adjustment: float = 0.0  # tau of logit-adjusted cross-entropy (label_skew.py); 0: plain
    record_dp: Any = None  # a record_dp.RecordDP: local training becomes DP-SGD (DESIGN 2.6)

    def __post_init__(self) -> None:
        if self.local_epochs < 1:
            raise ValueError(f"--local-epochs {self.local_epochs} must be >= 1")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size {self.batch_size} must be >= 1")
        if not self.lr > 0:
            raise ValueError(f"--lr {self.lr} must be > 0")
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer {self.optimizer!r} is not 'sgd' or 'adamw'")
        if self.mixed_precision not in ("no", "bf16"):
            raise ValueError(
                f"--mixed-precision {self.mixed_precision!r} is not 'no' or 'bf16' (fp16 is not supported)"
            )
        if not 0 <= self.logit_adjustment < float("inf"):
            raise ValueError(f"--logit-adjustment {self.logit_adjustment} must be a finite number >= 0")


@dataclass(frozen=True)
class ClientTask:
    """One client's work in a phase: its id, its local dataset of (pixel_values, label) and two seeds.

    `seed` (public, from --seed) fixes the data order and dropout. `dp_seed` seeds the draws behind
    record-level DP (Poisson batches, DP-SGD noise) and must be secret: the server derives it from the
    run's `DPRandomness`; None draws a fresh one from the OS.
    """

    client_id: int
    dataset: Dataset
    seed: int
    dp_seed: int | None = field(default=None, repr=False)


@dataclass
class ClientUpdate:
    """A client's result: `delta` (trained parameter name -> fp32 CPU tensor), example count, stats."""

    client_id: int
    delta: AdapterState
    num_examples: int
    mean_loss: float = float("nan")
    images_seen: int = 0
    seconds: float = 0.0


class ClientEngine(Protocol):
    def train_clients(
        self,
        model: PeftModel,
        layout: AdapterLayout,
        global_state: AdapterState,
        phase: Phase,
        tasks: Sequence[ClientTask],
    ) -> list[ClientUpdate]: ...


def set_phase_trainability(model: PeftModel, phase: Phase) -> None:
    """Make exactly the phase's factor(s) (and the head) trainable on the process's model."""
    config = model.peft_config[model.active_adapter]
    if config.method != "lora":
        model.base_model.set_deer_phase(phase.config_phase)


def begin_local_training(
    model: PeftModel, layout: AdapterLayout, global_state: AdapterState, phase: Phase
) -> tuple[list[str], dict[str, torch.nn.Parameter]]:
    """Load the global adapter, make exactly the phase's factor(s) and head trainable.

    Returns the trained parameter names and the model's parameters by name (every engine starts here).
    """
    load_adapter_state(model, global_state)
    set_phase_trainability(model, phase)
    keys = layout.trained_keys(phase.factors)
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    if trainable != set(keys):
        raise RuntimeError(f"trainable parameters {sorted(trainable - set(keys))[:3]} do not match the phase {phase}")
    return keys, params


def autocast_for(device: torch.device, mixed_precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device` when `mixed_precision == "bf16"`, else a no-op (fp16 is never used)."""
    if mixed_precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


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
    prior when `training.logit_adjustment` > 0.
    """
    if loss_fn is None:
        loss_fn = local_loss(model, task, training)
    if training.record_dp is not None:
        from .record_dp import train_client_record  # record-level DP-SGD with opacus

        return train_client_record(model, layout, global_state, phase, task, training, loss_fn)
    start = time.perf_counter()
    device = next(model.parameters()).device
    keys, params = begin_local_training(model, layout, global_state, phase)
    optimizer = _make_optimizer([params[k] for k in keys], training)
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
    delta = {k: params[k].detach().to("cpu", torch.float32) - global_state[k] for k in keys}
    return ClientUpdate(
        task.client_id, delta, len(task.dataset), loss_sum / max(seen, 1), seen, time.perf_counter() - start
    )


def local_loss(
    model: PeftModel, task: ClientTask, training: LocalTraining
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The client's training loss: cross-entropy, logit-adjusted by its label prior if asked."""
    if not training.logit_adjustment:
        return torch.nn.functional.cross_entropy
    offsets = logit_offsets(task.dataset, num_labels(model), training.logit_adjustment)
    return lambda logits, labels: adjusted_cross_entropy(logits, labels, offsets)


def num_labels(model: PeftModel) -> int:
    """Number of classes of the model's classifier (its config's `num_labels`)."""
    return int(model.get_base_model().config.num_labels)


def _make_optimizer(params: list[torch.nn.Parameter], training: LocalTraining) -> torch.optim.Optimizer:
    if training.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=training.lr, weight_decay=training.weight_decay)
    return torch.optim.SGD(params, lr=training.lr, momentum=training.momentum, weight_decay=training.weight_decay)


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
