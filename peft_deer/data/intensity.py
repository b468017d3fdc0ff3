"""Pixel intensities of any bit depth -> uint8: the one rule shared by training data and the demo.

Training loads images as uint8 (`peft_deer.data`), so every image a model sees, during training or
when the demo serves it, must reach uint8 by the same rule, whatever its bit depth (8-bit PNG,
16-bit PNG/TIFF, 12-bit DICOM, float TIFF). `to_uint8` is that rule; `pil_to_array` applies it to
a PIL image of any mode.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["HIGH_BIT_MODES", "pil_to_array", "to_uint8"]

# PIL modes that hold more than 8 bits per pixel (one channel).
HIGH_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def to_uint8(pixels: Any, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """uint8 pixels (same shape) from pixels of any bit depth.

    Args:
        pixels: array (H, W) or (H, W, C) of bool, integers or floats.
        value_range: (lo, hi) of the input that maps linearly to 0..255 (values outside are
            clipped), e.g. a DICOM window's output range. When None, the rule below applies.

    Without ``value_range``: uint8 is returned unchanged; bool becomes 0/255; otherwise the values
    are first shifted up by ``-min`` when negative (a signed range starts at 0), then floats whose
    maximum is <= 1 are read as [0, 1] intensities, values whose maximum is <= 255 as 8-bit values,
    and larger values (12-, 16-bit, ...) are divided by their maximum: black stays black, the
    brightest pixel becomes 255. Rounded to the nearest integer.
    """
    arr = np.asarray(pixels)
    if value_range is None and arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * np.uint8(255)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"pixels must be numbers, got dtype {arr.dtype}")
    x = arr.astype(np.float64)
    if not np.isfinite(x).all():
        x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    if value_range is not None:
        lo, hi = (float(v) for v in value_range)
        if not hi > lo:
            raise ValueError(f"value_range must have hi > lo, got {value_range}")
        scaled = (x - lo) / (hi - lo) * 255.0
    else:
        if x.size and x.min() < 0:
            x = x - x.min()
        peak = float(x.max()) if x.size else 0.0
        if np.issubdtype(arr.dtype, np.floating) and peak <= 1.0:
            scaled = x * 255.0
        else:
            scaled = x * (255.0 / peak) if peak > 255.0 else x
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def pil_to_array(img: Any) -> np.ndarray:
    """uint8 (H, W) for gray modes, (H, W, 3) otherwise, from a PIL image of any mode.

    High-bit gray modes (`HIGH_BIT_MODES`) go through `to_uint8`; palette, alpha, CMYK and other
    modes are converted by PIL to L (gray ones) or RGB, dropping alpha.
    """
    if img.mode in HIGH_BIT_MODES:
        return to_uint8(np.asarray(img))
    if img.mode not in ("L", "RGB"):
        img = img.convert("L" if img.mode in ("1", "LA", "La", "L;16") else "RGB")
    return np.asarray(img, dtype=np.uint8)
