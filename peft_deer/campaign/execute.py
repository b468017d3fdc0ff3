"""Running the plan: deer-fed in a subprocess per run (resumed or restarted as its dir says), the linear
probe in this process, one results row per attempt, a progress bar and `campaign.log`.

A run executes the repository's `train/fed.py` when there is one (a checkout), else `python -m
peft_deer.commands.fed` (an installed package); the probe loads torch and scikit-learn on first use.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .grid import Item, Probe, Run
from .report import write_report
from .store import PLOT, REPORT, RESULTS, append_result, launch_flags, utc_now

ROOT = Path(__file__).resolve().parents[2]  # the repository, in a checkout
FED = ROOT / "train" / "fed.py"
_TQDM_LINE = re.compile(r"\d+%\|")


def error_tail(text: str, lines: int = 8) -> str:
    """The last `lines` non-empty lines of a stderr text, without tqdm progress-bar redraws."""
    parts = [p.rstrip() for p in re.split(r"[\r\n]+", text)]
    kept = [p for p in parts if p.strip() and not _TQDM_LINE.search(p)]
    return "\n".join(kept[-lines:])


def _base_row(item: Item) -> dict[str, Any]:
    return {
        "id": item.id,
        "kind": item.kind,
        "method": item.method,
        "dataset": item.dataset,
        "seed": item.seed,
        "label": item.describe(),
        "settings": item.settings,
        "status": "failed",
        "test_final": None,
        "test_best": None,
        "epsilon": None,
        "record_epsilon": None,
        "privacy_level": None,
        "seconds": None,
        "error": None,
    }


def execute_run(run: Run, out: Path) -> dict[str, Any]:
    """Run deer-fed for `run` in a subprocess (HF_HUB_OFFLINE=1) and return its results.jsonl row.

    Console output goes to `out/logs/<id>.stdout|.stderr` (appended, one header per attempt). A
    KeyboardInterrupt is passed on without a row: the run's checkpoint lets the next call resume it.
    """
    out = Path(out).resolve()
    run_dir, logs = out / "runs" / run.id, out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    flags = launch_flags(run_dir)
    driver = [str(FED)] if FED.is_file() else ["-m", "peft_deer.commands.fed"]  # a checkout, or an installed package
    cmd = [
        sys.executable,
        *driver,
        *run.argv(),
        f"--output-dir={run_dir}",
        f"--prefix-cache-dir={out / 'prefix-cache'}",
        *flags,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    stderr_path = logs / f"{run.id}.stderr"
    header = f"\n=== {utc_now()} {' '.join(cmd)}\n"
    t0 = time.perf_counter()
    with open(logs / f"{run.id}.stdout", "a") as stdout, open(stderr_path, "a") as stderr:
        stdout.write(header)
        stderr.write(header)
        stdout.flush()
        stderr.flush()
        start = stderr.tell()  # this attempt's stderr begins here
        returncode = subprocess.run(cmd, stdout=stdout, stderr=stderr, env=env, check=False).returncode
    seconds = time.perf_counter() - t0
    row = {**_base_row(run), "seconds": seconds, "returncode": returncode, "attempt": flags[0][2:] if flags else "new"}
    row["run_dir"] = str(run_dir.relative_to(out))
    summary_path = run_dir / "summary.json"
    if returncode == 0 and summary_path.is_file():
        try:
            return {**row, **_run_outcome(run_dir), "status": "ok", "finished_at": utc_now()}
        except (OSError, ValueError, KeyError, TypeError) as err:
            row["error"] = f"unreadable outputs: {type(err).__name__}: {err}"
    else:
        with open(stderr_path, "rb") as f:
            f.seek(start)
            tail = error_tail(f.read().decode(errors="replace"))
        why = f"killed by signal {-returncode}" if returncode < 0 else f"exit code {returncode}"
        if returncode == 0:
            why = "exit code 0 but no summary.json"
        row["error"] = f"{why}\n{tail}".strip()
    return {**row, "finished_at": utc_now()}


def _run_outcome(run_dir: Path) -> dict[str, Any]:
    """The metrics and guarantee of a finished run dir (summary.json, privacy.json)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    privacy = json.loads((run_dir / "privacy.json").read_text())
    level = summary["privacy_level"]
    val_aucs = validation_aucs(run_dir)
    refit = summary.get("head_refit") or {}
    if refit.get("applied"):  # the final adapter is the refitted one: its validation AUC replaces the last row's
        val_aucs = [*val_aucs, refit["val_auc_after"]]
    return {
        "head_refit": summary.get("head_refit"),
        "val_auc_final": val_aucs[-1] if val_aucs else None,
        "val_auc_best": max(val_aucs) if val_aucs else None,
        "test_final": summary["test"]["final"],
        "test_best": summary["test"].get("best"),
        "epsilon": privacy.get("epsilon") if level in ("client", "client+record") else None,
        "record_epsilon": (privacy.get("record") or {}).get("epsilon_max"),
        "privacy_level": level,
        "train_seconds": _train_seconds(run_dir),
        "rounds_completed": summary.get("rounds_completed"),
        "stopped": summary.get("stopped"),
    }


