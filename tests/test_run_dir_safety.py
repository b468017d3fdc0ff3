"""The output dir and checkpoint against misuse and attack (issue 27 items 1-3, 5, 6d-e; issue 24 item 4), without
a training run: the output-dir lock, a code-carrying checkpoint, the data digest and the resume refusal's text,
owner-only modes under umask 0, a planted `.NAME.partial` symlink, Flower telemetry off.
"""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import ROOT

from peft_deer import checkpoint as ckpt_mod
from peft_deer.checkpoint import (
    DamagedFileError,
    SettingsMismatch,
    check_resume,
    data_digest,
    load_checkpoint,
    save_checkpoint,
)
from peft_deer.run_dir import (
    OutputDirError,
    check_output_lock,
    create_staging,
    lock_output_dir,
    lock_path,
    make_private_dir,
    prepare_output_dir,
    release_output_lock,
    staging_dir,
)

RUN_DIR = ROOT / "peft_deer" / "run_dir.py"
HOLD = textwrap.dedent(
    """
    import importlib.util, sys, time
    spec = importlib.util.spec_from_file_location("run_dir", sys.argv[3])  # stdlib only: no torch to load
    run_dir = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_dir)
    run_dir.lock_output_dir(sys.argv[1], sys.argv[2] or None)
    print("locked", flush=True)
    time.sleep(60)
    """
)


def _holder(out: Path, *launch: str) -> subprocess.Popen:
    """A process holding the lock of `out` (what a running deer-fed does) until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out), *(launch or ("",)), str(RUN_DIR)],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "locked"
    return proc


# ---------------------------------------------------------------------------------------- 1. the lock


def test_a_second_run_is_refused_naming_the_holder_and_a_dead_holders_lock_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    holder = _holder(out)
    try:
        with pytest.raises(OutputDirError) as err:
            lock_output_dir(out)
        message = str(err.value)
        assert "\n" not in message and "in use by another run" in message
        assert f"pid {holder.pid} on {socket.gethostname()}" in message and str(lock_path(out)) in message
    finally:
        holder.kill()
        holder.wait()
    lock_output_dir(out)  # the kernel dropped the dead process's lock; its file still names it
    try:
        note = capsys.readouterr().err
        assert f"took over the lock of {out}" in note and f"pid {holder.pid}" in note
        lock_output_dir(out)  # this process again: no-op
        # and now this process holds it: another process is refused
        probe = subprocess.run([sys.executable, "-c", HOLD, str(out), "", str(RUN_DIR)], capture_output=True,
                               text=True, timeout=60)  # fmt: skip
        assert probe.returncode != 0 and f"pid {os.getpid()}" in probe.stderr
    finally:
        release_output_lock(out)
    lock_output_dir(out)  # released: free again, with no take-over note (the file was emptied)
    release_output_lock(out)
    assert "took over" not in capsys.readouterr().err


def test_ranks_of_one_launch_share_the_lock_and_another_launch_is_refused(tmp_path):
    out = tmp_path / "run"
    check_output_lock(out, "127.0.0.1:29500")  # no lock file yet: nothing to check
    holder = _holder(out, "127.0.0.1:29500")
    try:
        check_output_lock(out, "127.0.0.1:29500")  # rank 1 of the holder's own launch
        with pytest.raises(OutputDirError, match=f"pid {holder.pid}"):
            check_output_lock(out, "127.0.0.1:29611")
    finally:
        holder.kill()
        holder.wait()
    check_output_lock(out, "127.0.0.1:29611")  # the holder is gone


# ---------------------------------------------------------------------------------------- 2. code in a checkpoint


class _RunsCode:
    """Unpickling this creates `marker`: what a crafted checkpoint.pt could do with any command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


@pytest.mark.parametrize("how", ["torch.save", "plain pickle"])
def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tmp_path, how):
    import pickle

    marker, path = tmp_path / "marker", tmp_path / "checkpoint.pt"
    payload = {k: 0 for k in ckpt_mod.CHECKPOINT_KEYS} | {"fingerprint": _RunsCode(marker)}
    if how == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    assert not marker.exists()
    with pytest.raises(DamagedFileError) as err:
        load_checkpoint(path)
    assert not marker.exists(), "loading the checkpoint ran the planted code"
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    # torch's own format reaches the planted global: named as code; a bare pickle fails on its framing first
    assert ("refused: it would run code on load" if how == "torch.save" else "is damaged") in str(err.value)


def test_a_real_checkpoint_payload_loads_with_weights_only(tmp_path):
    path = tmp_path / "checkpoint.pt"
    payload = {k: None for k in ckpt_mod.CHECKPOINT_KEYS} | {
        "fingerprint": {"lr": 0.1}, "server": {"w": torch.ones(2)}, "next_phase": (1, 0), "rows": [{"a": 1.5}],
    }  # fmt: skip
    save_checkpoint(path, payload)
    back = load_checkpoint(path)
    assert torch.equal(back["server"]["w"], torch.ones(2)) and back["rows"] == [{"a": 1.5}]


