"""Seeds derived from (run seed, round, phase, client, purpose), never from a process rank."""

from __future__ import annotations

import hashlib


def derive_seed(seed: int, *parts: int | str) -> int:
    """A 63-bit seed that depends only on `seed` and `parts` (stable across processes and runs)."""
    text = ":".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1
