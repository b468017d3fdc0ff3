"""The `deer-fed` command line, generated from the settings dataclasses, plus `--config FILE.yaml`.

Every field of `RunSettings`' groups becomes one flag in the group's section of `--help` (bools are
switches, name lists take several values); a YAML/JSON `--config` file gives defaults the command line
overrides. A bad value is one line, `prog: error: message`, and exit code 2. Standard library and
PyYAML only: `train/fed.py` checks its flags before torch loads.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from .run_settings import RunSettings
from .values import field_kinds, short, typed_values

GROUP_TITLES = {
    "data": "data",
    "model": "model",
    "federation": "federated training",
    "local": "local training",
    "privacy": "differential privacy",
    "record": "record-level differential privacy (--dp record: DP-SGD inside each client)",
    "refit": "head refit from DP class statistics (after training)",
    "output": "run",
}


class OneLineParser(argparse.ArgumentParser):
    """A parser whose errors are one line, `prog: error: message`, exit code 2 (no usage block).

    Under a multi-process launcher (torchrun, accelerate launch) only rank 0 prints it: every rank parses
    the same arguments and exits with the same code, so one line says it all.
    """

    def error(self, message: str):  # type: ignore[override]
        if os.environ.get("RANK", "0") == "0":
            print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


class RaisingParser(argparse.ArgumentParser):
    """A parser whose errors raise ValueError instead of exiting (for settings read inside an app)."""

    def error(self, message: str):  # type: ignore[override]
        raise ValueError(message)


def build_parser(
    prog: str = "deer-fed", parser_class: type[argparse.ArgumentParser] = OneLineParser
) -> argparse.ArgumentParser:
    """The parser of every `RunSettings` field (plus `--config`), one argument group per settings group."""
    p = parser_class(
        prog=prog,
        description="Simulated federated LoRA finetuning (deer, rolora, ffa, lora, deer-reference) with "
        "client-level differential privacy. Flags can also come from --config (YAML or JSON).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", help="YAML/JSON file of flag values (keys as the flags, '-' or '_'); CLI wins")
    for attr, group in RunSettings.groups().items():
        section = p.add_argument_group(GROUP_TITLES[attr])
        for f in field_kinds(group):
            name = "--" + f.name.replace("_", "-")
            if f.kind == "bool":
                section.add_argument(name, action="store_true", help=f.help)
                continue
            extra: dict[str, Any] = {"nargs": "+"} if f.kind == "names" else {}
            if f.choices is not None:
                extra["choices"] = list(f.choices)
                if any("," in str(c) for c in f.choices):  # argparse joins choices with ',': "client,record" would
                    extra["metavar"] = "{" + "|".join(map(str, f.choices)) + "}"  # read as two more choices
            if f.metavar is not None:
                extra["metavar"] = f.metavar
            section.add_argument(name, type=f.parse, default=f.default, help=f.help, **extra)
    return p


def parse_args(argv: list[str] | None = None, prog: str = "deer-fed") -> RunSettings:
    """The run's settings from `argv` (default: sys.argv) and its `--config` file; exits 2 with one line if bad."""
    parser = build_parser(prog)
    argv = sys.argv[1:] if argv is None else list(argv)
    known, _ = parser.parse_known_args(argv)
    if known.config is not None:
        if not known.config.strip() or "\x00" in known.config:
            parser.error(f"--config {short(known.config)} must be a file name")
        try:
            parser.set_defaults(**read_config_file(Path(known.config)))
        except ValueError as err:
            parser.error(str(err))
    args = vars(parser.parse_args(argv))  # the command line wins over the file
    args.pop("config")
    try:
        return RunSettings.from_flat(args)
    except ValueError as err:
        parser.error(str(err))
        raise  # unreachable: error() exits or raises


def read_config_file(path: Path) -> dict[str, Any]:
    """{setting: typed value} of a YAML/JSON `--config` file; ValueError (one line) if unreadable or bad."""
    try:
        is_file = path.is_file()
    except OSError as err:
        raise ValueError(f"--config {short(str(path))} cannot be read ({err.strerror or err})") from None
    if not is_file:
        raise ValueError(f"--config {path} does not exist (or is not a file)")
    try:
        values = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
    except OSError as err:
        raise ValueError(
            f"--config {path} cannot be read ({err.strerror or err}); check the file's permissions"
        ) from None
    except UnicodeDecodeError:
        raise ValueError(f"--config {path} is not UTF-8 text; give a YAML or JSON file") from None
    except (yaml.YAMLError, ValueError, RecursionError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"--config {path} is not valid YAML/JSON: {first}") from None
    if not isinstance(values, dict):
        raise ValueError(f"--config {path} must hold a mapping of flag names to values, got {type(values).__name__}")
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    known = {f.name for group in RunSettings.groups().values() for f in field_kinds(group)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"--config {path}: unknown keys {unknown} (the names of --help)")
    return typed_values(values, RunSettings.groups().values(), f"--config {path}")


def values_to_argv(values: Mapping[str, Any], parser: argparse.ArgumentParser, where: str) -> list[str]:
    """Command-line tokens for {dest: value} of known settings (a run's command line, e.g. for a campaign);
    `where` names the source in errors."""
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}
    tokens: list[str] = []
    for key, value in values.items():
        action, option = actions[key], actions[key].option_strings[-1]
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                parser.error(f"{where}: {key} must be true or false, got {value!r}")
            tokens += [option] if value else []
        elif value is None:
            if action.default is not None:
                parser.error(f"{where}: {key} needs a value")
        elif isinstance(value, (list, tuple)):
            if action.nargs != "+" or not value:
                parser.error(f"{where}: {key} takes a single value, got {short(value)}")
            if any(isinstance(v, (list, dict)) for v in value):
                parser.error(f"{where}: {key} takes a list of names, got {short(value)}")
            tokens += [option, *(str(v) for v in value)]
        elif isinstance(value, (dict, set, bytes)):
            parser.error(f"{where}: {key} takes a single value, got {short(value)}")
        else:
            tokens.append(f"{option}={value}")  # '=' keeps values such as -1 from reading as flags
    return tokens


def check_output_dir(output_dir: str) -> None:
    """ValueError (one line) unless `output_dir` is, or can be created as, a directory we can write in.

    A new run is built in a hidden sibling of the output dir (see `peft_deer.run.run_dir`), so the probe is a
    temporary directory made and removed in the output dir's parent (or its nearest existing ancestor).
    """
    out = Path(output_dir)
    base = Path(os.path.abspath(out)).parent
    try:
        if out.exists() and not out.is_dir():
            raise ValueError(f"--output-dir {out} is a file, not a directory; choose a directory path")
        while not base.exists():
            base = base.parent
        if not base.is_dir():
            raise ValueError(f"--output-dir {out} cannot be created: {base} is a file; choose another path")
        name = Path(os.path.abspath(out)).name
        if len(name.encode()) > 200:
            raise ValueError(f"--output-dir name {name[:40]}... is too long; use at most 200 bytes")
        os.rmdir(tempfile.mkdtemp(prefix=".deer-probe-", dir=base))
    except OSError as err:
        raise ValueError(
            f"--output-dir {out} cannot be created in {base} ({err.strerror or err}); choose a writable directory"
        ) from None
