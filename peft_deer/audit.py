"""`deer-audit`: an empirical privacy audit of the project's own DP mechanisms (runs on CPU in minutes).

The audit plays the distinguishing game behind the definition of (epsilon, delta)-DP and turns the
adversary's success into a statistical **lower bound** on the epsilon the mechanism really has:

1. *Setting.* A tiny adapter (rank-2 LoRA on two 4 x 4 linear layers; one 4 -> 2 layer at record
   level) whose frozen factors have largest singular value `--frozen-scale` (default 3). The adversary
   knows everything except one bit: whether the canary took part.
2. *Client level* (default). N clients; client 0 is the canary, every other client sends a zero update
   (the adversary knows them). A trial picks "in" or "out" (balanced, from `--seed`), then runs
   `--releases` releases through a fresh `FederatedServer` -- the project's own client sampling,
   clipping, noise and accounting, not a re-implementation -- following `iter_phases(method, ...)`.
   In the "out" world client 0 is dropped from every phase. The canary sends the worst-case clipped
   update for the mechanism: for 'regulated' and 'plain' noise `whitener.color(u)` with u a fixed
   whitened vector of norm C (metric norm exactly C: clipping leaves it); for 'reference' (the authors'
   mechanism) per matrix a rank-one update of Frobenius norm C along the top eigenvector of that
   matrix's metric M_j, whose whitened norm is C sqrt(sum_j lambda_max(M_j)) -- more than C once the
   frozen factor's largest singular value passes 1.
3. *Test statistic* (the likelihood-ratio test for the Gaussian). Per release the adversary takes the
   released sum (delta times the public denominator q N), whitens it with the whiteners the mechanism
   used (`build_whiteners` on the public global state), projects it on the canary's whitened direction
   and divides by the canary's whitened norm and sigma C; the statistic sums this over the releases.
4. *Bound.* Trials are split in two halves. The threshold is chosen on the first half (the one with the
   largest bound there, computed as below at a stricter 99.9 % level so that no tail threshold fitted
   to a few trials is picked); on the second half FPR and FNR get the upper ends of their two-sided
   95 % Clopper-Pearson intervals (each holds with 97.5 %, both together with >= 95 %), and
       epsilon_lower = max(0, log((1 - delta - FNR_up) / FPR_up), log((1 - delta - FPR_up) / FNR_up)).
   One threshold is tested on fresh trials, so with probability >= 95 % the mechanism's true epsilon
   at `--delta` is at least epsilon_lower. A sound mechanism gives epsilon_lower <= epsilon_ledger.
5. *Seed known to the adversary* (`--reproducible-noise`): the mechanism draws from
   `DPRandomness.from_seed(trial seed)` with a public per-trial seed; the adversary reruns the trial in
   the "out" world with the same seed and subtracts (statistic: whitened norm of the difference, 0 in
   the "out" world, the canary's contribution in the "in" world), which breaks any claimed epsilon.
   Without it every trial uses `DPRandomness.secret()` (OS entropy), as a real run does.
6. *Record level* (`--level record`): one client's DP-SGD (`train_client` with `RecordDP`, opacus
   Poisson batches, per-sample clipping and noise; whitened for `deer`). Its dataset has zero-input
   records (zero LoRA gradient) and, in the "in" world, one canary record with a large input whose
   per-sample gradient is clipped; the "out" world replaces it by another zero record. Statistic: the
   client's delta projected on the canary's first-step clipped gradient (whitened), in units of sigma C.

Reported: epsilon_lower; epsilon_ledger (what the project's ledger claims: the server's RDP epsilon,
from the effective multipliers for `deer-reference`, or opacus RDP over the DP-SGD steps);
epsilon_nominal (sigma alone, the published mechanism's claim for `deer-reference`); and, with every
client in every release (q = 1) of a Gaussian mechanism, epsilon_gaussian_exact, the exact epsilon of
that Gaussian mechanism (analytic Gaussian, Balle & Wang 2018) -- the best any audit can find.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace

import numpy as np
import torch
from peft import get_peft_model
from scipy.stats import beta, norm
from torch import nn
from torch.utils.data import TensorDataset
from tqdm import tqdm

from .config import METHODS, DeerLoraConfig
from .federated import accountant as _accountant
from .federated.accountant import ReleaseAccountant, check_delta
from .federated.adapter_state import AdapterLayout, AdapterState, adapter_layout, get_adapter_state, load_adapter_state
from .federated.aggregate import ClientDP, clip_client_update
from .federated.client import train_client
from .federated.local_training import ClientTask, ClientUpdate, LocalTraining, set_phase_trainability
from .federated.mechanism import Whitener, build_whiteners
from .federated.randomness import DPRandomness
from .federated.record_dp import RecordAccountants, RecordDP, record_sample_rate, record_steps
from .federated.schedule import NoiseKind, Phase, iter_phases, method_spec
from .federated.seeding import derive_seed
from .federated.server import FederatedServer

CONFIDENCE = 0.95  # of epsilon_lower
_RATE_LEVEL = 1 - (1 - CONFIDENCE) / 2  # each of FPR, FNR: one-sided 97.5 % (two-sided 95 % interval)
_SELECTION_LEVEL = 0.999  # threshold selection on the first half: a stricter bound, robust to the tails


# ---------------------------------------------------------------------------------------------------
# Results and statistics


@dataclass
class AuditResult:
    """One audit: the lower bound, what the ledger claims, and how the bound was obtained."""

    level: str
    method: str
    noise_multiplier: float
    clip_norm: float
    delta: float
    trials: int
    epsilon_lower: float
    epsilon_ledger: float
    epsilon_nominal: float
    epsilon_gaussian_exact: float | None
    threshold: float
    fpr: float  # observed on the second half of the trials
    fnr: float
    fpr_upper: float  # Clopper-Pearson upper ends used in the bound
    fnr_upper: float
    reproducible_noise: bool
    seconds: float
    seconds_per_trial: float
    confidence: float = CONFIDENCE
    details: dict = field(default_factory=dict)  # level-specific settings (sample rate, releases, steps, ...)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(out.pop("details"))
        return out


def clopper_pearson_upper(failures: np.ndarray | int, n: int, level: float = _RATE_LEVEL) -> np.ndarray:
    """One-sided upper confidence bound at `level` on a rate with `failures` out of `n` (Clopper-Pearson)."""
    k = np.asarray(failures, dtype=float)
    upper = beta.ppf(level, k + 1, np.maximum(n - k, 1e-12))
    return np.where(k >= n, 1.0, upper)


def epsilon_from_rates(fpr_up: np.ndarray, fnr_up: np.ndarray, delta: float) -> np.ndarray:
    """max(0, log((1 - delta - FNR)/FPR), log((1 - delta - FPR)/FNR)): the epsilon a test with these rates proves."""
    fpr_up, fnr_up = np.asarray(fpr_up, dtype=float), np.asarray(fnr_up, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.log(np.maximum(1 - delta - fnr_up, 0.0) / fpr_up)
        b = np.log(np.maximum(1 - delta - fpr_up, 0.0) / fnr_up)
    return np.maximum(0.0, np.nan_to_num(np.maximum(a, b), nan=0.0, neginf=0.0, posinf=0.0))


def _rates(out_stats: np.ndarray, in_stats: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False positives (out >= t) and false negatives (in < t) for each threshold t (the test says "in" at >= t)."""
    fp = len(out_stats) - np.searchsorted(np.sort(out_stats), thresholds, side="left")
    fn = np.searchsorted(np.sort(in_stats), thresholds, side="left")
    return fp, fn


