"""Simulated federated LoRA finetuning (DEeR and baselines) on one or many processes with accelerate.

    accelerate launch train/fed.py --dataset medmnist:pneumoniamnist --method deer --dp client --epsilon 4

Clients are split across processes (client c runs on rank c mod world); their updates are gathered,
sorted by client id and aggregated identically on every process, so results do not depend on the
number of processes. The model is never `accelerator.prepare()`d: DDP would average different
clients' gradients. The algorithm lives in `peft_deer.federated`, the run (data, loop, checkpoints,
outputs) in `peft_deer.experiment`; this driver only places clients on processes.
"""

from __future__ import annotations

import sys
from pathlib import Path

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
from peft_deer.settings import build_parser, parse_args

__all__ = ["build_parser", "main", "parse_args"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    rank, world, main_proc = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process

    # Everything that bad inputs can make fail happens before the output dir is touched.
    try:
        exp = build_experiment(args, accelerator.device, say=accelerator.print, share=_from_main_process)
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        print(f"deer-fed: error: {err}", file=sys.stderr)
        return 1

    out = prepare_output_dir(args) if main_proc else Path(args.output_dir)
    accelerator.wait_for_everyone()
    if main_proc:
        exp.save_base_model()
    try:
        progress = start_or_resume(exp, out, main_proc, accelerator.print)
    except SettingsMismatch as err:
        print(f"deer-fed: error: {err}", file=sys.stderr)
        return 2

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
    return broadcast_object_list([value], from_process=0)[0]


if __name__ == "__main__":
    sys.exit(main())
