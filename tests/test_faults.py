"""Fault injection: `kill -9` a tiny run at random phases (and during its final write), then resume it; the
result must be bit-identical to an uninterrupted run, and nothing half-written may be left behind.

The killed runs are subprocesses (`python train/fed.py`, one torch thread); the reference and the resumes
run in-process on one thread too. The run draws its DP noise from the seed (`--reproducible-noise`), so
that separate runs can be compared bit for bit.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import MEDMNIST_DIR, ROOT
from safetensors.torch import load_file

import peft_deer  # noqa: F401  (registers DEER_LORA with PEFT)
from peft_deer.run.run_dir import CHECKPOINT, staging_dir
from train import fed

PHASES = 4  # 2 rounds of deer, 2 phases each
TIMING = {"seconds", "images_per_s"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def argv(data_dir: Path, out: Path) -> list[str]:
    return [
        "--model", "tiny-vit", "--dataset", "medmnist:pneumoniamnist", "--data-dir", str(data_dir),
        "--train-subset", "200", "--num-clients", "3", "--rounds", "2", "--batch-size", "32", "--seed", "0",
        "--method", "deer", "--dp", "client", "--noise-multiplier", "1.0", "--delta", "1e-3", "--reproducible-noise",
        "--output-dir", str(out),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run."""
    if not (MEDMNIST_DIR / "pneumoniamnist.npz").is_file():
        pytest.skip(f"real MedMNIST files not found at {MEDMNIST_DIR}")
    out = tmp_path_factory.mktemp("faults") / "reference"
    assert fed.main(argv(MEDMNIST_DIR, out)) == 0
    return out


def _phases_done(out: Path) -> int:
    """Phases the run has checkpointed (0 before its first checkpoint)."""
    for where in (out, staging_dir(out)):
        try:
            step = torch.load(where / CHECKPOINT, weights_only=False)["next_phase"]
            return step[0] * 2 + step[1]
        except (FileNotFoundError, RuntimeError, EOFError, KeyError):
            continue
    return 0


def _kill(run: list[str], out: Path, when: str, rng: random.Random) -> str:
    """Start the run, SIGKILL it at `when` ('after:K' phases checkpointed plus a random delay, or 'final-write'),
    and return where it was when killed."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.Popen([sys.executable, str(ROOT / "train" / "fed.py"), *run], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 240
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if when == "final-write":
                if any((out / n).exists() for n in ("adapter.tmp", "adapter", "privacy.json")):
                    break
            elif staging_dir(out).exists() or out.exists():
                if _phases_done(out) >= int(when.split(":")[1]):
                    time.sleep(rng.uniform(0.0, 0.25))
                    break
            time.sleep(0.002)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
    if proc.returncode == 0:
        return "finished before the kill"
    if (out / "summary.json").exists():
        return "killed after summary.json"
    if when == "final-write":
        return "killed during the final write"
    return f"killed after {_phases_done(out)} checkpointed phases"


def _assert_identical(a: Path, b: Path) -> None:
    for name in ("adapter", "adapter-best", "adapter-lora"):
        ta, tb = (load_file(d / name / "adapter_model.safetensors") for d in (a, b))
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{name}: {k}"
    pa, pb = (json.loads((d / "privacy.json").read_text()) for d in (a, b))
    assert pa["epsilon"] == pb["epsilon"] and pa["releases"] == pb["releases"] == PHASES
    rows = [[{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in
             (d / "metrics.jsonl").read_text().splitlines()] for d in (a, b)]  # fmt: skip
    assert rows[0] == rows[1] and len(rows[0]) == 2
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert sa["test"] == sb["test"]


@pytest.mark.e2e
@pytest.mark.parametrize("when", ["after:0", "after:1", "after:3", "final-write"])
def test_kill_then_resume_is_bit_identical(when, reference, tmp_path, medmnist_dir):
    """'after:K': killed at a random moment (seeded by K) once K phases are checkpointed, i.e. in the first
    phase (no checkpoint yet), in the second, in the last (or later); 'final-write': while the outputs are written."""
    rng = random.Random(when)
    out = tmp_path / "run"
    run = argv(medmnist_dir, out)
    where = _kill(run, out, when, rng)
    print(f"{when}: {where}")
    if out.exists() and not (out / "summary.json").exists():
        # an output dir exists only once a checkpoint does: it is resumable
        assert (out / CHECKPOINT).is_file()
        assert fed.main([*run, "--resume"]) == 0
    elif not out.exists():
        # killed before the first checkpoint: no output dir, and --resume starts the run from the beginning
        assert fed.main([*run, "--resume"] if staging_dir(out).exists() else run) == 0
    _assert_identical(reference, out)
    assert not staging_dir(out).exists() and not (out / CHECKPOINT).exists()
    assert not any(p.name.endswith(".tmp") for p in out.rglob("*")), sorted(out.rglob("*.tmp"))
