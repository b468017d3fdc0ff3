"""Files a run or the demo reads back: the resume checkpoint and saved adapters, checked on load.

A damaged file (truncated, random bytes, empty, wrong content) gives a `DamagedFileError`: one line that
names the file and what to do, instead of a deep traceback from torch or safetensors. The checkpoint is read
with `weights_only=True`: a crafted file cannot run code (its pickle may only build tensors and plain
containers). It holds the run's DP secret, so it is owner-only (0600) from the moment it is created.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .files import BEST_KEYS, CHECKPOINT_KEYS, ROUND_TOTALS_KEYS


class DamagedFileError(ValueError):
    """A file that should hold a checkpoint or an adapter does not; the message names it and the fix."""


class SettingsMismatch(ValueError):
    """`--resume` of a run whose checkpoint was written with other settings or other data."""


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """`torch.save` to `path` atomically (temp file, fsync, rename): a kill leaves the old checkpoint or the new.

    The file is created 0600 (it holds the DP secret), whatever the umask: never readable by others, not even
    for the moment between its creation and a chmod.
    """
    tmp = path.with_name(path.name + ".tmp")
    if tmp.is_symlink():
        tmp.unlink()  # O_NOFOLLOW below refuses it; a planted link must not redirect the secret
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    os.fchmod(fd, 0o600)  # an existing temp file keeps its old mode under O_CREAT
    with os.fdopen(fd, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def data_digest(splits: Any) -> dict[str, str]:
    """{split name: sha256 of its images and labels} of a `DatasetSplits` (cheap: one pass over the arrays).

    A resumed run compares it with its checkpoint's, so changed images or labels are noticed.
    """
    digests = {}
    for name in ("train", "val", "test"):
        split = getattr(splits, name, None)
        if split is None:
            continue
        h = hashlib.sha256()
        for arr in (split.images, split.labels):
            arr = np.ascontiguousarray(arr)
            h.update(f"{arr.dtype.str}{arr.shape}".encode())
            h.update(memoryview(arr).cast("B"))
        digests[name] = h.hexdigest()
    return digests


def check_resume(path: Path, ckpt: Mapping[str, Any], fingerprint: Mapping[str, Any], data: Mapping[str, str]) -> None:
    """Refuse (SettingsMismatch, one line) a checkpoint written with other settings or data than this run's.

    Names each changed setting as `name: old -> new` and each changed data split. A checkpoint without a
    data digest (older versions) is only checked on its settings.
    """
    fix = "resume with the run's settings and data, or pass --overwrite to start again"
    saved = ckpt["fingerprint"]
    if not isinstance(saved, dict):
        raise SettingsMismatch(f"{path} holds no settings; pass --overwrite to start again")
    changed = [f"{k}: {saved.get(k, '(unset)')!r} -> {fingerprint.get(k, '(unset)')!r}"
               for k in sorted({*saved, *fingerprint}) if saved.get(k) != fingerprint.get(k)]  # fmt: skip
    if changed:
        raise SettingsMismatch(f"--resume with different settings ({'; '.join(changed)}); {fix}")
    saved_data = ckpt.get("data_sha256") or {}
    if saved_data and data:
        splits = [k for k in sorted({*saved_data, *data}) if saved_data.get(k) != data.get(k)]
        if splits:
            raise SettingsMismatch(
                f"--resume on changed data: the {', '.join(splits)} split(s) differ from the run's (sha256 of "
                f"images and labels; was {saved_data.get(splits[0], '(none)')[:12]}, now "
                f"{data.get(splits[0], '(none)')[:12]}); {fix}"
            )


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The resume checkpoint at `path`, with every key the phase loop needs; else DamagedFileError."""
    fix = "the run cannot continue from it: pass --overwrite to start the run again (or restore the file)"
    if not path.is_file():
        raise DamagedFileError(f"{path} is missing; {fix}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only=True found a global it may not build, or garbage
        detail = re.search(r"WeightsUnpickler error:\s*(.*?)(?: was not an allowed global|\n|$)", str(err), re.S)
        detail = detail.group(1).strip()[:120] if detail else "unreadable pickle"
        if "global" in detail.lower():  # a callable to run on load: the shape of an attack, never ours
            raise DamagedFileError(
                f"{path} is refused: it would run code on load ({detail}); a checkpoint holds only tensors and "
                f"plain data; {fix}"
            ) from None
        raise DamagedFileError(f"{path} is damaged ({detail}); {fix}") from None
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as err:
        raise DamagedFileError(f"{path} is damaged ({_reason(err)}); {fix}") from None
    if not isinstance(payload, dict):
        raise DamagedFileError(f"{path} holds a {type(payload).__name__}, not a peft_deer checkpoint; {fix}")
    missing = [k for k in CHECKPOINT_KEYS if k not in payload]
    if missing:
        raise DamagedFileError(f"{path} is not a complete peft_deer checkpoint (missing {missing}); {fix}")
    problem = checkpoint_problem(payload)
    if problem:
        raise DamagedFileError(f"{path} is damaged ({problem}); {fix}")
    payload["next_phase"] = tuple(payload["next_phase"])
    return payload


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _plain(x: Any, depth: int = 0) -> bool:
    """JSON-like data only (what metrics rows hold): no tensors, no bytes, bounded nesting."""
    if x is None or isinstance(x, bool | int | float | str):
        return True
    if depth > 8:
        return False
    if isinstance(x, list | tuple):
        return all(_plain(v, depth + 1) for v in x)
    if isinstance(x, dict):
        return all(isinstance(k, str) and _plain(v, depth + 1) for k, v in x.items())
    return False


def _tensors_problem(x: Any, where: str, depth: int = 0) -> str | None:
    """The first floating-point tensor in `x` (nested dicts and lists) with a NaN or inf entry, named."""
    if isinstance(x, torch.Tensor):
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            return f"{where} has NaN/inf entries"
        return None
    if depth > 12:
        return f"{where} is nested too deeply"
    items = x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, list | tuple) else ()
    for key, value in items:
        problem = _tensors_problem(value, f"{where}.{key}", depth + 1)
        if problem:
            return problem
    return None


