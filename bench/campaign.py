"""A results campaign: `deer-fed` runs over a grid of settings and seeds, kept in one table.

    python bench/campaign.py --grid bench/grids/cpu.yaml --out runs/campaign-cpu --dry-run
    python bench/campaign.py --grid bench/grids/cpu.yaml --out runs/campaign-cpu [--max-runs N]
    python bench/campaign.py --out runs/campaign-cpu --report-only

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
  linear probe on frozen features is computed (`peft_deer.linear_probe`); model, image-size, data-dir and
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
import datetime as dt
import functools
import hashlib
import importlib.util
import io
import itertools
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
import traceback
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm


def _light():  # peft_deer's light modules by path (peft_deer.light_import): --help and a bad grid before torch
    package = importlib.util.find_spec("peft_deer")  # finds the package without importing it
    if package is None or not package.submodule_search_locations:
        raise ImportError("peft_deer is not installed; run `pip install -e .` in the repository")
    path = Path(list(package.submodule_search_locations)[0]) / "light_import.py"
    spec = importlib.util.spec_from_file_location("_peft_deer_light_import", path)
    light = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(light)
    return light


_peft_deer = _light()
METHODS = _peft_deer.load("peft_deer.methods").METHODS
dumps_strict = _peft_deer.load("peft_deer.run.io").dumps_strict
CHECKPOINT = _peft_deer.load("peft_deer.run.run_dir").CHECKPOINT
_settings = _peft_deer.load("peft_deer.defaults", "peft_deer.settings")
RaisingParser, RunSettings, build_parser = _settings.RaisingParser, _settings.RunSettings, _settings.build_parser
parse_args, values_to_argv = _settings.parse_args, _settings.values_to_argv

ROOT = Path(__file__).resolve().parents[1]
FED = ROOT / "train" / "fed.py"
RESULTS, REPORT, PLOT = "results.jsonl", "RESULTS.md", "auc_vs_epsilon.png"
GRID_KEYS = ("description", "base", "vary", "seeds", "seeds_for", "extra", "probe")
# Set by the campaign for every run, never by a grid.
CAMPAIGN_SET = ("output_dir", "prefix_cache_dir", "resume", "overwrite", "max_phases")
PROBE_KEYS = ("dataset", "model", "image_size", "data_dir", "train_subset", "seed")
# Settings the report shows as the privacy column rather than as settings of their own.
PRIVACY_SETTINGS = ("dp", "epsilon", "noise_multiplier", "record_epsilon", "record_noise_multiplier")
# Settings the common-settings line never shows: the table's own columns, and paths.
REPORT_HIDDEN = ("seed", "method", "dataset", *PRIVACY_SETTINGS, *CAMPAIGN_SET, "data_dir", "config")
LEVEL_ORDER = {"none": 0, "record": 1, "client": 2, "client,record": 3}
_TQDM_LINE = re.compile(r"\d+%\|")


class GridError(ValueError):
    """A grid that cannot run; the message is one line naming what is wrong."""


# ----------------------------------------------------------------------------- deer-fed's settings


@functools.cache
def _parser() -> argparse.ArgumentParser:
    return build_parser("deer-fed", RaisingParser)


@functools.cache
def setting_actions() -> dict[str, argparse.Action]:
    """deer-fed's settings by dest (every flag but --help and --config)."""
    return {a.dest: a for a in _parser()._actions if a.option_strings and a.dest not in ("help", "config")}


@functools.cache
def setting_defaults() -> dict[str, Any]:
    return {dest: action.default for dest, action in setting_actions().items()}