@dataclass(frozen=True)
class Bound:
    epsilon_lower: float
    threshold: float
    fpr: float
    fnr: float
    fpr_upper: float
    fnr_upper: float


def epsilon_lower_bound(stats: np.ndarray, is_in: np.ndarray, delta: float) -> Bound:
    """Select a threshold on the first half of the trials, bound epsilon on the second half (module doc, 4)."""
    stats, is_in = np.asarray(stats, dtype=float), np.asarray(is_in, dtype=bool)
    half = len(stats) // 2
    first, second = slice(0, half), slice(half, None)
    out1, in1 = stats[first][~is_in[first]], stats[first][is_in[first]]
    out2, in2 = stats[second][~is_in[second]], stats[second][is_in[second]]
    if min(len(out1), len(in1), len(out2), len(in2)) == 0:
        raise ValueError("each half of the trials needs both worlds; use more --trials")
    candidates = np.unique(np.concatenate([out1, in1]))
    fp, fn = _rates(out1, in1, candidates)
    score = epsilon_from_rates(
        clopper_pearson_upper(fp, len(out1), _SELECTION_LEVEL),
        clopper_pearson_upper(fn, len(in1), _SELECTION_LEVEL),
        delta,
    )
    threshold = float(candidates[int(np.argmax(score))])
    fp2, fn2 = _rates(out2, in2, np.array([threshold]))
    fpr_up = float(clopper_pearson_upper(fp2[0], len(out2)))
    fnr_up = float(clopper_pearson_upper(fn2[0], len(in2)))
    eps = float(epsilon_from_rates(fpr_up, fnr_up, delta))
    return Bound(eps, threshold, float(fp2[0] / len(out2)), float(fn2[0] / len(in2)), fpr_up, fnr_up)


