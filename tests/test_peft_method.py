"""DEER_LORA as a PEFT method: registration, phase trainability, save/load paths, export, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import tiny_vit
from peft import AutoPeftModel, PeftModel, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

import peft_deer
from peft_deer import DeerLoraConfig, DeerLoraModel, export_lora_adapter

TARGETS = ["q_proj", "k_proj", "v_proj"]


def make_model(phase="B", method="deer", seed=0):
    config = DeerLoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, modules_to_save=["classifier"], phase=phase, method=method
    )
    return get_peft_model(tiny_vit(seed), config)


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def expected(model, factors) -> set[str]:
    names = {n for n, _ in model.named_parameters()}
    keep = {n for n in names if any(f".lora_{f}." in n for f in factors)}
    return keep | {n for n in names if ".modules_to_save.default." in n}


def randomize_b(model) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.normal_(0, 0.5)


def test_registration_is_idempotent_and_uses_a_str_enum_key():
    peft_deer.register()
    peft_deer.register()
    assert PEFT_TYPE_TO_CONFIG_MAPPING["DEER_LORA"] is DeerLoraConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["DEER_LORA"] is DeerLoraModel
    assert DeerLoraConfig(target_modules=TARGETS).peft_type.value == "DEER_LORA"


@pytest.mark.parametrize(
    "method,phase,factors",
    [("deer", "B", "B"), ("deer", "A", "A"), ("rolora", "A", "A"), ("ffa", "B", "B"), ("lora", "B", "AB")],
)
def test_trainable_parameters_are_the_phase_factor_and_head(method, phase, factors):
    model = make_model(phase, method)
    assert trainable(model) == expected(model, factors)
    n_lora = sum(1 for n in trainable(model) if "lora_" in n)
    assert n_lora == 2 * len(TARGETS) * len(factors)


def test_set_deer_phase_switches_and_validates():
    model = make_model("B")
    model.set_deer_phase("A")
    assert trainable(model) == expected(model, "A")
    assert model.peft_config["default"].phase == "A"
    model.set_deer_phase("B")
    assert trainable(model) == expected(model, "B")
    with pytest.raises(ValueError, match="phase='C'"):
        model.set_deer_phase("C")
    ffa = make_model("B", "ffa")
    with pytest.raises(ValueError, match="ffa"):
        ffa.set_deer_phase("A")


def test_save_load_round_trips_give_identical_outputs(tmp_path):
    model = make_model("A")
    randomize_b(model)
    x = torch.randn(3, 1, 28, 28)
    model.eval()
    reference = model(pixel_values=x).logits
    model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "DEER_LORA" and config["phase"] == "A" and config["method"] == "deer"

    loaded = PeftModel.from_pretrained(tiny_vit(0), tmp_path / "adapter")
    assert isinstance(loaded.peft_config["default"], DeerLoraConfig)
    assert torch.equal(loaded(pixel_values=x).logits, reference)
    assert trainable(loaded) == set()

    trainable_model = PeftModel.from_pretrained(tiny_vit(0), tmp_path / "adapter", is_trainable=True)
    assert trainable(trainable_model) == expected(trainable_model, "A")  # the phase survives loading
    trainable_model.eval()
    merged = trainable_model.merge_and_unload()
    torch.testing.assert_close(merged(pixel_values=x).logits, reference, rtol=1e-5, atol=1e-6)

    base = tiny_vit(0)
    base.load_adapter(str(tmp_path / "adapter"))
    base.eval()
    torch.testing.assert_close(base(pixel_values=x).logits, reference, rtol=0, atol=0)


def test_auto_peft_model_loads_from_a_local_base(tmp_path):
    base = tiny_vit(0)
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(
        type(base).from_pretrained(tmp_path / "base"),
        DeerLoraConfig(r=4, target_modules=TARGETS, modules_to_save=["classifier"], task_type=None),
    )
    randomize_b(model)
    model.eval()
    x = torch.randn(2, 1, 28, 28)
    reference = model(pixel_values=x).logits
    model.save_pretrained(tmp_path / "adapter")
    from transformers import AutoModelForImageClassification

    class AutoPeftModelForImageClassification(AutoPeftModel):
        _target_class = AutoModelForImageClassification

    loaded = AutoPeftModelForImageClassification.from_pretrained(tmp_path / "adapter")
    loaded.eval()
    torch.testing.assert_close(loaded(pixel_values=x).logits, reference, rtol=0, atol=0)


@pytest.mark.e2e
def test_plain_lora_export_loads_in_vanilla_peft_without_peft_deer(tmp_path):
    model = make_model("B")
    randomize_b(model)
    model.eval()
    x = torch.randn(2, 1, 28, 28)
    torch.save({"x": x, "y": model(pixel_values=x).logits, "base": tiny_vit(0).state_dict()}, tmp_path / "io.pt")
    export_lora_adapter(model, tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and "phase" not in config and "method" not in config
    script = f"""
import sys, torch
from transformers import ViTConfig, ViTForImageClassification
from peft import PeftModel
io = torch.load({str(tmp_path / "io.pt")!r})
base = ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
    intermediate_size=64, image_size=28, patch_size=7, num_channels=1, num_labels=2))
base.load_state_dict(io["base"])
model = PeftModel.from_pretrained(base.eval(), {str(tmp_path / "lora")!r}).eval()
assert "peft_deer" not in sys.modules
assert type(model.peft_config["default"]).__name__ == "LoraConfig"
print(float((model(pixel_values=io["x"]).logits - io["y"]).abs().max()))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip().splitlines()[-1]) == 0.0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"phase": "C"}, "phase='C'"),
        ({"method": "fedavg"}, "method='fedavg'"),
        ({"r": 0}, "r=0"),
        ({"method": "ffa", "phase": "A"}, "ffa"),
        ({"clip_norm": 0.0}, "clip_norm"),
        ({"dp_delta": 1.5}, "dp_delta"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DeerLoraConfig(target_modules=TARGETS, **kwargs)


def test_target_modules_that_match_nothing_fail_clearly():
    with pytest.raises(ValueError, match="nonexistent_proj"):
        get_peft_model(tiny_vit(0), DeerLoraConfig(target_modules=["nonexistent_proj"]))


def test_loading_into_a_model_of_other_shapes_fails(tmp_path):
    make_model().save_pretrained(tmp_path / "adapter")
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(tiny_vit(0, hidden=16), tmp_path / "adapter")
