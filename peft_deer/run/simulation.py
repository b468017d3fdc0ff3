"""Client updates in the simulation: the phase's clients train in this process (a share of them on each
of `world` processes) and every process aggregates all of them identically."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..federated import ClientTask, ClientUpdate, Phase, PhaseRelease, derive_seed
from .experiment import Experiment
from .lifecycle import Transport
from .phases import ReleasePhase


def simulated_release(
    exp: Experiment, rank: int = 0, world: int = 1, gather: Callable[[list], list] | None = None
) -> ReleasePhase:
    """Train the phase's clients in this process (clients c with c % world == rank) and aggregate.

    `gather` collects every process's updates (accelerate's gather_object) when world > 1.
    """
    seed = exp.settings.federation.seed

    def release(phase: Phase, participants: list[int]) -> tuple[list[ClientUpdate], PhaseRelease]:
        randomness = exp.server.randomness
        tasks = [
            ClientTask(
                c,
                exp.client_data[c],
                derive_seed(seed, *phase.step, c, "train"),
                dp_randomness=randomness.child(*phase.step, c, "record-dp"),
            )
            for c in participants[rank::world]
        ]
        local = exp.engine.train_clients(exp.model, exp.layout, exp.server.global_state, phase, tasks)
        updates = gather(local) if world > 1 and gather is not None else local
        return updates, exp.server.finish_phase(phase, updates)

    return release


@dataclass
class Simulation(Transport):
    """The simulation's transport: `simulated_release` on process `rank` of `world`."""

    rank: int = 0
    world: int = 1
    gather: Callable[[list], list] | None = None

    def release_phase(self, exp: Experiment, out: Path) -> ReleasePhase:
        return simulated_release(exp, self.rank, self.world, self.gather)
