"""Issue 27 item 4: SIGTERM to `python -m peft_deer.flower.local` ends every process it started (SuperLink,
SuperNodes, ServerApp, ClientApps, site workers) with one line and exit 143; nothing publishes a run later."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import MEDMNIST_DIR, ROOT

psutil = pytest.importorskip("psutil")
pytest.importorskip("flwr")


def _family(root: psutil.Process) -> set[int]:
    """`root`'s descendants and every process in their process groups (site workers are re-parented)."""
    kids = root.children(recursive=True)
    groups = {os.getpgid(p.pid) for p in kids if p.is_running()} - {os.getpgid(0)}  # `flwr run` shares ours
    found = {p.pid for p in kids}
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) in groups:
                found.add(p.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return found


@pytest.mark.e2e
def test_sigterm_stops_the_whole_local_deployment(tmp_path):
    if not (MEDMNIST_DIR / "pneumoniamnist.npz").is_file():
        pytest.skip(f"real MedMNIST files not found at {MEDMNIST_DIR}")
    out = tmp_path / "run"
    config = f"model='tiny-vit' image-size=28 train-subset=200 rounds=50 output-dir='{out}'"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "peft_deer.flower.local", "--nodes", "2", "--data-dir", str(MEDMNIST_DIR),
           "--log-dir", str(tmp_path / "logs"), "--run-config", config]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    root = psutil.Process(proc.pid)
    deadline, family = time.monotonic() + 240, set()
    while time.monotonic() < deadline and proc.poll() is None:  # until the ServerApp has checkpointed
        family |= _family(root)
        if (out / "server-private" / "checkpoint.pt").is_file():
            break
        time.sleep(0.5)
    family |= _family(root)
    assert proc.poll() is None and (out / "server-private" / "checkpoint.pt").is_file(), "the run never checkpointed"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 143, err[-2000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == [lines[-1]] and "interrupted (SIGTERM)" in lines[-1] and "resume=true" in lines[-1], err[-2000:]
    alive = [p for p in family if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert alive == [], [" ".join(psutil.Process(p).cmdline())[:120] for p in alive]
    assert len(family) >= 4  # SuperLink, 2 SuperNodes, flwr run (and the ServerApp, site workers)
    time.sleep(3)
    assert not (out / "summary.json").exists(), "an orphan finished the run"
