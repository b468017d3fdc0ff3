"""The campaign's plan: a YAML grid expanded into deer-fed runs and linear probes, each with a stable id.

Every run's flags are checked by deer-fed's own parser and checks (`peft_deer.settings.parse_args`)
before anything runs. A run's id is a hash of its settings that differ from deer-fed's defaults (seed
included), so the same run written two ways is one run, and a new deer-fed flag does not invalidate
finished runs. Ids are the keys of `results.jsonl` and the names of run dirs: they must never change.

Light: the standard library, yaml and peft_deer's settings only (no torch), so `--dry-run` is quick.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import io
import itertools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# peft_deer's modules (main's paths; the re-layout may move them), in one place:
from ..settings import RaisingParser, RunSettings, build_parser, parse_args, values_to_argv

GRID_KEYS = ("description", "base", "vary", "seeds", "seeds_for", "extra", "probe")
# Set by the campaign for every run, never by a grid.
CAMPAIGN_SET = ("output_dir", "prefix_cache_dir", "resume", "overwrite", "max_phases")
PROBE_KEYS = ("dataset", "model", "image_size", "data_dir", "train_subset", "seed")


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
    """deer-fed's default of every setting ({dest: default})."""
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
    """A centralized linear probe (`peft_deer.campaign.probe`) of one dataset, model and resolution."""

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
