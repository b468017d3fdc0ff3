"""`peft_deer.run`: the lifecycle both drivers share, the settings they share, and the adapter config as
the statement of the client-level mechanism."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import MEDMNIST_DIR

from peft_deer.run import Host, Simulation, build_experiment, run_experiment
from peft_deer.settings import RunSettings, from_mapping, parse_args

TINY = ["--model", "tiny-vit", "--data-dir", str(MEDMNIST_DIR), "--dataset", "medmnist:breastmnist",
        "--train-subset", "60", "--num-clients", "2", "--rounds", "1", "--batch-size", "16"]  # fmt: skip


def test_flags_config_and_run_config_give_the_same_settings(tmp_path):
    argv = ["--method", "ffa", "--rounds", "3", "--target-modules", "q_proj", "v_proj", "--dp", "client",
            "--epsilon", "6", "--delta", "1e-6", "--reproducible-noise", "--lora-layers", "last:2"]  # fmt: skip
    from_flags = parse_args(argv)
    config = tmp_path / "run.yaml"
    config.write_text(
        "method: ffa\nrounds: 3\ntarget-modules: [q_proj, v_proj]\ndp: client\nepsilon: 6\ndelta: 1.0e-6\n"
        "reproducible_noise: true\nlora_layers: last:2\n"
    )
    assert parse_args(["--config", str(config)]) == from_flags
    run_config = {"method": "ffa", "rounds": 3, "target-modules": "q_proj,v_proj", "dp": "client",
                  "epsilon": 6.0, "delta": 1e-6, "reproducible-noise": True, "lora-layers": "last:2",
                  "noise-multiplier": ""}  # fmt: skip
    assert from_mapping(run_config)[0] == from_flags
    assert from_flags.federation.method == "ffa" and from_flags.model.target_modules == ("q_proj", "v_proj")
    assert RunSettings.from_flat(from_flags.flat()) == from_flags
    with pytest.raises(ValueError, match="unknown settings"):
        RunSettings.from_flat({"bogus": 1})


@pytest.mark.parametrize("dp", ["client", "none"])
def test_the_server_runs_the_mechanism_the_adapter_config_states(dp, one_thread, tmp_path):
    extra = (
        ["--dp", "client", "--noise-multiplier", "1.3", "--clip-norm", "0.7", "--delta", "1e-3"] if dp != "none" else []
    )
    settings = parse_args([*TINY, "--regulator-ridge", "1e-5", "--output-dir", str(tmp_path / "r"), *extra])
    exp = build_experiment(settings, torch.device("cpu"), say=lambda *a: None)
    config = exp.model.peft_config["default"]
    if dp == "none":
        assert config.noise_multiplier == 0.0 and exp.server.dp is None
        return
    assert (config.noise_multiplier, config.clip_norm, config.regulator_ridge, config.dp_delta) == (
        1.3,
        0.7,
        1e-5,
        1e-3,
    )
    server_dp = exp.server.dp
    assert (server_dp.noise_multiplier, server_dp.clip_norm, server_dp.ridge, server_dp.delta) == (1.3, 0.7, 1e-5, 1e-3)


def test_run_experiment_calls_the_transport_hooks_in_order(one_thread, tmp_path):
    out = tmp_path / "run"
    calls: list[str] = []

    class Recording(Simulation):
        def before_start(self, exp, path):
            calls.append("before_start")
            assert path == out and not out.exists()  # nothing published before the first checkpoint

        def release_phase(self, exp, path):
            calls.append("release_phase")
            return super().release_phase(exp, path)

        def ledgers(self):
            calls.append("ledgers")
            return {"transport": "recorded"}, {"private": 1}

        def after_finalize(self, exp, path, summary):
            calls.append("after_finalize")

    said: list[str] = []
    settings = parse_args([*TINY, "--output-dir", str(out)])
    outcome = run_experiment(settings, Recording(), Host(say=said.append))
    assert calls == ["before_start", "release_phase", "ledgers", "after_finalize"]
    assert outcome.stopped is None and outcome.summary["rounds_completed"] == 1
    assert said[-1].startswith("done: deer test acc") and said[-1].endswith(str(out))
    assert json.loads((out / "privacy.json").read_text())["transport"] == "recorded"
    assert json.loads((out / "server-private" / "deployment.json").read_text()) == {"private": 1}
    assert json.loads((out / "summary.json").read_text())["args"] == settings.flat()


def test_each_dp_default_has_one_home():
    """delta, C and lambda: the flags, the adapter config, the core's ClientDP/RecordDP and the Flower app's
    declared run config all take peft_deer.defaults' values."""
    import tomllib

    from helpers import ROOT

    from peft_deer import defaults
    from peft_deer.federated import ClientDP
    from peft_deer.federated.record_dp import RecordDP
    from peft_deer.tuner.config import DeerLoraConfig

    s = RunSettings()
    assert (s.privacy.delta, s.record.record_delta) == (defaults.DELTA,) * 2
    assert (s.privacy.clip_norm, s.record.record_clip_norm) == (defaults.CLIP_NORM,) * 2
    assert s.privacy.regulator_ridge == defaults.RIDGE
    config = DeerLoraConfig(target_modules=["q"])
    assert (config.dp_delta, config.clip_norm, config.regulator_ridge) == (
        defaults.DELTA,
        defaults.CLIP_NORM,
        defaults.RIDGE,
    )
    dp, record = ClientDP(1.0, 1.0), RecordDP((1.0,))
    assert (dp.delta, dp.ridge, record.delta, record.ridge, record.clip_norm) == (
        defaults.DELTA, defaults.RIDGE, defaults.DELTA, defaults.RIDGE, defaults.CLIP_NORM
    )  # fmt: skip
    flower = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    declared = {k: flower[k] for k in ("delta", "record-delta", "clip-norm", "record-clip-norm", "regulator-ridge")}
    assert declared == {"delta": defaults.DELTA, "record-delta": defaults.DELTA, "clip-norm": defaults.CLIP_NORM,
                        "record-clip-norm": defaults.CLIP_NORM, "regulator-ridge": defaults.RIDGE}  # fmt: skip
