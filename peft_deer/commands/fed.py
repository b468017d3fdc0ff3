"""Simulated federated LoRA finetuning (DEeR and baselines) on one or many processes with accelerate.

    accelerate launch train/fed.py --dataset medmnist:pneumoniamnist --method deer --dp client --epsilon 4

Clients are split across processes (client c runs on rank c mod world); their updates are gathered,
sorted by client id and aggregated identically on every process, so results do not depend on the
number of processes. The model is never `accelerator.prepare()`d: DDP would average different
clients' gradients. The algorithm lives in `peft_deer.federated`, the run (data, loop, checkpoints,
outputs) in `peft_deer.run`; this driver only places clients on processes.

Errors: the arguments and the output dir are checked before torch, transformers and PEFT load when the
driver is started as `train/fed.py` (a bad flag is reported in a fraction of a second; the `deer-fed`
console script imports the package, torch included, first); every later step that bad input can make fail runs on
every process, and the processes agree on the outcome before going on, so a failure is one line from
rank 0 and the same exit code everywhere, with no process left waiting for a peer that has gone.
The output dir's state (finished, unfinished, ...) and its lock (one run at a time) are checked first.

Stopping: Ctrl-C (SIGINT) and SIGTERM end the run with one line and exit 130 / 143; the last checkpoint
stays intact (it is written atomically), so `--resume` continues. A failed write (e.g. a full disk) is one
line naming the file, and leaves the previous complete files. Under `accelerate launch` add `--quiet` to
drop accelerate's own traceback after a failed run (torchrun prints its exit-code summary).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..run.run_dir import (
    CHECKPOINT,
    check_output_lock,
    check_output_state,
    lock_output_dir,
    release_output_lock,
    staging_dir,
)
from ..settings import RunSettings, check_output_dir
from ..settings import build_parser as _build_parser
from ..settings import parse_args as _parse_args

__all__ = ["build_parser", "main", "parse_args"]

PROG = "deer-fed"


def build_parser() -> argparse.ArgumentParser:
    return _build_parser(PROG)


def parse_args(argv: list[str] | None = None) -> RunSettings:
    """The run's settings from the command line (and --config); exits 2 with one line if bad."""
    return _parse_args(argv, PROG)


def _say_error(message: Any, prefix: str = f"{PROG}: error: ") -> None:
    """The run's one error line, from rank 0 only (every rank meets the same error)."""
    if os.environ.get("RANK", "0") == "0":
        first = (str(message).strip().splitlines() or [""])[0]
        print(f"{prefix}{first}", file=sys.stderr, flush=True)


class Interrupted(Exception):
    """SIGTERM arrived (SIGINT arrives as KeyboardInterrupt)."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Interrupted()


def _launch_id() -> str | None:
    """What the processes of one multi-process launch share (and no other launch on this host): its rendezvous."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    return f"{os.environ.get('MASTER_ADDR', '')}:{os.environ.get('MASTER_PORT', '')}"


def main(argv: list[str] | None = None) -> int:
    """`deer-fed`: 0 when the run finished (or stopped at --max-phases), 1 or 2 (one line on stderr) if not,
    130 / 143 after Ctrl-C / SIGTERM."""
    settings = parse_args(argv)
    output = settings.output
    out = Path(output.output_dir)
    try:
        check_output_dir(output.output_dir)
        launch = _launch_id()
        if os.environ.get("RANK", "0") == "0":
            lock_output_dir(out, launch)
        else:
            try:
                check_output_lock(out, launch or "")
            except ValueError as err:  # this rank's own finding: rank 0 does not meet it, so this rank says it
                print(f"{PROG}: error: {err}", file=sys.stderr, flush=True)
                return 2
        check_output_state(out, output.resume, output.overwrite)  # before the heavy imports and data
    except ValueError as err:
        release_output_lock(out)
        _say_error(err)
        return 2
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    try:
        return _run(settings)
    except (KeyboardInterrupt, Interrupted) as stop:
        code, name = (143, "SIGTERM") if isinstance(stop, Interrupted) else (130, "SIGINT")
        started = (out / CHECKPOINT).is_file() or staging_dir(out).is_dir()
        hint = f"resume with --resume --output-dir {out}" if started else "nothing was written; start it again"
        _say_error(f"interrupted ({name}); {hint}", prefix=f"{PROG}: ")
        return code
    except OSError as err:  # a failed write after the setup (full disk, lost mount): the files before it stay
        where = f" {err.filename}" if err.filename else ""
        _say_error(f"cannot write{where}: {err.strerror or err}; the previous complete files are kept: fix it and "
                   f"resume with --resume --output-dir {out}")  # fmt: skip
        return 1
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
        release_output_lock(out)


def _run(settings: RunSettings) -> int:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list, gather_object

    from peft_deer.run import Host, SettingsMismatch, SetupFailed, Simulation, run_experiment

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    rank, world = accelerator.process_index, accelerator.num_processes

    def together(step: Callable[[], Any]) -> Any:
        """Run `step` on every process; its result, or the first process's error raised on all of them."""
        try:
            result, error = step(), None
        except (ValueError, RuntimeError, OSError) as err:  # bad input: one-line messages by design
            result, error = None, err
        if world > 1:
            errors = gather_object([None if error is None else (type(error).__name__, str(error))])
            first = next((e for e in errors if e is not None), None)
            kind = SettingsMismatch if first is not None and first[0] == "SettingsMismatch" else ValueError
            error = None if first is None else kind(first[1])
        if error is not None:
            raise error
        return result

    def broadcast(value: Any) -> Any:
        """The main process's `value` on every process (the run's DP secret must be one per run)."""
        return broadcast_object_list([value], from_process=0)[0] if world > 1 else value

    host = Host(
        accelerator.device, accelerator.print, accelerator.is_main_process, together, broadcast,
        accelerator.wait_for_everyone,
    )  # fmt: skip
    try:
        outcome = run_experiment(settings, Simulation(rank, world, gather_object), host)
    except SetupFailed as failed:
        _say_error(failed.error)
        return 2 if isinstance(failed.error, SettingsMismatch) else 1
    if outcome.stopped == "max-phases":
        accelerator.print("stopped after --max-phases phases; continue with --resume")
    return 0


if __name__ == "__main__":
    sys.exit(main())
