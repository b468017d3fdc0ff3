"""Typed values for settings fields, from the command line or from a mapping (a YAML/JSON `--config` file,
a Flower run config), each checked as its field's type and choices say.

A field's kind comes from its annotation: `bool` (a switch), `int`, `float` (finite unless the field
names another `type` in its metadata), `str`, or `tuple[str, ...]` (a list of names). Standard library only.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .groups import flag


def finite_float(text: str) -> float:
    """argparse type: a float that is neither NaN nor infinite."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number; give a finite value")
    return value


@dataclasses.dataclass(frozen=True)
class FieldKind:
    """What a settings field takes: `kind` in bool/int/float/str/names, its parser, choices and default."""

    name: str
    kind: str
    parse: Callable[[str], Any]
    choices: tuple | None
    default: Any
    help: str
    metavar: str | None


@functools.cache
def field_kinds(group: type) -> tuple[FieldKind, ...]:
    """The kinds of a settings dataclass's fields, in declaration order."""
    hints = typing.get_type_hints(group)
    kinds = []
    for f in dataclasses.fields(group):
        base = next(a for a in (typing.get_args(hints[f.name]) or (hints[f.name],)) if a is not type(None))
        kind = {bool: "bool", int: "int", float: "float", str: "str"}.get(base, "names")
        parse = f.metadata.get("type") or {"int": int, "float": finite_float}.get(kind, str)
        meta = f.metadata
        kinds.append(FieldKind(f.name, kind, parse, meta.get("choices"), f.default, meta["help"], meta.get("metavar")))
    return tuple(kinds)


def short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def convert(field: FieldKind, value: Any, where: str) -> Any:
    """`value` (from YAML, JSON or TOML) as `field`'s type; ValueError naming `where` and the flag if it cannot be."""
    name = flag(field.name)
    if value is None:
        if field.default is not None:
            raise ValueError(f"{where}: {field.name} needs a value")
        return None
    if field.kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{where}: {field.name} must be true or false, got {value!r}")
        return value
    if field.kind == "names":
        if isinstance(value, str):
            value = value.replace(",", " ").split()
        if not isinstance(value, list) or not value or any(isinstance(v, (list, dict)) for v in value):
            raise ValueError(f"{where}: {field.name} takes a list of names, got {short(value)}")
        return tuple(str(v) for v in value)
    if isinstance(value, (list, dict, set, bytes)):
        raise ValueError(f"{where}: {field.name} takes a single value, got {short(value)}")
    if field.kind in ("int", "float") and isinstance(value, bool):
        raise ValueError(f"argument {name}: invalid {field.parse.__name__} value: {str(value)!r}")
    # The messages argparse gives for the same value on the command line.
    try:
        typed = field.parse(str(value))
    except argparse.ArgumentTypeError as err:
        raise ValueError(f"argument {name}: {err}") from None
    except (ValueError, TypeError):
        raise ValueError(f"argument {name}: invalid {field.parse.__name__} value: {short(str(value))}") from None
    if field.choices is not None and typed not in field.choices:
        choices = ", ".join(repr(c) for c in field.choices)
        raise ValueError(f"argument {name}: invalid choice: {short(typed)} (choose from {choices})")
    return typed


def typed_values(
    mapping: Mapping[str, Any], groups: Iterable[type], where: str, empty_is_unset: bool = False
) -> dict[str, Any]:
    """{field name: typed value} of `mapping`, whose keys are field names with '-' or '_'.

    ValueError (one line) on a key that is no field of `groups` or a value its field refuses. With
    `empty_is_unset` an empty string means "the default" (TOML, hence a Flower run config, has no null).
    """
    fields = {k.name: k for group in groups for k in field_kinds(group)}
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        name = str(key).replace("-", "_")
        if name not in fields:
            raise ValueError(f"{where} key {key!r} is not a setting (see deer-fed --help)")
        if empty_is_unset and (value == "" or value is None):
            continue
        out[name] = convert(fields[name], value, where)
    return out
