"""The site's side of SecAgg+ beyond flwr's `secaggplus_mod`: what a server may not ask, and what the site sees.

Holes `secaggplus_mod` (flwr 1.42) leaves to the app, closed here for the ClientApp (`peft_deer_clientapp.py` calls
`guarded_secaggplus` instead of the mod; standard library and flwr only, no torch). Two attack passes (issue 25)
found them; `tests/test_flower_secagg_refit.py` has one test each.
- A message that skips the mod (no mod config record, or a message type other than plain "train", which the mod
  passes straight on) would be answered unmasked. Only a message the mod processes at its masked-vector stage gets
  the `SECAGG_VIEW` record (a view one brings is dropped); the site (`site.handle`), when its own run config says
  `secure-aggregation=true`, refuses any train message without one.
- The unmask stage names the active and dead node ids. flwr does not check that they are disjoint (a node named in
  both gives the server its mask seed share and its private key share, so its message), nor that the threshold
  exceeds half the participants (else the server can tell one half "active" and the other "dead" and collect both
  kinds of share). Both are refused here, as are repeated ids and ids outside the key sharing.
- Two SecAgg+ runs of the same instruction would let the server subtract the sums and read one site's message:
  over two participant sets, or over the same set with that site "dropped" from the second. The mod hands the
  site its view of the run (participants of the key sharing, threshold), which joins the instruction's digest
  (`site_noise`): another set is another instruction, refused. And a masked message (its hash) is unmasked with
  one active set only (`unmask-record.json` in the site's state dir): a replay unmasked over another set is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MessageType
from flwr.client.mod import secaggplus_mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage

SECAGG_VIEW = "peft-deer-secagg-view"  # config record the guard adds to the message the site's handler gets
PARTICIPANTS = "participants"  # JSON list of the node ids in the run's key sharing, sorted
THRESHOLD = "threshold"  # the run's reconstruction threshold
MASKED = "peft-deer-secagg-masked"  # context state: the hash of the message this node masked in the current run
UNMASK_RECORD = "unmask-record.json"  # in the site's state dir: message hash -> the active set it was unmasked with


def default_state_dir() -> Path:
    """A site's state dir when its node config names none (`state-dir`)."""
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "peft_deer" / "site"


def _state(context: Context) -> dict:
    record = context.state.config_records.get(RECORD_KEY_STATE)
    return dict(record) if record is not None else {}


def _participants(state: dict) -> list[int]:
    """The node ids of the key sharing (the mod keeps them as `public_keys_dict`'s keys, `public_keys_dict:K`)."""
    return sorted(int(k) for k in state.get("public_keys_dict:K") or [])


def check_unmask(configs: ConfigRecord, participants: list[int], threshold: int) -> None:
    """ValueError unless the unmask stage's active and dead ids are distinct, disjoint and from the key sharing, and
    the threshold is above half the participants (no two disjoint groups can each reach it)."""
    active = [int(n) for n in configs.get(Key.ACTIVE_NODE_ID_LIST, [])]
    dead = [int(n) for n in configs.get(Key.DEAD_NODE_ID_LIST, [])]
    if len(set(active)) != len(active) or len(set(dead)) != len(dead):
        raise ValueError("SecAgg+ unmask stage repeats a node id: refused")
    if set(active) & set(dead):
        raise ValueError(
            f"SecAgg+ unmask stage lists nodes {sorted(set(active) & set(dead))} as both active and dead (that "
            "would reveal their masked message): refused"
        )
    if not set(active) | set(dead) <= set(participants):
        raise ValueError("SecAgg+ unmask stage names nodes outside this run's key sharing: refused")
    if 2 * threshold <= len(participants):
        raise ValueError(
            f"SecAgg+ threshold {threshold} is not above half of the {len(participants)} participants (two halves "
            "told different active lists could each unmask a site): refused"
        )


