"""The run lifecycle, written once for every driver: build -> prepare the output dir -> save the base
model -> start or resume -> run the phases -> finalize -> the final line.

A driver says where the run is hosted (`Host`: device, log, and how its processes agree) and how client
updates move (`Transport`: in-process training in the simulation, messages to sites under Flower), and
calls `run_experiment`. The output dir is checked and locked (one run at a time) before anything heavy
loads. A bad setting or bad data found before the first phase raises `SetupFailed` holding the one-line
error; nothing is written to the output dir before then.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from ..settings import RunSettings
from .checkpoint import data_digest
from .experiment import Experiment, build_experiment
from .outputs import final_line, finalize
from .phases import ReleasePhase, run_phases, save_run_checkpoint
from .privacy import refit_multiplier
from .progress import RunProgress, append_jsonl, start_or_resume
from .refit import RefitRequest, refit_head, simulate_release
from .run_dir import PRIVATE_DIR, check_output_state, lock_output_dir, prepare_output_dir, release_output_lock

T = TypeVar("T")


class Transport:
    """How a phase's client updates are produced, plus the hooks a driver may need around the loop."""

    with_client_data = True  # the server process holds the clients' training images (simulation only)

    def before_start(self, exp: Experiment, out: Path) -> None:
        """Called once the output dir is checked, before the checkpoint is loaded or the run dir created."""

    def release_phase(self, exp: Experiment, out: Path) -> ReleasePhase:
        raise NotImplementedError

    def refit_release(self, exp: Experiment, request: RefitRequest):
        """The hospitals' summed statistics releases for `--head-refit stats` (`run.refit`): in process here."""
        return simulate_release(exp, request)

    def refit_noise_floor(self, exp: Experiment) -> int:
        """k, the hospitals whose distributed refit shares make up the noise (every hospital here)."""
        return exp.settings.data.num_clients

    def refit_multiplier(self, exp: Experiment) -> float | None:
        """m, the refit's noise multiplier (`run.privacy.refit_multiplier`: the Gaussian mechanism's here)."""
        return refit_multiplier(exp.settings)

    def ledgers(self) -> tuple[dict | None, dict | None]:
        """(what the public ledger adds, what server-private/deployment.json holds), or Nones."""
        return None, None

    def after_finalize(self, exp: Experiment, out: Path, summary: dict[str, Any]) -> None:
        """Called on the main process once the outputs are written, before the final line."""


def _call(step: Callable[[], T]) -> T:
    return step()


@dataclass
class Host:
    """Where a run executes: its device, its log, and (several processes) how they agree.

    together(step): run `step` on every process and return its result, or raise the same error on all;
    broadcast(value): the main process's value on every process; barrier(): wait for every process.
    """

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    say: Callable[[str], None] = print
    is_main: bool = True
    together: Callable[[Callable[[], Any]], Any] = _call
    broadcast: Callable[[Any], Any] = lambda value: value
    barrier: Callable[[], None] = lambda: None


class SetupFailed(Exception):
    """A step before the first phase failed on bad settings or data; `error` holds the one-line error."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass
class RunOutcome:
    """How `run_experiment` ended: `summary` (main process; None if stopped by --max-phases) and why it stopped."""

    out: Path
    stopped: str | None
    summary: dict[str, Any] | None = None


def run_experiment(settings: RunSettings, transport: Transport, host: Host | None = None) -> RunOutcome:
    """One run from its settings to its outputs (see the module docstring)."""
    host = host or Host()
    output = settings.output
    try:
        # a no-op if the driver took it already
        host.together(lambda: lock_output_dir(Path(output.output_dir), say=host.say) if host.is_main else None)
        host.together(lambda: check_output_state(output.output_dir, output.resume, output.overwrite))
        exp, progress, out = _set_up(settings, transport, host)
    except (ValueError, RuntimeError, OSError) as err:  # bad input: one-line messages by design
        if host.is_main:
            release_output_lock(Path(output.output_dir))
        raise SetupFailed(err) from err
    try:
        return _run(exp, progress, out, transport, host)
    finally:
        if host.is_main:
            release_output_lock(out)


def _run(exp: Experiment, progress: RunProgress, out: Path, transport: Transport, host: Host) -> RunOutcome:
    release = transport.release_phase(exp, out)
    stopped = run_phases(exp, out, progress, release, host.is_main, host.barrier, host.say)
    if stopped == "max-phases":
        return RunOutcome(out, stopped)
    if exp.settings.refit.head_refit != "none" and exp.server.refit is None:
        if host.is_main and not exp.settings.federation.rounds:  # the DP key on disk before the one release:
            save_run_checkpoint(exp, out, progress)  # a crash, then --resume, redraws the same noise, not fresh
        host.barrier()
        started = time.perf_counter()
        # every process: same data, same DP streams
        refit_head(
            exp, host.say, transport.refit_release, transport.refit_noise_floor(exp), transport.refit_multiplier(exp)
        )
        if host.is_main:  # its wall time depends on the hospitals' exact sizes: server-private only
            progress.private_rows.append({"head_refit_seconds": time.perf_counter() - started})
            append_jsonl(out / PRIVATE_DIR / "diagnostics.jsonl", progress.private_rows[-1])
            save_run_checkpoint(exp, out, progress)  # a resumed run never releases the statistics twice
        host.barrier()
    summary = None
    if host.is_main:
        extra_privacy, private_extra = transport.ledgers()
        summary = finalize(exp, out, progress, stopped, extra_privacy, private_extra)
        transport.after_finalize(exp, out, summary)
        host.say(final_line(summary, out))
    host.barrier()
    return RunOutcome(out, stopped, summary)


def _set_up(settings: RunSettings, transport: Transport, host: Host) -> tuple[Experiment, RunProgress, Path]:
    """Everything that bad inputs can make fail, before the output dir is touched; then the run's start."""
    exp = host.together(
        lambda: build_experiment(settings, host.device, transport.with_client_data, host.say, host.broadcast)
    )
    exp.data_sha256 = data_digest(exp.data.splits)  # in the checkpoint: a resume on changed data is refused
    output = settings.output
    checked = host.together(
        lambda: prepare_output_dir(output.output_dir, output.resume, output.overwrite) if host.is_main else None
    )
    # --resume of a run that never checkpointed is a fresh start: every process must know
    resume = host.broadcast(None if checked is None else checked[1])
    if resume != output.resume:
        exp.settings = settings = settings.replace(resume=resume)
    out = Path(settings.output.output_dir)
    if host.is_main:
        exp.save_base_model()  # a resumed run whose directory lacks its random backbone
    transport.before_start(exp, out)
    progress = host.together(lambda: start_or_resume(exp, out, host.is_main, host.say))
    return exp, progress, out