def gaussian_epsilon(sigma: float, delta: float) -> float:
    """Exact epsilon at `delta` of the Gaussian mechanism with noise multiplier `sigma` (Balle & Wang 2018).

    Solves Phi(-eps s + 1/(2s)) - e^eps Phi(-eps s - 1/(2s)) = delta (s = sigma, sensitivity 1) by bisection.
    """

    def delta_at(eps: float) -> float:
        return float(norm.cdf(-eps * sigma + 0.5 / sigma) - math.exp(eps + norm.logcdf(-eps * sigma - 0.5 / sigma)))

    if delta_at(0.0) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while delta_at(hi) > delta:
        lo, hi = hi, 2 * hi
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_at(mid) > delta else (lo, mid)
    return hi


# ---------------------------------------------------------------------------------------------------
# The audited adapter


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


# ---------------------------------------------------------------------------------------------------
# Client level


def _fixed_direction(keys: Sequence[str], shapes: dict[str, torch.Size], norm_: float, seed: int) -> AdapterState:
    """A fixed random vector over `keys` with total Frobenius norm `norm_` (the canary's whitened update)."""
    g = torch.Generator().manual_seed(derive_seed(seed, "canary", *keys) % 2**62)
    u = {k: torch.randn(shapes[k], generator=g) for k in keys}
    total = math.sqrt(sum(float(v.square().sum()) for v in u.values()))
    return {k: v * (norm_ / total) for k, v in u.items()}


def canary_update(
    keys: Sequence[str],
    whiteners: dict[str, Whitener],
    noise_kind: NoiseKind,
    state: AdapterState,
    clip_norm: float,
    seed: int,
) -> AdapterState:
    """The worst-case clipped update of one client for the mechanism `noise_kind` (module doc, 2)."""
    shapes = {k: state[k].shape for k in keys}
    if noise_kind != NoiseKind.REFERENCE:
        u = _fixed_direction(keys, shapes, clip_norm, seed)
        return {k: whiteners[k].color(u[k]) for k in keys}
    out = {}
    for k in keys:
        w = whiteners[k]
        rows, cols = shapes[k]
        if w.chol is None:  # identity metric (head): any direction of norm C
            out[k] = torch.zeros(shapes[k])
            out[k][0, 0] = clip_norm
            continue
        metric = w.chol.double() @ w.chol.double().T
        top = torch.linalg.eigh(metric).eigenvectors[:, -1].float()  # unit eigenvector of lambda_max
        if w.side == "right":  # B (d_out, r): dB = C e v^T
            e = torch.zeros(rows)
            e[0] = 1.0
            out[k] = clip_norm * torch.outer(e, top)
        else:  # A (r, d_in): dA = C v e^T
            e = torch.zeros(cols)
            e[0] = 1.0
            out[k] = clip_norm * torch.outer(top, e)
    return out


def _whitened(update: AdapterState, whiteners: dict[str, Whitener]) -> AdapterState:
    return {k: whiteners[k].whiten(v.float()) for k, v in update.items()}


def _dot(a: AdapterState, b: AdapterState) -> float:
    return float(sum(float((a[k].double() * b[k].double()).sum()) for k in a))


@dataclass
class _ClientSetup:
    method: str
    layout: AdapterLayout
    state: AdapterState
    num_clients: int
    clients_per_phase: int
    dp: ClientDP
    phases: list[Phase]
    seed: int


