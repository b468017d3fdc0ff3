"""`deer-audit`: the command line of the audit (one line per error, a table and a JSON line per result).

Light at module level (the standard library and light `peft_deer` modules, `peft_deer.light_import`): the
audit's torch and scipy load after the flags are parsed."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..defaults import DELTA
from ..methods import METHODS
from .from_run import run_settings

if TYPE_CHECKING:
    from .bounds import AuditResult


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="deer-audit",
        description=(
            "Empirical privacy audit: a 95% Clopper-Pearson lower bound on the real epsilon of the project's "
            "own DP mechanism (client sampling, clipping, noise via FederatedServer; DP-SGD via train_client), "
            "compared with the epsilon its ledger claims (tight and RDP) at the run's delta and at larger deltas: "
            "'detected' when the mechanism leaks more than claimed. Runs on CPU in minutes."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--level",
        choices=("client", "record"),
        default=None,
        help="client: one canary client among --num-clients; record: one canary record in a client's DP-SGD "
        "(default: client, or record for a --run with record-level DP only)",
    )
    p.add_argument("--method", choices=METHODS, default="deer", help="federated method whose mechanism is audited")
    p.add_argument("--noise-multiplier", type=float, default=1.0, help="noise multiplier sigma (nominal)")
    p.add_argument("--clip-norm", type=float, default=1.0, help="clip norm C (client update, or per-sample gradient)")
    p.add_argument(
        "--sample-rate",
        type=float,
        default=1.0,
        help="client level: q; round(q * num_clients) clients per phase, Poisson-sampled (1 = everyone)",
    )
    p.add_argument(
        "--releases",
        type=int,
        default=1,
        help="client level: releases (phases) per trial, following the method's schedule",
    )
    p.add_argument(
        "--trials",
        type=int,
        default=None,
        help="trials, half with the canary (None: 20000 / releases at client level, 10000 at record level for "
        "2 DP-SGD steps, fewer for more steps; at least 2000)",
    )
    p.add_argument("--delta", type=float, default=DELTA, help="delta of the audited (epsilon, delta) guarantee")
    p.add_argument("--num-clients", type=int, default=10, help="client level: clients N (delta must be < 1/N)")
    p.add_argument(
        "--reproducible-noise",
        action="store_true",
        help="the mechanism draws from a public per-trial seed (DPRandomness.from_seed) and the adversary "
        "reruns and subtracts: shows that reproducible noise voids the guarantee",
    )
    p.add_argument("--seed", type=int, default=0, help="the audit's own seed (trial order, adapter, canary direction)")
    p.add_argument(
        "--frozen-scale",
        type=float,
        default=3.0,
        help="largest singular value of every LoRA factor (frozen factor > 1 breaks deer-reference)",
    )
    p.add_argument("--rank", type=int, default=2, help="LoRA rank of the audited adapter")
    p.add_argument("--dim", type=int, default=4, help="width of the audited adapter's linear layers")
    p.add_argument("--record-examples", type=int, default=16, help="record level: the client's dataset size")
    p.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="record level: expected DP-SGD batch size (Poisson rate batch_size / record_examples)",
    )
    p.add_argument(
        "--plant-noise-factor",
        type=float,
        default=1.0,
        help="run the mechanism with noise multiplier sigma x F while the claimed epsilons keep sigma: "
        "F < 1 plants a bug, and 'detected' shows whether the audit catches it",
    )
    p.add_argument(
        "--run",
        default=None,
        metavar="RUN_DIR",
        help="audit the mechanism with a finished run's parameters (its privacy.json: level, method, sigma, C, "
        "delta, sample rate, releases or DP-SGD steps); they replace the corresponding flags",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object (no progress bar)")
    return p


def _format_table(result: AuditResult) -> str:
    d = result.to_dict()

    def fmt(v: object) -> str:
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    rows = [
        ("level", result.level),
        ("method", f"{result.method} (noise {d['noise']})"),
        ("noise multiplier", f"{result.noise_multiplier:g} (run with x {result.plant_noise_factor:g})"),
        ("delta", f"{result.delta:g}"),
        ("trials", result.trials),
        ("epsilon_lower (95%)", result.epsilon_lower),
        ("epsilon_tight (claimed)", result.epsilon_tight),
        ("epsilon_ledger (RDP)", result.epsilon_ledger),
        ("epsilon_nominal", result.epsilon_nominal),
        ("threshold / FPR / FNR", f"{result.threshold:.3f} / {result.fpr:.4f} / {result.fnr:.4f}"),
        (
            "most decisive delta",
            f"{result.detected_at_delta:.3g}: epsilon_lower {result.epsilon_lower_at_delta:.3f}, "
            f"tight claim {result.epsilon_tight_at_delta:.3f}",
        ),
        ("seconds (per trial)", f"{result.seconds:.1f} ({1000 * result.seconds_per_trial:.2f} ms)"),
    ]
    if "run" in d:
        rows.append(("run's claim", json.dumps(d["run"])))
    lines = [f"{k:<24} {fmt(v)}" for k, v in rows]
    verdict = (
        "DETECTED: the mechanism leaks more than its tight claimed epsilon"
        if result.detected
        else "not detected: the measured bound stays within the tight claim at every delta tested"
    )
    return "\n".join([*lines, verdict])


def _audit(args: argparse.Namespace, progress: bool) -> AuditResult:
    # The audit itself needs torch and scipy: imported once the flags are parsed (`peft_deer.light_import`).
    from ..federated.record_dp import record_steps
    from .audit_settings import AuditSettings
    from .client_level import run_client_audit
    from .record_level import run_record_audit

    settings = {
        "level": args.level or "client",
        "method": args.method,
        "noise_multiplier": args.noise_multiplier,
        "clip_norm": args.clip_norm,
        "delta": args.delta,
        "reproducible_noise": args.reproducible_noise,
        "num_clients": args.num_clients,
        "sample_rate": args.sample_rate,
        "releases": args.releases,
        "num_examples": args.record_examples,
        "batch_size": args.batch_size,
        "local_epochs": 1,
    }
    run_claim = None
    if args.run is not None:
        settings.update(run_settings(args.run, args.level))
        settings["reproducible_noise"] = settings["reproducible_noise"] or args.reproducible_noise
        run_claim = settings.pop("run_claim")
    elif args.level == "record" and (args.releases != 1 or args.sample_rate != 1.0):
        raise ValueError("--releases and --sample-rate apply to --level client only")
    mechanism = ("method", "noise_multiplier", "clip_norm", "delta", "reproducible_noise", "num_clients", "sample_rate",
                 "releases", "num_examples", "batch_size", "local_epochs")  # fmt: skip
    audit = AuditSettings(
        **{k: settings[k] for k in mechanism},
        trials=args.trials,
        seed=args.seed,
        rank=args.rank,
        dim=args.dim,
        frozen_scale=args.frozen_scale,
        progress=progress,
        plant_noise_factor=args.plant_noise_factor,
    )
    if settings["level"] == "client":
        result = run_client_audit(audit, trials=args.trials or max(2000, 20000 // audit.releases))
    else:
        steps = record_steps(audit.num_examples, audit.batch_size, audit.local_epochs)
        result = run_record_audit(audit, trials=args.trials or max(2000, 20000 // steps))
    if run_claim is not None:
        result.details["run"] = run_claim
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    progress = not args.json and sys.stderr.isatty()
    try:
        if args.trials is not None and args.trials < 20:
            raise ValueError(f"--trials {args.trials} must be >= 20 (both halves need trials of both worlds)")
        result = _audit(args, progress)
    except ValueError as err:
        sys.stderr.write(f"deer-audit: error: {err}\n")
        return 2
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(_format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
