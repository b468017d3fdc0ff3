"""Run deer, rolora, ffa and lora (and deer without DP) at one client-level epsilon; print a Markdown table.

    python bench/compare_methods.py --out runs/compare -- --model dinov2-s --image-size 56 --rounds 3

Arguments after `--` go to every `train/fed.py` run (they override the defaults below). Each run's
numbers come from its own summary.json; the table says which machine ran it.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

DEFAULTS = [
    "--dataset",
    "medmnist:pneumoniamnist",
    "--data-dir",
    "../shared/data/medmnist",
    "--model",
    "dinov2-s",
    "--image-size",
    "56",
    "--num-clients",
    "12",
    "--partition",
    "dirichlet",
    "--dirichlet-alpha",
    "0.1",
    "--train-subset",
    "1200",
    "--rounds",
    "3",
    "--batch-size",
    "16",
    "--lr",
    "0.002",
    "--delta",
    "1e-5",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/compare", help="parent folder of the runs")
    parser.add_argument("--epsilon", type=float, default=8.0, help="client-level epsilon of every DP run")
    parser.add_argument("--methods", nargs="+", default=["deer", "rolora", "ffa", "lora"])
    parser.add_argument(
        "--no-dp-baseline", action=argparse.BooleanOptionalAction, default=True, help="also run deer without DP"
    )
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    runs = [(m, ["--dp", "client", "--epsilon", str(args.epsilon)]) for m in args.methods]
    if args.no_dp_baseline:
        runs.append(("deer", ["--dp", "none"]))
    rows = []
    for method, dp in runs:
        out = Path(args.out) / f"{method}-{'dp' if '--epsilon' in dp else 'nodp'}"
        cmd = [
            sys.executable,
            "train/fed.py",
            *DEFAULTS,
            "--method",
            method,
            *dp,
            *extra,
            "--output-dir",
            str(out),
            "--overwrite",
        ]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        summary = json.loads((out / "summary.json").read_text())
        test = summary["test"]["final"]
        rows.append((method, summary["epsilon"], test["accuracy"], test["auc"], summary["total_seconds"]))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or 'x86_64'})"
    print(f"\n| method | client-level ε (δ=1e-5) | test accuracy | test AUC | training s | device: {device} |")
    print("|---|---|---|---|---|---|")
    for method, eps, accuracy, auc, seconds in rows:
        eps_text = "∞ (no DP)" if eps is None else f"{eps:.2f}"
        auc_text = "n/a" if auc is None else f"{auc:.3f}"
        print(f"| {method} | {eps_text} | {accuracy:.3f} | {auc_text} | {seconds:.0f} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
