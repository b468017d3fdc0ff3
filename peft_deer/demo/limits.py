"""What one request may cost, checked before anything is decoded; each refusal is one line.

An image's size comes from its header (PIL opens lazily; DICOM is read with ``stop_before_pixels``), a
zip's from its directory (members' uncompressed sizes), so a 300 KB PNG of 13000 x 13000 pixels or a
zip bomb is refused before it takes memory. Per image: at most `MAX_PIXELS` pixels in the frame decoded
and `MAX_DECODED_BYTES` of pixel data; per request: at most `MAX_REQUEST_FILES` images (zip members
counted), `MAX_REQUEST_ZIPS` zips and `MAX_REQUEST_BYTES` of file data (zip members uncompressed).
"""

from __future__ import annotations

import io
import math
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "MAX_DECODED_BYTES",
    "MAX_FILE_BYTES",
    "MAX_PIXELS",
    "MAX_REQUEST_BYTES",
    "MAX_REQUEST_FILES",
    "MAX_REQUEST_ZIPS",
    "OverBudget",
    "check_dicom_header",
    "check_raster_header",
    "check_request",
]

MAX_PIXELS = 25_000_000  # pixels of one decoded image (frame): 5000 x 5000
MAX_DECODED_BYTES = 256 * 2**20  # pixel data a DICOM file holds (all frames), as decoded
MAX_FILE_BYTES = 256 * 2**20  # one image or zip member
MAX_REQUEST_FILES = 1000  # images per request, zip members counted
MAX_REQUEST_ZIPS = 10
MAX_REQUEST_BYTES = 512 * 2**20  # file bytes per request, zip members uncompressed
_MB = 2**20


class OverBudget(ValueError):
    """A file or request over the demo's limits; the message is one line, meant for users."""


def _pixels_ok(width: int, height: int) -> None:
    if width <= 0 or height <= 0:
        raise OverBudget(f"the image header gives no size ({width} x {height})")
    if width * height > MAX_PIXELS:
        raise OverBudget(
            f"the image is {width} x {height} pixels, more than the {MAX_PIXELS / 1e6:g} megapixels the demo decodes"
        )


def check_raster_header(image: Any) -> None:
    """Refuse a lazily opened PIL image whose size is over `MAX_PIXELS` (nothing decoded yet)."""
    width, height = image.size
    _pixels_ok(int(width), int(height))


def check_dicom_header(data: bytes, force: bool) -> None:
    """Refuse a DICOM file whose header declares a frame over `MAX_PIXELS` or pixel data over
    `MAX_DECODED_BYTES` (Rows, Columns, BitsAllocated, SamplesPerPixel, NumberOfFrames)."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data), force=force, stop_before_pixels=True)
    try:
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        bits = int(ds.get("BitsAllocated", 8) or 8)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError) as exc:
        raise OverBudget(f"the DICOM header's image size is not a number ({exc.__class__.__name__})") from None
    if "PixelData" not in ds and not (rows and cols):
        return  # no image: the decoder says so
    _pixels_ok(cols, rows)
    size = rows * cols * samples * frames * math.ceil(bits / 8)
    if samples < 1 or frames < 1 or bits < 1 or size > MAX_DECODED_BYTES:
        raise OverBudget(
            f"the DICOM pixel data would take {size / _MB:.0f} MB decoded ({frames} frame(s) of {cols} x {rows} x "
            f"{samples} x {bits} bit), more than {MAX_DECODED_BYTES // _MB} MB"
        )


def check_request(paths: Sequence[str | Path]) -> None:
    """Refuse a request with too many images, zips or bytes, from file sizes and zip directories only."""
    files = zips = total = 0
    for p in paths:
        path = Path(p)
        try:
            if path.suffix.lower() == ".zip":
                zips += 1
                with zipfile.ZipFile(path) as archive:
                    members = [m for m in archive.infolist() if not m.is_dir()]
                files += len(members)
                total += sum(max(m.file_size, 0) for m in members)
            else:
                files += 1
                total += path.stat().st_size
        except (OSError, zipfile.BadZipFile):
            files += 1  # unreadable: its own row says so
    if zips > MAX_REQUEST_ZIPS:
        raise OverBudget(f"{zips} zips in one request, more than {MAX_REQUEST_ZIPS}; send them in several batches")
    if files > MAX_REQUEST_FILES:
        raise OverBudget(f"{files} files in one request, more than {MAX_REQUEST_FILES}; send them in several batches")
    if total > MAX_REQUEST_BYTES:
        raise OverBudget(
            f"{total / _MB:.0f} MB of files in one request (zips uncompressed), more than "
            f"{MAX_REQUEST_BYTES // _MB} MB; send them in several batches"
        )
