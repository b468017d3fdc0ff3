"""Where a run stands: its progress between phases and across a resume, and the start of its run directory.

`start_or_resume` either restores the server and progress from the checkpoint (`--resume`, refused
with `SettingsMismatch` if the settings or the data differ) or creates the staging dir with the run's first
outputs: example images, and, server-private, the per-client label counts.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..data import format_label_table, label_count_table, plot_label_counts
from .checkpoint import DamagedFileError, SettingsMismatch, check_resume, load_checkpoint
from .experiment import Experiment
from .io import dumps_strict, write_json_atomic
from .run_dir import CHECKPOINT, PRIVATE_DIR, create_staging, live_dir, make_private_dir

__all__ = [
    "PRIVATE_DIR",
    "RunProgress",
    "SettingsMismatch",
    "append_jsonl",
    "new_round_acc",
    "save_example_images",
    "start_or_resume",
    "write_jsonl",
]


def save_example_images(split, out_dir: Path, per_class: int = 2) -> list[dict[str, Any]]:
    """A few test images per class as PNGs (the demo's one-click examples)."""
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for c, name in enumerate(split.class_names):
        for j, i in enumerate(np.flatnonzero(split.labels == c)[:per_class]):
            img = split.images[i]
            file = out_dir / f"{c}_{j}.png"
            Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(file)
            rows.append({"file": file.name, "label": int(c), "class_name": name})
    write_json_atomic(out_dir / "examples.json", rows)
    return rows


@dataclass
class RunProgress:
    """What the phase loop carries between phases and across a resume."""

    next_phase: tuple[int, int] = (0, 0)
    rows: list[dict] = field(default_factory=list)  # one metrics.jsonl row per finished round (public)
    best: dict | None = None  # {"score", "round", "state"} of the best validated round
    round_acc: dict = field(default_factory=lambda: new_round_acc())
    private_rows: list[dict] = field(default_factory=list)  # server-private/diagnostics.jsonl rows


def new_round_acc() -> dict:
    """What a round's phases add up for its diagnostics (all of it computed from client data, un-noised)."""
    return {"loss": 0.0, "images": 0, "seconds": 0.0, "update_norms": [], "participants": []}


def _open_rows(path: Path, flags: int):
    """`path` opened for writing: 0600 in `server-private/`, else 0644, whatever the umask or its old mode."""
    mode = 0o600 if path.parent.name == PRIVATE_DIR else 0o644
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | flags, mode)
    os.fchmod(fd, mode)
    return os.fdopen(fd, "w")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write `rows` as strict JSON lines to `path` (replacing it)."""
    with _open_rows(path, os.O_TRUNC) as f:
        f.writelines(dumps_strict(r) + "\n" for r in rows)


def append_jsonl(path: Path, row: dict) -> None:
    """Append one strict JSON line to `path`."""
    with _open_rows(path, os.O_APPEND) as f:
        f.write(dumps_strict(row) + "\n")


def start_or_resume(exp: Experiment, out: Path, main_proc: bool = True, say: Callable = print) -> RunProgress:
    """Restore the server and progress from the checkpoint (--resume), else create the run's staging dir
    (`peft_deer.run.run_dir`) with its first outputs.

    Raises `SettingsMismatch` if the checkpoint was written with other settings, `DamagedFileError` if it
    cannot be read, `OutputDirError` if the run dir cannot be created (each a one-line ValueError).
    """
    settings = exp.settings
    if settings.output.resume:
        ckpt = load_checkpoint(out / CHECKPOINT)
        check_resume(out / CHECKPOINT, ckpt, exp.fingerprint(), exp.data_sha256)
        try:
            exp.server.load_state_dict(ckpt["server"])
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise SettingsMismatch(
                f"{out / CHECKPOINT} does not fit this run ({type(err).__name__}: {str(err)[:100]}); pass --overwrite "
                "to start again"
            ) from None
        rounds, per_round = settings.federation.rounds, exp.server.spec.releases_per_round
        step = ckpt["next_phase"]
        if not (step == (rounds, 0) or (step[0] < rounds and step[1] < per_round)):
            raise DamagedFileError(
                f"{out / CHECKPOINT} is damaged (next_phase {step} is outside this run's {rounds} rounds of "
                f"{per_round} phases); the run cannot continue from it: pass --overwrite to start the run again"
            )
        progress = RunProgress(step, ckpt["rows"], ckpt["best"], ckpt["round_acc"], ckpt["private_rows"])
    else:
        progress = RunProgress()
        if main_proc:
            run_dir = create_staging(out)
            exp.save_base_model(run_dir)
            # Per-client label counts are client statistics: server-private (0700), and printed only without DP.
            private = make_private_dir(run_dir / PRIVATE_DIR)
            splits = exp.data.splits
            label_rows = label_count_table(exp.data.train_labels, exp.data.partitions, splits.class_names)
            table = format_label_table(label_rows)
            (private / "label_counts.txt").write_text(table + "\n")
            write_json_atomic(private / "label_counts.json", label_rows)
            plot_label_counts(label_rows, splits.class_names, private / "label_counts.png")
            save_example_images(splits.test, run_dir / "examples")
            if settings.privacy.dp == "none":
                say(table)
    if main_proc:
        run_dir = live_dir(out)
        make_private_dir(run_dir / PRIVATE_DIR)
        write_jsonl(run_dir / "metrics.jsonl", progress.rows)
        write_jsonl(run_dir / PRIVATE_DIR / "diagnostics.jsonl", progress.private_rows)
    return progress
