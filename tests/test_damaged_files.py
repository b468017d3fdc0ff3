"""A damaged input file (.npz data, a checkpoint on --resume, adapter weights) is one line naming the file.

On real MedMNIST files and the tiny random ViT; runs call `train.fed.main([...])` in-process.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_nothing_written, assert_one_line_error, damaged_npz_folders, run_fed_main, tiny_fed_argv

from peft_deer.run.checkpoint import DamagedFileError, check_adapter
from peft_deer.run.run_dir import CHECKPOINT

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------- damaged .npz files


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("truncated", "is damaged (BadZipFile"),
        ("bad-crc", "is damaged (BadZipFile: Bad CRC-32"),
        ("text", "is not a .npz archive (it does not start with a zip header)"),
        ("empty", "is not a .npz archive"),
    ],
)
def test_damaged_npz_is_one_line(case, message, tmp_path, medmnist_dir, capsys):
    folder = damaged_npz_folders(tmp_path)[case]
    out = tmp_path / "out"
    code, lines = run_fed_main(tiny_fed_argv(out, data_dir=folder), capsys)
    assert_one_line_error(code, lines, str(folder / "breastmnist.npz"), message, "download it again")
    assert "pickle" not in lines[0]
    assert_nothing_written(out)


# ------------------------------------------------------------------------------------------------- damaged checkpoint


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 3])
    elif how == "random-bytes":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, len(data), dtype=np.uint8).tobytes())
    elif how == "empty":
        path.write_bytes(b"")
    else:  # missing keys
        payload = torch.load(path, weights_only=False)
        del payload["server"]
        torch.save(payload, path)


def test_damaged_checkpoint_on_resume(tmp_path, medmnist_dir, capsys):
    base = tmp_path / "base"
    old_umask = os.umask(0)  # attack 27.3: nothing group/world-writable; the DP key only in server-private/ (0600)
    try:
        assert run_fed_main(tiny_fed_argv(base, "--rounds", "2", "--max-phases", "1"), capsys)[0] == 0
    finally:
        os.umask(old_umask)
    assert Path(CHECKPOINT).parent.name == "server-private" and not (base / "checkpoint.pt").exists()
    assert os.stat((base / CHECKPOINT).parent).st_mode & 0o777 == 0o700
    assert {os.stat(p).st_mode & 0o777 for p in (base / CHECKPOINT).parent.iterdir()} == {0o600}
    assert [p for p in (base, *base.rglob("*")) if os.stat(p).st_mode & 0o022] == []
    for how, reason in (
        ("truncated", "is damaged"),
        ("random-bytes", "is damaged"),
        ("empty", "is damaged"),
        ("missing-keys", "is not a complete peft_deer checkpoint (missing ['server'])"),
    ):
        out = tmp_path / how
        shutil.copytree(base, out)
        _damage(out / CHECKPOINT, how)
        code, lines = run_fed_main(tiny_fed_argv(out, "--rounds", "2", "--resume"), capsys)
        assert_one_line_error(code, lines, str(out / CHECKPOINT), reason, "pass --overwrite to start the run again")
        assert not (out / "summary.json").exists()


# ---------------------------------------------------------------------------------------------------- damaged adapter


def test_corrupt_adapter_is_reported_with_its_file(tmp_path, medmnist_dir, capsys):
    out = tmp_path / "run"
    assert run_fed_main(tiny_fed_argv(out), capsys)[0] == 0
    check_adapter(out / "adapter")  # intact
    weights = out / "adapter" / "adapter_model.safetensors"
    data = weights.read_bytes()
    for damaged in (data[: len(data) // 2], b"\x00" * 16, b""):
        weights.write_bytes(damaged)
        with pytest.raises(DamagedFileError, match="adapter_model.safetensors is unreadable or damaged") as excinfo:
            check_adapter(out / "adapter")
        assert "\n" not in str(excinfo.value)
