"""`deer-audit --run RUN_DIR`: the audited mechanism's parameters from a finished run's `privacy.json`.

The audit keeps its tiny adapter (the Gaussian mechanism in the canary's direction does not depend on the
model; for `deer-reference` the effective multiplier does, and the audit's frozen factors set it) and takes
from the run: level, method, sigma, C, delta, the reproducible-noise flag, and at client level the number of
clients, the sample rate and the releases; at record level the most exposed client's (largest epsilon)
sigma, sample rate and steps. What the run claims is reported beside the audit's own claimed epsilons.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path


def _number(section: dict, key: str, where: str) -> float:
    value = section.get(key)
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{where} has no finite number {key!r}: not a ledger this audit can read")
    return float(value)


def load_ledger(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "privacy.json"
    if not path.is_file():
        raise ValueError(f"{path} not found: --run needs a finished run directory")
    try:
        ledger = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not readable JSON ({type(err).__name__})") from None
    if not isinstance(ledger, dict):
        raise ValueError(f"{path} is not a JSON object")
    if ledger.get("level") in (None, "none"):
        raise ValueError(f"{path}: the run used no differential privacy (level {ledger.get('level')!r})")
    return ledger


def _record_sample_rate(record: dict, client: str, where: str) -> float:
    rates = record.get("sample_rates")
    if isinstance(rates, dict) and client in rates:
        return _number(rates, client, f"{where} 'sample_rates'")
    if "sample_rate" in record:
        return _number(record, "sample_rate", where)
    raise ValueError(f"{where} states no record-level sample rate q ('sample_rate' or 'sample_rates')")


def run_settings(run_dir: str | Path, level: str | None = None) -> dict:
    """The audit's keyword settings for `level` (None: client level when the run has it, else record)."""
    ledger = load_ledger(run_dir)
    where = f"{Path(run_dir) / 'privacy.json'}"
    run_level = str(ledger["level"])
    level = level or ("record" if run_level == "record" else "client")
    if level not in run_level.split("+"):
        raise ValueError(f"{where}: the run has no {level}-level guarantee (level {run_level!r})")
    method = ledger.get("method")
    if not isinstance(method, str):
        raise ValueError(f"{where} names no method")
    common = {"method": method, "reproducible_noise": bool(ledger.get("reproducible_noise", False))}
    if level == "client":
        releases = int(_number(ledger, "releases", where))
        if releases < 1:
            raise ValueError(f"{where}: the run made no release; nothing to audit")
        claimed = {
            "epsilon_rdp": ledger.get("epsilon_rdp", ledger.get("epsilon")),
            "epsilon_prv": ledger.get("epsilon_prv"),
        }
        return {
            **common,
            "level": "client",
            "noise_multiplier": _number(ledger, "noise_multiplier", where),
            "clip_norm": _number(ledger, "clip_norm", where),
            "delta": _number(ledger, "delta", where),
            "num_clients": int(_number(ledger, "num_clients", where)),
            "sample_rate": _number(ledger, "sample_rate", where),
            "releases": releases,
            "run_claim": {"run_dir": str(run_dir), "level": run_level, "delta": ledger.get("delta"), **claimed},
        }
    record = ledger.get("record")
    if not isinstance(record, dict):
        raise ValueError(f"{where} has no 'record' section")
    where = f"{where} 'record'"
    per_client = record.get("epsilon_per_client")
    if not isinstance(per_client, dict) or not per_client:
        raise ValueError(f"{where} lists no client's epsilon ('epsilon_per_client')")
    client = max(per_client, key=lambda c: float(per_client[c]))  # the most exposed client
    sigma = _number(record.get("noise_multipliers") or {}, client, f"{where} 'noise_multipliers'")
    steps = int(_number(record.get("steps") or {}, client, f"{where} 'steps'"))
    q = _record_sample_rate(record, client, where)
    if not 0 < q <= 1 or steps < 1:
        raise ValueError(f"{where}: client {client} has sample rate {q} and {steps} steps; nothing to audit")
    ratio = Fraction(q).limit_denominator(512)  # q = batch_size / record_examples
    batch_size, examples = ratio.numerator, ratio.denominator
    if examples < 2:  # q = 1: any dataset with batch = size
        batch_size, examples = 2, 2
    per_epoch = int(examples / batch_size)
    return {
        **common,
        "level": "record",
        "noise_multiplier": sigma,
        "clip_norm": _number(record, "clip_norm", where),
        "delta": _number(record, "delta", where),
        "num_examples": examples,
        "batch_size": batch_size,
        "local_epochs": max(1, round(steps / per_epoch)),
        "run_claim": {
            "run_dir": str(run_dir),
            "level": run_level,
            "client": client,
            "delta": record.get("delta"),
            "epsilon_rdp": per_client[client],
            "sample_rate": q,
            "steps": steps,
        },
    }
