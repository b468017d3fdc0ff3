"""`AuditSettings`: what one audit runs, the same object for the client-level and the record-level game.

The mechanism's fields are spelled as the run settings spell them (`noise_multiplier`, `clip_norm`, `delta`,
`regulator_ridge`); `run_client_audit` and `run_record_audit` read theirs and ignore the other level's.
Only the standard library: `deer-audit` builds one before it loads torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .. import defaults


@dataclass(frozen=True, kw_only=True)
class AuditSettings:
    """One audit: the audited mechanism, the game (trials, seeds, a planted bug), the adapter and each level's setup."""

    # the audited mechanism
    method: str = "deer"
    noise_multiplier: float = 1.0
    clip_norm: float = 1.0
    delta: float = defaults.DELTA
    regulator_ridge: float = defaults.RIDGE
    # the game
    trials: int | None = None  # None: the level's default (`CLIENT_TRIALS`, `RECORD_TRIALS`)
    reproducible_noise: bool = False
    seed: int = 0
    noise_seed: int | None = None  # tests only: the mechanism's hidden seeds derive from it
    plant_noise_factor: float = 1.0  # F < 1 plants a bug: the noise has multiplier sigma * F, the claim sigma
    progress: bool = False
    # the audited adapter (`setting.build_audit_adapter`)
    rank: int = 2
    dim: int = 4
    frozen_scale: float = 3.0
    # client level
    num_clients: int = 10
    sample_rate: float = 1.0
    releases: int = 1
    # record level
    num_examples: int = 16
    batch_size: int = 8
    lr: float = 0.01
    local_epochs: int = 1

    @classmethod
    def of(cls, settings: AuditSettings | None, default_trials: int, /, **overrides: Any) -> AuditSettings:
        """`settings` (default: all defaults) with `overrides` applied and `default_trials` if `trials` is unset."""
        if settings is not None and not isinstance(settings, cls):
            raise TypeError(f"audit settings must be an AuditSettings, not {settings!r} (pass fields by name)")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown audit settings {unknown}; known: {sorted(names)}")
        out = dataclasses.replace(settings or cls(), **overrides)
        return out if out.trials is not None else dataclasses.replace(out, trials=default_trials)


CLIENT_TRIALS = 20000
RECORD_TRIALS = 5000
