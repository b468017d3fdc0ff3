"""A results campaign: `deer-fed` runs over a grid of settings and seeds, kept in one table.

    python bench/campaign.py --grid bench/grids/cpu.yaml --out runs/campaign-cpu --dry-run
    python bench/campaign.py --grid bench/grids/cpu.yaml --out runs/campaign-cpu [--max-runs N]
    python bench/campaign.py --out runs/campaign-cpu --report-only

(`deer-campaign ...` is the same command, installed with `pip install 'peft-deer[train]'`.)

A grid (YAML) holds:

- `base`: deer-fed settings, named as the flags of `python train/fed.py --help` ('-' or '_');
- `vary`: setting -> list of values; the runs are the Cartesian product of the lists. A value may be a
  mapping of settings merged into the run, under any name: `privacy: [{dp: none}, {dp: client, epsilon: 8}]`;
- `seeds`: list of seeds (default [0]); every run of the product is repeated per seed, unless
- `seeds_for`: list of conditions ({setting: value}); then only runs that meet one of them get every
  seed, the others the first seed only ("3 seeds for the no-DP and eps=8 cells, 1 elsewhere");
- `extra`: additional runs, each a mapping of settings merged over `base` (seeded like the product;
  an explicit `seed` pins one seed);
- `probe`: list of {dataset, image-size, model} (also data-dir, train-subset, seed) for which a centralized
  linear probe on frozen features is computed (`peft_deer.campaign.probe`); model, image-size, data-dir and
  train-subset default to `base`'s, seed to the first seed;
- `description`: free text, copied into RESULTS.md.

Every run's flags are checked by deer-fed's own parser and checks (`peft_deer.settings.parse_args`)
before anything runs; relative paths (data-dir) are read from the directory the campaign is started in.
A run's id is a hash of its settings that differ from deer-fed's defaults (seed included), so the same
run written two ways is one run, and a new deer-fed flag does not invalidate finished runs.

Outputs in `--out DIR`:

- `runs/<id>/`: each run's deer-fed output dir; `logs/<id>.stdout|.stderr`: its console output;
- `prefix-cache/`: frozen-prefix features (`--prefix-cache-dir`) and linear-probe features, shared by
  runs with the same backbone, resolution and dataset;
- `results.jsonl`: one line per finished attempt: {id, method, dataset, seed, settings, status (ok or
  failed), test_final, test_best (test metrics of the final / best-on-validation adapter), epsilon
  (client-level, from privacy.json), record_epsilon (privacy.json's record.epsilon_max), privacy_level,
  seconds (wall, incl. start-up), train_seconds, error (last stderr lines of a failed run), ...};
- `RESULTS.md` and `auc_vs_epsilon.png`, rewritten after every run (and by `--report-only`).

Resuming: a run with an ok line is skipped; a failed one is tried again (unless --no-retry-failed);
an interrupted run (its dir holds checkpoint.pt) continues with deer-fed's --resume; any other
non-empty run dir (no checkpoint yet, or a finished run whose line was deleted) is rerun with --overwrite.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from .grid import GridError, expand_grid, load_grid
from .store import RESULTS, item_state, latest_by_id, read_results


def build_arg_parser(prog: str = "deer-campaign") -> argparse.ArgumentParser:
    """The campaign's flags; `--help` shows this module's docstring."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", help="grid YAML (base, vary, seeds, seeds_for, extra, probe)")
    p.add_argument("--out", required=True, help="campaign folder: runs/, results.jsonl, RESULTS.md, ...")
    p.add_argument("--dry-run", action="store_true", help="check every run's settings and list the runs; run none")
    p.add_argument("--max-runs", type=int, default=None, help="stop after this many runs (and probes) in this call")
    p.add_argument("--report-only", action="store_true", help="only rewrite RESULTS.md and the plot from results.jsonl")
    p.add_argument(
        "--retry-failed",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run again the runs whose last attempt failed (default: yes)",
    )
    return p


def main(argv: Sequence[str] | None = None, prog: str = "deer-campaign") -> int:
    """Run (or list, or report) a campaign; 0 when every run of this call is ok, 1 if one failed, 2 on bad input."""
    args = build_arg_parser(prog).parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the in-process linear probe
    out = Path(args.out)
    if args.max_runs is not None and args.max_runs < 0:
        print(f"campaign: error: --max-runs {args.max_runs} must be >= 0", file=sys.stderr)
        return 2
    if args.report_only:
        if not (out / RESULTS).is_file():
            print(f"campaign: error: {out / RESULTS} does not exist: nothing to report", file=sys.stderr)
            return 2
        planned, description = None, ""
        with contextlib.suppress(GridError):  # the grid copied by the last campaign call, if still valid
            grid = load_grid(out / "grid.yaml")
            description, planned = str(grid.get("description") or ""), len(expand_grid(grid))
        from .report import write_report  # matplotlib loads when the plot is drawn

        md, png = write_report(out, planned, description)
        print(f"wrote {md} and {png}")
        return 0
    if not args.grid:
        print("campaign: error: --grid is required (except with --report-only)", file=sys.stderr)
        return 2
    try:
        grid = load_grid(args.grid)
        plan = expand_grid(grid, f"grid {args.grid}")
    except GridError as err:
        print(f"campaign: error: {err}", file=sys.stderr)
        return 2
    description = str(grid.get("description") or "")
    latest = latest_by_id(read_results(out))
    states = {item.id: item_state(item, out, latest) for item in plan}
    todo = [it for it in plan if states[it.id] != "done" and (args.retry_failed or states[it.id] != "failed")]
    counts = ", ".join(f"{n} {s}" for s, n in sorted(Counter(states.values()).items()))
    print(f"{len(plan)} runs planned ({counts}); {len(todo)} to run")
    if args.dry_run:
        for i, item in enumerate(plan, 1):
            origin = "" if item.origin.startswith(("vary", "base")) else f"  [{item.origin}]"
            print(f"{i:4d}  {item.id:15}  {states[item.id]:7}  {item.describe()}{origin}")
        return 0
    if args.max_runs is not None:
        todo = todo[: args.max_runs]
    from .execute import run_plan  # the stage that runs things (and, for a probe, loads torch)

    return run_plan(plan, todo, out, Path(args.grid), description)
