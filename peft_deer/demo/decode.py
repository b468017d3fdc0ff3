"""Uploads to pixels: raster images, DICOM and zips of them, decoded in memory.

Every path ends in `peft_deer.intensity.to_uint8`, the bit-depth rule training applies, so a
16-bit PNG, a 12-bit DICOM and an 8-bit PNG of the same picture reach the model alike. DICOM:
modality LUT (rescale slope/intercept), then the VOI LUT or the first window (LINEAR,
LINEAR_EXACT or SIGMOID, DICOM PS3.3 C.11.2.1.2) mapped to 0..255, MONOCHROME1 inverted, colour
(RGB, YBR, palette) to RGB, the first frame of a multi-frame file. Without a VOI LUT or window a
DICOM is scaled like a PNG of the same pixels. Zip members are read from memory, never extracted. Only
the README's raster formats are decoded (`RASTER_FORMATS`, from memory, never via a temp file): an EPS
(Ghostscript), PSD, FITS, ... is refused whatever its name.
Sizes are checked from the header before decoding (`peft_deer.demo.limits`); any failure of a file, a
malformed DICOM header included, is an `UnreadableFile` with one line.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from peft_deer.data.intensity import pil_to_array, to_uint8

from .limits import MAX_FILE_BYTES, MAX_REQUEST_FILES, OverBudget, check_dicom_header, check_raster_header

__all__ = ["MAX_SIDE", "Upload", "UnreadableFile", "decode", "expand", "is_dicom", "read_dicom", "read_uploads"]

MAX_SIDE = 2048  # larger images are first shrunk (bounded memory); the model sees image_size px anyway
MAX_ZIP_MEMBERS = MAX_REQUEST_FILES
DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
ACCEPTED = "PNG, JPEG, BMP, TIFF, WebP or DICOM"
# The only raster decoders Pillow may pick (by content): no EPS (runs Ghostscript), PSD, FITS, ... ever.
RASTER_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")


class UnreadableFile(ValueError):
    """An upload that is not a readable image; the message is one line, meant for users."""


@dataclass
class Upload:
    """One file of a request: its display name and bytes (or the error that stopped reading it)."""

    name: str
    data: bytes | None
    error: str | None = None


def is_dicom(data: bytes) -> bool:
    """True for a DICOM Part 10 file (``DICM`` after the 128-byte preamble)."""
    return data[128:132] == b"DICM"


def _shrink(pixels: np.ndarray) -> np.ndarray:
    if max(pixels.shape[:2]) <= MAX_SIDE:
        return pixels
    img = Image.fromarray(pixels)
    img.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.BILINEAR)
    return np.asarray(img)


def _read_raster(data: bytes) -> np.ndarray:
    """Pixels of a PNG, JPEG, BMP, TIFF or WebP, decoded from memory; any other format or failure: UnreadableFile."""
    try:
        with Image.open(io.BytesIO(data), formats=RASTER_FORMATS) as img:
            check_raster_header(img)  # the size is in the header: refuse before decoding
            img.load()
            return pil_to_array(img)
    except OverBudget as exc:
        raise UnreadableFile(str(exc)) from None
    except Image.UnidentifiedImageError:
        raise UnreadableFile(f"not a readable image or DICOM file; use {ACCEPTED}") from None
    except Exception as exc:  # noqa: BLE001 - a decoder's failure on hostile bytes, of whatever type, is one line
        raise UnreadableFile(f"not a readable image or DICOM file ({exc.__class__.__name__}); use {ACCEPTED}") from None


def _first(value: Any) -> float:
    """The first value of a possibly multi-valued DICOM number (several windows: the first)."""
    if isinstance(value, str | bytes) or not hasattr(value, "__len__"):
        return float(value)
    return float(value[0])


def _window(x: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """DICOM VOI windowing of modality values `x` to [0, 1] (PS3.3 C.11.2.1.2)."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((x - center) / width + 0.5, 0.0, 1.0)
    if width < 1:
        raise UnreadableFile(f"DICOM window width {width:g} is < 1 (invalid for a LINEAR window)")
    return np.clip((x - (center - 0.5)) / max(width - 1.0, 1e-12) + 0.5, 0.0, 1.0)


