"""`ClientDP`, the client-level mechanism, and its one conversion from and to the settings and the adapter config.

The mechanism is spelled as the run settings spell it (`PrivacySettings`: `noise_multiplier`, `clip_norm`,
`regulator_ridge`, `noise_placement`, `delta`); the adapter config keeps its saved names (`DeerLoraConfig`:
`dp_delta` for `delta`, so older adapters load) and `CONFIG_NAMES` is the one place that maps between them.
Every path goes through here: settings -> `config_fields` -> `DeerLoraConfig` -> `ClientDP.from_config`, and
settings -> `ClientDP.from_settings`, agree field by field (tests/test_run_lifecycle.py).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from .. import defaults
from ..methods import method_spec

if TYPE_CHECKING:  # the settings are light; the core only reads their attributes
    from ..settings import RunSettings

# ClientDP field -> the DeerLoraConfig field that saves it (adapter_config.json keys, kept for old adapters)
CONFIG_NAMES = {
    "noise_multiplier": "noise_multiplier",
    "clip_norm": "clip_norm",
    "regulator_ridge": "regulator_ridge",
    "noise_placement": "noise_placement",
    "delta": "dp_delta",
    "target_epsilon": "target_epsilon",
}


@dataclass(frozen=True, kw_only=True)
class ClientDP:
    """Client-level DP settings: sigma, clip norm C, ridge lambda, noise placement, delta, budget."""

    noise_multiplier: float
    clip_norm: float
    regulator_ridge: float = defaults.RIDGE
    noise_placement: str = "central"
    delta: float = defaults.DELTA
    target_epsilon: float | None = None

    def __post_init__(self) -> None:
        if not self.noise_multiplier > 0:
            raise ValueError(f"noise multiplier {self.noise_multiplier} must be > 0 with client-level DP")
        if not self.clip_norm > 0:
            raise ValueError(f"--clip-norm {self.clip_norm} must be > 0")
        if self.regulator_ridge < 0:
            raise ValueError(f"--regulator-ridge {self.regulator_ridge} must be >= 0")
        if self.noise_placement not in ("central", "distributed"):
            raise ValueError(f"noise placement {self.noise_placement!r} is not 'central' or 'distributed'")

    @classmethod
    def from_config(cls, config: Any) -> ClientDP | None:
        """The mechanism a `DeerLoraConfig` states (None: noise multiplier 0, no client-level DP).

        `deer-reference` reproduces the authors: its target epsilon is nominal, no budget (the ledger shows
        the true one)."""
        if config.noise_multiplier == 0:
            return None
        values = {name: getattr(config, saved) for name, saved in CONFIG_NAMES.items()}
        if not method_spec(config.method).enforces_budget:
            values["target_epsilon"] = None
        return cls(**values)

    @classmethod
    def from_settings(cls, settings: RunSettings, noise_multiplier: float) -> ClientDP | None:
        """The mechanism a run's settings ask for at sigma `noise_multiplier` (calibrated or given; None
        without client-level DP): the same object `from_config` reads back from the run's adapter config."""
        if not settings.privacy.client_level or noise_multiplier == 0:
            return None
        fields_ = cls.config_fields(settings, noise_multiplier)
        return cls.from_config(SimpleNamespace(**fields_, method=settings.federation.method))  # the config's view

    @staticmethod
    def config_fields(settings: RunSettings, noise_multiplier: float) -> dict[str, Any]:
        """The `DeerLoraConfig` keyword arguments that state the run's mechanism (`noise_multiplier` 0.0:
        no client-level DP); `from_config` reads them back."""
        privacy = settings.privacy
        values = {f.name: getattr(privacy, f.name) for f in fields(ClientDP) if hasattr(privacy, f.name)}
        values.update(noise_multiplier=noise_multiplier, target_epsilon=privacy.epsilon)
        return {CONFIG_NAMES[name]: value for name, value in values.items()}
