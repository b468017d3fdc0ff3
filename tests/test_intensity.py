"""One intensity rule for every bit depth (peft_deer.data.intensity), used by training and the demo."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from peft_deer.data import load_dataset_spec, preprocess_images
from peft_deer.data.intensity import pil_to_array, to_uint8


def test_rule_per_bit_depth() -> None:
    u8 = np.array([[0, 7, 255]], dtype=np.uint8)
    assert to_uint8(u8) is u8
    assert to_uint8(np.array([[0, 100, 200]], dtype=np.uint16)).tolist() == [[0, 100, 200]]  # <= 255: 8-bit values
    assert to_uint8(np.array([[0, 2048, 4095]], dtype=np.uint16)).tolist() == [[0, 128, 255]]  # 12-bit: / max
    assert to_uint8(np.array([[1000, 65535]], dtype=np.uint16)).tolist() == [[4, 255]]  # black stays black
    assert to_uint8(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).tolist() == [[0, 128, 255]]  # [0, 1] floats
    assert to_uint8(np.array([[-1024, 0, 1024]], dtype=np.int16)).tolist() == [[0, 128, 255]]  # signed: shifted
    assert to_uint8(np.array([[True, False]])).tolist() == [[255, 0]]
    assert to_uint8(np.array([[-1.0, 0.0, 0.5, 2.0]]), value_range=(0.0, 1.0)).tolist() == [[0, 0, 128, 255]]
    with pytest.raises(ValueError, match="hi > lo"):
        to_uint8(np.zeros((2, 2)), value_range=(1, 1))


def test_pil_modes() -> None:
    a16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    img16 = Image.fromarray(a16)
    assert img16.mode == "I;16"
    assert np.array_equal(pil_to_array(img16), to_uint8(a16))
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert pil_to_array(rgba).shape == (4, 4, 3) and pil_to_array(rgba)[0, 0].tolist() == [10, 20, 30]
    # preprocess_images used to let PIL clip a 16-bit image at 255 (all white here)
    x = preprocess_images(img16, 8, 1, 0.0, 1.0)
    assert float(x.min()) == 0.0 and 0.4 < float(x.mean()) < 0.6


def test_training_loader_uses_the_same_rule(tmp_path) -> None:
    """A 16-bit PNG in an imagefolder dataset reaches training as to_uint8 of its pixels."""
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(6):
            arr = rng.integers(0, 4096, size=(16, 16), dtype=np.uint16)  # 12-bit data in a 16-bit PNG
            Image.fromarray(arr).save(tmp_path / label / f"{i}.png")
    splits = load_dataset_spec(f"imagefolder:{tmp_path}", val_fraction=0.2, test_fraction=0.2, seed=0)
    seen = {a.tobytes() for part in (splits.train, splits.val, splits.test) for a in part.images[..., 0]}
    expected = {to_uint8(np.asarray(Image.open(p))).tobytes() for p in tmp_path.glob("*/*.png")}
    assert seen == expected