def read_dicom(data: bytes) -> np.ndarray:
    """uint8 (H, W) or (H, W, 3) pixels of a DICOM file's first frame, as displayed (see module doc)."""
    import pydicom

    try:
        check_dicom_header(data, force=not is_dicom(data))  # sizes from the header, before any pixel is read
        ds = pydicom.dcmread(io.BytesIO(data), force=not is_dicom(data))
    except OverBudget as exc:
        raise UnreadableFile(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on malformed files
        raise UnreadableFile(f"not a readable DICOM file ({exc.__class__.__name__})") from exc
    if "PixelData" not in ds:
        raise UnreadableFile("the DICOM file holds no image (no Pixel Data): e.g. a report or a structured document")
    try:
        return _displayed(ds)
    except UnreadableFile:
        raise
    except Exception as exc:  # noqa: BLE001 - malformed headers: palette without LUT, bad window, broken VOI LUT
        line = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise UnreadableFile(f"malformed DICOM header ({exc.__class__.__name__}: {line[:160]})") from exc


def _displayed(ds: Any) -> np.ndarray:
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, pixel_array

    try:
        arr = np.asarray(pixel_array(ds, index=0))  # the first frame only
    except Exception as exc:  # noqa: BLE001 - truncated data, missing tags, no decoder plugin
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        kind = f"{syntax.name} " if syntax is not None else ""
        line = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise UnreadableFile(f"cannot decode the DICOM {kind}pixel data: {line[:200]}") from exc
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        rgb = np.asarray(apply_color_lut(arr, ds))
        return _shrink(to_uint8(rgb, value_range=(0, np.iinfo(rgb.dtype).max) if rgb.dtype != np.uint8 else None))
    if arr.ndim == 3:  # RGB; pydicom converts YBR to RGB
        return _shrink(to_uint8(arr))
    modality = np.asarray(apply_modality_lut(arr, ds))
    values = modality.astype(np.float64)
    if ds.get("VOILUTSequence"):
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        indices = modality if np.issubdtype(modality.dtype, np.integer) else np.rint(values).astype(np.int64)
        pixels = to_uint8(apply_voi(indices, ds), value_range=(0, 2**bits - 1))
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        function = str(ds.get("VOILUTFunction", "LINEAR")).upper()
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        if not (np.isfinite(center) and np.isfinite(width) and width > 0):
            raise UnreadableFile(f"DICOM window center {center:g} / width {width:g} is not a usable window")
        pixels = to_uint8(_window(values, center, width, function), (0.0, 1.0))
    else:
        integral = bool(np.all(values == np.round(values)))  # integers follow the integer rule, as in a PNG
        pixels = to_uint8(values.astype(np.int64) if integral else values)
    if photometric == "MONOCHROME1":  # low values are white
        pixels = 255 - pixels
    return _shrink(pixels)


def decode(source: Any, name: str = "") -> np.ndarray:
    """uint8 (H, W) or (H, W, 3) pixels from a path, bytes, PIL image or array; DICOM by content or suffix.

    Raises UnreadableFile (one line) when the input is neither a readable image nor a DICOM file.
    """
    if source is None:
        raise UnreadableFile("no file given")
    if isinstance(source, np.ndarray):
        return _shrink(to_uint8(source))
    if isinstance(source, Image.Image):
        return _shrink(pil_to_array(source))
    if isinstance(source, str | Path):
        name = name or Path(source).name
        try:
            if Path(source).stat().st_size > MAX_FILE_BYTES:
                raise UnreadableFile(f"{name} is larger than {MAX_FILE_BYTES // 2**20} MB")
            source = Path(source).read_bytes()
        except OSError as exc:
            raise UnreadableFile(f"cannot read {name} ({exc.__class__.__name__})") from exc
    data = bytes(source)
    if not data:
        raise UnreadableFile("the file is empty")
    if is_dicom(data) or name.lower().endswith(DICOM_SUFFIXES):
        return read_dicom(data)
    return _shrink(_read_raster(data))


def _zip_members(zip_name: str, data: bytes) -> Iterator[Upload]:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = [m for m in archive.infolist() if not m.is_dir() and not Path(m.filename).name.startswith(".")]
            if len(members) > MAX_ZIP_MEMBERS:
                yield Upload(zip_name, None, f"the zip holds {len(members)} files, more than {MAX_ZIP_MEMBERS}")
                return
            for member in members:
                name = f"{zip_name}/{member.filename}"
                if member.file_size > MAX_FILE_BYTES:
                    yield Upload(name, None, f"larger than {MAX_FILE_BYTES // 2**20} MB")
                    continue
                try:
                    with archive.open(member) as fh:
                        member_data = fh.read(MAX_FILE_BYTES + 1)  # the declared size may lie
                except (OSError, zipfile.BadZipFile, RuntimeError, NotImplementedError, ValueError) as exc:
                    yield Upload(name, None, f"unreadable zip member ({exc.__class__.__name__})")
                    continue
                if len(member_data) > MAX_FILE_BYTES:
                    yield Upload(name, None, f"larger than {MAX_FILE_BYTES // 2**20} MB")
                else:
                    yield Upload(name, member_data)
    except (OSError, zipfile.BadZipFile, ValueError) as exc:
        yield Upload(zip_name, None, f"not a readable zip file ({exc.__class__.__name__})")


def expand(files: Iterable[Upload]) -> Iterator[Upload]:
    """Each file, a zip (by its ``.zip`` name) expanded into its members from memory, in order."""
    for upload in files:
        if upload.data is not None and upload.name.lower().endswith(".zip"):
            yield from _zip_members(upload.name, upload.data)
        else:
            yield upload


def read_file(path: str | Path) -> Upload:
    """One file's bytes as an Upload (or the error that stopped reading it)."""
    path = Path(path)
    try:
        data = path.read_bytes() if path.stat().st_size <= MAX_FILE_BYTES else None
    except OSError as exc:
        return Upload(path.name, None, f"cannot read the file ({exc.__class__.__name__})")
    return Upload(path.name, data, None if data is not None else f"larger than {MAX_FILE_BYTES // 2**20} MB")


def read_uploads(paths: Iterable[str | Path]) -> Iterator[Upload]:
    """Each file at `paths`, a zip expanded into its members (in memory), in order."""
    return expand(read_file(p) for p in paths)
