"""The campaign's records: `results.jsonl` (one line per finished attempt) and what each planned item's
state is (done, failed, resume, restart, new) from that file and its run dir.

Light: standard library and peft_deer's light modules only.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

# peft_deer's modules (main's paths; the re-layout moves io and run_dir), in one place:
from ..run.io import dumps_strict
from ..run.run_dir import CHECKPOINT
from .grid import Item, Run

RESULTS, REPORT, PLOT = "results.jsonl", "RESULTS.md", "auc_vs_epsilon.png"


def utc_now() -> str:
    """The time stamp of results rows, RESULTS.md and campaign.log (UTC, seconds)."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def read_results(out: Path) -> list[dict[str, Any]]:
    """The rows of `out/results.jsonl` in order; an unreadable line (a crash mid-write) is skipped."""
    path = Path(out) / RESULTS
    rows = []
    if path.is_file():
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                print(f"campaign: warning: {path}:{n} is not JSON; ignored", file=sys.stderr)
    return rows


def latest_by_id(rows: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per id, its last ok row, else its last row (the order of first appearance is kept)."""
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        old = out.get(row["id"])
        if old is None or row.get("status") == "ok" or old.get("status") != "ok":
            out[row["id"]] = dict(row)
    return out


def append_result(out: Path, row: Mapping[str, Any]) -> None:
    """Append one row to `out/results.jsonl` (strict JSON, fsynced: a crash loses at most the line being written)."""
    with open(Path(out) / RESULTS, "a") as f:
        f.write(dumps_strict(row, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def item_state(item: Item, out: Path, latest: Mapping[str, Mapping[str, Any]]) -> str:
    """done | failed | resume | restart | new: what the next campaign call does with `item`."""
    row = latest.get(item.id)
    if row is not None and row.get("status") == "ok":
        return "done"
    if isinstance(item, Run):
        flags = launch_flags(Path(out) / "runs" / item.id)
        if flags == ["--resume"]:
            return "resume"
        if row is None and flags:
            return "restart"
    return "failed" if row is not None else "new"


def launch_flags(run_dir: Path) -> list[str]:
    """deer-fed flags for a run dir: continue an interrupted run, replace a stale dir, or none for a new one."""
    if (run_dir / CHECKPOINT).is_file() and not (run_dir / "summary.json").is_file():
        return ["--resume"]
    if run_dir.is_dir() and any(run_dir.iterdir()):
        return ["--overwrite"]
    return []
