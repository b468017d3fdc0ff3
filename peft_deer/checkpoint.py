"""Files a run or the demo reads back: the resume checkpoint and saved adapters, checked on load.

A damaged file (truncated, random bytes, empty, wrong content) gives a `DamagedFileError`: one line that
names the file and what to do, instead of a deep traceback from torch or safetensors.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_KEYS = ("fingerprint", "server", "next_phase", "rows", "best", "round_acc", "private_rows")


class DamagedFileError(ValueError):
    """A file that should hold a checkpoint or an adapter does not; the message names it and the fix."""


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """`torch.save` to `path` atomically (temp file, fsync, rename): a kill leaves the old checkpoint or the new."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The resume checkpoint at `path`, with every key the phase loop needs; else DamagedFileError."""
    fix = "the run cannot continue from it: pass --overwrite to start the run again (or restore the file)"
    if not path.is_file():
        raise DamagedFileError(f"{path} is missing; {fix}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        raise DamagedFileError(f"{path} is damaged ({_reason(err)}); {fix}") from None
    if not isinstance(payload, dict):
        raise DamagedFileError(f"{path} holds a {type(payload).__name__}, not a peft_deer checkpoint; {fix}")
    missing = [k for k in CHECKPOINT_KEYS if k not in payload]
    if missing:
        raise DamagedFileError(f"{path} is not a complete peft_deer checkpoint (missing {missing}); {fix}")
    return payload


def check_adapter(adapter_dir: str | Path) -> None:
    """Check a saved adapter directory: `adapter_config.json` is JSON, every tensor of
    `adapter_model.safetensors` reads back and is finite. Raises DamagedFileError naming the file."""
    from safetensors import safe_open

    adapter_dir = Path(adapter_dir)
    fix = "copy the adapter again or export it anew from its run (RUN_DIR/adapter)"
    config = adapter_dir / "adapter_config.json"
    try:
        if not isinstance(json.loads(config.read_text()), dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        raise DamagedFileError(f"{config} is unreadable or damaged ({_reason(err)}); {fix}") from None
    weights = adapter_dir / "adapter_model.safetensors"
    try:
        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():
                if not torch.isfinite(f.get_tensor(key)).all():
                    raise ValueError(f"tensor {key} has NaN/inf entries")
    except Exception as err:  # noqa: BLE001 - safetensors raises its own SafetensorError (and OSError, ...)
        raise DamagedFileError(f"{weights} is unreadable or damaged ({_reason(err)}); {fix}") from None


def _reason(err: BaseException) -> str:
    text = (str(err).strip().splitlines() or [""])[0].split(". ")[0][:120]  # the first sentence
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