@dataclass
class _Release:
    released_sum: AdapterState  # release.delta * denominator: the noisy sum of clipped updates
    whiteners: dict[str, Whitener]
    canary_white: AdapterState  # whitened clipped canary update
    effective_noise_multiplier: float


def _run_releases(setup: _ClientSetup, canary_in: bool, randomness: DPRandomness) -> list[_Release]:
    """One trial: `releases` releases of a fresh `FederatedServer`; client 0 is the canary when `canary_in`."""
    server = FederatedServer(
        setup.method,
        setup.layout,
        dict(setup.state),  # add_delta never writes into these tensors: a shallow copy suffices
        setup.num_clients,
        setup.clients_per_phase,
        dp=setup.dp,
        randomness=randomness,
    )
    denominator = server.sample_rate * server.num_clients
    out = []
    for phase in setup.phases:
        keys = server.trained_keys(phase)
        whiteners = build_whiteners(server.layout, server.global_state, keys, server.spec.noise, setup.dp.ridge)
        canary = canary_update(keys, whiteners, server.spec.noise, server.global_state, setup.dp.clip_norm, setup.seed)
        zero = {k: torch.zeros_like(v) for k, v in canary.items()}
        updates = [
            ClientUpdate(c, canary if c == 0 else zero, num_examples=1)
            for c in server.participants(phase)
            if canary_in or c != 0
        ]
        release = server.finish_phase(phase, updates)
        clipped, _ = clip_client_update(canary, whiteners, server.spec.noise, setup.dp.clip_norm)
        out.append(
            _Release(
                {k: v * denominator for k, v in release.delta.items()},
                whiteners,
                _whitened(clipped, whiteners),
                float(release.effective_noise_multiplier),
            )
        )
    return out


def _projection_statistic(releases: list[_Release], sigma_c: float) -> float:
    """sum over releases of <whiten(sum), w> / (||w|| sigma C): N(0, T) without the canary (module doc, 3)."""
    total = 0.0
    for r in releases:
        w_norm = math.sqrt(_dot(r.canary_white, r.canary_white))
        total += _dot(_whitened(r.released_sum, r.whiteners), r.canary_white) / (w_norm * sigma_c)
    return total


def _difference_statistic(real: list[_Release], rerun: list[_Release], sigma_c: float) -> float:
    """Seed known: sum over releases of ||whiten(real - rerun)|| / (sigma C); exactly 0 without the canary."""
    total = 0.0
    for r, s in zip(real, rerun, strict=True):
        diff = {k: r.released_sum[k] - s.released_sum[k] for k in r.released_sum}
        white = _whitened(diff, r.whiteners)
        total += math.sqrt(_dot(white, white)) / sigma_c
    return total


def _balanced_worlds(trials: int, seed: int) -> np.ndarray:
    """True = "in" for half of the trials, in a random order fixed by the audit's `--seed`."""
    worlds = np.arange(trials) < trials // 2
    np.random.default_rng(derive_seed(seed, "worlds")).shuffle(worlds)
    return worlds


