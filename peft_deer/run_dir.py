"""The output directory of a run: created atomically, never clobbered, one consistent hint per state.

A new run is built in a hidden sibling, `.<name>.partial`, and renamed to `--output-dir` once its first
checkpoint is written (or, for a run that ends before one, once its outputs are). So an output dir that
exists holds either a resumable run (`checkpoint.pt`) or a finished one (`summary.json`): a run killed or
failing before its first checkpoint leaves only the hidden staging dir, which the next start removes.
`--overwrite` keeps the old run until the new one is published in its place.

Only the standard library: the drivers check the output dir before loading torch.
"""

from __future__ import annotations

import os
import shutil
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

    Raises `OutputDirError` with one line naming the state and the fix. A stale staging dir (a run that
    stopped before its first checkpoint) is removed; `--resume` of such a run starts it from the
    beginning (nothing of it was kept): then the returned resume is False.
    """
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"--output-dir {out} is a file, not a directory; choose a directory path")
    state, staging = run_state(out), staging_dir(out)
    hint = {
        "finished": f"{out} holds a finished run; pass --overwrite to replace it or choose another --output-dir",
        "unfinished": f"{out} holds an unfinished run; pass --resume to continue it or --overwrite to start again",
        "unstarted": f"{out} holds a run that stopped before its first checkpoint (nothing to resume); pass "
        "--overwrite to start it again",
        "foreign": f"{out} is not empty and holds no peft_deer run; choose another --output-dir",
    }
    if state == "foreign":
        raise OutputDirError(hint[state])
    if state == "finished":
        # killed between writing summary.json and deleting the checkpoint: that file holds the DP secret
        (out / CHECKPOINT).unlink(missing_ok=True)
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
    if staging.is_dir():
        shutil.rmtree(staging)
    return out, resume


def create_staging(out: Path) -> Path:
    """An empty staging dir for a new run of `out` (parents created); OutputDirError if that fails."""
    staging = staging_dir(out)
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
