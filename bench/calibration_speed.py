"""PRV sigma calibration time on the main job (train/configs/pneumonia_deer.yaml: 6 hospitals, record level).

Calibrates each hospital's record-level sigma (its declared public size gives q and steps) twice, on the same
(q, steps): with opacus's `get_noise_multiplier(accountant="prv")` (what `calibrate_noise_multiplier` used before:
bisection from [0, 20] to 0.01 in epsilon, each step a full `PRVAccountant`) and with the package's
`calibrate_noise_multiplier(..., "prv")` (RDP bracket, one PRV domain reused, relative 1e-3 on sigma). Prints
per-hospital sigma, time and the PRV epsilon (opacus) of each sigma, and the totals; the RDP calibration for scale.

    PYTHONPATH=. python bench/calibration_speed.py [--config train/configs/pneumonia_deer.yaml]
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

from opacus.accountants import PRVAccountant
from opacus.accountants.utils import get_noise_multiplier

from peft_deer.federated.accountant import _calibrate, calibrate_noise_multiplier
from peft_deer.federated.record_dp import public_size, record_sample_rate, record_steps
from peft_deer.methods import method_spec
from peft_deer.run.task import load_run_data
from peft_deer.settings import RunSettings
from peft_deer.settings.cli import read_config_file

ROOT = Path(__file__).resolve().parents[1]


def prv_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    acc = PRVAccountant()
    acc.history = [(sigma, q, steps)]
    return float(acc.get_epsilon(delta))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "train/configs/pneumonia_deer.yaml"))
    args = parser.parse_args()
    values = read_config_file(Path(args.config))
    values["data_dir"] = str((Path(args.config).parent / values.get("data_dir", "")).resolve())
    if not Path(values["data_dir"]).is_dir():
        values["data_dir"] = str(ROOT.parent / "shared/data/medmnist")
    settings = RunSettings.from_flat({k.replace("-", "_"): v for k, v in values.items()})
    data = load_run_data(settings)
    local, record = settings.local, settings.record
    updates = settings.federation.rounds * method_spec(settings.federation.method).releases_per_round
    eps, delta = record.record_epsilon, record.record_delta
    plans = []
    for part in data.partitions[: settings.data.num_clients]:
        declared = public_size(len(part))
        q = record_sample_rate(declared, local.batch_size)
        plans.append((declared, q, updates * record_steps(declared, local.batch_size, local.local_epochs)))
    warnings.simplefilter("ignore")
    totals = {"opacus-prv": 0.0, "new-prv": 0.0, "rdp": 0.0}
    print(f"epsilon {eps:g}, delta {delta:g}, {len(plans)} hospitals")
    for declared, q, steps in plans:
        start = time.perf_counter()
        old = get_noise_multiplier(
            target_epsilon=eps, target_delta=delta, sample_rate=q, steps=steps, accountant="prv", epsilon_tolerance=0.01
        )
        t_old = time.perf_counter() - start
        _calibrate.cache_clear()
        start = time.perf_counter()
        new = calibrate_noise_multiplier(eps, delta, q, steps, "prv")
        t_new = time.perf_counter() - start
        start = time.perf_counter()
        calibrate_noise_multiplier(eps, delta, q, steps, "rdp")
        t_rdp = time.perf_counter() - start
        totals["opacus-prv"] += t_old
        totals["new-prv"] += t_new
        totals["rdp"] += t_rdp
        print(
            f"n={declared:5d} q={q:.4f} steps={steps:4d}: opacus sigma {old:.5f} ({t_old:5.2f} s, eps "
            f"{prv_epsilon(old, q, steps, delta):.4f}) | new sigma {new:.5f} ({t_new:5.2f} s, eps "
            f"{prv_epsilon(new, q, steps, delta):.4f}) | rdp {t_rdp:5.2f} s"
        )
    print("total seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in totals.items()))


if __name__ == "__main__":
    main()
