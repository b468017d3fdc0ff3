"""One federated run from its settings to its outputs, whatever moves the client updates.

`train/fed.py` (accelerate simulation) and the Flower `ServerApp` both call `run_experiment`; they
differ only in their `Host` (device, processes) and `Transport` (how a phase's client updates are
produced). The modules, in the order a run meets them:

- `task.py`: the data and client partitions, the backbone and the DEER_LORA model (a Flower site builds
  its side from here too);
- `privacy.py`: the DP settings as the core's objects (sigma, the client-level mechanism read back from
  the adapter config, record-level DP-SGD, the run's DP randomness);
- `experiment.py`: `Experiment` and `build_experiment` (server, engine, frozen-prefix cache);
- `progress.py`: `RunProgress`, `start_or_resume` (checkpoint or a new run dir);
- `phases.py`: `run_phases`, the loop with budget stop, validation, best adapter and checkpoints;
- `evaluate.py`: validation and test metrics of the loaded adapter; its temperature (calibration) at the end;
- `outputs.py`: `finalize` (adapters, ledger, model card, summary) and `final_line`;
- `simulation.py`: the in-process transport; `lifecycle.py`: `run_experiment`.

The run's files, light (standard library, numpy; torch for `checkpoint.py` only): `run_dir.py` (the output
directory: staging, lock, publish), `io.py` (strict JSON, atomic writes), `checkpoint.py` (save, load and check
a checkpoint or an adapter's files) and `reporting.py` (curves, model card).

The names below load on first use, so that `peft_deer.light_import` can load `peft_deer.run.run_dir` (the
`deer-fed` driver's output-dir checks) without torch.
"""

from importlib import import_module
from typing import Any

# name -> the submodule that defines it
_EXPORTS = {
    **dict.fromkeys(("Experiment", "build_experiment"), "experiment"),
    **dict.fromkeys(("Host", "RunOutcome", "SetupFailed", "Transport", "run_experiment"), "lifecycle"),
    **dict.fromkeys(("DECISION_RULE", "final_line", "finalize"), "outputs"),
    **dict.fromkeys(("ReleasePhase", "run_phases"), "phases"),
    **dict.fromkeys(("PRIVATE_DIR", "RunProgress", "SettingsMismatch", "start_or_resume"), "progress"),
    **dict.fromkeys(("Simulation", "simulated_release"), "simulation"),
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DECISION_RULE",
    "PRIVATE_DIR",
    "Experiment",
    "Host",
    "ReleasePhase",
    "RunOutcome",
    "RunProgress",
    "SettingsMismatch",
    "SetupFailed",
    "Simulation",
    "Transport",
    "build_experiment",
    "final_line",
    "finalize",
    "run_experiment",
    "run_phases",
    "simulated_release",
    "start_or_resume",
]
