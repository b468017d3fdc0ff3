"""The randomness behind the DP guarantee: a run secret from the OS, drawn through a cryptographic stream.

Everything a run publishes (adapter, `summary.json` with `--seed`, the model card) is assumed known to
the adversary, and so is everything a site sends to the server. The draws the guarantee relies on -- the
Gaussian noise of a release, each client's noise share, the Poisson sample of clients, DP-SGD noise and
Poisson batches, integer (Skellam) noise under secure aggregation -- come from a 256-bit key read from
`secrets` (OS entropy) at the start of a run. No draw passes through `torch.manual_seed` or
`Generator.manual_seed` (PyTorch's CPU generator keeps 32 bits of a seed: a brute-force search recovers
it and with it the noise). Instead each draw named by `parts` reads its own `SecureStream`:

    block j of draw `parts` = SHAKE-256(domain || key || len(label) || label || j),  label = "p0:p1:..."

a keyed extendable-output function (the construction of KMAC), so the state behind every draw is the
whole 256-bit key. Uniforms take 53 bits per float64; normals are Box-Muller in float64, and each
output sums four of them (divided by 2) as opacus's `secure_mode` does against floating-point attacks
on Gaussian sampling (Holohan and Braghin 2021). Poisson and Skellam draws are exact given the uniforms
(inversion below mean 10, Hormann's transformed rejection above). Any process count and a resumed run
draw the same numbers: a draw depends on the key and its name only.

The key lives in the run's checkpoint (owner-only; `--resume` is bit-for-bit) and is gone when the run
ends. `DPRandomness.from_seed(seed)` derives the key from a public seed instead: for tests and
debugging only, since anyone holding the seed can regenerate and subtract the noise; a run made with it
says "no privacy guarantee" everywhere it reports privacy.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

_KEY_BYTES = 32
_DOMAIN = b"peft_deer/dp-stream/v1\x00"
_SECURE_NORMAL_TERMS = 4  # normals summed per output (opacus secure_mode); the sum is divided by 2

Shape = int | Sequence[int] | torch.Size


def _numel(shape: Shape) -> tuple[tuple[int, ...], int]:
    dims = (int(shape),) if isinstance(shape, int) else tuple(int(s) for s in shape)
    if any(d < 0 for d in dims):
        raise ValueError(f"negative dimension in shape {dims}")
    return dims, math.prod(dims)


class SecureStream:
    """Random numbers for one named draw, from SHAKE-256 keyed with the run's 256-bit key.

    Each call reads a fresh block (a counter in the hash input), so a stream gives the same sequence
    of calls the same numbers. Outputs are CPU tensors; move them with `.to(device)`.
    """

    def __init__(self, key: bytes, label: str) -> None:
        encoded = label.encode()
        self._prefix = _DOMAIN + key + len(encoded).to_bytes(8, "little") + encoded
        self._block = 0

    def _words(self, n: int) -> np.ndarray:
        """n uint64 words of the next block."""
        xof = hashlib.shake_256(self._prefix + self._block.to_bytes(8, "little"))
        self._block += 1
        return np.frombuffer(xof.digest(8 * n), dtype="<u8") if n else np.zeros(0, dtype=np.uint64)

    def _uniform_np(self, n: int) -> np.ndarray:
        return (self._words(n) >> np.uint64(11)).astype(np.float64) * 2.0**-53

    def uniform(self, shape: Shape) -> torch.Tensor:
        """float64 uniforms on [0, 1) with 53 random bits each."""
        dims, n = _numel(shape)
        return torch.from_numpy(self._uniform_np(n).reshape(dims))

    def _standard_normal_np(self, n: int) -> np.ndarray:
        """n standard normals (float64), each (z_1 + ... + z_4) / 2 of Box-Muller normals."""
        pairs = (n * _SECURE_NORMAL_TERMS + 1) // 2
        u = self._uniform_np(2 * pairs).reshape(2, pairs)
        radius = np.sqrt(-2.0 * np.log1p(-u[0]))  # 1 - u in (0, 1]: finite
        angle = 2.0 * math.pi * u[1]
        z = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[: n * _SECURE_NORMAL_TERMS]
        return z.reshape(_SECURE_NORMAL_TERMS, n).sum(0) / math.sqrt(_SECURE_NORMAL_TERMS)

    def normal(self, shape: Shape, std: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """N(0, std^2) entries of `shape`, computed in float64 and returned as `dtype`."""
        if not (std >= 0 and math.isfinite(std)):
            raise ValueError(f"noise std {std} must be finite and >= 0")
        dims, n = _numel(shape)
        return torch.from_numpy(self._standard_normal_np(n) * std).reshape(dims).to(dtype)

    def bernoulli(self, p: float, shape: Shape) -> torch.Tensor:
        """bool entries, each True with probability `p` (Poisson sampling)."""
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"probability {p} is not in [0, 1]")
        return self.uniform(shape) < p

    def poisson(self, lam: float, shape: Shape) -> torch.Tensor:
        """int64 Poisson(lam) entries of `shape`."""
        if not (lam >= 0 and math.isfinite(lam)):
            raise ValueError(f"Poisson mean {lam} must be finite and >= 0")
        dims, n = _numel(shape)
        if lam == 0 or n == 0:
            return torch.zeros(dims, dtype=torch.int64)
        out = self._poisson_inversion(lam, n) if lam < 10 else self._poisson_ptrs(lam, n)
        return torch.from_numpy(out).reshape(dims)

    def skellam(self, mu: float, shape: Shape) -> torch.Tensor:
        """int64 Skellam(mu, mu) entries: Poisson(mu) - Poisson(mu), mean 0, variance 2 mu."""
        return self.poisson(mu, shape) - self.poisson(mu, shape)

    def _poisson_inversion(self, lam: float, n: int) -> np.ndarray:
        """Sequential search of the CDF: exact for lam < 10 (at most a few dozen steps)."""
        u = self._uniform_np(n)
        k = np.zeros(n, dtype=np.int64)
        p = np.full(n, math.exp(-lam))
        cdf = p.copy()
        active = u >= cdf
        j = 0
        while active.any():
            j += 1
            p = p * (lam / j)
            k += active
            cdf = cdf + p
            active &= u >= cdf
            if j > 1000:  # cdf rounded below 1: the remaining mass is < 1e-300
                break
        return k

    def _poisson_ptrs(self, lam: float, n: int) -> np.ndarray:
        """Hormann's transformed rejection with squeeze (PTRS, 1993), exact for lam >= 10."""
        slam, loglam = math.sqrt(lam), math.log(lam)
        b = 0.931 + 2.53 * slam
        a = -0.059 + 0.02483 * b
        inv_alpha = 1.1239 + 1.1328 / (b - 3.4)
        v_r = 0.9277 - 3.6224 / (b - 2)
        out = np.zeros(n, dtype=np.int64)
        todo = np.arange(n)
        while todo.size:
            m = todo.size
            u = self._uniform_np(m) - 0.5
            v = self._uniform_np(m)
            us = 0.5 - np.abs(u)
            k = np.floor((2 * a / np.maximum(us, 1e-300) + b) * u + lam + 0.43)
            quick = (us >= 0.07) & (v <= v_r)
            bad = (k < 0) | ((us < 0.013) & (v > us))
            kk = np.maximum(k, 0)
            lgam = _lgamma1p(kk)
            with np.errstate(divide="ignore"):
                slow = (np.log(v) + math.log(inv_alpha) - np.log(a / np.maximum(us * us, 1e-300) + b)) <= (
                    -lam + kk * loglam - lgam
                )
            accept = quick | (~bad & slow)
            out[todo[accept]] = kk[accept].astype(np.int64)
            todo = todo[~accept]
        return out


