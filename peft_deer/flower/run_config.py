"""The Flower app's settings: the run's settings (the same names as `deer-fed`'s flags) plus a few
that only a deployment has. Both come from `[tool.flwr.app.config]` and `flwr run --run-config`.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..federated.quantization import check_quantization_range
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
    secure_aggregation: carry each phase through Flower's SecAgg+ (the server sees only the sum); needs
        client-level DP, the distributed noise placement and min_clients_per_phase >= 2.
    quantization_range: SecAgg+ quantization levels per entry (Q); num-clients * Q must stay below 2^32.
    """

    min_clients_per_phase: int = 1
    node_wait_s: float = 300.0
    reply_timeout_s: float = 3600.0
    secure_aggregation: bool = False  # each phase through SecAgg+ (peft_deer.flower.secagg)
    quantization_range: int = 2**24  # SecAgg+ levels per entry (see peft_deer.federated.quantization)

    def __post_init__(self) -> None:
        if self.min_clients_per_phase < 1:
            raise ValueError(f"min-clients-per-phase {self.min_clients_per_phase} must be >= 1")
        if not (self.node_wait_s > 0 and self.reply_timeout_s > 0):
            raise ValueError("node-wait-s and reply-timeout-s must be > 0")


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "false"):
        return str(value).lower() == "true"
    raise ValueError(f"{value!r} is not true or false")


OPTION_KEYS = {
    "min-clients-per-phase": ("min_clients_per_phase", int),
    "node-wait-s": ("node_wait_s", float),
    "reply-timeout-s": ("reply_timeout_s", float),
    "secure-aggregation": ("secure_aggregation", _flag),
    "quantization-range": ("quantization_range", int),
}


def parse_run_config(run_config: Mapping[str, Any]) -> tuple[argparse.Namespace, DeploymentOptions]:
    """(run settings, deployment options) from a Flower run config; ValueError / SystemExit on bad values."""
    options = {}
    for key, (dest, cast) in OPTION_KEYS.items():
        if key in run_config:
            try:
                options[dest] = cast(run_config[key])
            except ValueError as err:
                raise ValueError(f"{key} {run_config[key]!r}: {err}") from None
    args = run_config_to_args({k: v for k, v in run_config.items() if k not in OPTION_KEYS})
    deployment = DeploymentOptions(**options)
    if deployment.secure_aggregation:
        check_secure_aggregation(args, deployment)
    return args, deployment


def check_secure_aggregation(args: argparse.Namespace, options: DeploymentOptions) -> None:
    """ValueError (one line: the setting, and why) unless the run can go through SecAgg+."""
    levels = {level.strip() for level in args.dp.split(",")}
    if "client" not in levels:
        raise ValueError(
            f"secure-aggregation=true needs dp with 'client' (got dp={args.dp!r}): SecAgg+ quantizes each update "
            "into a range derived from the client-level clip norm C, which bounds nothing without it"
        )
    if args.noise_placement != "distributed":
        raise ValueError(
            f"secure-aggregation=true needs noise-placement='distributed' (got {args.noise_placement!r}): central "
            "noise is added by the server to the clients' raw updates, which secure aggregation hides from it"
        )
    if options.min_clients_per_phase < 2:
        raise ValueError(
            f"secure-aggregation=true needs min-clients-per-phase >= 2 (got {options.min_clients_per_phase}): "
            "a sum of one update is that update; set it to the number of sites you expect to reply"
        )
    check_quantization_range(options.quantization_range, args.num_clients)