def _train_seconds(run_dir: Path) -> float | None:
    """The run's training wall time: server-private (it depends on the clients' exact counts), None if absent."""
    path = run_dir / "server-private" / "diagnostics.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sum(r.get("seconds") or 0.0 for r in rows) if rows else None


def validation_aucs(run_dir: Path) -> list[float]:
    """Validation AUC of every evaluated round, in order, from `run_dir/metrics.jsonl` (empty if none)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    aucs = []
    for line in path.read_text().splitlines():
        try:
            auc = json.loads(line).get("val_auc")
        except ValueError:  # a line cut by a crash
            continue
        if isinstance(auc, int | float) and not math.isnan(auc):
            aucs.append(float(auc))
    return aucs


def execute_probe(probe: Probe, out: Path) -> dict[str, Any]:
    """The linear probe, in this process; any error is recorded, not raised."""
    from .probe import linear_probe

    t0 = time.perf_counter()
    row = {**_base_row(probe), "privacy_level": "none"}
    try:
        s = probe.settings
        result = linear_probe(
            s["dataset"],
            model=s["model"],
            image_size=s["image_size"],
            data_dir=s["data_dir"],
            train_subset=s["train_subset"],
            seed=s["seed"],
            cache_dir=Path(out) / "prefix-cache",
            say=tqdm.write,
        )
    except Exception as err:  # noqa: BLE001 -- one failed probe must not stop the campaign
        tail = error_tail(traceback.format_exc(), 4)
        return {**row, "seconds": time.perf_counter() - t0, "error": f"{type(err).__name__}: {err}\n{tail}"}
    keep = ("C", "c_grid", "val_scores", "selection_metric", "image_size", "train_size", "feature_dim")
    return {
        **row,
        "status": "ok",
        "test_final": result["test"],
        "seconds": time.perf_counter() - t0,
        "probe": {k: result[k] for k in keep},
        "finished_at": utc_now(),
    }


def _log_line(k: int, n: int, item: Item, row: Mapping[str, Any]) -> str:
    head = f"[{k}/{n}] {row['status']:6} {item.id} {item.describe()}"
    if row["status"] != "ok":
        last = (row.get("error") or "").strip().splitlines()
        return f"{head}: {last[-1] if last else 'failed'} ({row['seconds']:.0f} s)"
    auc = (row["test_final"] or {}).get("auc")
    eps = row.get("epsilon") if row.get("epsilon") is not None else row.get("record_epsilon")
    return f"{head}: test auc {_fmt(auc)}" + ("" if eps is None else f", eps {eps:.2f}") + f" ({row['seconds']:.0f} s)"


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def run_plan(plan: Sequence[Item], todo: Sequence[Item], out: Path, grid: Path, description: str) -> int:
    """Run `todo` (items of `plan`) in order, appending a row and rewriting the report after each.

    Copies the grid to `out/grid.yaml` (what `--report-only` reads). Returns 0 if every item of `todo` was
    ok, 1 if one failed, 130 on Ctrl-C (the interrupted run resumes on the next call).
    """
    out.mkdir(parents=True, exist_ok=True)
    (out / "grid.yaml").write_text(Path(grid).read_text())
    write_report(out, len(plan), description)
    failures = 0
    bar = tqdm(todo, desc="campaign", unit="run", disable=not todo)
    for k, item in enumerate(bar, 1):
        bar.set_postfix_str(item.id)
        try:
            row = execute_probe(item, out) if isinstance(item, Probe) else execute_run(item, out)
        except KeyboardInterrupt:
            bar.close()
            print(f"interrupted during {item.id}: run the same command again to continue (interrupted runs resume)")
            return 130
        append_result(out, row)
        failures += row["status"] != "ok"
        line = _log_line(k, len(todo), item, row)
        tqdm.write(line)
        with open(out / "campaign.log", "a") as log:
            log.write(f"{utc_now()} {line}\n")
        write_report(out, len(plan), description)
    bar.close()
    print(f"results: {out / RESULTS}; table: {out / REPORT}; plot: {out / PLOT}")
    return 1 if failures else 0
