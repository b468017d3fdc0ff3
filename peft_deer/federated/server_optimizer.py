"""The server's step on the aggregated (already privatized) update: FedAvg, FedAvgM or FedAdam.

Each phase releases one aggregated delta Δ of the phase's trained keys (the trained factor and the
head). The server treats Δ as a pseudo-gradient step and moves the global adapter x with it, per key
(per factor: in `deer`/`rolora` a phase B steps only the B keys and the head, a phase A only the A keys
and the head; a key's state advances only in the phases that release it):

- `avg` (FedAvg):       x ← x + η·Δ                               (η = 1: today's update, bit for bit)
- `momentum` (FedAvgM): v ← β·v + Δ;  x ← x + η·v                 (v starts at 0; Hsu et al. 2019)
- `adam` (FedAdam):     m ← β1·m + (1 − β1)·Δ;  u ← β2·u + (1 − β2)·Δ²;
                        x ← x + η · m̂ / (sqrt(û) + ε),  m̂ = m / (1 − β1^t), û = u / (1 − β2^t)
                        (t: the key's own step count; β1, β2 = 0.9, 0.99, ε = 1e-8; Reddi et al. 2021,
                        with Adam's bias correction so that the first steps are not damped)

Δ is a DP release, so whatever the server computes from it is post-processing: the privacy ledger is the
same for every server optimizer (except that `deer-reference` reads its effective sigma from the frozen
factor, which the optimizer shapes). Adam's step per entry is about η whatever the scale of Δ, so it
wants a much smaller η (e.g. 1e-3) than `avg`. All state is fp32 CPU tensors; `state_dict()`
round-trips it exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .adapter_state import AdapterState

SERVER_OPTIMIZERS = ("avg", "momentum", "adam")
ADAM_BETAS = (0.9, 0.99)
ADAM_EPS = 1e-8


@dataclass
class ServerOptimizer:
    """The server's update rule `kind` with learning rate `lr` (η) and, for `momentum`, `momentum` (β)."""

    kind: str = "avg"
    lr: float = 1.0
    momentum: float = 0.9
    betas: tuple[float, float] = ADAM_BETAS
    eps: float = ADAM_EPS
    # Per key: the momentum buffer v (momentum), or Adam's m, u and step count t.
    buffers: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)
    steps: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in SERVER_OPTIMIZERS:
            raise ValueError(f"--server-optimizer {self.kind!r} must be one of {', '.join(SERVER_OPTIMIZERS)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"--server-lr {self.lr:g} must be a finite number > 0 (1.0 for plain averaging)")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"--server-momentum {self.momentum:g} must be in [0, 1) (e.g. 0.9)")
        if not all(0 <= b < 1 for b in self.betas) or not self.eps > 0:
            raise ValueError(f"Adam betas {self.betas} must be in [0, 1) and eps {self.eps:g} > 0")

    def describe(self) -> str:
        """One line for the model card, e.g. 'adam (lr 0.001, betas (0.9, 0.99), eps 1e-08)'."""
        if self.kind == "avg":
            return f"avg (lr {self.lr:g})"
        if self.kind == "momentum":
            return f"momentum (lr {self.lr:g}, momentum {self.momentum:g})"
        return f"adam (lr {self.lr:g}, betas {self.betas}, eps {self.eps:g})"

    def step(self, state: AdapterState, delta: AdapterState, keys: list[str]) -> AdapterState:
        """The new global state after the release `delta` of `keys` (a new dict; `state` is not modified).

        `delta` must hold exactly `keys`, each with its key's shape in `state`; other keys are shared.
        """
        if set(delta) != set(keys):
            raise ValueError(
                f"the released delta holds keys {sorted(set(delta) ^ set(keys))} not matching the phase's keys"
            )
        out = dict(state)
        for key in keys:
            x, d = state[key].to(torch.float32), delta[key].to(torch.float32)
            if d.shape != x.shape:
                raise ValueError(f"{key}: delta shape {tuple(d.shape)} != state shape {tuple(x.shape)}")
            out[key] = x + self._direction(key, d)
        return out

    def _direction(self, key: str, d: torch.Tensor) -> torch.Tensor:
        """η times the step direction for `key` given its release `d`; advances the key's state."""
        if self.kind == "avg":
            return self.lr * d  # η = 1 multiplies exactly: x + 1.0·Δ == x + Δ bit for bit
        self.steps[key] = t = self.steps.get(key, 0) + 1
        if self.kind == "momentum":
            v = self.buffers.setdefault(key, {"v": torch.zeros_like(d)})["v"]
            v.mul_(self.momentum).add_(d)
            return self.lr * v
        beta1, beta2 = self.betas
        buf = self.buffers.setdefault(key, {"m": torch.zeros_like(d), "u": torch.zeros_like(d)})
        buf["m"].mul_(beta1).add_(d, alpha=1 - beta1)
        buf["u"].mul_(beta2).addcmul_(d, d, value=1 - beta2)
        m_hat = buf["m"] / (1 - beta1**t)
        u_hat = buf["u"] / (1 - beta2**t)
        return self.lr * m_hat / (u_hat.sqrt() + self.eps)

    def state_dict(self) -> dict:
        """The optimizer's state (kind, per-key buffers and step counts), tensors cloned."""
        return {
            "kind": self.kind,
            "buffers": {k: {n: t.clone() for n, t in b.items()} for k, b in self.buffers.items()},
            "steps": dict(self.steps),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["kind"] != self.kind:
            raise ValueError(f"the checkpoint's server optimizer is {state['kind']!r}, this run's is {self.kind!r}")
        self.buffers = {k: {n: t.clone() for n, t in b.items()} for k, b in state["buffers"].items()}
        self.steps = {k: int(t) for k, t in state["steps"].items()}


__all__ = ["ADAM_BETAS", "ADAM_EPS", "SERVER_OPTIMIZERS", "ServerOptimizer"]
