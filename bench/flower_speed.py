"""Wall time of the README's 2-site Flower demo against `deer-fed` for the same run, measured back to back.

    python bench/flower_speed.py --data-dir ../shared/data/medmnist --out runs/flower-speed [--run-config "rounds=1"]

Both runs take the Flower app's defaults (`[tool.flwr.app.config]` in pyproject.toml) plus `--run-config`;
`deer-fed` runs them in one process (`python train/fed.py`), the Flower demo is `python -m
peft_deer.flower.local --nodes 2` (a SuperLink and 2 SuperNodes on loopback, everything started and stopped
inside the timing). Prints one JSON object: seconds of each, their ratio, and both runs' test AUC.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEPLOYMENT_ONLY = {
    "min-clients-per-phase",
    "node-wait-s",
    "reply-timeout-s",
    "secure-aggregation",
    "quantization-range",
}


def parse_overrides(text: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in shlex.split(text))


def timed(cmd: list[str], log: Path) -> float:
    start = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - start
    if rc != 0:
        raise SystemExit(f"flower_speed: error: {cmd[:4]} exited {rc}; see {log}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True, help="MedMNIST folder")
    p.add_argument("--out", required=True, help="directory for both runs' outputs and logs (must not exist)")
    p.add_argument("--run-config", default="", help='overrides for both runs, e.g. "rounds=1"')
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    if out.exists():
        p.error(f"--out {out} exists; choose a new directory")
    out.mkdir(parents=True)
    data_dir = Path(args.data_dir).resolve()
    settings = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    overrides = parse_overrides(args.run_config)

    fed = [sys.executable, "train/fed.py"]
    for key, value in {**settings, **overrides}.items():
        flag = value is True or value == "true"
        if key in DEPLOYMENT_ONLY | {"data-dir", "output-dir"} or value == "" or value is False or value == "false":
            continue
        fed += [f"--{key}"] if flag else [f"--{key}={value}"]
    fed += [f"--data-dir={data_dir}", f"--output-dir={out / 'deer-fed'}"]
    flower = [sys.executable, "-m", "peft_deer.flower.local", "--nodes", "2", "--data-dir", str(data_dir)]
    flower += ["--log-dir", str(out / "flower-logs")]
    flower += ["--run-config", f"{args.run_config} output-dir='{out / 'flower'}'".strip()]

    sim_s = timed(fed, out / "deer-fed.log")
    flower_s = timed(flower, out / "flower.log")
    auc = {
        name: json.loads((out / name / "summary.json").read_text())["test"]["final"]["auc"]
        for name in ("deer-fed", "flower")
    }
    result = {
        "deer_fed_seconds": round(sim_s, 1),
        "flower_seconds": round(flower_s, 1),
        "ratio": round(flower_s / sim_s, 2),
        "test_auc": auc,
        "run_config": args.run_config,
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
