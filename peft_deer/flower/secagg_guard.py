"""The site's side of SecAgg+ beyond flwr's `secaggplus_mod`: what a server may not ask, and what the site sees.

Three holes `secaggplus_mod` (flwr 1.42) leaves to the app, closed here for the ClientApp (`peft_deer_clientapp.py`
calls `guarded_secaggplus` instead of the mod; standard library and flwr only, no torch):
- A train message without the mod's config record skips the mod, so its reply would leave unmasked. Such a
  message can carry no `SECAGG_VIEW` record (one it brings is dropped); the site (`site.handle`), when its own
  run config says `secure-aggregation=true`, refuses any train message without one.
- The unmask stage names the active and dead node ids; flwr does not check that they are disjoint, so a server
  listing one site in both gets its mask seed share and its private key share from every other site, and so its
  message in clear. Refused here, as are ids outside the key-sharing set and repeated ids.
- Two SecAgg+ runs of the same instruction over two participant sets would let the server subtract the sums and
  read one site's message. The mod hands the site its view of the run (`SECAGG_VIEW`: the participants of the key
  sharing and the reconstruction threshold); the site folds it into the instruction's digest (`site_noise`), so
  an identical re-send to the same set gets the identical message and any other set is refused.
"""

from __future__ import annotations

import json

from flwr.app import ConfigRecord, Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage

SECAGG_VIEW = "peft-deer-secagg-view"  # config record the guard adds to the message the site's handler gets
PARTICIPANTS = "participants"  # JSON list of the node ids in the run's key sharing, sorted
THRESHOLD = "threshold"  # the run's reconstruction threshold


def _state(context: Context) -> dict:
    record = context.state.config_records.get(RECORD_KEY_STATE)
    return dict(record) if record is not None else {}


def _participants(state: dict) -> list[int]:
    """The node ids of the key sharing (the mod keeps them as `public_keys_dict`'s keys, flattened in its state)."""
    keys = state.get("public_keys_dict:K") or state.get("public_keys_dict") or []
    if isinstance(keys, dict):
        keys = list(keys)
    return sorted(int(k) for k in keys)


def check_unmask(configs: ConfigRecord, participants: list[int]) -> None:
    """ValueError unless the unmask stage's active and dead ids are distinct, disjoint and from the key sharing."""
    active = [int(n) for n in configs.get(Key.ACTIVE_NODE_ID_LIST, [])]
    dead = [int(n) for n in configs.get(Key.DEAD_NODE_ID_LIST, [])]
    if len(set(active)) != len(active) or len(set(dead)) != len(dead):
        raise ValueError("SecAgg+ unmask stage repeats a node id: refused")
    if set(active) & set(dead):
        raise ValueError(
            f"SecAgg+ unmask stage lists nodes {sorted(set(active) & set(dead))} as both active and dead (that "
            "would reveal their masked message): refused"
        )
    if participants and not set(active) | set(dead) <= set(participants):
        raise ValueError("SecAgg+ unmask stage names nodes outside this run's key sharing: refused")


def guarded_secaggplus(msg: Message, context: Context, call_next) -> Message:
    """`secaggplus_mod` for a message that carries its config record, with the checks and the view above; any other
    message goes straight on, stripped of a `SECAGG_VIEW` record it may bring."""
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        if SECAGG_VIEW in msg.content.config_records:
            del msg.content.config_records[SECAGG_VIEW]
        return call_next(msg, context)
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    if configs.get(Key.STAGE) == Stage.UNMASK:
        check_unmask(configs, _participants(_state(context)))

    def with_view(inner: Message, ctxt: Context) -> Message:
        state = _state(ctxt)
        inner.content.config_records[SECAGG_VIEW] = ConfigRecord(
            {PARTICIPANTS: json.dumps(_participants(state)), THRESHOLD: int(state.get("threshold", 0))}
        )
        return call_next(inner, ctxt)

    return secaggplus_mod(msg, context, with_view)


def secagg_view(content) -> tuple[list[int], int] | None:
    """(participants, threshold) of the SecAgg+ run a train message came through, or None (no SecAgg+)."""
    record = content.config_records.get(SECAGG_VIEW)
    if record is None:
        return None
    return [int(n) for n in json.loads(str(record[PARTICIPANTS]))], int(record[THRESHOLD])


__all__ = ["SECAGG_VIEW", "check_unmask", "guarded_secaggplus", "secagg_view"]
