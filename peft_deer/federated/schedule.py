"""Schedules: the phases of a run, in order, as each method's `MethodSpec` lays them out.

A method is data (`peft_deer.methods.METHOD_SPECS`: factors per phase, noise kind); this module turns
it into `Phase`s. The method table is re-exported here, where the federated core has always found it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from ..methods import METHOD_SPECS, MethodSpec, NoiseKind, method_spec


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
        """The `DeerLoraConfig.phase` value for this phase: its trained factor.

        When both factors train (`lora`) it is 'A', but unused: a joint method sets no adapter phase.
        """
        return self.factors[0]


def iter_phases(method: str, rounds: int, start: tuple[int, int] = (0, 0)) -> Iterator[Phase]:
    """Phases of `rounds` rounds in order, beginning at `start` = (round, phase index)."""
    spec = method_spec(method)
    for r in range(rounds):
        for i, factors in enumerate(spec.phases):
            if (r, i) >= start:
                yield Phase(r, i, factors)


__all__ = ["METHOD_SPECS", "MethodSpec", "NoiseKind", "Phase", "iter_phases", "method_spec"]