def resolved(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Every setting of a run: deer-fed's defaults overridden by `settings` ({dest: value})."""
    return {**setting_defaults(), **settings}


def _dest(key: Any) -> str:
    return str(key).replace("-", "_")


def _coerce(dest: str, value: Any) -> Any:
    """`value` as deer-fed's parser would store it (so 8 and 8.0 and "8" compare equal for a float)."""
    action = setting_actions()[dest]
    if value is None or isinstance(action, argparse._StoreTrueAction):
        return value
    convert = action.type or str
    try:
        coerced = [convert(str(v)) for v in value] if isinstance(value, list) else convert(str(value))
    except (TypeError, ValueError) as err:
        raise GridError(f"{dest}: {value!r} is not a valid value ({err})") from None
    if action.choices is not None and not isinstance(coerced, list) and coerced not in action.choices:
        raise GridError(f"{dest}: {value!r} is not one of {list(action.choices)}")
    return coerced


def _parse(tokens: list[str], where: str) -> RunSettings:
    """deer-fed's own `parse_args` (types, choices, cross-checks); a failure becomes a one-line GridError."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return parse_args(tokens)
    except SystemExit as exc:
        lines = [line for line in captured.getvalue().splitlines() if line.strip()]
        message = lines[-1] if lines else f"exit code {exc.code}"
        raise GridError(f"{where}: {message.removeprefix('deer-fed: error: ')}") from None


def _short_hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Run:
    """One deer-fed run: `settings` are those that differ from deer-fed's defaults ({dest: parsed value}),
    always with `seed`; `varied` the ones that differ from the grid's base (for log lines)."""

    id: str
    settings: dict[str, Any]
    seed: int
    origin: str
    varied: dict[str, Any] = field(default_factory=dict)

    kind = "run"

    @property
    def method(self) -> str:
        return resolved(self.settings)["method"]

    @property
    def dataset(self) -> str:
        return resolved(self.settings)["dataset"]

    def argv(self) -> list[str]:
        """deer-fed flags of the run, without the output dir, cache dir and resume/overwrite."""
        return values_to_argv(self.settings, _parser(), f"run {self.id}")

    def describe(self) -> str:
        shown = {k: v for k, v in self.varied.items() if k != "seed"} or {"method": self.method}
        return ", ".join(f"{k}={v}" for k, v in shown.items()) + f", seed {self.seed}"


@dataclass(frozen=True)
class Probe:
    """A centralized linear probe (peft_deer.linear_probe) of one dataset, model and resolution."""

    id: str
    settings: dict[str, Any]
    origin: str

    kind = "probe"
    method = "linear-probe"

    @property
    def seed(self) -> int:
        return int(self.settings["seed"])

    @property
    def dataset(self) -> str:
        return self.settings["dataset"]

    def describe(self) -> str:
        size = self.settings["image_size"]
        return f"linear probe, {self.dataset}, {self.settings['model']}, " + (f"{size} px" if size else "default size")


Item = Run | Probe


def load_grid(path: str | Path) -> dict[str, Any]:
    """The grid file as a mapping (GridError if missing or not YAML)."""
    path = Path(path)
    if not path.is_file():
        raise GridError(f"grid {path} does not exist")
    try:
        grid = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise GridError(f"grid {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(grid, dict):
        raise GridError(f"grid {path} must hold a mapping with keys {list(GRID_KEYS)}")
    return grid


def _settings_map(value: Any, where: str, unknown: list[str]) -> dict[str, Any]:
    """{dest: value} of a mapping of settings; names that are no deer-fed setting go to `unknown`."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise GridError(f"{where} must be a mapping of settings, got {value!r}")
    out = {}
    for key, item in value.items():
        dest = _dest(key)
        if dest not in setting_actions():
            unknown.append(f"{where}.{key}")
        out[dest] = item
    return out


def _list_of(value: Any, where: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise GridError(f"{where} must be a list, got {value!r}")
    return value


def expand_grid(grid: Mapping[str, Any], where: str = "grid") -> list[Item]:
    """The grid's probes and runs (products x seeds, then extras), duplicates merged, every run checked.

    Raises GridError (one line) for unknown keys or settings, campaign-controlled settings, conflicting
    vary axes, or a run that deer-fed's parser refuses.
    """
    bad_keys = sorted(set(map(str, grid)) - set(GRID_KEYS))
    if bad_keys:
        raise GridError(f"{where}: unknown keys {bad_keys}; a grid holds {list(GRID_KEYS)}")
    unknown: list[str] = []
    base = _settings_map(grid.get("base"), "base", unknown)

    vary = grid.get("vary") or {}
    if not isinstance(vary, dict):
        raise GridError(f"{where}: vary must map a setting (or a name) to a list of values, got {vary!r}")
    axes: list[tuple[str, list[dict[str, Any]]]] = []
    for axis, values in vary.items():
        if not isinstance(values, list) or not values:
            raise GridError(f"vary.{axis} must be a non-empty list of values, got {values!r}")
        is_setting = _dest(axis) in setting_actions()
        options = []
        for i, value in enumerate(values):
            if isinstance(value, dict):
                options.append(_settings_map(value, f"vary.{axis}[{i}]", unknown))
            elif is_setting:
                options.append({_dest(axis): value})
            else:
                unknown.append(f"vary.{axis}")
                break
        axes.append((str(axis), options))

    seeds_for = [
        _settings_map(c, f"seeds_for[{i}]", unknown) for i, c in enumerate(_list_of(grid.get("seeds_for"), "seeds_for"))
    ]
    extra = [_settings_map(e, f"extra[{i}]", unknown) for i, e in enumerate(_list_of(grid.get("extra"), "extra"))]
    probes = _list_of(grid.get("probe"), "probe")
    for i, probe in enumerate(probes):
        if not isinstance(probe, dict):
            raise GridError(f"probe[{i}] must be a mapping with keys {list(PROBE_KEYS)}, got {probe!r}")
        unknown += [f"probe[{i}].{k}" for k in probe if _dest(k) not in PROBE_KEYS]
    if unknown:
        raise GridError(
            f"{where}: unknown settings {', '.join(dict.fromkeys(unknown))} "
            "(use the names of `python train/fed.py --help`, '-' or '_')"
        )

    sources = [("base", base), *((f"vary.{a}", o) for a, opts in axes for o in opts)]
    sources += [(f"extra[{i}]", e) for i, e in enumerate(extra)]
    for name, values in sources:
        controlled = sorted(set(values) & set(CAMPAIGN_SET))
        if controlled:
            raise GridError(f"{name}: {controlled} are set by the campaign (--out), not by a grid")
        if "seed" in values and not name.startswith("extra"):
            raise GridError(f"{name}: set seeds with `seeds: [...]` (an extra run may pin one `seed`)")
    for (a, opts_a), (b, opts_b) in itertools.combinations(axes, 2):
        shared = sorted({k for o in opts_a for k in o} & {k for o in opts_b for k in o})
        if shared:
            raise GridError(f"vary.{a} and vary.{b} both set {shared}: let one axis own each setting")

    seeds = _list_of(grid.get("seeds"), "seeds") or [0]
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds) or len(set(seeds)) != len(seeds):
        raise GridError(f"seeds must be a list of distinct integers, got {seeds!r}")
    conditions = [{k: _coerce(k, v) for k, v in c.items()} for c in seeds_for]

    specs: list[tuple[str, dict[str, Any], dict[str, Any]]] = []  # (origin, settings, what differs from base)
    for combo in itertools.product(*(opts for _, opts in axes)):
        varied = {k: v for option in combo for k, v in option.items()}
        label = ", ".join(f"{k}={v}" for k, v in varied.items())
        specs.append((f"vary[{label}]" if label else "base", {**base, **varied}, varied))
    specs += [(f"extra[{i}]", {**base, **e}, e) for i, e in enumerate(extra)]

    items: list[Item] = []
    seen: set[str] = set()
    for origin, settings, varied in specs:
        if "seed" in settings:
            run_seeds = [settings["seed"]]
        else:
            first = _make_run(origin, settings, seeds[0], varied)
            args = resolved(first.settings)
            matched = not conditions or any(all(args[k] == v for k, v in c.items()) for c in conditions)
            run_seeds = seeds if matched else seeds[:1]
        for seed in run_seeds:
            run = _make_run(origin, {**settings, "seed": seed}, seed, varied)
            if run.id not in seen:
                seen.add(run.id)
                items.append(run)

    probe_items: list[Item] = []
    for i, probe in enumerate(probes):
        values = {_dest(k): v for k, v in probe.items()}
        if not values.get("dataset"):
            raise GridError(f"probe[{i}] needs a dataset")
        settings = {
            "dataset": values["dataset"],
            "model": values.get("model", resolved(base)["model"]),
            "image_size": values.get("image_size", base.get("image_size")),
            "data_dir": values.get("data_dir", base.get("data_dir")),
            "train_subset": values.get("train_subset", base.get("train_subset")),
            "seed": values.get("seed", seeds[0]),
        }
        settings = {k: _coerce(k, v) for k, v in settings.items()}  # typed as deer-fed's flags
        probe_id = "lp-" + _short_hash({"method": "linear-probe", **settings})
        if probe_id not in seen:
            seen.add(probe_id)
            probe_items.append(Probe(probe_id, settings, f"probe[{i}]"))
    # Every cell's first seed before any cell's second: an interrupted campaign still covers the grid.
    rank = {s: i for i, s in enumerate(seeds)}
    items.sort(key=lambda run: rank.get(run.seed, 0))
    return probe_items + items


def _make_run(origin: str, settings: Mapping[str, Any], seed: int, varied: Mapping[str, Any]) -> Run:
    """Check the run with deer-fed's parser and key it by its non-default settings."""
    where = f"{origin} seed {seed}"
    values = {**settings, "seed": seed}
    try:
        tokens = values_to_argv(values, _parser(), where)
    except ValueError as err:
        raise GridError(str(err)) from None
    args = _parse(tokens, where)
    defaults = setting_defaults()
    canonical = {
        k: v for k, v in sorted(args.flat().items()) if k in defaults and k not in CAMPAIGN_SET and v != defaults[k]
    }
    canonical["seed"] = seed
    return Run(_short_hash(canonical), canonical, seed, origin, dict(varied))


# ----------------------------------------------------------------------------- results.jsonl


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


# ----------------------------------------------------------------------------- running


def error_tail(text: str, lines: int = 8) -> str:
    """The last `lines` non-empty lines of a stderr text, without tqdm progress-bar redraws."""
    parts = [p.rstrip() for p in re.split(r"[\r\n]+", text)]
    kept = [p for p in parts if p.strip() and not _TQDM_LINE.search(p)]
    return "\n".join(kept[-lines:])


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


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
    cmd = [
        sys.executable,
        str(FED),
        *run.argv(),
        f"--output-dir={run_dir}",
        f"--prefix-cache-dir={out / 'prefix-cache'}",
        *flags,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    stderr_path = logs / f"{run.id}.stderr"
    header = f"\n=== {_now()} {' '.join(cmd)}\n"
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
            return {**row, **_run_outcome(run_dir), "status": "ok", "finished_at": _now()}
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
    return {**row, "finished_at": _now()}


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


def _probe_val_auc(row: Mapping[str, Any]) -> float | None:
    info = row.get("probe") or {}
    return (info.get("val_scores") or {}).get(str(info.get("C")))


def execute_probe(probe: Probe, out: Path) -> dict[str, Any]:
    """The linear probe, in this process; any error is recorded, not raised."""
    from peft_deer.linear_probe import linear_probe

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
        "finished_at": _now(),
    }


def _log_line(k: int, n: int, item: Item, row: Mapping[str, Any]) -> str:
    head = f"[{k}/{n}] {row['status']:6} {item.id} {item.describe()}"
    if row["status"] != "ok":
        last = (row.get("error") or "").strip().splitlines()
        return f"{head}: {last[-1] if last else 'failed'} ({row['seconds']:.0f} s)"
    auc = (row["test_final"] or {}).get("auc")
    eps = row.get("epsilon") if row.get("epsilon") is not None else row.get("record_epsilon")
    return f"{head}: test auc {_fmt(auc)}" + ("" if eps is None else f", eps {eps:.2f}") + f" ({row['seconds']:.0f} s)"


# ----------------------------------------------------------------------------- the report


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _g(x: Any) -> str:
    return f"{x:g}" if isinstance(x, int | float) else str(x)


def privacy_of(settings: Mapping[str, Any]) -> tuple[tuple, str, str]:
    """(sort key, label e.g. 'client ε=8', level e.g. 'client') of a run's resolved settings."""
    levels = settings["dp"].split(",")
    parts, targets = [], []
    for level, eps_key, sigma_key in (
        ("record", "record_epsilon", "record_noise_multiplier"),
        ("client", "epsilon", "noise_multiplier"),
    ):
        if level in levels:
            eps, sigma = settings.get(eps_key), settings.get(sigma_key)
            parts.append(f"{level} ε={_g(eps)}" if eps is not None else f"{level} σ={_g(sigma)}")
            targets.append(eps if eps is not None else math.inf)
    level = settings["dp"]
    return (LEVEL_ORDER.get(level, 9), *targets), " + ".join(parts) or "none", level


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _pm(values: Sequence[float]) -> str:
    mean, std = _mean_std(values)
    if mean is None:
        return "n/a"
    return f"{mean:.3f} ± {'–' if std is None else f'{std:.3f}'}"


def _balanced(metrics: Mapping[str, Any] | None) -> float | None:
    """Balanced accuracy: reported as such, else macro recall (the same quantity)."""
    if not metrics:
        return None
    return metrics.get("balanced_accuracy", metrics.get("recall_macro"))


@dataclass
class _Group:
    """The ok runs of one table row (all seeds of one setting)."""

    dataset: str
    method: str
    privacy: tuple[tuple, str, str]
    other: tuple[tuple[str, Any], ...]  # settings that vary within the dataset besides method/privacy/seed
    rows: list[dict[str, Any]] = field(default_factory=list)

    def values(self, get) -> list[float]:
        return [v for v in (get(r) for r in self.rows) if v is not None]


def _groups(rows: Sequence[Mapping[str, Any]]) -> tuple[dict[str, list[_Group]], dict[str, list[str]]]:
    """Ok federated rows grouped per dataset into table rows; and per dataset the varying settings."""
    by_dataset: dict[str, list[dict]] = {}
    for row in rows:
        if row.get("kind", "run") == "run" and row.get("status") == "ok":
            by_dataset.setdefault(row["dataset"], []).append({**row, "_s": resolved(row["settings"])})
    groups: dict[str, list[_Group]] = {}
    varying: dict[str, list[str]] = {}
    ignore = {"seed", "method", "dataset", *PRIVACY_SETTINGS}
    for dataset, ds_rows in by_dataset.items():
        keys = sorted({k for r in ds_rows for k in r["_s"]} - ignore)
        varying[dataset] = [k for k in keys if len({json.dumps(r["_s"].get(k), default=str) for r in ds_rows}) > 1]
        table: dict[tuple, _Group] = {}
        for r in ds_rows:
            s = r["_s"]
            other = tuple((k, s.get(k)) for k in varying[dataset])
            privacy = privacy_of(s)
            key = (s["method"], privacy[1], json.dumps(other, default=str))
            table.setdefault(key, _Group(dataset, s["method"], privacy, other)).rows.append(r)
        method_rank = {m: i for i, m in enumerate(METHODS)}
        groups[dataset] = sorted(
            table.values(),
            key=lambda g: (
                method_rank.get(g.method, len(METHODS)),
                g.method,
                g.privacy[0],
                tuple(_sort_value(v) for _, v in g.other),
            ),
        )
    return groups, varying


def _sort_value(value: Any) -> tuple:
    """Numbers in numeric order, then strings, then unset."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (0, value, "")
    return (1, 0, str(value)) if value is not None else (2, 0, "")


def _datasets_in_order(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["dataset"] for r in rows))


def render_markdown(rows: Sequence[Mapping[str, Any]], planned: int | None = None, description: str = "") -> str:
    """RESULTS.md from the campaign's latest rows (one per id)."""
    ok = [r for r in rows if r.get("status") == "ok"]
    failed = [r for r in rows if r.get("status") != "ok"]
    groups, varying = _groups(rows)
    probes = [r for r in ok if r.get("kind") == "probe"]
    has_balanced = any(_balanced(r.get("test_final")) is not None for r in ok)
    has_val = any(r.get("val_auc_final") is not None for r in ok)
    counts = f"{len(ok)} ok, {len(failed)} failed" + (f", of {planned} planned" if planned is not None else "")
    lines = [
        "# Results campaign",
        "",
        *([description.strip(), ""] if description else []),
        f"{counts} (from `{RESULTS}`, written {_now()}). Test metrics of the final adapter; mean ± sample std "
        'over seeds ("–": one seed). AUC is macro one-vs-rest with more than two classes. ε achieved: '
        "client-level ε (RDP) and/or record-level ε (max over clients) as each run's `privacy.json` states "
        "(δ as set). Seconds: mean wall time per run, start-up included. The linear probe is centralized "
        "(no federation, no DP) on frozen features: CLS + mean patch token, C chosen on validation."
        + (
            " Val AUC: the validation split's AUC after the last round (the probe: at the chosen C), the "
            "figure to choose settings by; test AUC is not for choosing."
            if has_val
            else ""
        ),
        "",
        f"![test AUC vs ε]({PLOT})",
    ]
    for dataset in _datasets_in_order(rows):
        ds_groups, other_keys = groups.get(dataset, []), varying.get(dataset, [])
        ds_runs = [g.rows[0]["_s"] for g in ds_groups]
        lines += ["", f"## {dataset}", ""]
        if ds_runs:
            listed = (
                "model",
                "image_size",
                "lora_layers",
                "rank",
                "num_clients",
                "clients_per_round",
                "partition",
                "dirichlet_alpha",
                "train_subset",
                "rounds",
                "local_epochs",
                "optimizer",
                "lr",
                "batch_size",
                "delta",
                "record_delta",
            )  # fmt: skip
            # then every other setting the rows share at a non-default value (e.g. lora_alpha, head_init):
            # a row must never read as the default method when all of its dataset's runs changed it
            defaults = setting_defaults()
            unlisted = sorted(
                k
                for k, v in ds_runs[0].items()
                if k not in listed and k not in REPORT_HIDDEN and v != defaults.get(k, v) and v is not None
            )
            common = [
                f"{k}={_g(ds_runs[0].get(k))}"
                for k in (*listed, *unlisted)
                if k not in other_keys and ds_runs[0].get(k) is not None
            ]
            lines += [f"Common settings: {', '.join(common)}.", ""]
        head = ["method", "privacy", *other_keys, *(["val AUC"] if has_val else []), "test AUC"]
        head += ["balanced acc."] if has_balanced else []
        head += ["ε achieved", "runs", "mean s"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in (p for p in probes if p["dataset"] == dataset):
            info = r.get("probe") or {}
            size = info.get("image_size") or r["settings"].get("image_size")
            name = f"linear-probe ({r['settings'].get('model')}, {size} px, centralized; C={_g(info.get('C'))})"
            cells = [name, "none", *("–" for _ in other_keys)]
            cells += [_pm([_probe_val_auc(r)])] if has_val else []
            cells.append(_pm([(r["test_final"] or {}).get("auc")]))
            cells += [_pm([_balanced(r["test_final"])])] if has_balanced else []
            cells += ["–", "1", f"{r['seconds']:.0f}"]
            lines.append("| " + " | ".join(cells) + " |")
        for g in ds_groups:
            eps = _pm_eps(g)
            cells = [g.method, g.privacy[1], *(_g(v) for _, v in g.other)]
            if has_val:
                cells.append(_pm(g.values(lambda r: r.get("val_auc_final"))))
            cells.append(_pm(g.values(lambda r: (r["test_final"] or {}).get("auc"))))
            if has_balanced:
                cells.append(_pm(g.values(lambda r: _balanced(r["test_final"]))))
            seconds = g.values(lambda r: r.get("seconds"))
            cells += [eps, str(len(g.rows)), f"{statistics.fmean(seconds):.0f}" if seconds else "n/a"]
            lines.append("| " + " | ".join(cells) + " |")
    if failed:
        lines += ["", "## Failed runs", ""]
        for r in failed:
            s = resolved(r["settings"]) if r.get("kind", "run") == "run" else r["settings"]
            what = privacy_of(s)[1] if r.get("kind", "run") == "run" else "linear probe"
            label = f" ({r['label']})" if r.get("label") else ""
            lines.append(f"- `{r['id']}` {r['dataset']}, {r['method']}, {what}, seed {r.get('seed')}{label}:")
            lines += ["", "  ```", *(f"  {line}" for line in (r.get("error") or "no error text").splitlines()), "  ```"]
    return "\n".join(lines) + "\n"


def _pm_eps(g: _Group) -> str:
    """ε achieved of a table row: client and/or record level, mean over its runs (2 decimals)."""
    parts = []
    for key, name in (("record_epsilon", "record"), ("epsilon", "client")):
        values = g.values(lambda r, key=key: r.get(key))
        if values:
            parts.append(f"{name} {statistics.fmean(values):.2f}")
    return " / ".join(parts) if parts else "–"


def plot_auc_vs_epsilon(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Test AUC (final adapter) vs achieved ε (log x): one panel per dataset, one line per (method,
    privacy level, other varying settings); no-DP runs as dashed and the linear probe as dotted lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups, _ = _groups(rows)
    probes = [r for r in rows if r.get("kind") == "probe" and r.get("status") == "ok"]
    datasets = [d for d in _datasets_in_order(rows) if d in groups or any(p["dataset"] == d for p in probes)]
    datasets = datasets or ["(no results yet)"]
    fig, axes = plt.subplots(1, len(datasets), figsize=(6.5 * len(datasets), 5.2), squeeze=False)
    colors = plt.get_cmap("tab10")
    method_color = {m: colors(i % 10) for i, m in enumerate(METHODS)}
    styles = {"client": "-", "record": "-.", "client,record": (0, (5, 1, 1, 1, 1, 1))}
    markers = "osD^vP*X"
    for ax, dataset in zip(axes[0], datasets, strict=True):
        lines: dict[tuple, list[tuple[float, float, float | None]]] = {}
        others = sorted({g.other for g in groups.get(dataset, [])}, key=lambda o: tuple(_sort_value(v) for _, v in o))
        other_values = [json.dumps(o, default=str) for o in others]
        for g in groups.get(dataset, []):
            color = method_color.get(g.method, colors(len(method_color) % 10))
            marker = markers[other_values.index(json.dumps(g.other, default=str)) % len(markers)]
            other = ", ".join(f"{k}={_g(v)}" for k, v in g.other)
            mean_auc, std_auc = _mean_std(g.values(lambda r: (r["test_final"] or {}).get("auc")))
            if mean_auc is None:
                continue
            level = g.privacy[2]
            if level == "none":
                label = f"{g.method}, no DP" + (f" ({other})" if other else "")
                ax.axhline(mean_auc, color=color, linestyle="--", linewidth=1.2, label=label)
                continue
            key_eps = "epsilon" if "client" in level.split(",") else "record_epsilon"
            eps, _ = _mean_std(g.values(lambda r, k=key_eps: r.get(k)))
            if eps is None or eps <= 0:
                continue
            lines.setdefault((g.method, level, other, color, marker), []).append((eps, mean_auc, std_auc))
        for (method, level, other, color, marker), points in lines.items():
            points.sort()
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            yerr = [p[2] or 0.0 for p in points]
            label = f"{method}, {level.replace(',', '+')}-level DP" + (f" ({other})" if other else "")
            ax.errorbar(xs, ys, yerr=yerr, color=color, linestyle=styles.get(level, "-"), marker=marker,
                        capsize=3, label=label)  # fmt: skip
        for p in (p for p in probes if p["dataset"] == dataset):
            auc = (p["test_final"] or {}).get("auc")
            if auc is not None:
                size = (p.get("probe") or {}).get("image_size")
                ax.axhline(auc, color="black", linestyle=":", linewidth=1.5, label=f"linear probe ({size} px)")
        ax.set_xscale("log")
        if not lines:
            ax.set_xlim(0.5, 64)
        ax.set_xlabel("ε achieved (log scale)")
        ax.set_ylabel("test AUC (final adapter)")
        ax.set_title(dataset)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_report(out: Path, planned: int | None = None, description: str = "") -> tuple[Path, Path]:
    """Rewrite `out/RESULTS.md` and `out/auc_vs_epsilon.png` from `out/results.jsonl`."""
    out = Path(out)
    rows = list(latest_by_id(read_results(out)).values())
    md = out / REPORT
    tmp = md.with_name(md.name + ".tmp")
    tmp.write_text(render_markdown(rows, planned, description))
    os.replace(tmp, md)
    return md, plot_auc_vs_epsilon(rows, out / PLOT)


# ----------------------------------------------------------------------------- command line


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench/campaign.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
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
    out.mkdir(parents=True, exist_ok=True)
    (out / "grid.yaml").write_text(Path(args.grid).read_text())
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
            log.write(f"{_now()} {line}\n")
        write_report(out, len(plan), description)
    bar.close()
    print(f"results: {out / RESULTS}; table: {out / REPORT}; plot: {out / PLOT}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
