"""The randomness behind the DP guarantee: a run secret from the OS, never from public settings.

Everything a run publishes (adapter, `summary.json` with `--seed`, the model card) is assumed known to
the adversary, so the draws the guarantee relies on -- the Gaussian noise of a release, each simulated
client's noise share, the Poisson sample of clients, DP-SGD noise and Poisson batches -- come from a
256-bit key read from `secrets` (OS entropy) at the start of a run. Each draw gets its own seed,
HMAC-SHA256(key, purpose and step), so any process count and a resumed run draw the same numbers.
The key lives in the run's checkpoint (so `--resume` is bit-for-bit) and is gone when the run ends.

`DPRandomness.reproducible(seed)` derives the key from a public seed instead: for tests and debugging
only, since anyone holding the seed can regenerate and subtract the noise; a run made with it says
"no privacy guarantee" everywhere it reports privacy.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, field

import numpy as np
import torch

_KEY_BYTES = 32


@dataclass(frozen=True)
class DPRandomness:
    """Source of the DP draws of one run: `key` (32 bytes) and whether it came from a public seed.

    `seed(*parts)` is a 63-bit seed for one draw; `generator(*parts)` a torch generator seeded with it.
    The key never appears in `repr` and is only serialised by `state_dict()` (for the checkpoint).
    """

    key: bytes = field(repr=False)
    reproducible: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.key, bytes) or len(self.key) != _KEY_BYTES:
            raise ValueError(f"a DP randomness key must be {_KEY_BYTES} bytes")

    @classmethod
    def secret(cls) -> DPRandomness:
        """A fresh key from the OS's cryptographic source: the guarantee holds."""
        return cls(secrets.token_bytes(_KEY_BYTES), reproducible=False)

    @classmethod
    def from_seed(cls, seed: int) -> DPRandomness:
        """A key anyone can recompute from `seed`: reproducible runs, NO privacy guarantee."""
        return cls(hashlib.sha256(f"peft_deer-reproducible-noise:{seed}".encode()).digest(), reproducible=True)

    def seed(self, *parts: int | str) -> int:
        """A 63-bit seed for the draw named by `parts` (e.g. round, phase, client, purpose)."""
        message = ":".join(str(p) for p in parts).encode()
        digest = hmac.new(self.key, message, hashlib.sha256).digest()
        return int.from_bytes(digest[:8], "little") >> 1

    def generator(self, *parts: int | str, device: torch.device | str | None = None) -> torch.Generator:
        """A torch generator (on `device`, default CPU) for the draw named by `parts`."""
        return torch.Generator(device=device or "cpu").manual_seed(self.seed(*parts))

    def numpy(self, *parts: int | str) -> np.random.Generator:
        """A numpy generator for the draw named by `parts` (client sampling)."""
        return np.random.default_rng(self.seed(*parts))

    @property
    def guarantee_note(self) -> str:
        """How the ledger describes this source of randomness."""
        if self.reproducible:
            return (
                "reproducible from the public --seed: anyone with the seed can regenerate and remove the noise, "
                "so there is NO privacy guarantee (tests and debugging only)"
            )
        return "secret: a 256-bit key from the OS (secrets), kept only in the checkpoint and deleted with it"

    def state_dict(self) -> dict:
        """For the checkpoint only: it holds the key."""
        return {"key": self.key.hex(), "reproducible": self.reproducible}

    @classmethod
    def from_state_dict(cls, state: dict) -> DPRandomness:
        return cls(bytes.fromhex(state["key"]), bool(state["reproducible"]))


__all__ = ["DPRandomness"]
