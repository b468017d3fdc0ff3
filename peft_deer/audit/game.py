"""What both audit levels share: the balanced in/out worlds, the quiet one-thread context, the argument checks
and whitened inner products."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from ..federated import accountant as _accountant
from ..federated.adapter_state import AdapterState
from ..federated.mechanism import Whitener
from ..federated.seeding import derive_seed
from ..tuner.config import METHODS


def whitened(update: AdapterState, whiteners: dict[str, Whitener]) -> AdapterState:
    return {k: whiteners[k].whiten(v.float()) for k, v in update.items()}


def dot(a: AdapterState, b: AdapterState) -> float:
    return float(sum(float((a[k].double() * b[k].double()).sum()) for k in a))


def balanced_worlds(trials: int, seed: int) -> np.ndarray:
    """True = "in" for half of the trials, in a random order fixed by the audit's `--seed`."""
    worlds = np.arange(trials) < trials // 2
    np.random.default_rng(derive_seed(seed, "worlds")).shuffle(worlds)
    return worlds


@contextmanager
def audit_context() -> Iterator[None]:
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


def check_common(method: str, noise_multiplier: float, clip_norm: float, trials: int, delta: float) -> None:
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
