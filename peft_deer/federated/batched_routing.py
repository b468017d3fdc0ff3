"""Per-sample routing in a batched pass: the LoRA layers' and the head's forwards, patched so that each
sample meets its own client's row of every stacked trained tensor (one bmm per client group)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
from peft import PeftModel
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

from .adapter_state import AdapterLayout
from .batched_plan import _Group


def _head_params(layout: AdapterLayout) -> list[tuple[str, str]]:
    """(wrapper module name, 'weight'/'bias') for each head key."""
    return [(key.rsplit(".modules_to_save.", 1)[0], key.rsplit(".", 1)[1]) for key in layout.head_keys]


def _rows(weight: torch.Tensor, g: _Group) -> torch.Tensor:
    """The group's rows (G, ...) of a stacked (K, ...) tensor (each row gathered once: one gradient writer)."""
    return weight if g.all_rows else weight[g.clients]


def _route(
    h: torch.Tensor, weight: torch.Tensor, groups: Sequence[_Group], bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`h @ weightᵀ (+ bias)` for h (N, ..., in), with a shared (out, in) weight or per client with a
    stacked (K, out, in) one (and (K, out) bias): one bmm per group over (G, size·tokens, in)."""
    if weight.dim() == 2:
        return nn.functional.linear(h, weight, bias)
    outs = []
    for g in groups:
        hg = h[g.start : g.stop].reshape(len(g.members), -1, h.shape[-1])
        w = _rows(weight, g).transpose(1, 2)
        out = torch.bmm(hg, w) if bias is None else torch.baddbmm(_rows(bias, g).unsqueeze(1), hg, w)
        outs.append(out.reshape(g.stop - g.start, *h.shape[1:-1], weight.shape[1]))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _route_add(
    base: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, groups: Sequence[_Group], alpha: float
) -> torch.Tensor:
    """`base + alpha · h @ weightᵀ` for base (N, ..., out), h (N, ..., r) and a shared (out, r) or
    stacked (K, out, r) weight, as one fused addmm / baddbmm per group (no separate scale and add)."""
    if weight.dim() == 2:
        flat = torch.addmm(base.reshape(-1, base.shape[-1]), h.reshape(-1, h.shape[-1]), weight.t(), alpha=alpha)
        return flat.view(base.shape)
    outs = []
    for g in groups:
        g_base = base[g.start : g.stop].reshape(len(g.members), -1, base.shape[-1])
        g_h = h[g.start : g.stop].reshape(len(g.members), -1, h.shape[-1])
        outs.append(
            torch.baddbmm(g_base, g_h, _rows(weight, g).transpose(1, 2), alpha=alpha).view(base[g.start : g.stop].shape)
        )
    return outs[0] if len(outs) == 1 else torch.cat(outs)


@dataclass
class _Routing:
    """What the patched forwards read: this step's client groups and each adapter key's tensor."""

    adapter: str
    weights: dict[str, torch.Tensor]
    groups: list[_Group] = field(default_factory=list)
    cast: tuple[torch.Tensor, int, torch.Tensor] | None = None  # (input, its version, input in autocast dtype)

    def autocast_input(self, x: torch.Tensor) -> torch.Tensor:
        """`x` in the autocast dtype, cast once per input tensor: the q/k/v projections share theirs."""
        if self.cast is None or self.cast[0] is not x or self.cast[1] != x._version:
            self.cast = (x, x._version, x.to(torch.get_autocast_dtype(x.device.type)))
        return self.cast[2]


def _lora_forward(layer: LoraLinear, routing: _Routing, a_key: str, b_key: str, x: torch.Tensor, *args, **kwargs):
    """`base(x) + s · dropout(x) @ A_kᵀ @ B_kᵀ` for x (N, ..., in), each sample with its client's factors."""
    autocast = torch.is_autocast_enabled(x.device.type)
    if autocast:  # one cast of x serves the base and LoRA matmuls of every layer reading x (autocast casts per matmul)
        x = routing.autocast_input(x)
    result = layer.base_layer(x, *args, **kwargs)
    a, b = routing.weights[a_key], routing.weights[b_key]
    if not autocast:
        x = layer._cast_input_dtype(x, a.dtype)
    h = _route(layer.lora_dropout[routing.adapter](x), a, routing.groups)
    return _route_add(result, h, b, routing.groups, layer.scaling[routing.adapter]).to(result.dtype)


def _head_forward(routing: _Routing, keys: dict[str, str], x: torch.Tensor, *args, **kwargs):
    weight, bias = routing.weights[keys["weight"]], routing.weights.get(keys.get("bias", ""))
    return _route(x, weight, routing.groups, bias)


@contextlib.contextmanager
def routed_forward(model: PeftModel, layout: AdapterLayout, routing: _Routing) -> Iterator[None]:
    """Patch the LoRA layers' and head's forwards to route samples to clients; restore them on exit."""
    modules = dict(model.named_modules())
    heads: dict[str, dict[str, str]] = {}
    for key, (wrapper_name, attr) in zip(layout.head_keys, _head_params(layout), strict=True):
        heads.setdefault(wrapper_name, {})[attr] = key
    forwards = {
        modules[f.module]: partial(_lora_forward, modules[f.module], routing, f.a_key, f.b_key) for f in layout.lora
    }
    forwards.update({modules[name]: partial(_head_forward, routing, keys) for name, keys in heads.items()})
    saved: dict[nn.Module, object] = {}  # a module's own instance `forward` (e.g. an accelerate hook), if any
    try:
        for module, forward in forwards.items():
            saved[module] = vars(module).get("forward")
            module.forward = forward
        yield
    finally:
        for module, previous in saved.items():
            if previous is None:
                del module.forward  # the class's forward is back
            else:
                module.forward = previous
