"""Local training of one client: its settings, its task and result, and the steps every trainer shares.

A client is data plus a seed, never a model: the process's single `PeftModel` is loaded with the
global adapter state (`begin_local_training`), the phase's factor(s) are trained and the delta is
returned as a `ClientUpdate`. The trainers themselves live elsewhere: plain SGD in `client.py`,
DP-SGD in `dp_sgd.py`, many clients at once in `batched.py`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

import torch
from peft import PeftModel
from torch.utils.data import Dataset

from .adapter_state import AdapterLayout, AdapterState, load_adapter_state
from .label_skew import adjusted_cross_entropy, logit_offsets
from .randomness import DPRandomness
from .record_dp import RecordDP
from .schedule import Phase, method_spec

if TYPE_CHECKING:  # the settings are light; the core only reads their attributes
    from ..settings import RunSettings


@dataclass(frozen=True, kw_only=True)
class LocalTraining:
    """Local optimisation of one client: E epochs of mini-batch SGD (momentum, weight decay) or AdamW.

    Its fields are spelled as the settings' `LocalTrainingSettings` (`from_settings` copies them by name).
    """

    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 1e-4
    optimizer: str = "sgd"
    mixed_precision: str = "no"
    logit_adjustment: float = 0.0  # tau of logit-adjusted cross-entropy (label_skew.py); 0: plain
    record_dp: RecordDP | None = None  # set: local training becomes DP-SGD (DESIGN 2.6)

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

    @classmethod
    def from_settings(cls, settings: RunSettings, record_dp: RecordDP | None = None) -> LocalTraining:
        """What a client of the run does in a phase (DP-SGD when `record_dp` is given)."""
        names = [f.name for f in fields(cls) if f.name != "record_dp"]
        return cls(**{name: getattr(settings.local, name) for name in names}, record_dp=record_dp)


@dataclass(frozen=True)
class ClientTask:
    """One client's work in a phase: its id, its local dataset of (pixel_values, label), a seed and a secret.

    `seed` (public, from --seed) fixes the data order and dropout. `dp_randomness` is the secret source
    of the draws behind record-level DP (Poisson batches, DP-SGD noise): the simulation derives it from
    the run's `DPRandomness` (`child(round, phase, client, "record-dp")`); None draws a fresh one from the OS.
    """

    client_id: int
    dataset: Dataset
    seed: int
    dp_randomness: DPRandomness | None = field(default=None, repr=False)


@dataclass
class ClientUpdate:
    """A client's result: `delta` (trained parameter name -> fp32 CPU tensor), example count, stats."""

    client_id: int
    delta: AdapterState
    num_examples: int
    mean_loss: float = float("nan")
    images_seen: int = 0
    seconds: float = 0.0


def set_phase_trainability(model: PeftModel, phase: Phase) -> None:
    """Make exactly the phase's factor(s) (and the head) trainable on the process's model."""
    config = model.peft_config[model.active_adapter]
    if not method_spec(config.method).trains_jointly:
        model.base_model.set_deer_phase(phase.config_phase)


@dataclass(frozen=True)
class PhaseContext:
    """What every trainer of a phase shares: the process's model, its adapter layout, the global adapter
    state the phase starts from, and the phase (which factor(s) train)."""

    model: PeftModel
    layout: AdapterLayout
    global_state: AdapterState
    phase: Phase

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def delta(self, params: dict[str, torch.Tensor], keys: list[str]) -> AdapterState:
        """The trained parameters `keys` minus the global state, as fp32 CPU tensors (a client's update)."""
        return {k: params[k].detach().to("cpu", torch.float32) - self.global_state[k] for k in keys}


def begin_local_training(ctx: PhaseContext) -> tuple[list[str], dict[str, torch.nn.Parameter]]:
    """Load the global adapter, make exactly the phase's factor(s) and head trainable.

    Returns the trained parameter names and the model's parameters by name (every trainer starts here).
    """
    load_adapter_state(ctx.model, ctx.global_state)
    set_phase_trainability(ctx.model, ctx.phase)
    keys = ctx.layout.trained_keys(ctx.phase.factors)
    params = dict(ctx.model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    if trainable != set(keys):
        raise RuntimeError(
            f"trainable parameters {sorted(trainable - set(keys))[:3]} do not match the phase {ctx.phase}"
        )
    return keys, params


def autocast_for(device: torch.device, mixed_precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device` when `mixed_precision == "bf16"`, else a no-op (fp16 is never used)."""
    if mixed_precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_optimizer(params: list[torch.nn.Parameter], training: LocalTraining) -> torch.optim.Optimizer:
    """The local optimizer over `params`: AdamW, or SGD with momentum (both with weight decay)."""
    if training.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=training.lr, weight_decay=training.weight_decay)
    return torch.optim.SGD(params, lr=training.lr, momentum=training.momentum, weight_decay=training.weight_decay)


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
