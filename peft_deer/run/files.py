"""What a run directory holds: its files' names and the schema of its resume checkpoint, in one place.

Only the standard library: the drivers and the campaign read these names before loading torch. The run
directory's own names are defined in `run_dir.py` (which must load as a lone file) and listed here.

The checkpoint (`CHECKPOINT`, owner-only) is one dict: `fingerprint` (what a resume must share), `data_sha256`
(per split; absent in older checkpoints), `server` (`FederatedServer.state_dict()`) and the run's progress
(`RunProgress.state_dict()`: `PROGRESS_KEYS`). `checkpoint_payload` builds it; `checkpoint.load_checkpoint`
checks it against `CHECKPOINT_KEYS`. The keys are those of every earlier version, so old checkpoints resume.
"""

from __future__ import annotations

from typing import Any

from .run_dir import CHECKPOINT, LEGACY_CHECKPOINT, METRICS, PRIVATE_DIR, RUN_FILES, SUMMARY

DIAGNOSTICS = f"{PRIVATE_DIR}/diagnostics.jsonl"  # one server-private row per validated round
PRIVACY_LEDGER = "privacy.json"
DEPLOYMENT = f"{PRIVATE_DIR}/deployment.json"  # a transport's server-private facts

# The checkpoint's schema: RunProgress.state_dict() keys, its `best` and `round_acc` records, and the whole file.
PROGRESS_KEYS = ("next_phase", "rows", "best", "round_acc", "private_rows")
BEST_KEYS = ("score", "round", "state")
ROUND_TOTALS_KEYS = ("loss", "images", "seconds", "update_norms", "participants")
CHECKPOINT_KEYS = ("fingerprint", "server", *PROGRESS_KEYS)  # required; `data_sha256` is optional

__all__ = [
    "BEST_KEYS", "CHECKPOINT", "CHECKPOINT_KEYS", "DEPLOYMENT", "DIAGNOSTICS", "LEGACY_CHECKPOINT", "METRICS",
    "PRIVACY_LEDGER", "PRIVATE_DIR", "PROGRESS_KEYS", "ROUND_TOTALS_KEYS", "RUN_FILES", "SUMMARY", "checkpoint_payload",
]  # fmt: skip


def checkpoint_payload(
    fingerprint: dict[str, Any], data_sha256: dict[str, str], server: dict[str, Any], progress: dict[str, Any]
) -> dict[str, Any]:
    """The checkpoint dict: the resume fingerprint, the data digests, the server's and the progress's state."""
    if set(progress) != set(PROGRESS_KEYS):
        raise ValueError(f"progress state keys {sorted(progress)} are not {sorted(PROGRESS_KEYS)}")
    return {"fingerprint": fingerprint, "data_sha256": data_sha256, "server": server, **progress}
