"""Method schedules: which LoRA factor(s) each phase of a round trains, aggregates and how it is noised.

The five methods share one code path and differ only by the data in `METHOD_SPECS`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from ..config import METHODS


@dataclass(frozen=True)
class MethodSpec:
    """A method as data: the factors trained in each phase of a round and the DP noise kind.

    `noise` is 'plain' (isotropic in factor space), 'regulated' (DESIGN 2.3, covariance
    sigma^2 C^2 M^-1 with whole-update clipping in the metric M) or 'reference' (the authors' mechanism).
    """

    name: str
    phases: tuple[tuple[str, ...], ...]
    noise: str

    @property
    def releases_per_round(self) -> int:
        return len(self.phases)


METHOD_SPECS: dict[str, MethodSpec] = {
    "lora": MethodSpec("lora", (("A", "B"),), "plain"),
    "ffa": MethodSpec("ffa", (("B",),), "plain"),
    "rolora": MethodSpec("rolora", (("B",), ("A",)), "plain"),
    "deer": MethodSpec("deer", (("B",), ("A",)), "regulated"),
    "deer-reference": MethodSpec("deer-reference", (("B",), ("A",)), "reference"),
}
assert set(METHOD_SPECS) == set(METHODS)


@dataclass(frozen=True)
class Phase:
    """One phase (= one DP release): round index, phase index inside the round, trained factors."""

    round: int
    index: int
    factors: tuple[str, ...]

    @property
    def step(self) -> tuple[int, int]:
        return (self.round, self.index)

    @property
    def config_phase(self) -> str:
        """The `DeerLoraConfig.phase` value for this phase ('B' when both factors train)."""
        return "B" if "B" in self.factors and len(self.factors) == 1 else self.factors[0]


def method_spec(method: str) -> MethodSpec:
    if method not in METHOD_SPECS:
        raise ValueError(f"method={method!r} is not one of {tuple(METHOD_SPECS)}")
    return METHOD_SPECS[method]


def iter_phases(method: str, rounds: int, start: tuple[int, int] = (0, 0)) -> Iterator[Phase]:
    """Phases of `rounds` rounds in order, beginning at `start` = (round, phase index)."""
    spec = method_spec(method)
    for r in range(rounds):
        for i, factors in enumerate(spec.phases):
            if (r, i) >= start:
                yield Phase(r, i, factors)
