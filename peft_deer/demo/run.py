"""Reading a finished run's directory (light: no torch), so that the command fails fast.

A run directory holds ``adapter/`` (also ``adapter-best/``, ``adapter-lora/``), ``privacy.json``,
``summary.json``, ``curves.png``, ``examples/`` and, for random bases, ``base-model/``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..evaluation.calibration import check_temperature

__all__ = [
    "AdapterError",
    "Example",
    "check_adapter_dir",
    "first_line",
    "optional_json",
    "read_examples",
    "resolve_base",
]

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "peft_deer_run.json")
PEFT_TYPES = ("DEER_LORA", "LORA")
RUN_KEYS = ("class_names", "image_size", "num_channels", "mean", "std")


class AdapterError(Exception):
    """An adapter directory that cannot be served; the message is one line, meant for users."""


@dataclass
class Example:
    """One example image of the run's test split."""

    path: Path
    label: int
    class_name: str


def first_line(exc: BaseException | str) -> str:
    """The most telling line of an error message (a "size mismatch" line if any), shortened."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    if not lines:
        return exc.__class__.__name__
    line = next((ln for ln in lines if ln.startswith("size mismatch")), lines[0])
    return line if len(line) <= 300 else line[:297] + "..."


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{path}: not readable JSON ({first_line(exc)})") from exc


def optional_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def check_adapter_dir(adapter_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(adapter config, run info) of a served adapter directory, or AdapterError naming what is wrong."""
    if not adapter_dir.is_dir():
        raise AdapterError(f"adapter directory not found: {adapter_dir}")
    missing = [f for f in ADAPTER_FILES if not (adapter_dir / f).is_file()]
    if missing:
        raise AdapterError(
            f"{adapter_dir} is not a finished peft_deer adapter: missing {', '.join(missing)} "
            "(pass RUN_DIR/adapter, RUN_DIR/adapter-best or RUN_DIR/adapter-lora)"
        )
    config = _read_json(adapter_dir / "adapter_config.json")
    run = _read_json(adapter_dir / "peft_deer_run.json")
    if not isinstance(config, dict) or config.get("peft_type") not in PEFT_TYPES:
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise AdapterError(f"{adapter_dir}: peft_type {kind!r} is not served (expected one of {', '.join(PEFT_TYPES)})")
    if not isinstance(run, dict) or any(k not in run for k in RUN_KEYS):
        raise AdapterError(f"{adapter_dir}/peft_deer_run.json lacks one of {', '.join(RUN_KEYS)}")
    try:
        check_temperature(run.get("temperature", 1.0))  # absent in runs written before calibration: T = 1
    except ValueError as err:
        raise AdapterError(
            f"{adapter_dir}/peft_deer_run.json: {err} "
            "(copy the file again from the run directory, or delete the key to use T = 1)"
        ) from None
    if not config.get("base_model_name_or_path"):
        raise AdapterError(f"{adapter_dir}/adapter_config.json names no base_model_name_or_path")
    return config, run


def resolve_base(config: dict[str, Any], adapter_dir: Path, override: str | None) -> str:
    """The base model to load: `override`, else the config's; a moved run falls back to RUN_DIR/base-model."""
    base = override or str(config["base_model_name_or_path"])
    if base.startswith(("/", ".", "~")) and not Path(base).expanduser().exists():
        local = adapter_dir.parent / "base-model"
        if not override and local.is_dir():  # the run directory was moved
            return str(local)
        raise AdapterError(f"base model directory of {adapter_dir} not found: {base} (pass --base-model)")
    return base


def read_examples(run_dir: Path) -> list[Example]:
    """The example images listed in RUN_DIR/examples/examples.json that exist."""
    rows = optional_json(run_dir / "examples" / "examples.json") or []
    out = []
    for row in rows if isinstance(rows, list) else []:
        try:
            path = run_dir / "examples" / str(row["file"])
            if path.is_file():
                out.append(Example(path, int(row["label"]), str(row["class_name"])))
        except (KeyError, TypeError, ValueError):
            continue
    return out
