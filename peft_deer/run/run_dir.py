"""The output directory of a run: created atomically, never clobbered, one consistent hint per state.

A new run is built in a hidden sibling, `.<name>.partial`, and renamed to `--output-dir` once its first
checkpoint is written (or, for a run that ends before one, once its outputs are). So an output dir that
exists holds either a resumable run (`server-private/checkpoint.pt`) or a finished one (`summary.json`): a run killed or
failing before its first checkpoint leaves only the hidden staging dir, which the next start removes.
`--overwrite` keeps the old run until the new one is published in its place.

One run at a time per output dir: `lock_output_dir` holds an exclusive `flock` on `.<name>.lock` next to it
for the life of the process (the kernel drops it when the process dies, so a killed run's lock is taken
over, with a note). The lock file names its holder (pid, host, start time) for the refusal's one line. The
lock is keyed on the resolved path (`os.path.realpath`): a symbolic link aliasing the output dir shares its lock.

Files of other users are never trusted: a run dir that another user owns, or a `server-private/` that another
user owns or that is a symbolic link, is refused. A run creates nothing group- or world-writable whatever the
umask (the process's umask gains 022), and `server-private/` (0700, its files 0600) holds the checkpoint with
the run's DP secret, so a run dir published without `server-private/` never carries the key.

Only the standard library: the drivers check the output dir before loading torch.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import socket
import stat
import sys
import time
from pathlib import Path

# The run directory's own names (`peft_deer.run.files` lists them with the rest of the run's files). This module
# imports nothing of the package: a lock holder loads it as a lone file.
PRIVATE_DIR = "server-private"  # owner-only: un-noised per-client diagnostics and the checkpoint (the DP secret)
CHECKPOINT = f"{PRIVATE_DIR}/checkpoint.pt"
LEGACY_CHECKPOINT = "checkpoint.pt"  # where older versions kept it (with a 63-bit noise key): never resumed
SUMMARY = "summary.json"
METRICS = "metrics.jsonl"  # one public row per validated round
# What marks a directory as a peft_deer run (metrics.jsonl: runs of older versions, stopped before a checkpoint).
RUN_FILES = (CHECKPOINT, LEGACY_CHECKPOINT, SUMMARY, METRICS)


class OutputDirError(ValueError):
    """The output dir cannot be used as asked; the message is one line with the fix."""


def staging_dir(out: Path) -> Path:
    """Where a new run is built until it is published: `.<name>.partial` next to `out`."""
    out = Path(os.path.abspath(out))
    return out.parent / f".{out.name}.partial"


def lock_path(out: Path) -> Path:
    """The lock file of `out`: `.<name>.lock` next to it (the output dir itself is renamed into place), keyed on
    the resolved path: any alias of the dir (a symbolic link to it or to a folder above it) has the same lock."""
    out = Path(os.path.realpath(out))
    return out.parent / f".{out.name}.lock"


LOCK_RECORD_WAIT_S = 10.0  # how long another rank waits for rank 0's lock record (a loaded machine is slow)
_HELD: dict[Path, int] = {}  # lock file -> open descriptor holding its flock, for the life of this process


def _holder_text(info: dict) -> str:
    """'pid P on HOST, started TIME' from a checked lock record; '?' / 'at an unknown time' for what it lacks."""
    started = "at an unknown time"
    if info.get("started") is not None:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"]))
    return f"pid {info.get('pid') or '?'} on {info.get('host') or '?'}, started {started}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def lock_output_dir(out: Path, launch: str | None = None, say=None) -> None:
    """Take the exclusive lock on `out` for this process (again: no-op); OutputDirError naming the holder.

    `launch` identifies one multi-process launch (its processes share the lock its rank 0 takes: see
    `check_output_lock`). A lock file naming a process gone from this host is taken over with a note to `say`
    (stderr by default). The lock is released when the process exits (or by `release_output_lock`).
    """
    path = lock_path(out)
    if path in _HELD:
        return
    if path.is_symlink():
        raise OutputDirError(f"{path} is a symbolic link; remove it (a run's lock file is a plain file)")
    _check_plain_lock(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError as err:
        raise OutputDirError(f"cannot create the lock file {path} ({err.strerror or err}); choose a writable "
                             "--output-dir") from None  # fmt: skip
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped in after the check above
        os.close(fd)
        raise OutputDirError(f"{path} is not a plain file (a run's lock file is one); remove it and start again")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        info = _read_lock(fd)
        os.close(fd)
        raise OutputDirError(
            f"{out} is in use by another run ({_holder_text(info)}; lock {path}); wait for it to end or choose "
            "another --output-dir"
        ) from None
    old = _read_lock(fd)
    if old.get("pid") and old.get("host") == socket.gethostname() and not _pid_alive(old["pid"]):
        (say or (lambda m: print(m, file=sys.stderr)))(
            f"note: took over the lock of {out} from a run that is gone ({_holder_text(old)})"
        )
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "launch": launch}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    _HELD[path] = fd


def check_output_lock(out: Path, launch: str) -> None:
    """For a process other than rank 0 of a launch: OutputDirError if another launch holds the lock of `out`."""
    path = lock_path(out)
    if not path.is_file() or path.is_symlink():
        return
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return  # gone or swapped since the check: rank 0's own lock attempt names the problem
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return  # nobody holds it (rank 0 takes it in a moment)
        except OSError:
            info = _read_lock(fd)
        # rank 0 writes its record just after taking the lock: until then the file is empty or still names the
        # previous run, so a record naming another launch is read again for a while before it counts
        deadline = time.monotonic() + LOCK_RECORD_WAIT_S
        while info.get("launch") != launch and time.monotonic() < deadline:
            time.sleep(0.05)
            info = _read_lock(fd)
    finally:
        os.close(fd)
    if info.get("launch") != launch:
        raise OutputDirError(f"{out} is in use by another run ({_holder_text(info)}; lock {path}); wait for it "
                             "to end or choose another --output-dir")  # fmt: skip


def release_output_lock(out: Path) -> None:
    """Release this process's lock on `out` (if held); the (emptied) lock file stays: unlinking it would race."""
    fd = _HELD.pop(lock_path(out), None)
    if fd is not None:
        os.ftruncate(fd, 0)
        os.close(fd)


