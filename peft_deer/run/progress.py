"""Where a run stands: its progress between phases and across a resume, and the start of its run directory.

`start_or_resume` either restores the server and progress from the checkpoint (`--resume`, refused
with `SettingsMismatch` if the settings or the data differ) or creates the staging dir with the run's first
outputs: example images, and, server-private, the per-client label counts.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..data import format_label_table, label_count_table, plot_label_counts
from ..federated import AdapterState, ClientUpdate, PhaseRelease
from .checkpoint import DamagedFileError, SettingsMismatch, check_resume, load_checkpoint
from .experiment import Experiment
from .files import BEST_KEYS, DIAGNOSTICS, METRICS, ROUND_TOTALS_KEYS
from .io import dumps_strict, write_json_atomic
from .run_dir import CHECKPOINT, PRIVATE_DIR, create_staging, live_dir, make_private_dir

__all__ = [
    "PRIVATE_DIR",
    "BestRound",
    "RoundTotals",
    "RunProgress",
    "SettingsMismatch",
    "append_jsonl",
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
class RoundTotals:
    """What a round's phases add up for its diagnostics (all of it computed from client data, un-noised)."""

    loss: float = 0.0  # sum of mean loss x images over the round's updates
    images: int = 0
    seconds: float = 0.0  # wall time of the round's phases
    update_norms: list[float] = field(default_factory=list)  # per phase: the release's mean update norm
    participants: list[int] = field(default_factory=list)  # per phase: how many clients took part

    def add(self, updates: list[ClientUpdate], release: PhaseRelease, seconds: float) -> None:
        """Count one phase: its client updates (`images_seen` 0: the site kept its statistics) and release."""
        self.seconds += seconds
        self.images += sum(u.images_seen for u in updates)
        self.loss += sum(u.mean_loss * u.images_seen for u in updates if u.images_seen)
        self.update_norms.append(release.mean_update_norm)
        self.participants.append(len(release.participants))

    def state_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, list) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> RoundTotals:
        return cls(**{k: list(state[k]) if isinstance(state[k], list) else state[k] for k in ROUND_TOTALS_KEYS})


@dataclass(frozen=True)
class BestRound:
    """The best validated round so far: its score (AUC, else accuracy), round and global adapter state."""

    score: float
    round: int
    state: AdapterState

    def state_dict(self) -> dict[str, Any]:
        return {"score": self.score, "round": self.round, "state": dict(self.state)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any] | None) -> BestRound | None:
        return None if state is None else cls(*(state[k] for k in BEST_KEYS))


@dataclass
class RunProgress:
    """What the phase loop carries between phases and across a resume (`state_dict` is the checkpoint's part)."""

    next_phase: tuple[int, int] = (0, 0)
    rows: list[dict] = field(default_factory=list)  # one metrics.jsonl row per finished round (public)
    best: BestRound | None = None  # the best validated round
    round_totals: RoundTotals = field(default_factory=RoundTotals)  # the current round's phases so far
    private_rows: list[dict] = field(default_factory=list)  # server-private/diagnostics.jsonl rows

    def state_dict(self) -> dict[str, Any]:
        """The progress as the checkpoint stores it (`files.PROGRESS_KEYS`, the keys of every earlier version)."""
        return {
            "next_phase": tuple(self.next_phase),
            "rows": list(self.rows),
            "best": None if self.best is None else self.best.state_dict(),
            "round_acc": self.round_totals.state_dict(),
            "private_rows": list(self.private_rows),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.next_phase = tuple(state["next_phase"])
        self.rows = list(state["rows"])
        self.best = BestRound.from_state_dict(state["best"])
        self.round_totals = RoundTotals.from_state_dict(state["round_acc"])
        self.private_rows = list(state["private_rows"])

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> RunProgress:
        progress = cls()
        progress.load_state_dict(state)
        return progress


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
        progress = RunProgress.from_state_dict(ckpt)
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
        write_jsonl(run_dir / METRICS, progress.rows)
        write_jsonl(run_dir / DIAGNOSTICS, progress.private_rows)
    return progress
