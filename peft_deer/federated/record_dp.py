"""Record-level DP (DESIGN 2.6): DP-SGD inside each client's local training, with opacus.

A hospital protects each patient: every local step is Poisson-sampled (rate q = batch_size / n_k),
every per-sample gradient is clipped to C and Gaussian noise of std sigma*C is added to the sum.
For `deer` the regulator carries over: a per-sample gradient g_i of the trained factor is clipped in
the metric M of the frozen factor (norm sqrt(sum_params ||whiten(g_i)||^2)) and the noise has
covariance sigma^2 C^2 M^-1 (`Whitener.color`): DP-SGD in whitened coordinates, hence exactly the
Gaussian mechanism with multiplier sigma. Plain DP-SGD for lora / ffa / rolora / deer-reference.

Opacus per-sample gradients are attached to the process's single model per client update
(`GradSampleModule`, hooks on the modules trainable *now*) and removed afterwards, so a phase
switch (B then A) never meets stale hooks. Each client has its own RDP history that persists
across rounds and restarts. Engine-free: no accelerate, flwr or gradio.
"""

from __future__ import annotations

import contextlib
import math
import secrets
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from opacus.accountants import RDPAccountant
from opacus.data_loader import DPDataLoader
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _generate_noise, _mark_as_processed
from opacus.utils.batch_memory_manager import BatchMemoryManager
from peft import PeftModel

from .accountant import calibrate_noise_multiplier
from .adapter_state import AdapterLayout, AdapterState
from .mechanism import Whitener, build_whiteners
from .schedule import Phase
from .seeding import derive_seed

# ---------------------------------------------------------------------------------------------
# Sampling and calibration


def record_sample_rate(num_examples: int, batch_size: int) -> float:
    """Poisson rate q = batch_size / n (at most 1)."""
    if num_examples < 1:
        raise ValueError("a client with record-level DP needs at least one example")
    return min(1.0, batch_size / num_examples)


def record_steps(num_examples: int, batch_size: int, local_epochs: int) -> int:
    """DP-SGD steps of one client update: local_epochs * int(1/q) (opacus's Poisson sampler length)."""
    return local_epochs * int(1 / record_sample_rate(num_examples, batch_size))


def calibrate_record_sigmas(
    target_epsilon: float,
    delta: float,
    client_sizes: Sequence[int],
    batch_size: int,
    local_epochs: int,
    updates_per_client: int,
) -> tuple[float, ...]:
    """Per-client calibration: sigma_k so that client k reaches `target_epsilon` after the planned run.

    The plan assumes client k takes part in every phase: `updates_per_client` = rounds * phases per
    round updates of `record_steps` steps each at rate q_k. (Clients sampled less often end below.)
    """
    cache: dict[tuple[float, int], float] = {}
    out = []
    for n in client_sizes:
        q = record_sample_rate(n, batch_size)
        steps = updates_per_client * record_steps(n, batch_size, local_epochs)
        if (q, steps) not in cache:
            cache[(q, steps)] = calibrate_noise_multiplier(target_epsilon, delta, q, steps)
        out.append(cache[(q, steps)])
    return tuple(out)


@dataclass(frozen=True)
class RecordDP:
    """Record-level DP-SGD settings: per-client multipliers (indexed by client id), C, delta, noise kind.

    `noise` is 'regulated' (metric clipping, covariance sigma^2 C^2 M^-1; method deer) or 'plain'.
    `max_physical_batch_size` bounds memory with opacus's `BatchMemoryManager` (None: no split).
    """

    noise_multipliers: tuple[float, ...]
    clip_norm: float = 1.0
    delta: float = 1e-5
    noise: str = "plain"
    ridge: float = 1e-6
    max_physical_batch_size: int | None = None
    target_epsilon: float | None = None
    calibration: str = "per-client"

    def __post_init__(self) -> None:
        if not self.clip_norm > 0:
            raise ValueError(f"record-level clip norm {self.clip_norm} must be > 0")
        if not 0 < self.delta < 1:
            raise ValueError(f"record-level delta {self.delta} must be in (0, 1)")
        if any(not (s > 0 and math.isfinite(s)) for s in self.noise_multipliers):
            raise ValueError("record-level noise multipliers must be finite and > 0")
        if self.noise not in ("plain", "regulated"):
            raise ValueError(f"record-level noise {self.noise!r} is not 'plain' or 'regulated'")
        if self.max_physical_batch_size is not None and self.max_physical_batch_size < 1:
            raise ValueError("--max-physical-batch-size must be >= 1")

    def noise_multiplier(self, client_id: int) -> float:
        return self.noise_multipliers[client_id]