def _check_plain_lock(path: Path) -> None:
    """OutputDirError if something other than a plain file (a FIFO, a directory, a device) sits at `path`."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        raise OutputDirError(f"{path} is not a plain file (a run's lock file is one); remove it and start again")


def _read_lock(fd: int) -> dict:
    """The lock record at `fd` with only well-formed fields: pid (a positive int), host (str), started (a time
    `time.localtime` can show), launch (str); a field that is missing or malformed (a tampered file) is dropped."""
    try:
        raw = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (ValueError, OSError):
        return {}
    if not isinstance(raw, dict):
        return {}
    info: dict = {}
    pid, started = raw.get("pid"), raw.get("started")
    if type(pid) is int and 0 < pid < 2**31:
        info["pid"] = pid
    for key in ("host", "launch"):
        if isinstance(raw.get(key), str):
            info[key] = raw[key][:200]
    if type(started) in (int, float) and math.isfinite(started) and 0 < started < 2**40:
        info["started"] = float(started)
    return info


def no_group_world_write() -> None:
    """Add 022 to this process's umask: nothing a run creates from now on is group- or world-writable."""
    os.umask(os.umask(0o022) | 0o022)


def check_owned(path: Path, what: str, follow: bool = False) -> None:
    """OutputDirError (one line) if `path` is another user's or (unless `follow`: then its target is checked) a
    symbolic link: a run never writes through it."""
    try:
        info = os.stat(path) if follow else os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(info.st_mode):
        raise OutputDirError(f"{path} is a symbolic link; refusing to write {what} through it")
    if info.st_uid != os.geteuid():
        raise OutputDirError(f"{path} belongs to another user (uid {info.st_uid}); refusing to write {what} into "
                             "it: remove it or choose another --output-dir")  # fmt: skip


def make_private_dir(path: Path) -> Path:
    """`path` as an owner-only (0700) directory of this user, its files 0600, whatever the umask.

    OutputDirError if it is a symbolic link or belongs to another user (swapped in through a writable parent).
    """
    path = Path(path)
    check_owned(path, "server-private files")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as err:
        raise OutputDirError(f"{path} cannot be used as the server-private dir ({err.strerror or err})") from None
    try:
        if os.fstat(fd).st_uid != os.geteuid():  # swapped between the check and the open
            check_owned(path, "server-private files")
            raise OutputDirError(f"{path} changed while it was checked; remove it and start again")
        os.fchmod(fd, 0o700)  # mkdir's mode is masked by the umask (only ever narrower); an existing dir is narrowed
        for entry in os.scandir(fd):
            if entry.is_file(follow_symlinks=False):
                os.chmod(entry.name, 0o600, dir_fd=fd)  # a plain file in a dir only this user can change
    finally:
        os.close(fd)
    return path


def _narrow(path: Path) -> None:
    """Drop group and world write from a directory of this user (a run dir made under umask 000)."""
    mode = os.lstat(path).st_mode
    if mode & 0o022:
        os.chmod(path, stat.S_IMODE(mode) & ~0o022)


def live_dir(out: Path) -> Path:
    """Where the run's files go now: its staging dir until it is published, then `out`."""
    staging = staging_dir(out)
    return staging if staging.is_dir() else Path(out)