def _lgamma1p(k: np.ndarray) -> np.ndarray:
    """log(k!) for an array of non-negative integers (float64), through torch's lgamma."""
    return torch.lgamma(torch.from_numpy(k + 1.0)).numpy()


@dataclass(frozen=True)
class DPRandomness:
    """Source of the DP draws of one run: `key` (32 bytes) and whether it came from a public seed.

    `stream(*parts)` is the `SecureStream` of the draw named by `parts` (round, phase, client, purpose);
    `child(*parts)` a derived source (one client's DP-SGD, a site's run). The key never appears in
    `repr` and is only serialised by `state_dict()` (for the owner-only checkpoint).
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

    def _mac(self, purpose: str, parts: tuple[int | str, ...]) -> bytes:
        message = ":".join([purpose, *(str(p) for p in parts)]).encode()
        return hmac.new(self.key, message, hashlib.sha256).digest()

    def stream(self, *parts: int | str) -> SecureStream:
        """The cryptographic stream of the draw named by `parts`."""
        return SecureStream(self.key, ":".join(str(p) for p in parts))

    def child(self, *parts: int | str) -> DPRandomness:
        """An independent source for a sub-task (a 256-bit key derived with HMAC-SHA256)."""
        return DPRandomness(self._mac("child", parts), self.reproducible)

    def token_hex(self, *parts: int | str) -> str:
        """A 256-bit identifier derived from the key (64 hex digits); reveals nothing about the key."""
        return self._mac("token", parts).hex()

    @property
    def guarantee_note(self) -> str:
        """How the ledger describes this source of randomness."""
        if self.reproducible:
            return (
                "reproducible from the public --seed: anyone with the seed can regenerate and remove the noise, "
                "so there is NO privacy guarantee (tests and debugging only)"
            )
        return (
            "secret: a 256-bit key from the OS (secrets), kept only in the owner-only checkpoint and deleted with "
            "it; every draw reads a SHAKE-256 stream keyed with the whole key (no 32-bit generator seeding)"
        )

    def state_dict(self) -> dict:
        """For the checkpoint only: it holds the key."""
        return {"key": self.key.hex(), "reproducible": self.reproducible}

    @classmethod
    def from_state_dict(cls, state: dict) -> DPRandomness:
        return cls(bytes.fromhex(state["key"]), bool(state["reproducible"]))


__all__ = ["DPRandomness", "SecureStream"]
