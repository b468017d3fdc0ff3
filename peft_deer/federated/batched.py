"""Batched client update: all clients of a phase train together in one forward/backward per step.

The clients' mini-batches are concatenated and go once through the shared frozen backbone; every
sample is routed to its own client's adapter. Each trained parameter is held as one stacked tensor
(K, ...) — one row per client — and every LoRA layer computes

    out = base(x) + s · dropout(x) @ A_kᵀ @ B_kᵀ      (k = the sample's client)

where a factor frozen in the phase (A in phase B, B in phase A, A in `ffa`) is the one shared
global tensor and a trained one is gathered per sample from its stack; the head (the PEFT
`modules_to_save` Linear) likewise. The loss is the sum over clients of each client's mean loss on
its own batch, so client k's stack row receives exactly client k's gradient. Per-client SGD
(momentum, weight decay) or AdamW then steps all rows at once; a client whose epochs are done is
masked out of the update, so its parameters and optimizer state stay untouched.

Each client's data order is its own `DataLoader(shuffle=True, generator=Generator().manual_seed(seed))`,
as in `train_client`: the result equals `SequentialEngine`'s up to float rounding. Random layers
(dropout) draw different masks than the sequential loop (same distribution). The state per client
is its trained adapter parameters and their optimizer state — never a model copy.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
from peft import PeftModel
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.utils.other import ModulesToSaveWrapper
from torch import nn
from torch.utils.data import DataLoader

from .adapter_state import AdapterLayout, AdapterState
from .client import ClientTask, ClientUpdate, LocalTraining, autocast_for, begin_local_training
from .schedule import Phase


def batched_unsupported_reason(model: PeftModel, layout: AdapterLayout, adapter_name: str = "default") -> str | None:
    """Why the batched engine cannot train `model` exactly like the sequential loop (None: it can)."""
    modules = dict(model.named_modules())
    for f in layout.lora:
        layer = modules[f.module]
        if type(layer) is not LoraLinear:
            return f"LoRA target {f.module} is a {type(layer).__name__}, not a LoRA Linear"
        if adapter_name in layer.lora_variant or layer.merged or layer.disable_adapters:
            return f"LoRA target {f.module} uses a LoRA variant (DoRA, ...) or is merged/disabled"
        if layer.lora_B[adapter_name].bias is not None:
            return f"LoRA target {f.module} has a LoRA bias"
        if list(layer.active_adapters) != [adapter_name]:
            return f"LoRA target {f.module} has active adapters {layer.active_adapters}, not [{adapter_name!r}]"
    for wrapper_name, _ in _head_params(layout):
        wrapper = modules[wrapper_name]
        if not isinstance(wrapper, ModulesToSaveWrapper) or not isinstance(
            wrapper.modules_to_save[adapter_name], nn.Linear
        ):
            return f"trained head {wrapper_name} is not a modules_to_save Linear"
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return f"{name} is a BatchNorm: its batch statistics would mix clients"
    return None


def _head_params(layout: AdapterLayout) -> list[tuple[str, str]]:
    """(wrapper module name, 'weight'/'bias') for each head key."""
    return [(key.rsplit(".modules_to_save.", 1)[0], key.rsplit(".", 1)[1]) for key in layout.head_keys]


@dataclass(frozen=True)
class _Group:
    """Clients that contribute `size` samples each to this step, stored contiguously at [start, stop)."""

    start: int
    stop: int
    size: int
    clients: torch.Tensor  # (G,) client rows in the stacks


def _route(
    h: torch.Tensor, weight: torch.Tensor, groups: Sequence[_Group], bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`h @ weightᵀ (+ bias)` with a shared (out, in) weight, or per client with a stacked (K, out, in) one.

    Per client, each group is one bmm over (G, size·tokens, in); every stack row is gathered once
    per step, so its gradient has a single writer (deterministic on GPU too, no atomic sums).
    """
    if weight.dim() == 2:
        return nn.functional.linear(h, weight, bias)
    outs = []
    for g in groups:
        hg = h[g.start : g.stop].reshape(len(g.clients), -1, h.shape[-1])
        out = torch.bmm(hg, weight[g.clients].transpose(1, 2))
        if bias is not None:
            out = out + bias[g.clients].unsqueeze(1)
        outs.append(out.reshape(g.stop - g.start, *h.shape[1:-1], weight.shape[1]))
    return torch.cat(outs)


@dataclass
class _Routing:
    """What the patched forwards read: this step's client groups and each adapter key's tensor."""

    adapter: str
    weights: dict[str, torch.Tensor]
    groups: list[_Group] = field(default_factory=list)