# ---------------------------------------------------------------------------------------------
# Accounting


class RecordAccountants:
    """One opacus RDP history [(sigma, q, steps)] per client; JSON state, so it survives a restart."""

    def __init__(self) -> None:
        self.history: dict[int, list[tuple[float, float, int]]] = {}
        self._cache: dict[tuple, float] = {}  # opacus RDP epsilon takes ~0.1-0.5 s per call

    def step(self, client_id: int, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        h = self.history.setdefault(int(client_id), [])
        if h and h[-1][:2] == (noise_multiplier, sample_rate):
            h[-1] = (noise_multiplier, sample_rate, h[-1][2] + steps)
        else:
            h.append((noise_multiplier, sample_rate, steps))

    def epsilon(self, client_id: int, delta: float) -> float:
        h = self.history.get(int(client_id))
        if not h:
            return 0.0
        key = (tuple(h), delta)
        if key not in self._cache:
            acc = RDPAccountant()
            acc.history = [tuple(x) for x in h]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                self._cache[key] = float(acc.get_epsilon(delta=delta))
        return self._cache[key]

    def epsilons(self, delta: float) -> dict[int, float]:
        return {c: self.epsilon(c, delta) for c in sorted(self.history)}

    def state_dict(self) -> dict:
        return {"history": {str(c): [list(x) for x in h] for c, h in self.history.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.history = {int(c): [(float(s), float(q), int(n)) for s, q, n in h] for c, h in state["history"].items()}


class RecordLevel:
    """What the server keeps for record-level DP: the settings, the local plan and per-client accountants."""

    def __init__(self, dp: RecordDP, batch_size: int, local_epochs: int) -> None:
        self.dp, self.batch_size, self.local_epochs = dp, batch_size, local_epochs
        self.accountants = RecordAccountants()

    def account(self, updates) -> None:
        """Step the accountant of every client that returned an update (same on every process)."""
        for u in sorted(updates, key=lambda u: u.client_id):
            q = record_sample_rate(u.num_examples, self.batch_size)
            steps = record_steps(u.num_examples, self.batch_size, self.local_epochs)
            self.accountants.step(u.client_id, self.dp.noise_multiplier(u.client_id), q, steps)

    def epsilon_max(self) -> float:
        eps = self.accountants.epsilons(self.dp.delta)
        return max(eps.values(), default=0.0)

    def ledger(self) -> dict:
        eps = self.accountants.epsilons(self.dp.delta)
        return {
            "mechanism": {
                "regulated": "regulated DP-SGD (per-sample metric clipping, noise sigma^2 C^2 M^-1)",
                "plain": "DP-SGD (per-sample clipping, isotropic Gaussian noise)",
            }[self.dp.noise],
            "sampling": "poisson (opacus DPDataLoader), q_k = batch_size / n_k",
            "noise_multipliers": {str(c): s for c, s in enumerate(self.dp.noise_multipliers)},
            "calibration": self.dp.calibration,
            "clip_norm": self.dp.clip_norm,
            "regulator_ridge": self.dp.ridge if self.dp.noise == "regulated" else None,
            "delta": self.dp.delta,
            "target_epsilon": self.dp.target_epsilon,
            "steps": {str(c): sum(n for _, _, n in h) for c, h in sorted(self.accountants.history.items())},
            "epsilon_per_client": {str(c): e for c, e in eps.items()},
            "epsilon_max": max(eps.values(), default=0.0),
            "accountant": "opacus RDP, one per client",
            "neighbouring_relation": "add/remove one record (one patient's image) in one client's data",
            "trust_model": "each client is trusted with its own records; what leaves it is DP-SGD output",
        }

    def state_dict(self) -> dict:
        return {"accountants": self.accountants.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.accountants.load_state_dict(state["accountants"])


def merge_ledgers(client_ledger: dict, record: RecordLevel) -> dict:
    """The client-level ledger plus the record-level guarantee (level 'record' or 'client+record')."""
    rec = record.ledger()
    out = dict(client_ledger)
    if client_ledger.get("level") == "none":
        out.pop("note", None)
        out.update(
            level="record",
            mechanism=rec["mechanism"],
            epsilon=rec["epsilon_max"],
            delta=rec["delta"],
            trust_model=rec["trust_model"],
            neighbouring_relation=rec["neighbouring_relation"],
        )
    else:
        out["level"] = "client+record"
        out["record_epsilon_max"] = rec["epsilon_max"]
    out["record"] = rec
    return out


# ---------------------------------------------------------------------------------------------
# The whitened DP optimizer


def _on(w: Whitener, device: torch.device) -> Whitener:
    return w if w.chol is None else Whitener(w.chol.to(device), w.side, w.kernel_dims)


def whitened_norms(grad_samples: Sequence[torch.Tensor], whiteners: Sequence[Whitener]) -> torch.Tensor:
    """Per-sample metric norms sqrt(sum_params ||whiten(g_i)||^2) of per-sample grads (n, *shape)."""
    n = len(grad_samples[0])
    sq = torch.zeros(n, dtype=torch.float32, device=grad_samples[0].device)
    for g, w in zip(grad_samples, whiteners, strict=True):
        sq = sq + w.whiten(g.float()).reshape(n, -1).square().sum(1)
    return sq.sqrt()


class WhitenedDPOptimizer(DPOptimizer):
    """opacus `DPOptimizer` whose clipping and noise live in whitened coordinates.

    Per-sample gradients are scaled by min(1, C / ||g_i||_M) with the metric norm over all
    parameters; noise for parameter p is `whitener.color(N(0, sigma^2 C^2 I))`, covariance
    sigma^2 C^2 M^-1 per row (B) / column (A). Identity whiteners give plain opacus DP-SGD.
    `whiteners` is aligned with `self.params` (the wrapped optimizer's parameter order).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, whiteners: Sequence[Whitener], **kwargs) -> None:
        super().__init__(optimizer, **kwargs)
        if len(whiteners) != len(self.params):
            raise ValueError(f"{len(whiteners)} whiteners for {len(self.params)} parameters")
        self.whiteners = [_on(w, p.device) for w, p in zip(whiteners, self.params, strict=True)]
        self.last_per_sample_norms: torch.Tensor | None = None

    def clip_and_accumulate(self) -> None:
        samples = [self._get_flat_grad_sample(p).to(p.dtype) for p in self.params]
        if len(samples[0]) == 0:
            factor = torch.zeros((0,), device=samples[0].device, dtype=samples[0].dtype)
        else:
            norms = whitened_norms(samples, self.whiteners)
            self.last_per_sample_norms = norms.detach()
            factor = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        for p, g in zip(self.params, samples, strict=True):
            _check_processed_flag(p.grad_sample)
            grad = torch.einsum("i,i...", factor.to(g.dtype), g)
            p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad
            _mark_as_processed(p.grad_sample)

    def add_noise(self) -> None:
        for p, w in zip(self.params, self.whiteners, strict=True):
            _check_processed_flag(p.summed_grad)
            z = _generate_noise(
                std=self.noise_multiplier * self.max_grad_norm,
                reference=p.summed_grad,
                generator=self.generator,
                secure_mode=self.secure_mode,
            )
            p.grad = (p.summed_grad + w.color(z)).view_as(p)
            _mark_as_processed(p.summed_grad)


# ---------------------------------------------------------------------------------------------
# One client update under DP-SGD


@contextlib.contextmanager
def per_sample_gradients(model: torch.nn.Module):
    """Attach opacus per-sample gradient hooks to the modules trainable now; remove them on exit."""
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=False)
    try:
        yield gsm
    finally:
        gsm._close()  # removes hooks and grad_sample / summed_grad attributes


def train_client_record(
    model: PeftModel,
    layout: AdapterLayout,
    global_state: AdapterState,
    phase: Phase,
    task,
    training,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = torch.nn.functional.cross_entropy,
):
    """`client.train_client` under record-level DP-SGD (`training.record_dp`); returns a `ClientUpdate`."""
    if training.logit_adjustment:
        raise ValueError(
            "--logit-adjustment with record-level DP: the loss would depend on the hospital's label counts, "
            "which DP-SGD does not protect; use --logit-adjustment 0"
        )
    from .client import ClientUpdate, _make_optimizer, autocast_for, begin_local_training  # lazy: cycle

    record: RecordDP = training.record_dp
    embedding = next((f.module for f in layout.lora if ".lora_embedding_A." in f.a_key), None)
    if embedding is not None:  # opacus hooks modules; an Embedding's LoRA factors are bare parameters
        raise ValueError(
            f"record-level DP cannot compute per-sample gradients of the LoRA Embedding {embedding}; "
            "remove it from target_modules or use client-level DP only"
        )
    start = time.perf_counter()
    device = next(model.parameters()).device
    keys, params = begin_local_training(model, layout, global_state, phase)
    whiteners = build_whiteners(layout, global_state, keys, record.noise, record.ridge)
    n = len(task.dataset)
    q = record_sample_rate(n, training.batch_size)
    sigma = record.noise_multiplier(task.client_id)
    torch.manual_seed(task.seed)  # dropout and any other stochastic layers
    dp_seed = secrets.randbits(63) if task.dp_seed is None else task.dp_seed  # never the public task.seed
    sample_gen = torch.Generator().manual_seed(derive_seed(dp_seed, "poisson"))
    noise_gen = torch.Generator(device=device).manual_seed(derive_seed(dp_seed, "record-noise"))
    autocast = autocast_for(device, training.mixed_precision)
    loss_sum, seen = 0.0, 0
    model.train()
    with per_sample_gradients(model) as gsm, warnings.catch_warnings():
        # opacus's full backward hooks on a frozen-input model: torch warns, harmlessly, at every step
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        optimizer = WhitenedDPOptimizer(
            _make_optimizer([params[k] for k in keys], training),
            whiteners=[whiteners[k] for k in keys],
            noise_multiplier=sigma,
            max_grad_norm=record.clip_norm,
            expected_batch_size=max(1, round(q * n)),
            loss_reduction="mean",
            generator=noise_gen,
        )
        for _ in range(training.local_epochs):
            loader = DPDataLoader(task.dataset, sample_rate=q, generator=sample_gen)
            memory = (
                BatchMemoryManager(
                    data_loader=loader, max_physical_batch_size=record.max_physical_batch_size, optimizer=optimizer
                )
                if record.max_physical_batch_size
                else contextlib.nullcontext(loader)
            )
            with memory as batches:
                for pixel_values, labels in batches:
                    optimizer.zero_grad(set_to_none=True)
                    if len(labels) == 0:  # a Poisson draw can be empty: the step is noise only
                        for k in keys:
                            params[k].grad_sample = torch.zeros((0, *params[k].shape), device=device)
                        optimizer.step()
                        continue
                    pixel_values, labels = pixel_values.to(device), labels.to(device)
                    with autocast:
                        logits = gsm(pixel_values=pixel_values).logits
                    loss = loss_fn(logits.float(), labels)
                    loss.backward()
                    optimizer.step()
                    loss_sum += float(loss.detach()) * len(labels)
                    seen += len(labels)
        optimizer.zero_grad(set_to_none=True)
    for k in keys:  # opacus's optimizer attribute, not removed by the module cleanup
        if hasattr(params[k], "summed_grad"):
            del params[k].summed_grad
    delta = {k: params[k].detach().to("cpu", torch.float32) - global_state[k] for k in keys}
    return ClientUpdate(task.client_id, delta, n, loss_sum / max(seen, 1), seen, time.perf_counter() - start)


__all__ = [
    "RecordAccountants",
    "RecordDP",
    "RecordLevel",
    "WhitenedDPOptimizer",
    "calibrate_record_sigmas",
    "merge_ledgers",
    "per_sample_gradients",
    "record_sample_rate",
    "record_steps",
    "train_client_record",
    "whitened_norms",
]
