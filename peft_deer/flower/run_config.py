"""The Flower app's settings: the run's settings (the same names as `deer-fed`'s flags) plus a few
that only a deployment has. Both come from `[tool.flwr.app.config]` and `flwr run --run-config`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..settings import RunSettings, from_mapping, setting


@dataclass(frozen=True)
class DeploymentOptions:
    """Settings of a deployment that a simulation does not have (read with the run's settings, same checks).

    With distributed noise, min_clients_per_phase is also the noise floor: each client adds 1/k of the
    noise variance, k = min(min_clients_per_phase, sampled), so any release the server accepts carries at
    least the full noise.
    """

    min_clients_per_phase: int = setting(
        1,
        "fewer valid updates than this (or than the phase's participants, if fewer) stop the run before the "
        "release; resume it later with resume=true",
    )
    node_wait_s: float = setting(300.0, "how long the ServerApp waits for all num-clients SuperNodes to connect")
    reply_timeout_s: float = setting(
        3600.0, "how long a phase waits for its clients' replies; a late client is dropped"
    )

    def __post_init__(self) -> None:
        if self.min_clients_per_phase < 1:
            raise ValueError(f"min-clients-per-phase {self.min_clients_per_phase} must be >= 1")
        if not (self.node_wait_s > 0 and self.reply_timeout_s > 0):
            raise ValueError("node-wait-s and reply-timeout-s must be > 0")


# The run-config keys of the deployment options (a site's loaded data does not depend on them).
OPTION_KEYS = {name.replace("_", "-") for name in DeploymentOptions.__dataclass_fields__}


def parse_run_config(run_config: Mapping[str, Any]) -> tuple[RunSettings, DeploymentOptions]:
    """(run settings, deployment options) from a Flower run config; ValueError (one line) on bad values."""
    settings, options = from_mapping(run_config, extra=[DeploymentOptions])
    return settings, DeploymentOptions(**options)
