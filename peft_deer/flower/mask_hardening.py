"""SecAgg+ masks drawn from the whole 32-byte key, for both sides of the DEeR Flower app.

flwr 1.42's `pseudo_rand_gen` folds the 32-byte key into a 32-bit seed of numpy's `RandomState`: a server that
has unmasked the sum (and so learnt each survivor's private mask) could then try all 2^32 seeds of a pairwise
mask and read a site's update when only two sites take part. `harden_secaggplus_masks` makes the sites' mod and
the server's workflow draw with `keyed_masks` instead; the ClientApp calls it at import, the server's
`SecAggDeerStrategy` before each SecAgg+ phase. Standard library and numpy only (the ClientApp loads it by path,
no torch).
"""

from __future__ import annotations

import hashlib
import importlib
import math

import numpy as np

PATCHED_MODULES = (
    "flwr.client.mod.secure_aggregation.secaggplus_mod",
    "flwr.server.workflow.secure_aggregation.secaggplus_workflow",
)


def keyed_masks(seed: bytes, num_range: int, dimensions_list: list[tuple[int, ...]]) -> list[np.ndarray]:
    """SecAgg+ masks drawn from the whole key: uniform int64 in [0, num_range), SHAKE-256(key) as the keystream.

    Server and sites must both use this one (`harden_secaggplus_masks`); a mismatch unmasks to noise that the
    server's norm check refuses. Values: 8 keystream bytes each, reduced mod num_range (exact for 2^n).
    """
    counts = [math.prod(d) for d in dimensions_list]
    stream = np.frombuffer(hashlib.shake_256(b"peft-deer-secagg-mask" + seed).digest(8 * sum(counts)), dtype="<u8")
    values = (stream % np.uint64(num_range)).astype(np.int64)
    out, start = [], 0
    for dims, count in zip(dimensions_list, counts, strict=True):
        out.append(values[start : start + count].reshape(dims))
        start += count
    return out


def harden_secaggplus_masks() -> None:
    """Make Flower's SecAgg+ (the sites' mod and the server's workflow) draw its masks with `keyed_masks`."""
    for name in PATCHED_MODULES:
        module = importlib.import_module(name)  # the module (the package re-exports a function of the same name)
        if not hasattr(module, "pseudo_rand_gen"):
            raise ImportError(f"{module.__name__} has no pseudo_rand_gen: this flwr is not the 1.42 line we patch")
        module.pseudo_rand_gen = keyed_masks
