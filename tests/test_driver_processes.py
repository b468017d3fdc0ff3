"""The driver as a process: argument errors come before torch/transformers/PEFT load, and bad input under
torchrun (two processes) is still one line with no peer-connection noise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ROOT, assert_nothing_written, damaged_npz_folders, tiny_fed_argv

FED = ROOT / "train" / "fed.py"

pytestmark = pytest.mark.e2e  # starts subprocesses: python -c, train/fed.py, torchrun with 2 processes


def _env() -> dict[str, str]:
    return {
        **os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
    }  # fmt: skip


def test_argument_errors_come_before_the_heavy_imports(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("rounds: -1\n")
    probe = (
        "import json, sys, time; t = time.perf_counter(); from train import fed\n"
        "try:\n    code = fed.main(sys.argv[1:])\nexcept SystemExit as e:\n    code = e.code\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'accelerate') if m in sys.modules)\n"
        "print(json.dumps({'code': code, 'heavy': heavy, 'seconds': time.perf_counter() - t}))"
    )
    for argv, message in (
        (["--epsilon", "nan", "--dp", "client"], "--epsilon: 'nan' is not a finite number"),
        (["--config", str(config)], "--rounds -1 must be >= 1"),
        (["--output-dir", str(config)], "is a file, not a directory"),
    ):
        proc = subprocess.run(
            [sys.executable, "-c", probe, *argv], capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=60
        )
        result = json.loads(proc.stdout)
        assert result["code"] == 2 and result["heavy"] == [], (result, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, proc.stderr
        print(f"{argv[0]}: error after {result['seconds']:.3f} s in-process, no torch/transformers/peft imported")
        assert result["seconds"] < 1.0
    # and as a script, end to end (Python start-up included)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(FED), "--lr", "inf"], capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=60
    )
    seconds = time.perf_counter() - t0
    print(f"python train/fed.py --lr inf: exit {proc.returncode} after {seconds:.2f} s")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and seconds < 3.0


def test_bad_input_under_torchrun_is_one_line(tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.is_file():
        pytest.skip(f"torchrun not found next to {sys.executable}")
    folder = damaged_npz_folders(tmp_path)["bad-crc"]
    out = tmp_path / "out"
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", str(FED), *tiny_fed_argv(out, data_dir=folder)],
        capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=300,
    )  # fmt: skip
    ours = [line for line in proc.stderr.splitlines() if "deer-fed" in line]
    assert proc.returncode != 0
    assert len(ours) == 1, proc.stderr[-3000:]  # (the stderr of a failure, for the next reader)
    assert ours == [f"deer-fed: error: {folder / 'breastmnist.npz'} is damaged " + ours[0].split(" is damaged ", 1)[1]]
    # no peer-connection errors and no traceback through our code; torchrun's own ChildFailedError summary of
    # the exit codes (its agent process, not ours) is all that follows the line
    for noise in ("Connection closed by peer", "gloo", f'File "{FED}"', "/peft_deer/", "ProcessGroup"):
        assert noise not in proc.stderr, proc.stderr[-3000:]
    assert_nothing_written(out)
