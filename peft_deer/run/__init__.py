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
"""

from .experiment import Experiment, build_experiment
from .lifecycle import Host, RunOutcome, SetupFailed, Transport, run_experiment
from .outputs import DECISION_RULE, final_line, finalize
from .phases import ReleasePhase, run_phases
from .progress import PRIVATE_DIR, RunProgress, SettingsMismatch, start_or_resume
from .simulation import Simulation, simulated_release

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
