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

The pass's plan (batch orders, steps, staged data) is in `batched_plan.py`, the per-sample routing of
the LoRA layers and head in `batched_routing.py`; this module holds the engine.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from peft import PeftModel
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.utils.other import ModulesToSaveWrapper
from torch import nn

from .adapter_state import AdapterLayout, AdapterState
from .batched_plan import _schedule, _step_offsets, _StepData, client_order
from .batched_routing import _head_params, _Routing, routed_forward
from .label_skew import adjusted_cross_entropy
from .local_training import (
    ClientTask,
    ClientUpdate,
    LocalTraining,
    PhaseContext,
    autocast_for,
    begin_local_training,
    make_optimizer,
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
            updates += self._train_pass(PhaseContext(model, layout, global_state, phase), tasks[i : i + size])
        return updates

    def _train_pass(self, ctx: PhaseContext, tasks: Sequence[ClientTask]) -> list[ClientUpdate]:
        start, training, k_clients = time.perf_counter(), self.training, len(tasks)
        model, layout, global_state, device = ctx.model, ctx.layout, ctx.global_state, ctx.device
        keys, params = begin_local_training(ctx)
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