@contextmanager
def _audit_context() -> Iterator[None]:
    """One torch thread (tiny tensors: threads only add overhead); no large-delta warning per trial.

    The audit picks its delta on purpose (a larger delta makes a tighter audit); `check_delta` still
    rejects delta >= 1/num_clients.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            weak = getattr(_accountant, "WeakDeltaWarning", None)
            if weak is not None:
                warnings.simplefilter("ignore", weak)
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            yield
    finally:
        torch.set_num_threads(previous)


def _check_common(method: str, noise_multiplier: float, clip_norm: float, trials: int, delta: float) -> None:
    if method not in METHODS:
        raise ValueError(f"--method {method!r} is not one of {', '.join(METHODS)}")
    if not (noise_multiplier > 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"--noise-multiplier {noise_multiplier} must be finite and > 0")
    if not (clip_norm > 0 and math.isfinite(clip_norm)):
        raise ValueError(f"--clip-norm {clip_norm} must be finite and > 0")
    if trials < 20:
        raise ValueError(f"--trials {trials} must be >= 20 (both halves need trials of both worlds)")
    if not 0 < delta < 1:
        raise ValueError(f"--delta {delta} must be in (0, 1)")


def run_client_audit(
    method: str = "deer",
    noise_multiplier: float = 1.0,
    clip_norm: float = 1.0,
    sample_rate: float = 1.0,
    releases: int = 1,
    trials: int = 20000,
    delta: float = 1e-5,
    num_clients: int = 10,
    reproducible_noise: bool = False,
    seed: int = 0,
    rank: int = 2,
    dim: int = 4,
    frozen_scale: float = 3.0,
    ridge: float = 1e-6,
    progress: bool = False,
    noise_seed: int | None = None,
) -> AuditResult:
    """Client-level audit of `method`'s mechanism through `FederatedServer` (module doc, 2-5).

    `noise_seed` (tests only): the mechanism's randomness comes from `DPRandomness.from_seed` with seeds
    derived from it, which the adversary does NOT use -- statistically the same as secret noise, but the
    audit is deterministic. Without it (and without `reproducible_noise`) every trial draws a fresh secret.
    """
    _check_common(method, noise_multiplier, clip_norm, trials, delta)
    if num_clients < 1:
        raise ValueError(f"--num-clients {num_clients} must be >= 1")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"--sample-rate {sample_rate} must be in (0, 1]")
    clients_per_phase = round(sample_rate * num_clients)
    if clients_per_phase < 1:
        raise ValueError(f"--sample-rate {sample_rate} x --num-clients {num_clients} rounds to 0 clients per phase")
    if releases < 1:
        raise ValueError(f"--releases {releases} must be >= 1")
    if rank < 1 or dim < rank:
        raise ValueError(f"--rank {rank} must be in [1, --dim={dim}]")
    if not (frozen_scale > 0 and math.isfinite(frozen_scale)):
        raise ValueError(f"--frozen-scale {frozen_scale} must be finite and > 0")
    with _audit_context():
        check_delta(delta, num_clients)
    spec = method_spec(method)
    start = time.perf_counter()
    with _audit_context():
        _, layout, state = build_audit_adapter(method, rank, dim, frozen_scale, seed=seed)
        rounds = -(-releases // spec.releases_per_round)
        setup = _ClientSetup(
            method,
            layout,
            state,
            num_clients,
            clients_per_phase,
            ClientDP(noise_multiplier, clip_norm, ridge=ridge, delta=delta),
            list(itertools.islice(iter_phases(method, rounds), releases)),
            seed,
        )
        worlds = _balanced_worlds(trials, seed)
        stats = np.empty(trials)
        min_sigma = [math.inf] * releases  # per release: the smallest effective multiplier of any trial
        sigma_c = noise_multiplier * clip_norm
        for i in tqdm(range(trials), desc=f"audit {method}", unit="trial", disable=not progress):
            if reproducible_noise:
                randomness = DPRandomness.from_seed(derive_seed(seed, "trial", i))  # public
                real = _run_releases(setup, bool(worlds[i]), randomness)
                rerun = _run_releases(setup, False, DPRandomness.from_seed(derive_seed(seed, "trial", i)))
                stats[i] = _difference_statistic(real, rerun, sigma_c)
            else:
                randomness = (
                    DPRandomness.secret()
                    if noise_seed is None
                    else DPRandomness.from_seed(derive_seed(noise_seed, "hidden-trial", i))
                )
                real = _run_releases(setup, bool(worlds[i]), randomness)
                stats[i] = _projection_statistic(real, sigma_c)
            for t, r in enumerate(real):
                min_sigma[t] = min(min_sigma[t], r.effective_noise_multiplier)
    seconds = time.perf_counter() - start
    bound = epsilon_lower_bound(stats, worlds, delta)
    ledger, nominal = ReleaseAccountant(), ReleaseAccountant()
    for s in min_sigma:  # identical in every trial except deer-reference with releases > 1
        ledger.step(s, setup.clients_per_phase / num_clients)
        nominal.step(noise_multiplier, setup.clients_per_phase / num_clients)
    exact = None
    if clients_per_phase == num_clients and (releases == 1 or spec.noise != NoiseKind.REFERENCE):
        # q = 1: the T-fold composition of a Gaussian mechanism with multiplier s is one with s / sqrt(T)
        exact = gaussian_epsilon(min_sigma[0] / math.sqrt(releases), delta)
    return AuditResult(
        level="client",
        method=method,
        noise_multiplier=noise_multiplier,
        clip_norm=clip_norm,
        delta=delta,
        trials=trials,
        epsilon_lower=bound.epsilon_lower,
        epsilon_ledger=ledger.epsilon(delta, "rdp"),
        epsilon_nominal=nominal.epsilon(delta, "rdp"),
        epsilon_gaussian_exact=exact,
        threshold=bound.threshold,
        fpr=bound.fpr,
        fnr=bound.fnr,
        fpr_upper=bound.fpr_upper,
        fnr_upper=bound.fnr_upper,
        reproducible_noise=reproducible_noise,
        seconds=seconds,
        seconds_per_trial=seconds / trials,
        details={
            "noise": spec.noise,
            "sample_rate": clients_per_phase / num_clients,
            "num_clients": num_clients,
            "releases": releases,
            "effective_noise_multipliers": min_sigma,
            "frozen_scale": frozen_scale,
            "rank": rank,
            "dim": dim,
            "seed": seed,
        },
    )


# ---------------------------------------------------------------------------------------------------
# Record level


def _canary_gradient(
    model: nn.Module, layout: AdapterLayout, state: AdapterState, phase: Phase, x: torch.Tensor, y: torch.Tensor
) -> AdapterState:
    """The canary record's per-sample gradient of the phase's trained factor(s) at the initial state."""
    load_adapter_state(model, state)
    set_phase_trainability(model, phase)
    params = dict(model.named_parameters())
    keys = layout.trained_keys(phase.factors)
    loss = nn.functional.cross_entropy(model(pixel_values=x[None]).logits, y[None])
    grads = torch.autograd.grad(loss, [params[k] for k in keys])
    return {k: g.detach().float() for k, g in zip(keys, grads, strict=True)}


def run_record_audit(
    method: str = "deer",
    noise_multiplier: float = 1.0,
    clip_norm: float = 1.0,
    trials: int = 5000,
    delta: float = 1e-5,
    num_examples: int = 16,
    batch_size: int = 8,
    lr: float = 0.01,
    reproducible_noise: bool = False,
    seed: int = 0,
    rank: int = 2,
    dim: int = 4,
    frozen_scale: float = 3.0,
    ridge: float = 1e-6,
    progress: bool = False,
    noise_seed: int | None = None,
) -> AuditResult:
    """Record-level audit: one client update of DP-SGD (`train_client` + `RecordDP`) with a canary record.

    `noise_seed` (tests only): `dp_seed`s derived from it, unused by the adversary (see `run_client_audit`).
    """
    _check_common(method, noise_multiplier, clip_norm, trials, delta)
    if num_examples < 2:
        raise ValueError(f"--record-examples {num_examples} must be >= 2")
    if not 1 <= batch_size <= num_examples:
        raise ValueError(f"--batch-size {batch_size} must be in [1, --record-examples={num_examples}]")
    if not lr > 0:
        raise ValueError(f"--lr {lr} must be > 0")
    if rank < 1 or dim < rank:
        raise ValueError(f"--rank {rank} must be in [1, --dim={dim}]")
    if not (frozen_scale > 0 and math.isfinite(frozen_scale)):
        raise ValueError(f"--frozen-scale {frozen_scale} must be finite and > 0")
    noise = method_spec(method).record_noise
    record = RecordDP(noise_multipliers=(noise_multiplier,), clip_norm=clip_norm, delta=delta, noise=noise, ridge=ridge)
    training = LocalTraining(
        local_epochs=1, batch_size=batch_size, lr=lr, momentum=0.0, weight_decay=0.0, record_dp=record
    )
    q = record_sample_rate(num_examples, batch_size)
    steps = record_steps(num_examples, batch_size, 1)
    expected_batch = max(1, round(q * num_examples))
    start = time.perf_counter()
    with _audit_context():
        model, layout, state = build_audit_adapter(method, rank, dim, frozen_scale, 1, 2, seed=seed)
        phase = next(iter_phases(method, 1))
        keys = layout.trained_keys(phase.factors)
        whiteners = build_whiteners(layout, state, keys, noise, ridge)
        # The canary: a large input along the frozen A's top right-singular vector, labelled against the
        # model's prediction; two classes keep its per-sample gradient's direction fixed while it trains.
        a = state[layout.lora[0].a_key]
        x = 50.0 * torch.linalg.svd(a.double()).Vh[0].float()
        with torch.no_grad():
            load_adapter_state(model, state)
            y = model(pixel_values=x[None]).logits[0].argmin()
        grad = _canary_gradient(model, layout, state, phase, x, y)
        white = _whitened(grad, whiteners)
        white_norm = math.sqrt(_dot(white, white))
        direction = {k: v / white_norm for k, v in white.items()}  # unit, whitened
        worlds = _balanced_worlds(trials, seed)
        labels = torch.zeros(num_examples, dtype=torch.long)
        labels[0] = y
        zeros = torch.zeros(num_examples, dim)
        with_canary = zeros.clone()
        with_canary[0] = x
        datasets = {True: TensorDataset(with_canary, labels), False: TensorDataset(zeros, labels)}
        scale = expected_batch / lr  # delta = -lr / B * (sum of clipped per-sample grads + noise) per step
        stats = np.empty(trials)

        def update(canary_in: bool, dp_seed: int | None) -> AdapterState:
            task = ClientTask(0, datasets[canary_in], seed, dp_seed=dp_seed)
            return train_client(model, layout, state, phase, task, training).delta

        for i in tqdm(range(trials), desc=f"record audit {method}", unit="trial", disable=not progress):
            if reproducible_noise:
                public = derive_seed(seed, "record-trial", i)
                diff = {
                    k: v - w
                    for (k, v), w in zip(
                        update(bool(worlds[i]), public).items(), update(False, public).values(), strict=True
                    )
                }
                white_diff = _whitened(diff, whiteners)
                stats[i] = math.sqrt(_dot(white_diff, white_diff)) * scale / (noise_multiplier * clip_norm)
            else:
                # dp_seed None: fresh OS entropy, as in a real run
                hidden = None if noise_seed is None else derive_seed(noise_seed, "hidden-record-trial", i)
                delta_ = update(bool(worlds[i]), hidden)
                stats[i] = -_dot(_whitened(delta_, whiteners), direction) * scale / (noise_multiplier * clip_norm)
    seconds = time.perf_counter() - start
    bound = epsilon_lower_bound(stats, worlds, delta)
    accountants = RecordAccountants()
    accountants.step(0, noise_multiplier, q, steps)
    eps_ledger = accountants.epsilon(0, delta)
    return AuditResult(
        level="record",
        method=method,
        noise_multiplier=noise_multiplier,
        clip_norm=clip_norm,
        delta=delta,
        trials=trials,
        epsilon_lower=bound.epsilon_lower,
        epsilon_ledger=eps_ledger,
        epsilon_nominal=eps_ledger,
        epsilon_gaussian_exact=gaussian_epsilon(noise_multiplier, delta) if q == 1 else None,
        threshold=bound.threshold,
        fpr=bound.fpr,
        fnr=bound.fnr,
        fpr_upper=bound.fpr_upper,
        fnr_upper=bound.fnr_upper,
        reproducible_noise=reproducible_noise,
        seconds=seconds,
        seconds_per_trial=seconds / trials,
        details={
            "noise": noise,
            "record_examples": num_examples,
            "batch_size": batch_size,
            "record_sample_rate": q,
            "steps": steps,
            "lr": lr,
            "frozen_scale": frozen_scale,
            "rank": rank,
            "dim": dim,
            "seed": seed,
        },
    )


# ---------------------------------------------------------------------------------------------------
# CLI


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="deer-audit",
        description=(
            "Empirical privacy audit: a 95% Clopper-Pearson lower bound on the real epsilon of the project's "
            "own DP mechanism (client sampling, clipping, noise via FederatedServer; DP-SGD via train_client), "
            "to compare with the epsilon its ledger claims. Runs on CPU in minutes."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--level",
        choices=("client", "record"),
        default="client",
        help="client: one canary client among --num-clients; record: one canary record in a client's DP-SGD",
    )
    p.add_argument("--method", choices=METHODS, default="deer", help="federated method whose mechanism is audited")
    p.add_argument("--noise-multiplier", type=float, default=1.0, help="noise multiplier sigma (nominal)")
    p.add_argument("--clip-norm", type=float, default=1.0, help="clip norm C (client update, or per-sample gradient)")
    p.add_argument(
        "--sample-rate",
        type=float,
        default=1.0,
        help="client level: q; round(q * num_clients) clients per phase, Poisson-sampled (1 = everyone)",
    )
    p.add_argument(
        "--releases",
        type=int,
        default=1,
        help="client level: releases (phases) per trial, following the method's schedule",
    )
    p.add_argument(
        "--trials",
        type=int,
        default=None,
        help="trials, half with the canary (None: 20000 at client level, 5000 at record level)",
    )
    p.add_argument("--delta", type=float, default=1e-5, help="delta of the audited (epsilon, delta) guarantee")
    p.add_argument("--num-clients", type=int, default=10, help="client level: clients N (delta must be < 1/N)")
    p.add_argument(
        "--reproducible-noise",
        action="store_true",
        help="the mechanism draws from a public per-trial seed (DPRandomness.from_seed) and the adversary "
        "reruns and subtracts: shows that reproducible noise voids the guarantee",
    )
    p.add_argument("--seed", type=int, default=0, help="the audit's own seed (trial order, adapter, canary direction)")
    p.add_argument(
        "--frozen-scale",
        type=float,
        default=3.0,
        help="largest singular value of every LoRA factor (frozen factor > 1 breaks deer-reference)",
    )
    p.add_argument("--rank", type=int, default=2, help="LoRA rank of the audited adapter")
    p.add_argument("--dim", type=int, default=4, help="width of the audited adapter's linear layers")
    p.add_argument("--record-examples", type=int, default=16, help="record level: the client's dataset size")
    p.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="record level: expected DP-SGD batch size (Poisson rate batch_size / record_examples)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object (no progress bar)")
    return p


def _format_table(result: AuditResult) -> str:
    d = result.to_dict()

    def fmt(v: object) -> str:
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    rows = [
        ("level", result.level),
        ("method", f"{result.method} (noise {d['noise']})"),
        ("noise multiplier", result.noise_multiplier),
        ("delta", f"{result.delta:g}"),
        ("trials", result.trials),
        ("epsilon_lower (95%)", result.epsilon_lower),
        ("epsilon_ledger", result.epsilon_ledger),
        ("epsilon_nominal", result.epsilon_nominal),
        ("epsilon_gaussian_exact", result.epsilon_gaussian_exact),
        ("threshold / FPR / FNR", f"{result.threshold:.3f} / {result.fpr:.4f} / {result.fnr:.4f}"),
        ("seconds (per trial)", f"{result.seconds:.1f} ({1000 * result.seconds_per_trial:.2f} ms)"),
    ]
    lines = [f"{k:<24} {fmt(v)}" for k, v in rows]
    verdict = (
        "VIOLATION: the measured epsilon exceeds the ledger's claim"
        if result.epsilon_lower > result.epsilon_ledger
        else "consistent: epsilon_lower <= epsilon_ledger"
    )
    return "\n".join([*lines, verdict])


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    progress = not args.json and sys.stderr.isatty()
    shared = {
        "method": args.method,
        "noise_multiplier": args.noise_multiplier,
        "clip_norm": args.clip_norm,
        "delta": args.delta,
        "reproducible_noise": args.reproducible_noise,
        "seed": args.seed,
        "rank": args.rank,
        "dim": args.dim,
        "frozen_scale": args.frozen_scale,
        "progress": progress,
    }
    try:
        if args.level == "client":
            result = run_client_audit(
                sample_rate=args.sample_rate,
                releases=args.releases,
                trials=20000 if args.trials is None else args.trials,
                num_clients=args.num_clients,
                **shared,
            )
        else:
            if args.releases != 1 or args.sample_rate != 1.0:
                raise ValueError("--releases and --sample-rate apply to --level client only")
            result = run_record_audit(
                trials=5000 if args.trials is None else args.trials,
                num_examples=args.record_examples,
                batch_size=args.batch_size,
                **shared,
            )
    except ValueError as err:
        sys.stderr.write(f"deer-audit: error: {err}\n")
        return 2
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(_format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
