"""`RunSettings`: every setting of a federated run, as the typed groups of `groups.py`.

The drivers build one from flags, a `--config` file or a Flower run config (`cli.py`, `mapping.py`);
the run code below them reads typed fields (`settings.privacy.epsilon`), never a flag bag. The flat
view (`flat()`, one entry per flag) is what a checkpoint's fingerprint and `summary.json` record.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .groups import (
    DataSettings,
    FederationSettings,
    HeadRefitSettings,
    LocalTrainingSettings,
    ModelSettings,
    OutputSettings,
    PrivacySettings,
    RecordDPSettings,
)

# Settings that may differ between a run and its resumption; all others must match. A run directory may be
# moved or copied (or named by a relative instead of an absolute path) before it is resumed.
RESUMABLE_FLAGS = {"resume", "overwrite", "max_phases", "config", "engine", "output_dir", "prefix_cache_dir"}


def check_delta_bound(delta: float, num_clients: int) -> None:
    """Client-level DP needs 0 < delta < 1/num_clients (the server repeats this check and warns when weak)."""
    if not 0 < delta < 1.0 / num_clients:
        raise ValueError(
            f"--delta {delta:g} must be in (0, 1/num_clients) (= {1.0 / num_clients:.3g} for {num_clients} "
            "clients); use e.g. 1e-5"
        )


@dataclass(frozen=True)
class RunSettings:
    """All settings of a run. Construction checks them (ValueError, one line naming the flag and the fix)."""

    data: DataSettings = field(default_factory=DataSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    federation: FederationSettings = field(default_factory=FederationSettings)
    local: LocalTrainingSettings = field(default_factory=LocalTrainingSettings)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    record: RecordDPSettings = field(default_factory=RecordDPSettings)
    refit: HeadRefitSettings = field(default_factory=HeadRefitSettings)
    output: OutputSettings = field(default_factory=OutputSettings)

    def __post_init__(self) -> None:
        """The checks that span groups."""
        k, n = self.federation.clients_per_round, self.data.num_clients
        if k is not None and not 1 <= k <= n:
            raise ValueError(f"--clients-per-round {k} must be in [1, --num-clients {n}]")
        if self.privacy.client_level:
            check_delta_bound(self.privacy.delta, n)
        if self.privacy.record_level and self.local.logit_adjustment:
            raise ValueError(
                f"--logit-adjustment {self.local.logit_adjustment:g} with --dp record: the loss would depend on each "
                "hospital's label counts, which DP-SGD does not protect; use --logit-adjustment 0"
            )
        self.record.check(self.privacy.record_level)
        if self.federation.rounds == 0 and self.refit.head_refit != "stats":
            raise ValueError("--rounds 0 (statistics only: no training, one release) needs --head-refit stats")

    @classmethod
    def groups(cls) -> dict[str, type]:
        """{attribute name: group dataclass}, in `--help` order."""
        return dict(_GROUPS)

    @classmethod
    def from_flat(cls, values: Mapping[str, Any]) -> RunSettings:
        """Settings from {flag name with underscores: typed value}; missing names keep their defaults.

        ValueError on an unknown name or a value a check refuses.
        """
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        parts = {}
        for attr, group in cls.groups().items():
            names = [f.name for f in dataclasses.fields(group)]
            parts[attr] = group(**{n: values.pop(n) for n in names if n in values})
        if values:
            raise ValueError(f"unknown settings {sorted(values)} (the names of deer-fed --help)")
        return cls(**parts)

    def flat(self) -> dict[str, Any]:
        """{flag name: value} of every setting (lists, not tuples: as JSON and older checkpoints hold them)."""
        out: dict[str, Any] = {}
        for attr in self.groups():
            for name, value in dataclasses.asdict(getattr(self, attr)).items():
                out[name] = list(value) if isinstance(value, tuple) else value
        return out

    def replace(self, **changes: Any) -> RunSettings:
        """A copy with some settings changed by flag name (checked again)."""
        return type(self).from_flat({**self.flat(), **changes})

    def fingerprint(self) -> dict[str, Any]:
        """The settings a resumed run must share with the run it continues."""
        return {k: v for k, v in sorted(self.flat().items()) if k not in RESUMABLE_FLAGS}


_GROUPS = {
    "data": DataSettings,
    "model": ModelSettings,
    "federation": FederationSettings,
    "local": LocalTrainingSettings,
    "privacy": PrivacySettings,
    "record": RecordDPSettings,
    "refit": HeadRefitSettings,
    "output": OutputSettings,
}
