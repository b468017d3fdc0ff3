"""DICOM uploads (app/decode.py): windowing, VOI LUT, MONOCHROME1, 12-16-bit, RGB, palette; corrupt files.

Every DICOM here is built by the test with pydicom (no downloaded data)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pydicom = pytest.importorskip("pydicom", reason="pydicom is a dependency of the demo (pip install pydicom)")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, SecondaryCaptureImageStorage, generate_uid  # noqa: E402

from peft_deer.data.intensity import to_uint8  # noqa: E402
from peft_deer.demo.decode import UnreadableFile, decode, read_uploads  # noqa: E402


def dicom_bytes(pixels: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int | None = None, **tags) -> bytes:
    """A DICOM Part 10 file (Secondary Capture, explicit VR little endian) holding `pixels`."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    ds.set_pixel_data(pixels, photometric, bits_stored or pixels.dtype.itemsize * 8)
    for key, value in tags.items():
        setattr(ds, key, value)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _ramp(dtype=np.uint16, top: int = 4095) -> np.ndarray:
    return np.linspace(0, top, 32 * 32).reshape(32, 32).astype(dtype)


def test_twelve_bit_without_window_is_scaled_like_a_png() -> None:
    arr = _ramp()
    from_dicom = decode(dicom_bytes(arr, bits_stored=12))
    png = io.BytesIO()
    Image.fromarray(arr).save(png, format="PNG")  # a 16-bit PNG of the same pixels
    assert np.array_equal(from_dicom, to_uint8(arr))
    assert np.array_equal(from_dicom, decode(png.getvalue()))


def test_window_monochrome1_and_rescale() -> None:
    arr = _ramp()
    windowed = decode(dicom_bytes(arr, bits_stored=12, WindowCenter=1000, WindowWidth=1000))
    low, high = arr <= 500 - 1, arr >= 1500
    assert windowed[low].max() == 0 and windowed[high].min() == 255  # outside the window: black / white
    mid = windowed[(arr > 600) & (arr < 1400)]
    assert 0 < mid.min() < mid.max() < 255
    inverted = decode(dicom_bytes(arr, "MONOCHROME1", 12, WindowCenter=1000, WindowWidth=1000))
    assert np.array_equal(inverted, 255 - windowed)
    # A CT-like signed image with a rescale intercept: the window is in modality units (HU).
    hu = np.linspace(-1024, 1024, 32 * 32).reshape(32, 32).astype(np.int16)
    stored = (hu + 1024).astype(np.uint16)
    ct = decode(dicom_bytes(stored, bits_stored=12, RescaleSlope=1, RescaleIntercept=-1024,
                            WindowCenter=40, WindowWidth=400))  # fmt: skip
    assert ct[hu < -160].max() == 0 and ct[hu > 240].min() == 255
    exact = decode(dicom_bytes(arr, bits_stored=12, WindowCenter=2048, WindowWidth=4096, VOILUTFunction="LINEAR_EXACT"))
    assert np.abs(exact.astype(int) - to_uint8(arr).astype(int)).max() <= 1
    sigmoid = decode(dicom_bytes(arr, bits_stored=12, WindowCenter=2048, WindowWidth=1024, VOILUTFunction="SIGMOID"))
    assert sigmoid[0, 0] < 5 and sigmoid[-1, -1] > 250 and np.all(np.diff(sigmoid.ravel().astype(int)) >= 0)


def test_voi_lut_sequence() -> None:
    arr = _ramp(top=255)
    item = Dataset()
    item.LUTDescriptor = [256, 0, 8]
    item.add_new(0x00283006, "US", [255 - v for v in range(256)])  # LUT Data: an inverting LUT, 8-bit output
    lut_ds = dicom_bytes(arr, bits_stored=8)
    ds = pydicom.dcmread(io.BytesIO(lut_ds))
    ds.VOILUTSequence = [item]
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    assert np.array_equal(decode(out.getvalue()), 255 - arr.astype(np.uint8))


def test_sixteen_bit_rgb_and_palette() -> None:
    full = _ramp(top=65535)
    assert np.array_equal(decode(dicom_bytes(full, bits_stored=16)), to_uint8(full))
    rgb = np.random.default_rng(0).integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
    assert np.array_equal(decode(dicom_bytes(rgb, "RGB", 8)), rgb)
    index = (np.arange(16 * 16).reshape(16, 16) % 4).astype(np.uint8)
    palette = dicom_bytes(index, "PALETTE COLOR", 8)
    ds = pydicom.dcmread(io.BytesIO(palette))
    for k, values in enumerate(([0, 65535, 0, 0], [0, 0, 65535, 0], [0, 0, 0, 65535])):  # red, green, blue
        ds.add_new(0x00281101 + k, "US", [4, 0, 16])  # 16-bit palette descriptor
        ds.add_new(0x00281201 + k, "OW", np.array(values, dtype="<u2").tobytes())
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    pixels = decode(out.getvalue())
    assert pixels.shape == (16, 16, 3)
    assert pixels[index == 1].tolist()[0] == [255, 0, 0] and pixels[index == 3].tolist()[0] == [0, 0, 255]


def test_multiframe_takes_the_first_frame() -> None:
    frames = np.stack([_ramp(), 4095 - _ramp()])
    assert np.array_equal(decode(dicom_bytes(frames, bits_stored=12)), to_uint8(frames[0]))


def test_corrupt_and_non_image_files_get_one_line_messages(tmp_path: Path) -> None:
    good = dicom_bytes(_ramp(), bits_stored=12)
    no_pixels = pydicom.dcmread(io.BytesIO(good))
    del no_pixels.PixelData
    buf = io.BytesIO()
    no_pixels.save_as(buf, enforce_file_format=True)
    compressed = pydicom.dcmread(io.BytesIO(good))
    compressed.file_meta.TransferSyntaxUID = JPEG2000Lossless  # claims JPEG 2000, holds raw bytes
    compressed["PixelData"].VR = "OB"
    compressed.PixelData = pydicom.encaps.encapsulate([b"\xff\x4f\xff\x51 not a codestream"])
    comp = io.BytesIO()
    compressed.save_as(comp, enforce_file_format=True)
    cases = {
        good[: len(good) // 2]: "DICOM",  # truncated pixel data
        good[:140]: "DICOM",  # truncated header
        buf.getvalue(): "holds no image",
        comp.getvalue(): "JPEG 2000",
        b"just some text": "not a readable image or DICOM file",
        b"": "empty",
        b"\x89PNG\r\n\x1a\n broken": "not a readable image or DICOM file",
    }
    for data, message in cases.items():
        with pytest.raises(UnreadableFile, match=message) as info:
            decode(data, "upload.dcm" if data.startswith(good[:132]) else "upload.bin")
        assert "\n" not in str(info.value) and len(str(info.value)) < 300
    # A file named .dcm that is not DICOM at all
    with pytest.raises(UnreadableFile, match="DICOM"):
        decode(b"not dicom at all", "scan.dcm")
    # Batch reading keeps going past a bad file
    (tmp_path / "a.dcm").write_bytes(good)
    (tmp_path / "b.dcm").write_bytes(good[:200])
    names = [u.name for u in read_uploads([tmp_path / "a.dcm", tmp_path / "b.dcm", tmp_path / "missing.png"])]
    assert names == ["a.dcm", "b.dcm", "missing.png"]
