"""A site's distributed noise share, the same for a re-sent instruction: no averaging away of the noise.

Were every train message answered with a fresh secret, a (round, phase) sent twice -- after a ServerApp resume,
or by a malicious server -- would get two noise shares on the same clipped update, and their mean has half the
noise variance. So the site keeps, in its state dir, a per-site secret key (`noise-key-client<k>.hex`, 256 bits,
0600) and, per run key, the digest of the instruction it answered for each (round, phase)
(`noise-answered-<run key>-client<k>.json`, 0600). The share's stream is derived from the key and the label
(run key, round, phase, instruction digest): an identical re-send gets the identical share (no new
information), and a different instruction for an already-answered (round, phase) is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import stat
from pathlib import Path

from ..federated.randomness import DPRandomness, SecureStream
from ..run.io import write_json_atomic
from .protocol import TrainInstruction

_KEY_BYTES = 32


def instruction_digest(work: TrainInstruction) -> str:
    """SHA-256 over everything the instruction asks: phase, client, share count, noise terms, adapter tensors."""
    h = hashlib.sha256()
    terms = None if work.noise is None else sorted(vars(work.noise).items())
    scalars = (work.round, work.phase, work.client_id, work.num_shares, work.run_key, work.skellam_scale, terms)
    if work.secagg_view is not None:  # another participant set is another instruction (`secagg_guard`)
        scalars = (*scalars, work.secagg_view)
    h.update(repr(scalars).encode())
    for key in sorted(work.global_state):
        tensor = work.global_state[key].detach().cpu().contiguous()
        h.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        h.update(tensor.numpy().tobytes())
    return h.hexdigest()


def site_key(state_dir: Path, client_id: int) -> bytes:
    """The site's 256-bit noise key, created owner-only (0600) on first use; refused if others can read it."""
    path = state_dir / f"noise-key-client{client_id}.hex"
    state_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            raise ValueError(f"{path} is readable by others: chmod 600 it (or remove it to draw a new key)") from None
        text = path.read_text().strip()
        if not re.fullmatch(f"[0-9a-f]{{{2 * _KEY_BYTES}}}", text):
            raise ValueError(f"{path} is not a {8 * _KEY_BYTES}-bit hex key; remove it to draw a new one") from None
        return bytes.fromhex(text)
    key = secrets.token_bytes(_KEY_BYTES)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex())
        f.flush()
        os.fsync(f.fileno())
    return key


def noise_stream(state_dir: str | Path, work: TrainInstruction) -> SecureStream:
    """The stream of this site's noise share for `work` (module docstring); ValueError (one line) if another
    instruction was already answered for the same run key, round and phase."""
    digest = instruction_digest(work)
    randomness, _ = answered_randomness(state_dir, work.client_id, work.run_key, f"{work.round}:{work.phase}", digest)
    return randomness.stream(work.run_key, work.round, work.phase, digest, work.client_id, "noise")


def answered_randomness(
    state_dir: str | Path, client_id: int, run_key: str, step: str, digest: str
) -> tuple[DPRandomness, bool]:
    """The site's keyed randomness for the instruction `digest` at `step` of the run, and whether this is its first
    answer there (an identical re-send: False); ValueError (one line) if another instruction was answered there."""
    if not re.fullmatch(r"[0-9a-f]{16,64}", run_key):
        raise ValueError(f"run key {run_key!r} is not a hex digest: the ServerApp is of another version")
    state_dir = Path(state_dir)
    key = site_key(state_dir, client_id)
    path = state_dir / f"noise-answered-{run_key}-client{client_id}.json"
    answered = json.loads(path.read_text()) if path.is_file() else {}
    first = step not in answered
    if answered.setdefault(step, digest) != digest:
        what = "round {} phase {}".format(*step.split(":")) if ":" in step else step
        raise ValueError(
            f"{what} was already answered for another instruction: refused (a second noise draw on this site's "
            "data would weaken its noise)"
        )
    write_json_atomic(path, answered)  # a temp file from mkstemp: 0600
    return DPRandomness(key), first


__all__ = ["answered_randomness", "instruction_digest", "noise_stream", "site_key"]