# ---------------------------------------------------------------------------------------- 3. data digest, 6d


def _splits(images: np.ndarray, labels: np.ndarray) -> SimpleNamespace:
    split = SimpleNamespace(images=images, labels=labels)
    return SimpleNamespace(train=split, val=SimpleNamespace(images=images[:3], labels=labels[:3]), test=None)


def test_the_data_digest_changes_with_any_image_or_label_and_only_then():
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (20, 8, 8, 1), dtype=np.uint8), rng.integers(0, 2, 20)
    base = data_digest(_splits(images, labels))
    assert set(base) == {"train", "val"}
    assert data_digest(_splits(images.copy(), labels.copy())) == base
    inverted = data_digest(_splits(255 - images, labels))
    assert inverted["train"] != base["train"] and inverted["val"] != base["val"]
    flipped = labels.copy()
    flipped[-1] = 1 - flipped[-1]  # one label, outside val's first 3
    changed = data_digest(_splits(images, flipped))
    assert changed["train"] != base["train"] and changed["val"] == base["val"]


def test_the_resume_refusal_names_each_changed_setting_with_old_and_new_values_and_the_changed_data():
    saved = {"fingerprint": {"lr": 0.002, "rounds": 2, "seed": 0}, "data_sha256": {"train": "a" * 64, "val": "b" * 64}}
    path = Path("/runs/x/checkpoint.pt")
    check_resume(path, saved, {"lr": 0.002, "rounds": 2, "seed": 0}, {"train": "a" * 64, "val": "b" * 64})
    with pytest.raises(SettingsMismatch) as err:
        check_resume(path, saved, {"lr": 0.1, "rounds": 2, "seed": 3}, saved["data_sha256"])
    assert "lr: 0.002 -> 0.1" in str(err.value) and "seed: 0 -> 3" in str(err.value) and "rounds" not in str(err.value)
    with pytest.raises(SettingsMismatch, match=r"changed data: the train split\(s\) differ"):
        check_resume(path, saved, saved["fingerprint"], {"train": "c" * 64, "val": "b" * 64})
    check_resume(path, {"fingerprint": saved["fingerprint"]}, saved["fingerprint"], {"train": "c" * 64})  # older


# ---------------------------------------------------------------------------------------- issue 24 item 4


@pytest.fixture
def umask_0():
    old = os.umask(0)
    yield
    os.umask(old)


def test_the_checkpoint_is_owner_only_from_its_creation_under_umask_0(tmp_path, umask_0, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    seen = []
    real_save = torch.save

    def spy(obj, f):  # the mode of the file while the secret is being written into it
        seen.append(os.stat(f.fileno()).st_mode & 0o777)
        real_save(obj, f)

    monkeypatch.setattr(ckpt_mod.torch, "save", spy)
    (tmp_path / "checkpoint.pt.tmp").write_text("left by a killed run")
    os.chmod(tmp_path / "checkpoint.pt.tmp", 0o666)
    save_checkpoint(path, {"key": "00ff"})
    assert seen == [0o600] and os.stat(path).st_mode & 0o777 == 0o600


def test_the_private_dir_is_owner_only_under_umask_0(tmp_path, umask_0):
    made = make_private_dir(tmp_path / "run" / "server-private")
    assert os.stat(made).st_mode & 0o777 == 0o700
    widened = tmp_path / "old-private"
    widened.mkdir(mode=0o777)
    assert os.stat(make_private_dir(widened)).st_mode & 0o777 == 0o700


# ---------------------------------------------------------------------------------------- 6e. planted symlink


def test_a_symlink_at_the_staging_path_is_refused_naming_it(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("keep me")
    out = tmp_path / "run"
    staging_dir(out).symlink_to(victim)
    for call in (lambda: prepare_output_dir(out, False, False), lambda: create_staging(out)):
        with pytest.raises(OutputDirError) as err:
            call()
        assert str(staging_dir(out)) in str(err.value) and "symbolic link" in str(err.value)
        assert "\n" not in str(err.value)
    assert (victim / "keep.txt").read_text() == "keep me"


# ---------------------------------------------------------------------------------------- 5. telemetry


def test_every_flower_process_of_the_local_deployment_runs_without_telemetry(tmp_path, monkeypatch):
    pytest.importorskip("psutil")
    from peft_deer.flower.local import LocalDeployment

    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "1")
    deployment = LocalDeployment(1, tmp_path)
    try:
        assert deployment.env["FLWR_TELEMETRY_ENABLED"] == "0"
    finally:
        deployment.__exit__(None, None, None)
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("flower-superlink --insecure") - 200 : readme.index("flwr run . local-deployment")]
    assert "export FLWR_TELEMETRY_ENABLED=0" in block, "the README's deployment commands must turn telemetry off"
