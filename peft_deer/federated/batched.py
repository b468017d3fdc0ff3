"""Batched client update: all clients of a phase train together in one forward/backward per step.

The clients' mini-batches are concatenated and go once through the shared frozen backbone; every
sample is routed to its own client's adapter. Each trained parameter is held as one stacked tensor
(K, ...) — one row per client — and every LoRA layer computes

    out = base(x) + s · dropout(x) @ A_kᵀ @ B_kᵀ      (k = the sample's client)

where a factor frozen in the phase (A in phase B, B in phase A, A in `ffa`) is the one shared
global tensor and a trained one is gathered per sample from its stack; the head (the PEFT
`modules_to_save` Linear) likewise. The loss is the sum over clients of each client's mean loss on
its own batch, so client k's stack row receives exactly client k's gradient. `train_client`'s own
torch optimizer (SGD with momentum and weight decay, or AdamW) then steps all rows at once — its
update is elementwise, so each row steps as that client's parameter would; a client whose epochs are
done has its rows put back after the step.

Each client's data order is that of its own `DataLoader(shuffle=True, generator=Generator().manual_seed(seed))`,
as in `train_client`, planned for the whole pass up front: the result equals `SequentialEngine`'s up
to float rounding. A step's batch of tensor datasets is one gather by index (on the host into pinned
memory, copied on a side stream, or from data staged on the device), and a step makes no host sync.
Random layers (dropout) draw different masks than the sequential loop (same distribution). The
state per client is its trained adapter parameters and their optimizer state — never a model copy.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
from peft import PeftModel
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.utils.other import ModulesToSaveWrapper
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, default_collate

from .adapter_state import AdapterLayout, AdapterState
from .label_skew import adjusted_cross_entropy, logit_offsets
from .local_training import (
    ClientTask,
    ClientUpdate,
    LocalTraining,
    autocast_for,
    begin_local_training,
    make_optimizer,
    num_labels,
)
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
    """Clients that contribute `size` samples each to a step, stored contiguously at [start, stop).

    `clients` (G,) are their stack rows on the device and `members` the same rows on the host;
    `all_rows`: the group is every stack row in order, so stacks are used as they are (no gather).
    """

    start: int
    stop: int
    size: int
    clients: torch.Tensor
    members: tuple[int, ...]
    all_rows: bool


@dataclass(frozen=True)
class _Step:
    """One step: its client groups (larger batches first), its samples as (client, (B_k,) indices) in
    batch order, and `active`, the (K,) bool device mask of clients still training (None: all)."""

    groups: list[_Group]
    rows: list[tuple[int, torch.Tensor]]
    active: torch.Tensor | None


def client_order(task: ClientTask, training: LocalTraining) -> list[torch.Tensor]:
    """A client's mini-batches over all local epochs as (B,) sample indices, in `train_client`'s order.

    A DataLoader over `range(n)` with the client's seeded generator draws what one over the dataset
    draws: its sampler's permutations and per-epoch seed depend only on `n` and the generator.
    """
    generator = torch.Generator().manual_seed(task.seed)
    loader = DataLoader(range(len(task.dataset)), batch_size=training.batch_size, shuffle=True, generator=generator)  # type: ignore[arg-type]
    return [idx for _ in range(training.local_epochs) for idx in loader]


def _schedule(orders: Sequence[Sequence[torch.Tensor]], device: torch.device) -> list[_Step]:
    """Every step of a pass, planned on the host; device tensors are made once per distinct client set."""
    k_clients, on_device = len(orders), {}

    def rows_on_device(members: tuple[int, ...]) -> torch.Tensor:
        if members not in on_device:
            on_device[members] = torch.tensor(members, device=device)
        return on_device[members]

    steps = []
    for s in range(max(map(len, orders), default=0)):
        by_size: dict[int, list[int]] = {}
        for k, order in enumerate(orders):
            if s < len(order):  # a client's batches are consecutive: once done, it never resumes
                by_size.setdefault(len(order[s]), []).append(k)
        groups, rows, start = [], [], 0
        for size in sorted(by_size, reverse=True):
            members = tuple(by_size[size])
            stop = start + size * len(members)
            all_rows = members == tuple(range(k_clients))
            groups.append(_Group(start, stop, size, rows_on_device(members), members, all_rows))
            rows += [(k, orders[k][s]) for k in members]
            start = stop
        active = sorted(k for g in groups for k in g.members)
        mask = None
        if len(active) < k_clients:
            mask = torch.zeros(k_clients, dtype=torch.bool)
            mask[active] = True
            mask = mask.to(device)
        steps.append(_Step(groups, rows, mask))
    return steps


STAGE_FRACTION = 0.25  # the most of the device's free memory that a pass's staged samples may take


class _StepData:
    """Each step's (inputs (B, ...), labels (B,)) on the device, with no host sync.

    TensorDatasets of one layout: each step is gathered on the host by index — on CUDA into pinned
    memory, copied on a side stream that overlaps the previous step's compute; or, with `stage`,
    staged on the device once per pass (when they fit in `STAGE_FRACTION` of its free memory),
    concatenated client by client, and a step is one gather there by its (B,) global indices. On an
    H200 (ViT-B/16, 3 steps) the host gather was 10-25% faster: staging is a blocking copy of all
    samples before the first step. Other datasets are read sample by sample and collated, as a
    DataLoader does.
    """

    def __init__(
        self, tasks: Sequence[ClientTask], steps: Sequence[_Step], device: torch.device, stage: bool = False
    ) -> None:
        self.steps, self.device, self.staged = steps, device, None
        tensors = [t.dataset.tensors if isinstance(t.dataset, TensorDataset) else () for t in tasks]
        one_layout = all(len(ts) == 2 for ts in tensors) and (
            len({(x.shape[1:], x.dtype, y.shape[1:], y.dtype) for x, y in tensors}) == 1
        )
        self.datasets = [t.dataset for t in tasks]
        self.tensors = tensors if one_layout else None
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        if self.tensors and device.type != "cpu" and stage:
            nbytes = sum(x.nbytes + y.nbytes for x, y in self.tensors)
            free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else math.inf
            if nbytes <= STAGE_FRACTION * free:
                self._stage()

    def _stage(self) -> None:
        offsets = [0]
        for x, _ in self.tensors:
            offsets.append(offsets[-1] + len(x))
        x0, y0 = self.tensors[0]
        xs = torch.empty((offsets[-1], *x0.shape[1:]), dtype=x0.dtype, device=self.device)
        ys = torch.empty((offsets[-1], *y0.shape[1:]), dtype=y0.dtype, device=self.device)
        for (x, y), a, b in zip(self.tensors, offsets, offsets[1:], strict=False):
            xs[a:b].copy_(x)
            ys[a:b].copy_(y)
        index = [torch.cat([idx + offsets[k] for k, idx in step.rows]) for step in self.steps]
        bounds = [0]
        for idx in index:
            bounds.append(bounds[-1] + len(idx))
        all_index = torch.cat(index).to(self.device) if index else None
        self.staged = (xs, ys, all_index, bounds)

    def __call__(self, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.steps[s].rows
        if self.staged is not None:
            xs, ys, index, bounds = self.staged
            idx = index[bounds[s] : bounds[s + 1]]
            return xs.index_select(0, idx), ys.index_select(0, idx)
        if self.tensors is None:
            samples = [self.datasets[k][i] for k, idx in rows for i in idx.tolist()]
            x, y = default_collate(samples)
            return x.to(self.device), y.to(self.device)
        pin = self.copy_stream is not None
        n = sum(len(idx) for _, idx in rows)
        x0, y0 = self.tensors[0]
        x = torch.empty((n, *x0.shape[1:]), dtype=x0.dtype, pin_memory=pin)
        y = torch.empty((n, *y0.shape[1:]), dtype=y0.dtype, pin_memory=pin)
        start = 0
        for k, idx in rows:
            xk, yk = self.tensors[k]
            torch.index_select(xk, 0, idx, out=x[start : start + len(idx)])
            torch.index_select(yk, 0, idx, out=y[start : start + len(idx)])
            start += len(idx)
        if not pin:
            return x.to(self.device), y.to(self.device)
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.copy_stream):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        compute.wait_stream(self.copy_stream)
        x.record_stream(compute)  # made on the copy stream, used and freed on the compute stream
        y.record_stream(compute)
        return x, y


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


@torch.no_grad()
def _masked_step(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], active: torch.Tensor | None) -> None:
    """`optimizer.step()` on stacked (K, ...) params, then put back the rows of clients not `active`.

    A client that is done never resumes, so its (stepped) optimizer state is never read again.
    """
    before = None if active is None else [p.detach().clone() for p in params]
    optimizer.step()
    if before is not None:
        for p, old in zip(params, before, strict=True):
            p.copy_(torch.where(active.reshape(-1, *([1] * (p.dim() - 1))), p, old))


@dataclass
class BatchedEngine:
    """Trains the phase's clients together, `clients_per_pass` at a time (None: all in one pass).

    After a call, `stats` holds the per-pass state sizes: `params_per_client` (numel of one client's
    trained adapter parameters) and `optimizer_per_client` (its optimizer state).
    """

    training: LocalTraining
    clients_per_pass: int | None = None
    adapter_name: str = "default"
    stage_on_device: bool = False  # stage the pass's tensor datasets on the device (see _StepData)
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
        # torch's own optimizer, as `train_client` makes it: its update is elementwise, so each row of a
        # stack steps exactly as that client's parameter would (AdamW's step count is shared: all rows
        # that still train are at the same step)
        optimizer = make_optimizer(list(stacks.values()), training)
        steps = _schedule([client_order(t, training) for t in tasks], device)
        batch = _StepData(tasks, steps, device, self.stage_on_device)
        autocast = autocast_for(device, training.mixed_precision)
        loss_means: list[torch.Tensor] = []  # (G,) mean losses per group and step, read back once at the end
        routing = _Routing(self.adapter_name, weights)
        offsets = _step_offsets(model, tasks, training)
        was_training = model.training
        model.train()
        try:
            with routed_forward(model, layout, routing):
                for s, step in enumerate(steps):
                    routing.groups = step.groups
                    x, y = batch(s)
                    with autocast:
                        logits = model(pixel_values=x).logits
                    routing.cast = None
                    per_sample = adjusted_cross_entropy(logits.float(), y, offsets(step), reduction="none")
                    # each client's loss is the mean over its own batch; their sum trains every row at once
                    means = [per_sample[g.start : g.stop].reshape(-1, g.size).mean(1) for g in step.groups]
                    optimizer.zero_grad(set_to_none=True)
                    torch.stack([m.sum() for m in means]).sum().backward()
                    _masked_step(optimizer, list(stacks.values()), step.active)
                    loss_means += [m.detach() for m in means]
        finally:
            routing.groups, routing.cast = [], None
            model.train(was_training)
        self.stats = {
            "clients": k_clients,
            "params_per_client": sum(s[0].numel() for s in stacks.values()),
            "optimizer_per_client": sum(
                v.numel()
                for state in optimizer.state.values()
                for v in state.values()
                if torch.is_tensor(v) and v.dim()
            )
            // max(k_clients, 1),
        }
        loss_sum = torch.zeros(k_clients, dtype=torch.float64)
        seen = torch.zeros(k_clients, dtype=torch.long)
        values = torch.cat(loss_means).double().cpu() if loss_means else torch.zeros(0)  # one device sync
        at = 0
        for g in (g for step in steps for g in step.groups):
            members = torch.tensor(g.members)
            loss_sum[members] += values[at : at + len(members)] * g.size
            seen[members] += g.size
            at += len(members)
        # every trained row to the host in one copy: (K, params_per_client) fp32
        flat = torch.cat([stacks[k].detach().reshape(k_clients, -1).float() for k in keys], 1).cpu()
        parts = dict(zip(keys, flat.split([stacks[k][0].numel() for k in keys], 1), strict=True))
        seconds = (time.perf_counter() - start) / max(k_clients, 1)
        return [
            ClientUpdate(
                t.client_id,
                {key: parts[key][i].reshape(global_state[key].shape) - global_state[key] for key in keys},
                len(t.dataset),
                float(loss_sum[i] / max(int(seen[i]), 1)),
                int(seen[i]),
                seconds,
            )
            for i, t in enumerate(tasks)
        ]


def _step_offsets(
    model: PeftModel, tasks: Sequence[ClientTask], training: LocalTraining
) -> Callable[[_Step], torch.Tensor | None]:
    """step -> its (B, C) logit offsets (each row its client's `tau * log prior`), or None without adjustment."""
    if not training.logit_adjustment:
        return lambda step: None
    device = next(model.parameters()).device
    per_client = [logit_offsets(t.dataset, num_labels(model), training.logit_adjustment) for t in tasks]
    table = torch.stack(per_client).to(device)  # (K, C)

    def rows(step: _Step) -> torch.Tensor:
        out = table.new_empty((max(g.stop for g in step.groups), table.shape[1]))
        for g in step.groups:  # a group's rows are member-major: member 0's `size` samples, then member 1's ...
            out[g.start : g.stop] = table[list(g.members)].repeat_interleave(g.size, 0)
        return out

    return rows


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
