"""The Flower app's settings: the run's settings (the same names as `deer-fed`'s flags) plus a few
that only a deployment has. Both come from `[tool.flwr.app.config]` and `flwr run --run-config`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..federated.quantization import check_quantization_range
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
    secure_aggregation: bool = setting(
        False,
        "carry each phase through Flower's SecAgg+ (peft_deer.flower.secagg): the server sees only the sum; "
        "needs dp with 'client', noise-placement='distributed' and min-clients-per-phase >= 2",
    )
    secagg_noise: str = setting(
        "skellam",
        "SecAgg+ noise: skellam (integer shares that pass the quantization exactly: the Skellam epsilon of the sum is "
        "stated and drives the budget stop) or gaussian (opt-in, NO proof: float shares quantized after the noise; "
        "warns, and the ledger says so); in the resume fingerprint",
        choices=("gaussian", "skellam"),
    )
    quantization_range: int = setting(
        2**24,
        "SecAgg+ quantization levels per entry (Q, see peft_deer.federated.quantization); num-clients x Q must "
        "stay below 2^32",
    )

    def __post_init__(self) -> None:
        if self.min_clients_per_phase < 1:
            raise ValueError(f"min-clients-per-phase {self.min_clients_per_phase} must be >= 1")
        if not (self.node_wait_s > 0 and self.reply_timeout_s > 0):
            raise ValueError("node-wait-s and reply-timeout-s must be > 0")
        check_quantization_range(self.quantization_range, 1)

    def check(self, settings: RunSettings) -> None:
        """ValueError (one line: the setting, and why) unless these options fit the run's `settings`."""
        if self.secure_aggregation:
            check_secure_aggregation(settings, self)


GAUSSIAN_SECAGG_WARNING = (
    "secagg-noise='gaussian': NO proof: quantization after noise (each site sends Q(x + z), and the sum of those is "
    "not a post-processing of the Gaussian sum the ledger's epsilon accounts); use secagg-noise='skellam'"
)

# The run-config keys of the deployment options (a site's loaded data does not depend on them).
OPTION_KEYS = {name.replace("_", "-") for name in DeploymentOptions.__dataclass_fields__}


def parse_run_config(run_config: Mapping[str, Any]) -> tuple[RunSettings, DeploymentOptions]:
    """(run settings, deployment options) from a Flower run config; ValueError (one line) on bad values."""
    settings, options = from_mapping(run_config, extra=[DeploymentOptions])
    deployment = DeploymentOptions(**options)
    deployment.check(settings)
    return settings, deployment


def check_secure_aggregation(settings: RunSettings, options: DeploymentOptions) -> None:
    """ValueError (one line: the setting, and why) unless the run can go through SecAgg+."""
    privacy = settings.privacy
    if not privacy.client_level:
        raise ValueError(
            f"secure-aggregation=true needs dp with 'client' (got dp={privacy.dp!r}): SecAgg+ quantizes each update "
            "into a range derived from the client-level clip norm C, which bounds nothing without it"
        )
    if privacy.noise_placement != "distributed":
        raise ValueError(
            f"secure-aggregation=true needs noise-placement='distributed' (got {privacy.noise_placement!r}): central "
            "noise is added by the server to the clients' raw updates, which secure aggregation hides from it"
        )
    if options.min_clients_per_phase < 2:
        raise ValueError(
            f"secure-aggregation=true needs min-clients-per-phase >= 2 (got {options.min_clients_per_phase}): "
            "a sum of one update is that update; set it to the number of sites you expect to reply"
        )
    if options.secagg_noise == "skellam" and settings.federation.method == "deer-reference":
        raise ValueError(
            "secagg-noise='skellam' needs a metric-clipped method (not deer-reference, which clips per matrix); "
            "secagg-noise='gaussian' runs it without a proof"
        )
    if options.secagg_noise == "gaussian" and settings.refit.head_refit != "none":
        raise ValueError(
            "head-refit='stats' with secure-aggregation=true needs secagg-noise='skellam': the statistics travel as "
            "integer (Skellam) shares, the construction with a proof"
        )
    if options.secagg_noise == "gaussian":
        warnings.warn(GAUSSIAN_SECAGG_WARNING, UserWarning, stacklevel=2)
    if privacy.collusion_threshold >= options.min_clients_per_phase:
        raise ValueError(
            f"secure-aggregation=true needs collusion-threshold < min-clients-per-phase (got "
            f"{privacy.collusion_threshold} >= {options.min_clients_per_phase}): that many colluding sites would know "
            "every noise share of a release; raise min-clients-per-phase or lower collusion-threshold"
        )
    check_quantization_range(options.quantization_range, settings.data.num_clients)
