"""Settings parsing: non-finite numbers are refused from flags, config files and the Flower run config; the
library's name lists match the settings' copies; the shipped YAML configs parse.
"""

from __future__ import annotations

import json
import math

import pytest
import yaml
from helpers import ROOT

from peft_deer import settings
from train import fed

FLOAT_FLAGS = sorted(a.option_strings[-1] for a in settings.build_parser()._actions if a.type is settings.finite_float)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN", "1e999"])
def test_non_finite_flags_are_refused(value, capsys):
    assert len(FLOAT_FLAGS) >= 15, FLOAT_FLAGS  # every float setting goes through finite_float
    for flag in FLOAT_FLAGS:
        with pytest.raises(SystemExit) as excinfo:
            fed.parse_args(["--dp", "client,record", f"{flag}={value}"])
        assert excinfo.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"deer-fed: error: argument {flag}: {value!r} is not a finite number; give a finite value"]


def test_non_finite_numbers_in_config_files_and_flower_run_config(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    for key, value in (("lr", ".nan"), ("momentum", ".inf"), ("server_lr", "-.inf"), ("dirichlet-alpha", ".NaN")):
        config.write_text(f"{key}: {value}\n")
        with pytest.raises(SystemExit) as excinfo:
            fed.parse_args(["--config", str(config)])
        assert excinfo.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is not a finite number" in err[0] and key.replace("_", "-") in err[0], err
    # Python writes JSON with Infinity; YAML reads it as a string, and float() would take it: refused too.
    config.write_text(json.dumps({"weight_decay": float("inf")}))
    with pytest.raises(SystemExit):
        fed.parse_args(["--config", str(config)])
    assert "--weight-decay: 'Infinity' is not a finite number" in capsys.readouterr().err
    # The Flower run config (TOML floats may be nan/inf) goes through the same parser.
    for key in ("lr", "epsilon", "clip-norm", "server-momentum", "lora-alpha"):
        with pytest.raises(ValueError, match="is not a finite number"):
            settings.from_mapping({key: float("nan"), "dp": "client", "noise-multiplier": 1.0})
    args, _ = settings.from_mapping({"lr": 0.01, "dp": "client", "epsilon": 8.0})
    assert args.local.lr == 0.01 and args.privacy.epsilon == 8.0


def test_library_names_match_the_settings_copies():
    from peft_deer.federated import SERVER_OPTIMIZERS
    from peft_deer.tuner.config import METHODS

    assert settings.METHODS == METHODS and settings.SERVER_OPTIMIZERS == SERVER_OPTIMIZERS


def test_shipped_yaml_config_still_parses():
    for path in sorted((ROOT / "train" / "configs").glob("*.yaml")):
        args = fed.parse_args(["--config", str(path)])
        flat = args.flat()
        assert all(math.isfinite(flat[a.dest]) for a in settings.build_parser()._actions
                   if a.type is settings.finite_float and flat[a.dest] is not None)  # fmt: skip
        assert yaml.safe_load(path.read_text())