def _state_problem(state: Any, where: str) -> str | None:
    if not isinstance(state, dict) or not state:
        return f"{where} is not a non-empty {{name: tensor}} dict"
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        return f"{where} holds something other than named tensors"
    return _tensors_problem(state, where)


def checkpoint_problem(payload: Mapping[str, Any]) -> str | None:
    """What is wrong with the values of a checkpoint that has every key (a type, a range, a NaN), or None.

    The phase loop restores these as they are, so a crafted or damaged value must be caught here, in one line.
    """
    step = payload["next_phase"]
    if not (isinstance(step, list | tuple) and len(step) == 2 and all(_is_int(v) and 0 <= v < 2**31 for v in step)):
        return f"next_phase {str(step)[:40]!r} is not a (round, phase) pair of non-negative integers"
    server = payload["server"]
    if not isinstance(server, dict) or "global_state" not in server:
        return "server is not a server state (no global_state)"
    problem = _state_problem(server["global_state"], "server.global_state") or _tensors_problem(server, "server")
    if problem:
        return problem
    for key in ("rows", "private_rows"):
        rows = payload[key]
        if not (isinstance(rows, list) and all(isinstance(r, dict) and _plain(r) for r in rows)):
            return f"{key} is not a list of plain rows (dicts of numbers and text)"
    best = payload["best"]
    if best is not None:
        if not (isinstance(best, dict) and _is_number(best.get("score")) and _is_int(best.get("round"))):
            return f"best is not a {{{', '.join(BEST_KEYS)}}} record"
        problem = _state_problem(best.get("state"), "best.state")
        if problem:
            return problem
    digests = payload.get("data_sha256")
    if digests is not None and not (isinstance(digests, dict) and all(isinstance(v, str) for v in digests.values())):
        return "data_sha256 is not a {split: sha256} record"
    acc = payload["round_acc"]
    ok = (
        isinstance(acc, dict)
        and all(_is_number(acc.get(k)) for k in ROUND_TOTALS_KEYS[:3])
        and all(isinstance(acc.get(k), list) and all(map(_is_number, acc[k])) for k in ROUND_TOTALS_KEYS[3:])
    )
    return None if ok else f"round_acc is not a {{{', '.join(ROUND_TOTALS_KEYS)}}} record"


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
