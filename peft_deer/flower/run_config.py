"""The Flower app's settings: the run's settings (the same names as `deer-fed`'s flags) plus a few
that only a deployment has. Both come from `[tool.flwr.app.config]` and `flwr run --run-config`.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..settings import run_config_to_args


@dataclass(frozen=True)
class DeploymentOptions:
    """Settings of a deployment that a simulation does not have.

    min_clients_per_phase: fewer valid updates than this (or than the phase's participants, if fewer)
        stop the run before the release; resume it later with `resume=true`.
    node_wait_s: how long the ServerApp waits for all `num-clients` SuperNodes to connect.
    reply_timeout_s: how long a phase waits for its clients' replies; a late client is dropped.
        With distributed noise, min_clients_per_phase is also the noise floor: each client adds
        1/k of the noise variance, k = min(min_clients_per_phase, sampled), so any release the server
        accepts carries at least the full noise.
    """

    min_clients_per_phase: int = 1
    node_wait_s: float = 300.0
    reply_timeout_s: float = 3600.0

    def __post_init__(self) -> None:
        if self.min_clients_per_phase < 1:
            raise ValueError(f"min-clients-per-phase {self.min_clients_per_phase} must be >= 1")
        if not (self.node_wait_s > 0 and self.reply_timeout_s > 0):
            raise ValueError("node-wait-s and reply-timeout-s must be > 0")


OPTION_KEYS = {
    "min-clients-per-phase": ("min_clients_per_phase", int),
    "node-wait-s": ("node_wait_s", float),
    "reply-timeout-s": ("reply_timeout_s", float),
}


def parse_run_config(run_config: Mapping[str, Any]) -> tuple[argparse.Namespace, DeploymentOptions]:
    """(run settings, deployment options) from a Flower run config; ValueError / SystemExit on bad values."""
    options = {dest: cast(run_config[key]) for key, (dest, cast) in OPTION_KEYS.items() if key in run_config}
    args = run_config_to_args({k: v for k, v in run_config.items() if k not in OPTION_KEYS})
    return args, DeploymentOptions(**options)
