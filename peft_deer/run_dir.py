"""The output directory of a run: created atomically, never clobbered, one consistent hint per state.

A new run is built in a hidden sibling, `.<name>.partial`, and renamed to `--output-dir` once its first
checkpoint is written (or, for a run that ends before one, once its outputs are). So an output dir that
exists holds either a resumable run (`checkpoint.pt`) or a finished one (`summary.json`): a run killed or
failing before its first checkpoint leaves only the hidden staging dir, which the next start removes.
`--overwrite` keeps the old run until the new one is published in its place.

One run at a time per output dir: `lock_output_dir` holds an exclusive `flock` on `.<name>.lock` next to it
for the life of the process (the kernel drops it when the process dies, so a killed run's lock is taken
over, with a note). The lock file names its holder (pid, host, start time) for the refusal's one line.

Only the standard library: the drivers check the output dir before loading torch.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

CHECKPOINT = "checkpoint.pt"
SUMMARY = "summary.json"
# What marks a directory as a peft_deer run (metrics.jsonl: runs of older versions, stopped before a checkpoint).
RUN_FILES = (CHECKPOINT, SUMMARY, "metrics.jsonl")


class OutputDirError(ValueError):
    """The output dir cannot be used as asked; the message is one line with the fix."""


def staging_dir(out: Path) -> Path:
    """Where a new run is built until it is published: `.<name>.partial` next to `out`."""
    out = Path(os.path.abspath(out))
    return out.parent / f".{out.name}.partial"


def lock_path(out: Path) -> Path:
    """The lock file of `out`: `.<name>.lock` next to it (the output dir itself is renamed into place)."""
    out = Path(os.path.abspath(out))
    return out.parent / f".{out.name}.lock"


_HELD: dict[Path, int] = {}  # lock file -> open descriptor holding its flock, for the life of this process


def _holder_text(info: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started {started}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
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
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as err:
        raise OutputDirError(f"cannot create the lock file {path} ({err.strerror or err}); choose a writable "
                             "--output-dir") from None  # fmt: skip
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
    if old.get("pid") and old.get("host") == socket.gethostname() and not _pid_alive(int(old["pid"])):
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
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return  # nobody holds it (rank 0 takes it in a moment)
        except OSError:
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


def _read_lock(fd: int) -> dict:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def make_private_dir(path: Path) -> Path:
    """`path` as an owner-only (0700) directory, created so (never readable by others), whatever the umask."""
    path = Path(path)
    if path.is_symlink():
        raise OutputDirError(f"{path} is a symbolic link; refusing to write server-private files through it")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    os.chmod(path, 0o700)  # mkdir's mode is masked by the umask (only ever narrower); an existing dir is narrowed
    return path


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
    if (out / CHECKPOINT).is_file():
        return "unfinished"
    return "unstarted" if any((out / f).exists() for f in RUN_FILES) else "foreign"


def prepare_output_dir(output_dir: str | Path, resume: bool, overwrite: bool) -> tuple[Path, bool]:
    """Check `output_dir` against --resume/--overwrite before anything is written; (it, whether to resume).

    Raises `OutputDirError` with one line naming the state and the fix (`check_output_state`). A stale staging
    dir (a run that stopped before its first checkpoint) is removed; `--resume` of such a run starts it from
    the beginning (nothing of it was kept): then the returned resume is False.
    """
    out = Path(output_dir)
    if run_state(out) == "finished":
        # killed between writing summary.json and deleting the checkpoint: that file holds the DP secret
        (out / CHECKPOINT).unlink(missing_ok=True)
    resume = check_output_state(out, resume, overwrite)
    staging = staging_dir(out)
    if staging.is_dir():
        shutil.rmtree(staging)
    return out, resume


def check_output_state(output_dir: str | Path, resume: bool, overwrite: bool) -> bool:
    """`prepare_output_dir`'s checks alone, changing nothing (the drivers run them before anything heavy):
    OutputDirError with one line naming the state and the fix, else whether the run resumes."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"--output-dir {out} is a file, not a directory; choose a directory path")
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
    try:
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
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
