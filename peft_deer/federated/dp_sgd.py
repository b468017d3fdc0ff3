"""DP-SGD (DESIGN 2.6): one client's local training under record-level DP, with opacus.

For `deer` the regulator carries over: a per-sample gradient g_i of the trained factor is clipped in
the metric M of the frozen factor (norm sqrt(sum_params ||whiten(g_i)||^2)) and the noise has
covariance sigma^2 C^2 M^-1 (`Whitener.color`): DP-SGD in whitened coordinates, hence exactly the
Gaussian mechanism with multiplier sigma. Plain DP-SGD for lora / ffa / rolora / deer-reference.

Opacus per-sample gradients are attached to the process's single model per client update
(`GradSampleModule`, hooks on the modules trainable *now*) and removed afterwards, so a phase
switch (B then A) never meets stale hooks. Engine-free: no accelerate, flwr or gradio.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch
from opacus.data_loader import dtype_safe, shape_safe, wrap_collate_with_empty
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.utils.batch_memory_manager import BatchMemoryManager

from .local_training import (
    ClientTask,
    ClientUpdate,
    LocalTraining,
    PhaseContext,
    autocast_for,
    begin_local_training,
    make_optimizer,
)
from .mechanism import Whitener, build_whiteners
from .randomness import DPRandomness, SecureStream
from .record_dp import record_sample_rate

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
    `whiteners` is aligned with `self.params` (the wrapped optimizer's parameter order). The noise reads
    `stream` (the client's secret `SecureStream`), never a torch generator: each step takes the next blocks.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        whiteners: Sequence[Whitener],
        stream: SecureStream,
        **kwargs,
    ) -> None:
        super().__init__(optimizer, **kwargs)
        if len(whiteners) != len(self.params):
            raise ValueError(f"{len(whiteners)} whiteners for {len(self.params)} parameters")
        self.whiteners = [_on(w, p.device) for w, p in zip(whiteners, self.params, strict=True)]
        self.stream = stream
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
            std = self.noise_multiplier * self.max_grad_norm
            z = self.stream.normal(p.summed_grad.shape, std).to(p.summed_grad.device, p.summed_grad.dtype)
            p.grad = (p.summed_grad + w.color(z)).view_as(p)
            _mark_as_processed(p.summed_grad)


# ---------------------------------------------------------------------------------------------
# Poisson batches from the secret stream


class SecurePoissonSampler(torch.utils.data.Sampler[list[int]]):
    """`steps` batches, each record in with probability `sample_rate` (opacus's sampler, secret draws)."""

    def __init__(self, num_samples: int, sample_rate: float, steps: int, stream: SecureStream) -> None:
        self.num_samples, self.sample_rate, self.steps, self.stream = num_samples, sample_rate, steps, stream

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            yield self.stream.bernoulli(self.sample_rate, self.num_samples).nonzero().flatten().tolist()


def poisson_loader(dataset, sample_rate: float, stream: SecureStream) -> torch.utils.data.DataLoader:
    """One epoch of int(1/q) Poisson batches over `dataset` (empty batches collate to 0-length tensors)."""
    first = dataset[0]
    sampler = SecurePoissonSampler(len(dataset), sample_rate, int(1 / sample_rate), stream)
    collate = wrap_collate_with_empty(
        collate_fn=torch.utils.data.default_collate,
        sample_empty_shapes=[(0, *shape_safe(x)) for x in first],
        dtypes=[dtype_safe(x) for x in first],
    )
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)


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
    ctx: PhaseContext,
    task: ClientTask,
    training: LocalTraining,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = torch.nn.functional.cross_entropy,
) -> ClientUpdate:
    """`client.train_client` under record-level DP-SGD (`training.record_dp`); returns a `ClientUpdate`."""
    if training.logit_adjustment:
        raise ValueError(
            "--logit-adjustment with record-level DP: the loss would depend on the hospital's label counts, "
            "which DP-SGD does not protect; use --logit-adjustment 0"
        )
    record = training.record_dp
    if record is None:
        raise ValueError("train_client_record needs LocalTraining.record_dp (record-level DP settings)")
    model, layout = ctx.model, ctx.layout
    embedding = next((f.module for f in layout.lora if ".lora_embedding_A." in f.a_key), None)
    if embedding is not None:  # opacus hooks modules; an Embedding's LoRA factors are bare parameters
        raise ValueError(
            f"record-level DP cannot compute per-sample gradients of the LoRA Embedding {embedding}; "
            "remove it from target_modules or use client-level DP only"
        )
    start = time.perf_counter()
    device = ctx.device
    keys, params = begin_local_training(ctx)
    whiteners = build_whiteners(layout, ctx.global_state, keys, record.noise, record.regulator_ridge)
    n = record.public_size(task.client_id, len(task.dataset))  # declared public size: q, steps, weight
    q = record_sample_rate(n, training.batch_size)
    sigma = record.noise_multiplier(task.client_id)
    torch.manual_seed(task.seed)  # dropout and any other stochastic layers (public: not a DP draw)
    secret = task.dp_randomness or DPRandomness.secret()  # never derived from the public task.seed
    batches_stream, noise_stream = secret.stream("poisson"), secret.stream("record-noise")
    autocast = autocast_for(device, training.mixed_precision)
    loss_sum, seen = 0.0, 0
    model.train()
    with per_sample_gradients(model) as gsm, warnings.catch_warnings():
        # opacus's full backward hooks on a frozen-input model: torch warns, harmlessly, at every step
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        optimizer = WhitenedDPOptimizer(
            make_optimizer([params[k] for k in keys], training),
            whiteners=[whiteners[k] for k in keys],
            noise_multiplier=sigma,
            max_grad_norm=record.clip_norm,
            expected_batch_size=max(1, round(q * n)),
            loss_reduction="mean",
            stream=noise_stream,
        )
        for _ in range(training.local_epochs):
            loader = poisson_loader(task.dataset, q, batches_stream)
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
    return ClientUpdate(
        task.client_id, ctx.delta(params, keys), n, loss_sum / max(seen, 1), seen, time.perf_counter() - start
    )


__all__ = [
    "SecurePoissonSampler",
    "WhitenedDPOptimizer",
    "poisson_loader",
    "per_sample_gradients",
    "train_client_record",
    "whitened_norms",
]
