"""The global adapter as plain tensors: which parameters are LoRA factors, which are the head.

An `AdapterState` maps PEFT parameter names to fp32 CPU tensors. Clients are such states, not
model copies: the one frozen backbone per process is loaded with a state before it trains.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from peft import PeftModel
from peft.tuners.lora.layer import LoraLayer

from ..tuner.model import has_adapter, unsupported_layer_reason

AdapterState = dict[str, torch.Tensor]


@dataclass(frozen=True)
class LoraFactors:
    """One LoRA module: parameter names of A and B, and its scaling s (dW = s B A on 2-D views).

    A is (r, d_in) and B (d_out, r) for a Linear; an Embedding's `lora_embedding_A` is (r, num_embeddings)
    and `lora_embedding_B` (embedding_dim, r); a conv's A is (r, c_in, *kernel) and B (c_out, r, 1, ...),
    read as (r, c_in * prod(kernel)) and (c_out, r).
    """

    module: str
    a_key: str
    b_key: str
    scaling: float


@dataclass(frozen=True)
class AdapterLayout:
    """Where the adapter's parameters live in a `PeftModel` (LoRA factors and trained head)."""

    lora: tuple[LoraFactors, ...]
    head_keys: tuple[str, ...]

    def trained_keys(self, factors: Iterable[str]) -> list[str]:
        """Names of the parameters trained when `factors` ('A'/'B') train, head included."""
        factors = set(factors)
        keys = [f.a_key for f in self.lora if "A" in factors] + [f.b_key for f in self.lora if "B" in factors]
        return sorted(keys) + list(self.head_keys)

    def frozen_factor(self, key: str) -> tuple[LoraFactors, str] | None:
        """For a LoRA factor key: its module and which factor it is ('A' or 'B'); None for head keys."""
        for f in self.lora:
            if key == f.a_key:
                return f, "A"
            if key == f.b_key:
                return f, "B"
        return None


def adapter_layout(model: PeftModel, adapter_name: str = "default") -> AdapterLayout:
    """Read the layout of `adapter_name` from a model with LoRA/DEER_LORA layers."""
    params = dict(model.named_parameters())
    lora = []
    for name, module in model.named_modules():
        if not (isinstance(module, LoraLayer) and has_adapter(module, adapter_name)):
            continue
        reason = unsupported_layer_reason(module, adapter_name)
        if reason is not None:
            raise ValueError(f"LoRA module {name} {reason}")
        if adapter_name in module.lora_A:
            a_key = f"{name}.lora_A.{adapter_name}.weight"
            b_key = f"{name}.lora_B.{adapter_name}.weight"
        else:
            a_key = f"{name}.lora_embedding_A.{adapter_name}"
            b_key = f"{name}.lora_embedding_B.{adapter_name}"
        if a_key not in params or b_key not in params:
            raise ValueError(f"LoRA module {name} lacks the expected parameters {a_key}, {b_key}")
        lora.append(LoraFactors(name, a_key, b_key, float(module.scaling[adapter_name])))
    if not lora:
        raise ValueError(f"the model has no LoRA layers for adapter {adapter_name!r}")
    head = tuple(sorted(n for n in params if f".modules_to_save.{adapter_name}." in n))
    return AdapterLayout(tuple(lora), head)


def get_adapter_state(model: PeftModel, layout: AdapterLayout) -> AdapterState:
    """A detached fp32 CPU copy of every adapter parameter (both factors and the head)."""
    params = dict(model.named_parameters())
    keys = [f.a_key for f in layout.lora] + [f.b_key for f in layout.lora] + list(layout.head_keys)
    return {k: params[k].detach().to("cpu", torch.float32).clone() for k in keys}


@torch.no_grad()
def load_adapter_state(model: PeftModel, state: AdapterState) -> None:
    """Copy `state` into the model's adapter parameters (shapes must match)."""
    params = dict(model.named_parameters())
    for key, value in state.items():
        if key not in params:
            raise KeyError(f"adapter state key {key} is not a parameter of the model")
        if params[key].shape != value.shape:
            raise ValueError(f"{key}: state shape {tuple(value.shape)} != model shape {tuple(params[key].shape)}")
        params[key].copy_(value)


def add_delta(state: AdapterState, delta: AdapterState) -> AdapterState:
    """`state + delta` on the keys of `delta` (a new dict; other keys are shared, not copied)."""
    out = dict(state)
    for key, value in delta.items():
        out[key] = state[key] + value
    return out