def check_threshold(threshold: int, num_shares: int, colluders: int) -> None:
    """ValueError unless a SecAgg+ run's reconstruction threshold keeps t colluders facing the full noise: a sum of
    at least d + t shares of variance 1/d each (d = the instruction's num-shares, t = the site's
    collusion-threshold), and at least 2 (a sum of one message is that message)."""
    needed = num_shares + colluders
    if threshold < max(needed, 2):
        raise ValueError(f"the SecAgg+ run's threshold {threshold} is below d + t = {needed} (fewer survivors would "
                         "carry less noise than sigma): refused")  # fmt: skip


def check_replay(state_dir: Path, masked: str, active: list[int]) -> None:
    """ValueError if the message hashed `masked` was already unmasked with another active set (a replay with a
    site dropped would give that site's message as a difference); records the set on first use."""
    path = state_dir / UNMASK_RECORD
    state_dir.mkdir(parents=True, exist_ok=True)
    seen = json.loads(path.read_text()) if path.is_file() else {}
    if seen.setdefault(masked, sorted(active)) != sorted(active):
        raise ValueError("this site's masked message was already unmasked with other active nodes: refused (the two "
                         "sums would differ by one site's message)")  # fmt: skip
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(seen, f)
    os.replace(tmp, path)


def _message_hash(content) -> str:
    """SHA-256 of the arrays of a FitRes content (the message the mod is about to mask)."""
    h = hashlib.sha256()
    for name in sorted(content.array_records):
        for key, array in sorted(content.array_records[name].items()):
            h.update(f"{name}/{key}".encode())
            h.update(array.data)
    return h.hexdigest()


def guarded_secaggplus(msg: Message, context: Context, call_next) -> Message:
    """`secaggplus_mod` for a plain "train" message that carries its config record, with the checks and the view
    above; any other message goes straight on, stripped of a `SECAGG_VIEW` record it may bring."""
    if SECAGG_VIEW in msg.content.config_records:
        del msg.content.config_records[SECAGG_VIEW]
    if RECORD_KEY_CONFIGS not in msg.content.config_records or msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    stage = configs.get(Key.STAGE)
    if stage == Stage.UNMASK:
        state = _state(context)
        check_unmask(configs, _participants(state), int(state.get("threshold", 0)))
        masked = context.state.config_records.get(MASKED)
        reproducible = str(context.run_config.get("reproducible-noise", False)).lower() in ("true", "1")
        if masked is not None and not reproducible:  # (reproducible noise: no guarantee, identical messages by design)
            state_dir = Path(context.node_config.get("state-dir") or default_state_dir()).expanduser()
            check_replay(state_dir, str(masked["hash"]), [int(n) for n in configs[Key.ACTIVE_NODE_ID_LIST]])
    if stage != Stage.COLLECT_MASKED_VECTORS:
        return secaggplus_mod(msg, context, call_next)

    def with_view(inner: Message, ctxt: Context) -> Message:
        state = _state(ctxt)
        inner.content.config_records[SECAGG_VIEW] = ConfigRecord(
            {PARTICIPANTS: json.dumps(_participants(state)), THRESHOLD: int(state.get("threshold", 0))}
        )
        reply = call_next(inner, ctxt)
        ctxt.state.config_records[MASKED] = ConfigRecord({"hash": _message_hash(reply.content)})
        return reply

    return secaggplus_mod(msg, context, with_view)


def secagg_view(content) -> tuple[list[int], int] | None:
    """(participants, threshold) of the SecAgg+ run a train message came through, or None (no SecAgg+)."""
    record = content.config_records.get(SECAGG_VIEW)
    if record is None:
        return None
    return [int(n) for n in json.loads(str(record[PARTICIPANTS]))], int(record[THRESHOLD])


__all__ = [
    "SECAGG_VIEW",
    "check_replay",
    "check_threshold",
    "check_unmask",
    "default_state_dir",
    "guarded_secaggplus",
    "secagg_view",
]
