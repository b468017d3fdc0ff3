"""The federated methods as data: which LoRA factor(s) each phase of a round trains, and the DP noise kind.

The five methods share one code path and differ only by their row in `METHOD_SPECS`; code that needs
to know how a method behaves asks its `MethodSpec`, never its name. Standard library only, so the
PEFT config, the model and the federated core can all import it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class NoiseKind(enum.StrEnum):
    """How a release is clipped and noised (str-valued: JSON and ledgers show 'plain', ...).

    PLAIN: isotropic in factor space. REGULATED (DESIGN 2.3): whole-update clipping in the metric M
    of the frozen factor, covariance sigma^2 C^2 M^-1. REFERENCE: the authors' mechanism (per-matrix
    clipping, unscaled (Y^T Y)^-1 noise), reproduced for comparison; it is not the sound Gaussian
    mechanism its nominal sigma suggests.
    """

    PLAIN = "plain"
    REGULATED = "regulated"
    REFERENCE = "reference"


@dataclass(frozen=True)
class MethodSpec:
    """A method as data: the factors trained in each phase of a round and the DP noise kind."""

    name: str
    phases: tuple[tuple[str, ...], ...]
    noise: NoiseKind

    @property
    def releases_per_round(self) -> int:
        return len(self.phases)

    @property
    def trains_jointly(self) -> bool:
        """True when a phase trains A and B together (FedIT LoRA): no adapter phase to set."""
        return any(len(factors) > 1 for factors in self.phases)

    @property
    def factors(self) -> tuple[str, ...]:
        """Every factor some phase trains, in ('A', 'B') order: the `DeerLoraConfig.phase` values allowed."""
        return tuple(f for f in ("A", "B") if any(f in factors for factors in self.phases))

    @property
    def enforces_budget(self) -> bool:
        """Whether the run stops at --epsilon: not for the reference mechanism, whose nominal target is
        the authors' and whose true epsilon is only reported."""
        return self.noise is not NoiseKind.REFERENCE

    @property
    def record_noise(self) -> NoiseKind:
        """Noise kind of record-level DP-SGD: regulated for a regulated method, plain otherwise."""
        return NoiseKind.REGULATED if self.noise is NoiseKind.REGULATED else NoiseKind.PLAIN

    def trained_factors(self, phase: str) -> tuple[str, ...]:
        """Factors trained when the adapter is in `phase`: both for a joint method, else `phase` only."""
        return ("A", "B") if self.trains_jointly else (phase,)

    def check_phase(self, phase: str) -> None:
        """Raise ValueError when the method never trains `phase` (e.g. 'A' for ffa, whose A stays at init)."""
        if phase not in self.factors:
            allowed = " or ".join(repr(f) for f in self.factors)
            raise ValueError(f"method={self.name!r} trains only {' and '.join(self.factors)}: phase must be {allowed}")


METHOD_SPECS: dict[str, MethodSpec] = {
    "deer": MethodSpec("deer", (("B",), ("A",)), NoiseKind.REGULATED),
    "rolora": MethodSpec("rolora", (("B",), ("A",)), NoiseKind.PLAIN),
    "ffa": MethodSpec("ffa", (("B",),), NoiseKind.PLAIN),
    "lora": MethodSpec("lora", (("A", "B"),), NoiseKind.PLAIN),
    "deer-reference": MethodSpec("deer-reference", (("B",), ("A",)), NoiseKind.REFERENCE),
}
METHODS: tuple[str, ...] = tuple(METHOD_SPECS)  # ("deer", "rolora", "ffa", "lora", "deer-reference")


def method_spec(method: str) -> MethodSpec:
    """The `MethodSpec` of `method`; ValueError naming the allowed methods otherwise."""
    if method not in METHOD_SPECS:
        raise ValueError(f"method={method!r} is not one of {METHODS}")
    return METHOD_SPECS[method]