def _lora_forward(layer: LoraLinear, routing: _Routing, a_key: str, b_key: str, x: torch.Tensor, *args, **kwargs):
    result = layer.base_layer(x, *args, **kwargs)
    a, b = routing.weights[a_key], routing.weights[b_key]
    x = layer._cast_input_dtype(x, a.dtype)
    h = layer.lora_dropout[routing.adapter](x)
    delta = _route(_route(h, a, routing.groups), b, routing.groups) * layer.scaling[routing.adapter]
    return (result + delta).to(result.dtype)


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


class _StackedOptimizer:
    """`torch.optim.SGD` / `AdamW` (PyTorch's update rules) on stacked (K, ...) tensors, one row per client.

    `step(mask)` updates only the rows of clients in `mask`; all active clients are at the same step
    count (they start together and a finished client never resumes), so one step counter serves.
    """

    def __init__(self, params: list[torch.Tensor], training: LocalTraining) -> None:
        self.params, self.training, self.steps = params, training, 0
        self.state = [[torch.zeros_like(p) for _ in range(2 if training.optimizer == "adamw" else 1)] for p in params]

    @property
    def numel(self) -> int:
        return sum(s.numel() for group in self.state for s in group)

    @torch.no_grad()
    def step(self, mask: torch.Tensor) -> None:
        t = self.training
        self.steps += 1
        for p, state in zip(self.params, self.state, strict=True):
            m = mask.reshape(-1, *([1] * (p.dim() - 1)))
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            if t.optimizer == "sgd":
                (buf,) = state
                d_p = grad + t.weight_decay * p if t.weight_decay else grad
                if t.momentum:
                    # torch initialises the buffer to d_p at step 1: momentum * 0 + d_p is the same
                    buf.copy_(torch.where(m, buf * t.momentum + d_p, buf))
                    d_p = buf
                p.copy_(torch.where(m, p - t.lr * d_p, p))
            else:
                beta1, beta2, eps = 0.9, 0.999, 1e-8  # torch.optim.AdamW defaults
                exp_avg, exp_avg_sq = state
                new_p = p * (1 - t.lr * t.weight_decay)
                new_avg = exp_avg.lerp(grad, 1 - beta1)
                new_sq = exp_avg_sq * beta2 + (1 - beta2) * grad * grad
                step_size = t.lr / (1 - beta1**self.steps)
                denom = (new_sq.sqrt() / math.sqrt(1 - beta2**self.steps)) + eps
                new_p = new_p - step_size * new_avg / denom
                exp_avg.copy_(torch.where(m, new_avg, exp_avg))
                exp_avg_sq.copy_(torch.where(m, new_sq, exp_avg_sq))
                p.copy_(torch.where(m, new_p, p))


def client_batches(task: ClientTask, training: LocalTraining) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """A client's mini-batches over all local epochs, in `train_client`'s exact order."""
    generator = torch.Generator().manual_seed(task.seed)
    loader = DataLoader(task.dataset, batch_size=training.batch_size, shuffle=True, generator=generator)
    for _ in range(training.local_epochs):
        yield from loader


