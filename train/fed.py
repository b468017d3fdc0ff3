"""Simulated federated LoRA finetuning (DEeR and baselines) on one or many processes with accelerate.

    accelerate launch train/fed.py --dataset medmnist:pneumoniamnist --method deer --dp client --epsilon 4

Clients are split across processes (client c runs on rank c mod world); their updates are gathered,
sorted by client id and aggregated identically on every process, so results do not depend on the
number of processes. The model is never `accelerator.prepare()`d: DDP would average different
clients' gradients. The algorithm lives in `peft_deer.federated`, the run (data, loop, checkpoints,
outputs) in `peft_deer.experiment`; this driver only places clients on processes.

Errors: the arguments and the output dir are checked before torch, transformers and PEFT load (a bad
flag is reported in a fraction of a second); every later step that bad input can make fail runs on
every process, and the processes agree on the outcome before going on, so a failure is one line from
rank 0 and the same exit code everywhere, with no process left waiting for a peer that has gone.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["build_parser", "main", "parse_args"]

PROG = "deer-fed"


def _settings() -> ModuleType:
    """`peft_deer.settings`, loaded on its own when the `peft_deer` package is not imported yet: importing the
    package loads torch and PEFT (seconds), and the settings module needs neither."""
    if "peft_deer" in sys.modules:
        from peft_deer import settings

        return settings
    package = importlib.util.find_spec("peft_deer")
    if package is None or not package.submodule_search_locations:
        raise ImportError("peft_deer is not installed; run `pip install -e .` in the repository")
    path = Path(list(package.submodule_search_locations)[0]) / "settings.py"
    spec = importlib.util.spec_from_file_location("_deer_fed_settings", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_parser() -> argparse.ArgumentParser:
    return _settings().build_parser(PROG)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return _settings().parse_args(argv, PROG)


def _say_error(message: Any) -> None:
    """The run's one error line, from rank 0 only (every rank meets the same error)."""
    if os.environ.get("RANK", "0") == "0":
        first = (str(message).strip().splitlines() or [""])[0]
        print(f"{PROG}: error: {first}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    settings = _settings()
    args = settings.parse_args(argv, PROG)
    try:
        settings.check_output_dir(args.output_dir)
    except ValueError as err:
        _say_error(err)
        return 2
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list, gather_object

    from peft_deer.experiment import (
        SettingsMismatch,
        build_experiment,
        final_line,
        finalize,
        prepare_output_dir,
        run_phases,
        simulated_release,
        start_or_resume,
    )

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    rank, world, main_proc = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process

    def together(step: Callable[[], Any]) -> tuple[Any, BaseException | None]:
        """Run `step` on every process; (its result, the first process's error or None), the same on all."""
        try:
            result, error = step(), None
        except (ValueError, RuntimeError, OSError) as err:  # bad input: one-line messages by design
            result, error = None, err
        if world > 1:
            errors = gather_object([None if error is None else (type(error).__name__, str(error))])
            first = next((e for e in errors if e is not None), None)
            kind = SettingsMismatch if first is not None and first[0] == "SettingsMismatch" else ValueError
            error = None if first is None else kind(first[1])
        return result, error

    # Everything that bad inputs can make fail happens before the output dir is touched.
    exp, error = together(
        lambda: build_experiment(args, accelerator.device, say=accelerator.print, share=_from_main_process)
    )
    if error is None:
        _, error = together(lambda: prepare_output_dir(args, PROG) if main_proc else None)
    if error is not None:
        _say_error(error)
        return 1
    if world > 1:  # prepare_output_dir may turn --resume of a run that never checkpointed into a fresh start
        args.resume = broadcast_object_list([args.resume], from_process=0)[0]
    out = Path(args.output_dir)
    progress, error = together(lambda: start_or_resume(exp, out, main_proc, accelerator.print))
    if error is not None:
        _say_error(error)
        return 2 if isinstance(error, SettingsMismatch) else 1

    release = simulated_release(exp, rank, world, gather_object)
    stopped = run_phases(exp, out, progress, release, main_proc, accelerator.wait_for_everyone, accelerator.print)
    if stopped == "max-phases":
        accelerator.print("stopped after --max-phases phases; continue with --resume")
        return 0
    if main_proc:
        print(final_line(finalize(exp, out, progress, stopped), out))
    accelerator.wait_for_everyone()
    return 0


def _from_main_process(value):
    """The main process's `value` on every process (the run's DP secret must be one per run)."""
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


if __name__ == "__main__":
    sys.exit(main())
