"""The audited adapter: a tiny network with rank-2 LoRA whose frozen factors have a chosen largest singular value."""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
from peft import get_peft_model
from torch import nn

from ..federated.adapter_state import AdapterLayout, AdapterState, adapter_layout, get_adapter_state, load_adapter_state
from ..tuner.config import DeerLoraConfig


class _TinyNet(nn.Module):
    """Bias-free linear layers l0 .. l{n-1} (the LoRA targets); zero inputs give zero LoRA gradients."""

    def __init__(self, dim: int, num_layers: int, out_features: int) -> None:
        super().__init__()
        sizes = [dim] * num_layers + [out_features]
        self.layers = nn.ModuleDict({f"l{i}": nn.Linear(sizes[i], sizes[i + 1], bias=False) for i in range(num_layers)})

    def forward(self, pixel_values: torch.Tensor, **_: object) -> SimpleNamespace:
        x = pixel_values
        for layer in self.layers.values():
            x = layer(x)
        return SimpleNamespace(logits=x)


def build_audit_adapter(
    method: str,
    rank: int,
    dim: int,
    frozen_scale: float,
    num_layers: int = 2,
    out_features: int | None = None,
    seed: int = 0,
) -> tuple[nn.Module, AdapterLayout, AdapterState]:
    """A tiny DEER_LORA adapter on `num_layers` linear targets; every A and B has top singular value `frozen_scale`."""
    generator = torch.Generator().manual_seed(seed)
    base = _TinyNet(dim, num_layers, out_features or dim)
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(dim))
    config = DeerLoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=[f"l{i}" for i in range(num_layers)], method=method
    )
    model = get_peft_model(base, config)
    layout = adapter_layout(model)
    state = get_adapter_state(model, layout)
    for f in layout.lora:  # B = 0 at init: the frozen factor of a phase-A release must be non-trivial
        for key in (f.a_key, f.b_key):
            x = torch.randn(state[key].shape, generator=generator)
            state[key] = (x * (frozen_scale / float(torch.linalg.matrix_norm(x, ord=2)))).float()
    load_adapter_state(model, state)
    return model, layout, state
