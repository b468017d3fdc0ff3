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


@pytest.mark.parametrize(
    "argv",
    [
        ["--dp", "client", "--noise-multiplier", "1.3", "--clip-norm", "0.7", "--delta", "1e-3",
         "--regulator-ridge", "1e-5", "--noise-placement", "distributed", "--epsilon", "4"],
        ["--method", "deer-reference", "--dp", "client", "--epsilon", "4", "--clip-norm", "2.5"],
        ["--method", "ffa", "--dp", "client", "--noise-multiplier", "0.9"],
        ["--dp", "none"],
    ],
)  # fmt: skip
def test_settings_config_and_client_dp_state_one_mechanism(argv):
    """settings -> DeerLoraConfig -> ClientDP and settings -> ClientDP agree field by field, and the config keeps
    its saved names (`dp_delta`): one conversion, `peft_deer.federated.client_dp`."""
    from dataclasses import fields

    from peft_deer.federated import ClientDP
    from peft_deer.federated.client_dp import CONFIG_NAMES
    from peft_deer.tuner.config import DeerLoraConfig

    settings = parse_args(argv)
    sigma = settings.privacy.noise_multiplier or (2.1 if settings.privacy.client_level else 0.0)
    kwargs = ClientDP.config_fields(settings, sigma)
    config = DeerLoraConfig(target_modules=["q"], method=settings.federation.method, **kwargs)
    via_config, direct = ClientDP.from_config(config), ClientDP.from_settings(settings, sigma)
    assert set(kwargs) == set(CONFIG_NAMES.values()) and "dp_delta" in kwargs and "delta" not in kwargs
    assert set(CONFIG_NAMES) == {f.name for f in fields(ClientDP)}
    if not settings.privacy.client_level:
        assert via_config is None and direct is None and config.noise_multiplier == 0.0
        return
    for f in fields(ClientDP):
        assert getattr(via_config, f.name) == getattr(direct, f.name), f.name
    privacy = settings.privacy
    names = ("clip_norm", "regulator_ridge", "noise_placement", "delta")
    assert direct.noise_multiplier == sigma
    assert [getattr(direct, n) for n in names] == [getattr(privacy, n) for n in names]
    enforced = settings.federation.method != "deer-reference"  # the authors' nominal target is no budget
    assert direct.target_epsilon == (privacy.epsilon if enforced else None)
    assert config.target_epsilon == privacy.epsilon and config.dp_delta == privacy.delta


def test_wide_constructors_are_keyword_only():
    from peft_deer.federated import ClientDP, FederatedServer, LocalTraining
    from peft_deer.federated.record_dp import RecordDP
    from peft_deer.run import Experiment

    for cls, positional in [
        (ClientDP, (1.0, 1.0)),
        (RecordDP, ((1.0,),)),
        (LocalTraining, (1,)),
        (FederatedServer, ("deer",)),
        (Experiment, (None,)),
    ]:
        with pytest.raises(TypeError, match="positional"):
            cls(*positional)


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
    assert (server_dp.noise_multiplier, server_dp.clip_norm, server_dp.regulator_ridge, server_dp.delta) == (
        1.3,
        0.7,
        1e-5,
        1e-3,
    )


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
    dp, record = ClientDP(noise_multiplier=1.0, clip_norm=1.0), RecordDP(noise_multipliers=(1.0,))
    assert (dp.delta, dp.regulator_ridge, record.delta, record.regulator_ridge, record.clip_norm) == (
        defaults.DELTA, defaults.RIDGE, defaults.DELTA, defaults.RIDGE, defaults.CLIP_NORM
    )  # fmt: skip
    flower = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    declared = {k: flower[k] for k in ("delta", "record-delta", "clip-norm", "record-clip-norm", "regulator-ridge")}
    assert declared == {"delta": defaults.DELTA, "record-delta": defaults.DELTA, "clip-norm": defaults.CLIP_NORM,
                        "record-clip-norm": defaults.CLIP_NORM, "regulator-ridge": defaults.RIDGE}  # fmt: skip


def test_run_progress_reads_and_writes_the_checkpoint_schema_of_earlier_versions(tmp_path):
    """A checkpoint written before `RunProgress` had a `state_dict` (plain dicts under the same keys) resumes: it
    loads into typed progress, and saving it again writes the very same keys and values."""
    from peft_deer.run.checkpoint import load_checkpoint, save_checkpoint
    from peft_deer.run.files import CHECKPOINT_KEYS, PROGRESS_KEYS, checkpoint_payload
    from peft_deer.run.progress import BestRound, RoundTotals, RunProgress

    state = {"lora_A": torch.ones(2, 3), "lora_B": torch.zeros(3, 2)}
    old = {  # what main's phase loop wrote before this change (tests/test_run_dir_safety.py's payload)
        "fingerprint": {"lr": 0.1},
        "data_sha256": {"train": "ab" * 32},
        "server": {"global_state": state, "releases": [{"sigma": 1.0}]},
        "next_phase": (1, 0),
        "rows": [{"round": 0, "val_auc": 0.75, "epsilon": None}],
        "best": {"score": 0.75, "round": 0, "state": dict(state)},
        "round_acc": {"loss": 1.5, "images": 7, "seconds": 2.0, "update_norms": [0.3], "participants": [3]},
        "private_rows": [{"round": 0, "train_loss": None, "participants_per_phase": [3]}],
    }
    save_checkpoint(tmp_path / "old.pt", old)
    progress = RunProgress.from_state_dict(load_checkpoint(tmp_path / "old.pt"))
    assert progress.next_phase == (1, 0) and isinstance(progress.best, BestRound) and progress.best.round == 0
    assert progress.round_totals == RoundTotals(loss=1.5, images=7, seconds=2.0, update_norms=[0.3], participants=[3])
    assert torch.equal(progress.best.state["lora_A"], state["lora_A"])
    again = checkpoint_payload(old["fingerprint"], old["data_sha256"], old["server"], progress.state_dict())
    assert set(again) == set(old) and set(CHECKPOINT_KEYS) <= set(again) and set(PROGRESS_KEYS) < set(again)
    save_checkpoint(tmp_path / "new.pt", again)
    back = load_checkpoint(tmp_path / "new.pt")
    for key in ("next_phase", "rows", "round_acc", "private_rows", "fingerprint", "data_sha256"):
        assert back[key] == old[key], key
    assert (back["best"]["score"], back["best"]["round"]) == (0.75, 0)
    assert torch.equal(back["best"]["state"]["lora_B"], state["lora_B"])
    # the progress mutates through its own methods, and its state stays the schema's
    progress.round_totals.add([], _release(participants=[0, 1]), seconds=1.0)
    assert progress.state_dict()["round_acc"]["participants"] == [3, 2]
    with pytest.raises(ValueError, match="progress state keys"):
        checkpoint_payload({}, {}, {}, {"rows": []})


def _release(participants: list[int]):
    from peft_deer.federated import PhaseRelease

    return PhaseRelease(
        delta={}, participants=participants, effective_noise_multiplier=None, mean_update_norm=0.1, clipped_fraction=0
    )
