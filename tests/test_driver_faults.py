"""`deer-fed` under operational faults (issue 27 items 1, 3, 6b-c, 7): a second run into a locked output dir,
a finished run rerun without `--overwrite` (refused before any data loads), changed data on `--resume`, a
full disk during the final write, SIGTERM and Ctrl-C. Tiny runs (tiny random ViT, 200 images, 3 clients)."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import MEDMNIST_DIR, ROOT

import peft_deer  # noqa: F401  (registers DEER_LORA with PEFT)
from peft_deer.run import outputs
from peft_deer.run.checkpoint import load_checkpoint
from peft_deer.run.run_dir import CHECKPOINT, lock_path
from train import fed

FED = ROOT / "train" / "fed.py"


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


@pytest.fixture
def data_dir(tmp_path) -> Path:
    """A private copy of PneumoniaMNIST (the tests change it)."""
    if not (MEDMNIST_DIR / "pneumoniamnist.npz").is_file():
        pytest.skip(f"real MedMNIST files not found at {MEDMNIST_DIR}")
    d = tmp_path / "data"
    d.mkdir()
    shutil.copy(MEDMNIST_DIR / "pneumoniamnist.npz", d)
    return d


def argv(data_dir: Path, out: Path, *extra: str, rounds: int = 2) -> list[str]:
    return [
        "--model", "tiny-vit", "--dataset", "medmnist:pneumoniamnist", "--data-dir", str(data_dir),
        "--train-subset", "200", "--num-clients", "3", "--rounds", str(rounds), "--batch-size", "32", "--seed", "0",
        "--method", "deer", "--dp", "client", "--noise-multiplier", "1.0", "--delta", "1e-3",
        "--output-dir", str(out), *extra,
    ]  # fmt: skip


def error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("deer-fed")]


def test_a_finished_run_without_overwrite_is_refused_before_the_data_loads(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    assert fed.main(argv(data_dir, out, rounds=1)) == 0
    capsys.readouterr()
    missing = tmp_path / "no-data-here"  # had the data loaded first, this would be the error
    t0 = time.perf_counter()
    assert fed.main(argv(missing, out, rounds=1)) == 2
    seconds = time.perf_counter() - t0
    assert error_lines(capsys) == [
        f"deer-fed: error: {out} holds a finished run; pass --overwrite to replace it or choose another --output-dir"
    ]
    assert seconds < 2.0, f"the refusal took {seconds:.2f} s"


@pytest.mark.e2e
def test_a_second_run_into_a_locked_output_dir_gets_one_line_naming_the_holder(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    hold = f"import fcntl, os, sys, time; fd = os.open({str(lock_path(out))!r}, os.O_RDWR | os.O_CREAT); "
    hold += "os.write(fd, b'{\"pid\": %d, \"host\": \"h\", \"started\": 0}' % os.getpid()); fcntl.flock(fd, "
    hold += "fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert fed.main(argv(data_dir, out, rounds=1)) == 2
        (line,) = error_lines(capsys)
        assert f"is in use by another run (pid {holder.pid} on h" in line
        assert not out.exists(), "the refused run wrote into the locked output dir"
    finally:
        holder.kill()
        holder.wait()
    assert fed.main(argv(data_dir, out, rounds=1)) == 0  # the holder is gone: its lock is taken over


@pytest.mark.parametrize("change", ["inverted images", "flipped labels"])
def test_a_resume_on_changed_data_is_refused_naming_the_split(tmp_path, data_dir, capsys, change):
    out = tmp_path / "run"
    assert fed.main(argv(data_dir, out, "--max-phases", "1")) == 0
    arrays = dict(np.load(data_dir / "pneumoniamnist.npz"))
    if change == "inverted images":
        arrays["train_images"] = 255 - arrays["train_images"]
    else:
        arrays["train_labels"] = 1 - arrays["train_labels"]
    np.savez(data_dir / "pneumoniamnist.npz", **arrays)
    capsys.readouterr()
    assert fed.main(argv(data_dir, out, "--resume")) == 2
    (line,) = error_lines(capsys)
    assert "--resume on changed data: the train split(s) differ" in line
    assert load_checkpoint(out / CHECKPOINT)["next_phase"] == (0, 1), "the refused resume changed the checkpoint"


def test_a_full_disk_during_the_final_write_is_one_line_and_keeps_the_previous_files(
    tmp_path, data_dir, capsys, monkeypatch
):
    out = tmp_path / "run"
    assert fed.main(argv(data_dir, out, "--max-phases", "3")) == 0
    # as if an earlier final write had completed adapter/ before it was killed: those files must survive
    previous = tmp_path / "previous"
    (previous / "adapter").mkdir(parents=True)
    (previous / "adapter" / "adapter_model.safetensors").write_bytes(b"complete earlier file")
    shutil.copytree(previous / "adapter", out / "adapter")
    full = out / "adapter-lora.tmp" / "adapter_model.safetensors"

    def disk_full(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(full))

    monkeypatch.setattr(outputs, "export_lora_adapter", disk_full)
    capsys.readouterr()
    assert fed.main(argv(data_dir, out, "--resume")) == 1
    (line,) = error_lines(capsys)
    assert f"cannot write {full}: No space left on device" in line and "--resume" in line
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == b"complete earlier file"
    assert not (out / "summary.json").exists() and not (out / "adapter-lora").exists()
    monkeypatch.undo()
    assert fed.main(argv(data_dir, out, "--resume")) == 0  # space again: the run finishes from its checkpoint
    assert (out / "summary.json").is_file() and not list(out.rglob("*.tmp"))


def _interruptible() -> None:
    """In the child: Ctrl-C as in a terminal, even when the test runs as a background job (SIGINT ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(run: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, str(FED), *run], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_interruptible)  # fmt: skip


@pytest.mark.e2e
@pytest.mark.parametrize(("sig", "code", "name"), [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "SIGINT")])
def test_sigterm_and_ctrl_c_end_the_run_with_one_line_and_a_resumable_checkpoint(tmp_path, data_dir, sig, code, name):
    out = tmp_path / "run"
    proc = _start(argv(data_dir, out, rounds=50))
    deadline = time.monotonic() + 120
    while not (out / CHECKPOINT).is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err[-2000:]
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("deer-fed")]
    assert lines == [f"deer-fed: interrupted ({name}); resume with --resume --output-dir {out}"]
    assert load_checkpoint(out / CHECKPOINT)["next_phase"] != (0, 0)
    assert lock_path(out).read_text() == "", "the lock was not released"