@dataclass
class BatchedEngine:
    """Trains the phase's clients together, `clients_per_pass` at a time (None: all in one pass).

    After a call, `stats` holds the per-pass state sizes: `params_per_client` (numel of one client's
    trained adapter parameters) and `optimizer_per_client` (its optimizer state).
    """

    training: LocalTraining
    clients_per_pass: int | None = None
    adapter_name: str = "default"
    stats: dict = field(default_factory=dict)

    def train_clients(
        self,
        model: PeftModel,
        layout: AdapterLayout,
        global_state: AdapterState,
        phase: Phase,
        tasks: Sequence[ClientTask],
    ) -> list[ClientUpdate]:
        reason = batched_unsupported_reason(model, layout, self.adapter_name)
        if getattr(self.training, "record_dp", None) is not None:
            reason = "record-level DP clips each example's gradient; use SequentialEngine"
        if reason is not None:
            raise ValueError(f"the batched engine cannot train this model: {reason}")
        size = self.clients_per_pass or max(len(tasks), 1)
        updates: list[ClientUpdate] = []
        for i in range(0, len(tasks), size):
            updates += self._train_pass(model, layout, global_state, phase, tasks[i : i + size])
        return updates

    def _train_pass(
        self,
        model: PeftModel,
        layout: AdapterLayout,
        global_state: AdapterState,
        phase: Phase,
        tasks: Sequence[ClientTask],
    ) -> list[ClientUpdate]:
        start, training, k_clients = time.perf_counter(), self.training, len(tasks)
        device = next(model.parameters()).device
        keys, params = begin_local_training(model, layout, global_state, phase)
        adapter_keys = [f.a_key for f in layout.lora] + [f.b_key for f in layout.lora] + list(layout.head_keys)
        # Frozen factors are the model's own (shared) parameters; trained ones get one row per client.
        weights = {k: params[k].detach() for k in adapter_keys}
        stacks = {k: params[k].detach().expand(k_clients, *params[k].shape).clone().requires_grad_() for k in keys}
        weights.update(stacks)
        optimizer = _StackedOptimizer(list(stacks.values()), training)
        self.stats = {
            "clients": k_clients,
            "params_per_client": sum(s[0].numel() for s in stacks.values()),
            "optimizer_per_client": optimizer.numel // max(k_clients, 1),
        }
        autocast = autocast_for(device, training.mixed_precision)
        batches = [client_batches(t, training) for t in tasks]
        active = [True] * k_clients
        losses: list[tuple[torch.Tensor, int, torch.Tensor]] = []  # (clients, batch size, mean losses) per group
        routing = _Routing(self.adapter_name, weights)
        was_training = model.training
        model.train()
        try:
            with routed_forward(model, layout, routing):
                while True:
                    step = {k: b for k in range(k_clients) if active[k] and (b := next(batches[k], None)) is not None}
                    active = [k in step for k in range(k_clients)]
                    if not step:
                        break
                    routing.groups = self._groups(step, device)
                    order = [k for g in routing.groups for k in g.clients.tolist()]
                    x = torch.cat([step[k][0] for k in order]).to(device)
                    y = torch.cat([step[k][1] for k in order]).to(device)
                    with autocast:
                        logits = model(pixel_values=x).logits
                    per_sample = nn.functional.cross_entropy(logits.float(), y, reduction="none")
                    # each client's loss is the mean over its own batch; their sum trains every row at once
                    means = [per_sample[g.start : g.stop].reshape(-1, g.size).mean(1) for g in routing.groups]
                    for stack in stacks.values():
                        stack.grad = None
                    torch.stack([m.sum() for m in means]).sum().backward()
                    optimizer.step(torch.tensor(active, device=device))
                    losses += [(g.clients, g.size, m.detach()) for g, m in zip(routing.groups, means, strict=True)]
        finally:
            routing.groups = []
            model.train(was_training)
        loss_sum = torch.zeros(k_clients, dtype=torch.float64)
        seen = torch.zeros(k_clients, dtype=torch.long)
        for clients, size, means in losses:  # on the CPU once, not a device sync per step
            loss_sum[clients.cpu()] += means.double().cpu() * size
            seen[clients.cpu()] += size
        seconds = (time.perf_counter() - start) / max(k_clients, 1)
        return [
            ClientUpdate(
                t.client_id,
                {key: stacks[key][i].detach().to("cpu", torch.float32) - global_state[key] for key in keys},
                len(t.dataset),
                float(loss_sum[i] / max(int(seen[i]), 1)),
                int(seen[i]),
                seconds,
            )
            for i, t in enumerate(tasks)
        ]

    @staticmethod
    def _groups(step: dict[int, tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> list[_Group]:
        """This step's clients grouped by batch size (larger first), each group stored contiguously."""
        by_size: dict[int, list[int]] = {}
        for k, (_, labels) in step.items():
            by_size.setdefault(len(labels), []).append(k)
        groups, start = [], 0
        for size in sorted(by_size, reverse=True):
            clients = by_size[size]
            groups.append(_Group(start, start + size * len(clients), size, torch.tensor(clients, device=device)))
            start += size * len(clients)
        return groups


def select_engine(name: str, sequential, model: PeftModel, layout: AdapterLayout, log=print):
    """The engine for `--engine name`: `BatchedEngine` where it applies, else `sequential` with the reason logged."""
    if name == "sequential":
        return sequential
    if name != "batched":
        raise ValueError(f"--engine {name!r} is not 'batched' or 'sequential'")
    reason = batched_unsupported_reason(model, layout)
    if getattr(sequential.training, "record_dp", None) is not None:
        reason = "record-level DP clips each example's gradient (per-client DP-SGD)"
    if reason is not None:
        log(f"--engine batched does not apply ({reason}): training clients sequentially")
        return sequential
    return BatchedEngine(sequential.training)