def run_state(out: Path) -> str:
    """'absent' (or empty), 'finished', 'unfinished' (resumable), 'unstarted' (a run without a checkpoint)
    or 'foreign' (a non-empty directory that is not a peft_deer run)."""
    if not out.is_dir() or not any(out.iterdir()):
        return "absent"
    if (out / SUMMARY).is_file():
        return "finished"
    if (out / CHECKPOINT).is_file() or (out / LEGACY_CHECKPOINT).is_file():
        return "unfinished"
    return "unstarted" if any((out / f).exists() for f in RUN_FILES) else "foreign"


def prepare_output_dir(output_dir: str | Path, resume: bool, overwrite: bool) -> tuple[Path, bool]:
    """Check `output_dir` against --resume/--overwrite before anything is written; (it, whether to resume).

    Raises `OutputDirError` with one line naming the state and the fix (`check_output_state`). A stale staging
    dir (a run that stopped before its first checkpoint) is removed; `--resume` of such a run starts it from
    the beginning (nothing of it was kept): then the returned resume is False.
    """
    out = Path(output_dir)
    no_group_world_write()
    if run_state(out) == "finished":
        # killed between writing summary.json and deleting the checkpoint: that file holds the DP secret
        (out / CHECKPOINT).unlink(missing_ok=True)
        (out / LEGACY_CHECKPOINT).unlink(missing_ok=True)
    resume = check_output_state(out, resume, overwrite)
    staging = staging_dir(out)
    if staging.is_dir():
        shutil.rmtree(staging)
    if resume:
        _narrow(out)  # made by an older version under umask 000
    return out, resume


def check_output_state(output_dir: str | Path, resume: bool, overwrite: bool) -> bool:
    """`prepare_output_dir`'s checks alone, changing nothing (the drivers run them before anything heavy):
    OutputDirError with one line naming the state and the fix, else whether the run resumes."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"--output-dir {out} is a file, not a directory; choose a directory path")
    check_owned(out, "a run", follow=True)  # an alias (symbolic link) of one's own dir is fine: the lock resolves it
    state, staging = run_state(out), staging_dir(out)
    check_not_symlink(staging)
    hint = {
        "finished": f"{out} holds a finished run; pass --overwrite to replace it or choose another --output-dir",
        "unfinished": f"{out} holds an unfinished run; pass --resume to continue it or --overwrite to start again",
        "unstarted": f"{out} holds a run that stopped before its first checkpoint (nothing to resume); pass "
        "--overwrite to start it again",
        "foreign": f"{out} is not empty and holds no peft_deer run; choose another --output-dir",
    }
    if state == "foreign":
        raise OutputDirError(hint[state])
    if resume:
        if state == "unfinished" and not (out / CHECKPOINT).is_file():
            raise OutputDirError(f"{out / LEGACY_CHECKPOINT} was written by an older version (its noise key has 63 "
                                 "bits); start again with --overwrite")  # fmt: skip
        if state == "finished":
            raise OutputDirError(f"{out} holds a finished run: nothing to resume; pass --overwrite to replace it")
        if state == "unstarted":
            raise OutputDirError(hint[state])
        if state == "absent":
            if not staging.is_dir():
                raise OutputDirError(f"--resume given but {out} holds no run; drop --resume to start one")
            resume = False  # it stopped before its first checkpoint: starting again is the same run
    elif state != "absent" and not overwrite:
        raise OutputDirError(hint[state])
    return resume


def check_not_symlink(staging: Path) -> None:
    """OutputDirError if the staging dir is a symbolic link (a run would write, or delete, through it)."""
    if staging.is_symlink():
        raise OutputDirError(
            f"{staging} is a symbolic link, not a staging dir of a run; remove it (nothing is written through it)"
        )


def create_staging(out: Path) -> Path:
    """An empty staging dir for a new run of `out` (parents created); OutputDirError if that fails."""
    staging = staging_dir(out)
    check_not_symlink(staging)
    no_group_world_write()
    try:
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True, mode=0o755)
        _narrow(staging)
    except OSError as err:
        raise OutputDirError(
            f"--output-dir {out} cannot be created ({err.strerror or err}); choose a writable directory"
        ) from None
    return staging


def publish(out: Path) -> None:
    """Move the staging dir (if any) to `out`; an old run there (--overwrite) is removed only now."""
    staging = staging_dir(out)
    if not staging.is_dir():
        return
    out = Path(out)
    if out.is_dir() and any(out.iterdir()):
        replaced = staging.with_name(staging.name.replace(".partial", ".replaced"))
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(out, replaced)
        os.replace(staging, out)
        shutil.rmtree(replaced, ignore_errors=True)
    else:
        os.replace(staging, out)  # onto nothing or an empty directory: one rename


def remove_temp_files(run_dir: Path) -> None:
    """Remove what a killed atomic write left behind in `run_dir` and its subfolders (`*.tmp` files and dirs)."""
    for path in sorted(Path(run_dir).rglob("*.tmp"), reverse=True):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
