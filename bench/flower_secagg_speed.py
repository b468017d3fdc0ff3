"""Wall time of one Flower run with and without SecAgg+ (`secure-aggregation=true`), same settings, back to back.

    python bench/flower_secagg_speed.py --data-dir ../shared/data/medmnist --out runs/secagg-speed [--nodes 2]
        [--run-config "model='tiny-vit' image-size=28 ..."]

Each run is `python -m peft_deer.flower.local --nodes N` (a SuperLink and N SuperNodes on loopback, all started
and stopped inside the timing) with client-level DP and distributed noise (`min-clients-per-phase` = N), the
second one with `secure-aggregation=true`. Prints one JSON object: the seconds of each, their ratio, both runs'
test AUC and the secure run's largest stated quantization error of a sum.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = (
    "model='tiny-vit' image-size=28 train-subset=200 rounds=2 dp='client' noise-multiplier=0.8 clip-norm=0.5 delta=1e-3"
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True, help="MedMNIST folder")
    p.add_argument("--out", required=True, help="directory for both runs' outputs and logs (must not exist)")
    p.add_argument("--nodes", type=int, default=2, help="SuperNodes (sites), >= 2")
    p.add_argument("--run-config", default=DEFAULT, help=f"settings of both runs (default: {DEFAULT})")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    if out.exists():
        p.error(f"--out {out} exists; choose a new directory")
    if args.nodes < 2:
        p.error(f"--nodes {args.nodes} must be >= 2 (SecAgg+ needs two sites)")
    out.mkdir(parents=True)
    common = f"{args.run_config} noise-placement='distributed' min-clients-per-phase={args.nodes}"
    seconds, summaries = {}, {}
    for name, extra in (("distributed", ""), ("secagg", " secure-aggregation=true")):
        cmd = [sys.executable, "-m", "peft_deer.flower.local", "--nodes", str(args.nodes)]
        cmd += ["--data-dir", str(Path(args.data_dir).resolve()), "--log-dir", str(out / f"{name}-logs")]
        cmd += ["--run-config", f"{common}{extra} output-dir='{out / name}'"]
        start = time.perf_counter()
        with open(out / f"{name}.log", "w") as log:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
        seconds[name] = round(time.perf_counter() - start, 1)
        if rc != 0:
            raise SystemExit(f"flower_secagg_speed: error: the {name} run exited {rc}; see {out / f'{name}.log'}")
        summaries[name] = json.loads((out / name / "summary.json").read_text())
    ledger = json.loads((out / "secagg" / "privacy.json").read_text())
    result = {
        "distributed_seconds": seconds["distributed"],
        "secagg_seconds": seconds["secagg"],
        "ratio": round(seconds["secagg"] / seconds["distributed"], 2),
        "test_auc": {name: s["test"]["final"]["auc"] for name, s in summaries.items()},
        "epsilon": ledger["epsilon"],
        "sum_error_bound_per_entry_max": ledger["secure_aggregation_protocol"]["sum_error_bound_per_entry_max"],
        "nodes": args.nodes,
        "run_config": common,
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
