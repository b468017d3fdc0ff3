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
from helpers import ROOT

from peft_deer.run import checkpoint as ckpt_mod
from peft_deer.run import run_dir as run_dir_mod
from peft_deer.run.checkpoint import (
    DamagedFileError,
    SettingsMismatch,
    check_resume,
    data_digest,
    load_checkpoint,
    save_checkpoint,
)
from peft_deer.run.run_dir import (
    CHECKPOINT,
    LEGACY_CHECKPOINT,
    PRIVATE_DIR,
    OutputDirError,
    check_output_lock,
    create_staging,
    lock_output_dir,
    lock_path,
    make_private_dir,
    prepare_output_dir,
    release_output_lock,
    run_state,
    staging_dir,
)

RUN_DIR = ROOT / "peft_deer" / "run" / "run_dir.py"
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


@pytest.fixture(autouse=True)
def _short_lock_record_wait(monkeypatch):
    """A refused check waits LOCK_RECORD_WAIT_S for a record naming its launch; 0.2 s keeps these tests quick."""
    monkeypatch.setattr(run_dir_mod, "LOCK_RECORD_WAIT_S", 0.2)


@pytest.mark.e2e
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


@pytest.mark.e2e
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


def test_another_rank_waits_for_rank_0s_lock_record(tmp_path, monkeypatch):
    """The torchrun flake: rank 0 holds the flock but has not yet written its record (the file is empty, or
    still names the previous run); rank 1 must wait for the record, not refuse its own launch."""
    import fcntl
    import threading

    out = tmp_path / "run"
    path = lock_path(out)
    path.write_text('{"pid": 1, "host": "elsewhere", "launch": "127.0.0.1:1"}')  # a previous launch's record
    fd = os.open(path, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # taken, record not yet rewritten

    def write_record() -> None:
        os.ftruncate(fd, 0)
        os.pwrite(fd, b'{"pid": %d, "launch": "127.0.0.1:29500"}' % os.getpid(), 0)

    monkeypatch.setattr(run_dir_mod, "LOCK_RECORD_WAIT_S", 5.0)
    timer = threading.Timer(0.5, write_record)
    timer.start()
    try:
        check_output_lock(out, "127.0.0.1:29500")  # passes once the record names this launch
        monkeypatch.setattr(run_dir_mod, "LOCK_RECORD_WAIT_S", 0.2)
        with pytest.raises(OutputDirError, match="in use by another run"):
            check_output_lock(out, "127.0.0.1:29611")  # another launch is still refused
    finally:
        timer.join()
        os.close(fd)


@pytest.mark.e2e
def test_a_symlinked_alias_of_the_output_dir_shares_its_lock(tmp_path):
    """Attack item 2: the lock is keyed on the resolved path, so a second run through an alias is refused."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "alias").symlink_to(real)
    (tmp_path / "up").symlink_to(tmp_path)  # an alias of a folder above
    aliases = [tmp_path / "alias", tmp_path / "up" / "real", tmp_path / "up" / ".." / tmp_path.name / "real"]
    assert {lock_path(a) for a in aliases} == {lock_path(real)} == {tmp_path / ".real.lock"}
    assert lock_path(tmp_path / "up" / "new") == tmp_path / ".new.lock"  # not there yet: its parent resolved
    holder = _holder(real)
    try:
        for alias in aliases:
            with pytest.raises(OutputDirError, match=f"in use by another run \\(pid {holder.pid} "):
                lock_output_dir(alias)
    finally:
        holder.kill()
        holder.wait()


HOLD_RAW = "import fcntl, sys, time; f = open(sys.argv[1], 'w'); f.write(sys.argv[2]); f.flush(); " \
           "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)"  # fmt: skip
TAMPERED = {
    "pid a list": ('{"pid": [1], "host": "HOST"}', None),
    "pid text": ('{"pid": "abc", "host": "HOST"}', None),
    "pid huge": ('{"pid": 99999999999999999999, "host": "HOST"}', None),
    "pid float": ('{"pid": 1e20, "host": "HOST"}', None),
    "not json": ("\x00\xff garbage", None),
    "held, started text": ('{"pid": 1, "host": "x", "started": "yesterday"}', "pid 1 on x, started at an unknown time"),
    "held, started huge": ('{"pid": 1, "host": "x", "started": 1e300}', "pid 1 on x, started at an unknown time"),
    "held, pid a list": ('{"pid": [1], "host": "x", "started": 0}', "pid ? on x, started at an unknown time"),
    "fifo": (None, "is not a plain file"),
    "directory": (None, "is not a plain file"),
}


@pytest.mark.e2e
@pytest.mark.parametrize("how", list(TAMPERED))
def test_a_tampered_lock_file_gives_one_line_or_is_taken_over(tmp_path, capsys, how):
    """Attack item 4: a malformed lock file never gives a traceback or a misleading line."""
    text, expected = TAMPERED[how]
    out, holder = tmp_path / "run", None
    path = lock_path(out)
    if how == "fifo":
        os.mkfifo(path)
    elif how == "directory":
        path.mkdir()
    elif how.startswith("held"):
        holder = subprocess.Popen([sys.executable, "-c", HOLD_RAW, str(path), text], stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "locked"
    else:
        path.write_text(text.replace("HOST", socket.gethostname()))
    try:
        if expected is None:  # nobody holds it: taken over without a note naming a made-up holder
            lock_output_dir(out)
            release_output_lock(out)
            assert "took over" not in capsys.readouterr().err
            return
        with pytest.raises(OutputDirError) as err:
            lock_output_dir(out)
        assert "\n" not in str(err.value) and expected in str(err.value), err.value
        if holder is not None:
            with pytest.raises(OutputDirError, match="started at an unknown time"):
                check_output_lock(out, "another launch")
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()


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


def _payload() -> dict:
    """A checkpoint of the shape the phase loop writes (`peft_deer.run.phases`)."""
    state = {"lora_A": torch.ones(2, 3), "lora_B": torch.zeros(3, 2)}
    return {
        "fingerprint": {"lr": 0.1},
        "data_sha256": {"train": "ab" * 32},
        "server": {"global_state": state, "releases": [{"sigma": 1.0}], "randomness": {"key": torch.arange(4)}},
        "next_phase": (1, 0),
        "rows": [{"round": 0, "val_auc": 0.75, "epsilon": None}],
        "best": {"score": 0.75, "round": 0, "state": dict(state)},
        "round_acc": {"loss": 0.0, "images": 0, "seconds": 0.0, "update_norms": [float("nan")], "participants": [3]},
        "private_rows": [{"round": 0, "train_loss": None, "participants_per_phase": [3]}],
    }


def test_a_real_checkpoint_payload_loads_with_weights_only(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, _payload())
    back = load_checkpoint(path)
    assert torch.equal(back["server"]["global_state"]["lora_A"], torch.ones(2, 3)) and back["next_phase"] == (1, 0)
    assert back["rows"] == _payload()["rows"] and back["best"]["round"] == 0


def _nan_state(p: dict) -> None:
    for t in p["server"]["global_state"].values():
        t.fill_(float("nan"))


CORRUPT = {
    "next_phase int": (lambda p: p.update(next_phase=5), "next_phase"),
    "next_phase negative": (lambda p: p.update(next_phase=(-1, 0)), "next_phase"),
    "rows a string": (lambda p: p.update(rows="=cmd|' /C calc'!A0"), "rows"),
    "best a string": (lambda p: p.update(best="x"), "best"),
    "best state not tensors": (lambda p: p["best"].update(state={"w": "x"}), "best.state"),
    "round_acc None": (lambda p: p.update(round_acc=None), "round_acc"),
    "tensor in private_rows": (lambda p: p.update(private_rows=[torch.zeros(1).expand(10**6)]), "private_rows"),
    "server a string": (lambda p: p.update(server="x"), "server"),
    "server state NaN": (_nan_state, "server.global_state.lora_A has NaN/inf"),
    "data digest a string": (lambda p: p.update(data_sha256="x"), "data_sha256"),
}


@pytest.mark.parametrize("how", list(CORRUPT))
def test_a_checkpoint_with_wrong_value_types_is_one_line_not_a_traceback(tmp_path, how):
    """Attack item 5: the right keys with crafted values are refused on load (DamagedFileError naming the field)."""
    payload = _payload()
    corrupt, field = CORRUPT[how]
    corrupt(payload)
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, payload)
    with pytest.raises(DamagedFileError) as err:
        load_checkpoint(path)
    text = str(err.value)
    assert "\n" not in text and str(path) in text and field in text and "--overwrite" in text, text


def test_a_next_phase_beyond_the_runs_schedule_is_refused_on_resume(tmp_path):
    from peft_deer.run.progress import start_or_resume

    out = tmp_path / "run"
    make_private_dir(out / "server-private")
    loaded = []
    server = SimpleNamespace(spec=SimpleNamespace(releases_per_round=2), load_state_dict=loaded.append)
    settings = SimpleNamespace(output=SimpleNamespace(resume=True), federation=SimpleNamespace(rounds=3),
                               fingerprint=lambda: {"lr": 0.1})  # fmt: skip
    exp = SimpleNamespace(
        settings=settings, server=server, data_sha256={"train": "ab" * 32}, fingerprint=settings.fingerprint
    )
    for step, ok in (((9, 0), False), ((1, 2), False), ((3, 1), False), ((3, 0), True), ((2, 1), True)):
        save_checkpoint(out / CHECKPOINT, _payload() | {"next_phase": step})
        if ok:
            assert start_or_resume(exp, out, main_proc=False).next_phase == step
        else:
            with pytest.raises(DamagedFileError, match=rf"next_phase \({step[0]}, {step[1]}\) is outside this run's 3"):
                start_or_resume(exp, out, main_proc=False)


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


def test_the_run_dir_and_its_files_are_never_group_or_world_writable_under_umask_0(tmp_path, umask_0):
    """Attack item 3: under umask 000 the run dir was 0777 and its files 0666; private files are 0600."""
    from peft_deer.run.progress import append_jsonl, write_jsonl

    out = tmp_path / "run"
    prepare_output_dir(out, False, False)
    assert os.umask(0o022) & 0o022 == 0o022  # the run's umask drops group/world write for every file it makes
    os.umask(0)
    staging = create_staging(out)
    private = make_private_dir(staging / PRIVATE_DIR)
    (private / "old.txt").write_text("from an older version")
    os.chmod(private / "old.txt", 0o666)
    make_private_dir(private)  # an existing private dir: its files are narrowed too
    write_jsonl(staging / "metrics.jsonl", [{"round": 0}])
    (private / "diagnostics.jsonl").write_text("")
    os.chmod(private / "diagnostics.jsonl", 0o666)  # a file left world-writable keeps no old mode
    append_jsonl(private / "diagnostics.jsonl", {"round": 0})
    modes = {p.name: os.stat(p).st_mode & 0o777 for p in (staging, private, *staging.rglob("*"))}
    assert modes == {staging.name: 0o755, PRIVATE_DIR: 0o700, "old.txt": 0o600, "metrics.jsonl": 0o644,
                     "diagnostics.jsonl": 0o600}, modes  # fmt: skip


def test_another_users_private_dir_or_run_dir_is_refused(tmp_path, monkeypatch):
    """Attack item 3: a `server-private/` swapped in by another local user (or a run dir of theirs) is refused,
    and left as it is (no chmod). Here the files are this test's and the run is "another" uid."""
    import peft_deer.run.run_dir as run_dir_mod

    out = tmp_path / "run"
    (out / PRIVATE_DIR).mkdir(parents=True, mode=0o755)
    (out / "metrics.jsonl").write_text("")
    me = os.geteuid()
    monkeypatch.setattr(run_dir_mod.os, "geteuid", lambda: me + 1)
    with pytest.raises(OutputDirError) as err:
        make_private_dir(out / PRIVATE_DIR)
    assert f"belongs to another user (uid {me})" in str(err.value) and "\n" not in str(err.value)
    assert os.stat(out / PRIVATE_DIR).st_mode & 0o777 == 0o755  # not narrowed: never touched
    for resume, overwrite in ((False, True), (True, False)):
        with pytest.raises(OutputDirError, match=f"{out} belongs to another user"):
            prepare_output_dir(out, resume, overwrite)
    monkeypatch.undo()
    assert os.stat(make_private_dir(out / PRIVATE_DIR)).st_mode & 0o777 == 0o700  # this user's: narrowed


def test_the_checkpoint_lives_in_the_private_dir_and_an_old_root_checkpoint_is_not_resumed(tmp_path):
    """Issue 24 item 4: the DP key is never in a file that publishing the run dir minus server-private/ takes."""
    assert Path(CHECKPOINT).parts == (PRIVATE_DIR, "checkpoint.pt") and LEGACY_CHECKPOINT == "checkpoint.pt"
    out = tmp_path / "run"
    out.mkdir()
    (out / LEGACY_CHECKPOINT).write_bytes(b"an older version's")
    assert run_state(out) == "unfinished"
    with pytest.raises(OutputDirError) as err:
        prepare_output_dir(out, True, False)
    assert str(err.value) == (f"{out / LEGACY_CHECKPOINT} was written by an older version (its noise key has 63 "
                              "bits); start again with --overwrite")  # fmt: skip
    with pytest.raises(OutputDirError, match="pass --resume to continue it or --overwrite"):
        prepare_output_dir(out, False, False)
    assert prepare_output_dir(out, False, True) == (out, False)
    make_private_dir(out / PRIVATE_DIR)
    save_checkpoint(out / CHECKPOINT, _payload())
    assert prepare_output_dir(out, True, False) == (out, True)  # the new location resumes
    (out / "summary.json").write_text("{}")
    prepare_output_dir(out, False, True)  # finished: both checkpoints (the DP key) are deleted
    assert not (out / CHECKPOINT).exists() and not (out / LEGACY_CHECKPOINT).exists()


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


@pytest.mark.e2e
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
