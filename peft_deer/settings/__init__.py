"""The settings of a federated run: typed dataclasses, from which the `deer-fed` flags and the Flower
run-config reader are generated.

- `groups.py`: one dataclass per concern (data, model, federation, local training, client-level DP,
  record-level DP, outputs), each field with its help text, default and checks;
- `run_settings.py`: `RunSettings`, the groups together, with the checks that span them;
- `values.py`: a field's type and choices, applied to a value from the command line or a mapping;
- `cli.py`: the generated `deer-fed` parser and `--config FILE.yaml`.

`from_mapping` reads a Flower run config (`num-clients = 2`) through the same fields and checks.
Standard library and PyYAML only, so a driver checks its settings before torch loads (`train/fed.py`
loads this package through `peft_deer.light_import`, without importing the `peft_deer` package).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .cli import OneLineParser, RaisingParser, build_parser, check_output_dir, parse_args, values_to_argv
from .groups import (
    DEFAULT_CLIP_NORM,
    DEFAULT_DELTA,
    DEFAULT_RIDGE,
    MAX_SEED,
    METHODS,
    SERVER_OPTIMIZERS,
    DataSettings,
    FederationSettings,
    HeadRefitSettings,
    LocalTrainingSettings,
    ModelSettings,
    OutputSettings,
    PrivacySettings,
    RecordDPSettings,
    setting,
)
from .run_settings import RESUMABLE_FLAGS, RunSettings, check_delta_bound
from .values import finite_float, typed_values


def from_mapping(
    mapping: Mapping[str, Any], extra: Iterable[type] = (), where: str = "run config"
) -> tuple[RunSettings, dict[str, Any]]:
    """(run settings, {name: value} of the `extra` dataclasses' fields) from a Flower run config.

    Keys are the flag names without dashes (`num-clients`); an empty string means "unset" (TOML has no
    null). A bad value raises ValueError (one line) naming the setting, checked as on the command line.
    """
    extra = tuple(extra)
    values = typed_values(mapping, (*RunSettings.groups().values(), *extra), where, empty_is_unset=True)
    own = {f for group in extra for f in group.__dataclass_fields__}
    settings = RunSettings.from_flat({k: v for k, v in values.items() if k not in own})
    return settings, {k: v for k, v in values.items() if k in own}


__all__ = [
    "DEFAULT_CLIP_NORM",
    "DEFAULT_DELTA",
    "DEFAULT_RIDGE",
    "MAX_SEED",
    "METHODS",
    "RESUMABLE_FLAGS",
    "SERVER_OPTIMIZERS",
    "DataSettings",
    "FederationSettings",
    "HeadRefitSettings",
    "LocalTrainingSettings",
    "ModelSettings",
    "OneLineParser",
    "OutputSettings",
    "PrivacySettings",
    "RaisingParser",
    "RecordDPSettings",
    "RunSettings",
    "build_parser",
    "check_delta_bound",
    "check_output_dir",
    "finite_float",
    "from_mapping",
    "parse_args",
    "setting",
    "typed_values",
    "values_to_argv",
]
