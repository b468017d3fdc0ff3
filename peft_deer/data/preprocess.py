"""Tensors for the model: uint8 images to normalised float32 NCHW tensors (training and the Gradio app)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from .images import ImageDataset, as_uint8_images
from .intensity import pil_to_array


def _channel_stats(values: float | Sequence[float], num_channels: int, what: str) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float32).reshape(-1)
    if t.numel() == 1:
        t = t.repeat(num_channels)
    if t.numel() != num_channels:
        raise ValueError(f"{what} has {t.numel()} values, expected 1 or {num_channels}")
    if what == "std" and bool((t <= 0).any()):
        raise ValueError(f"std must be > 0, got {t.tolist()}")
    return t.view(1, num_channels, 1, 1)


def _to_nhwc(images: Any) -> np.ndarray:
    """uint8 NHWC from an (N,H,W,C), (N,H,W), (H,W,C) or (H,W) array or a PIL image."""
    if hasattr(images, "convert") and hasattr(images, "mode"):  # PIL image
        images = pil_to_array(images)
    arr = as_uint8_images(images)
    if arr.ndim == 2:  # (H, W)
        arr = arr[None, ..., None]
    elif arr.ndim == 3:
        # (H, W, C) single image when the last axis looks like channels, else (N, H, W).
        arr = arr[None] if arr.shape[-1] in (1, 3, 4) else arr[..., None]
    if arr.ndim != 4:
        raise ValueError(f"expected images of ndim 2, 3 or 4, got shape {arr.shape}")
    if arr.shape[-1] == 4:  # RGBA: drop alpha
        arr = arr[..., :3]
    if arr.shape[-1] not in (1, 3):
        raise ValueError(f"expected 1 or 3 channels in the last axis, got shape {arr.shape}")
    return arr


def preprocess_images(
    images: Any,
    image_size: int,
    num_channels: int,
    mean: float | Sequence[float],
    std: float | Sequence[float],
) -> torch.Tensor:
    """uint8 images -> normalized float32 tensor (N, num_channels, image_size, image_size).

    ``images`` is uint8 (N,H,W,C), (N,H,W), a single (H,W,C) or (H,W) array (a 3-D array whose
    last axis is 1, 3 or 4 is read as one HWC image), or a PIL image. Steps: scale to [0, 1];
    gray -> RGB by repeating the channel, RGB -> gray by the channel mean; bilinear resize
    (``antialias=False, align_corners=False``) to ``image_size`` px; ``(x - mean) / std`` with
    per-channel ``mean``/``std`` (length ``num_channels`` or 1) in [0, 1] units.
    """
    if num_channels not in (1, 3):
        raise ValueError(f"num_channels must be 1 or 3, got {num_channels}")
    size = int(image_size)
    if size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    arr = _to_nhwc(images)
    m = _channel_stats(mean, num_channels, "mean")
    s = _channel_stats(std, num_channels, "std")
    if not arr.flags.writeable:  # e.g. np.asarray(PIL image); torch warns on read-only arrays
        arr = arr.copy()
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).to(torch.float32) / 255.0
    c = x.shape[1]
    if c == 1 and num_channels == 3:
        x = x.expand(-1, 3, -1, -1)
    elif c == 3 and num_channels == 1:
        x = x.mean(dim=1, keepdim=True)
    if tuple(x.shape[-2:]) != (size, size):
        x = torch.nn.functional.interpolate(
            x,
            size=(size, size),
            mode="bilinear",
            align_corners=False,
            antialias=False,
        )
    return ((x - m) / s).contiguous()


def make_tensor_dataset(
    ds: ImageDataset,
    indices: Sequence[int] | np.ndarray | None,
    image_size: int,
    num_channels: int,
    mean: float | Sequence[float],
    std: float | Sequence[float],
    *,
    chunk_size: int = 512,
) -> TensorDataset:
    """Precompute model inputs for ``ds[indices]`` (all rows when ``indices`` is None).

    Returns a ``TensorDataset`` of (pixel_values float32 (n, num_channels, image_size,
    image_size), labels int64 (n,)), processed by :func:`preprocess_images` in chunks of
    ``chunk_size`` images to bound peak memory.
    """
    idx = np.arange(len(ds)) if indices is None else np.asarray(indices, dtype=np.int64)
    if idx.ndim != 1:
        raise ValueError(f"indices must be 1-D, got shape {idx.shape}")
    n, size, step = len(idx), int(image_size), max(1, int(chunk_size))
    out = torch.empty((n, num_channels, size, size), dtype=torch.float32)
    for start in range(0, n, step):
        sl = idx[start : start + step]
        out[start : start + len(sl)] = preprocess_images(ds.images[sl], image_size, num_channels, mean, std)
    labels = torch.from_numpy(ds.labels[idx].astype(np.int64))
    return TensorDataset(out, labels)
