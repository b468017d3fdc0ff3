"""The phase loop: budget stop, release, per-round validation, best adapter and a checkpoint per phase.

`run_phases` is the same for every driver; a phase's client updates come from `release_phase`
(in-process training in the simulation, messages to the sites under Flower).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..federated import ClientUpdate, Phase, PhaseRelease, PrivacyBudgetExceeded, iter_phases, load_adapter_state
from .checkpoint import save_checkpoint
from .evaluate import validation_metrics
from .experiment import Experiment
from .files import CHECKPOINT, DIAGNOSTICS, METRICS, checkpoint_payload
from .progress import BestRound, RoundTotals, RunProgress, append_jsonl
from .reporting import reproducible_noise_label
from .run_dir import live_dir, publish

# (phase, participating client ids) -> (the updates that were aggregated, the release)
ReleasePhase = Callable[[Phase, list[int]], tuple[list[ClientUpdate], PhaseRelease]]


def _next_step(phase: Phase, per_round: int) -> tuple[int, int]:
    return (phase.round + 1, 0) if phase.index + 1 == per_round else (phase.round, phase.index + 1)


def run_phases(
    exp: Experiment,
    out: Path,
    progress: RunProgress,
    release_phase: ReleasePhase,
    main_proc: bool = True,
    barrier: Callable[[], None] = lambda: None,
    say: Callable = print,
) -> str | None:
    """Run the remaining phases; returns why it stopped early ("budget", "max-phases") or None.

    Every phase: budget check, sampling, `release_phase`; after the last phase of a round the main
    process validates, appends to metrics.jsonl and tracks the best adapter; then a checkpoint.
    """
    settings, server = exp.settings, exp.server
    spec = server.spec
    totals = progress.round_totals
    phases = list(iter_phases(settings.federation.method, settings.federation.rounds, progress.next_phase))
    done_this_call, stopped = 0, None
    bar = tqdm(phases, desc=f"{settings.federation.method} phases", disable=not main_proc, unit="phase")
    for phase in bar:
        if settings.output.max_phases is not None and done_this_call >= settings.output.max_phases:
            stopped = "max-phases"
            break
        try:
            server.check_budget(phase)
        except PrivacyBudgetExceeded as err:
            say(f"budget stop: {err}")
            stopped = "budget"
            break
        t0 = time.perf_counter()
        with exp.model_inputs():
            updates, release = release_phase(phase, server.participants(phase))
        # Client statistics, server-private; a deployed site under DP keeps them (images_seen 0: none sent).
        totals.add(updates, release, time.perf_counter() - t0)
        done_this_call += 1
        last_of_round = phase.index == spec.releases_per_round - 1
        if last_of_round and main_proc:
            with exp.model_inputs():
                _validate_round(exp, live_dir(out), progress, phase, totals, bar.write)
        if last_of_round:
            totals = progress.round_totals = RoundTotals()
        progress.next_phase = _next_step(phase, spec.releases_per_round)
        if main_proc:
            save_run_checkpoint(exp, out, progress)
        barrier()
    bar.close()
    return stopped


def save_run_checkpoint(exp: Experiment, out: Path, progress: RunProgress) -> None:
    """Checkpoint the run (server state, progress) and publish its directory (a new run's appears now)."""
    save_checkpoint(
        live_dir(out) / CHECKPOINT,
        checkpoint_payload(exp.fingerprint(), exp.data_sha256, exp.server.state_dict(), progress.state_dict()),
    )
    publish(out)


def _validate_round(
    exp: Experiment, out: Path, progress: RunProgress, phase: Phase, totals: RoundTotals, say: Callable
) -> None:
    settings, server = exp.settings, exp.server
    load_adapter_state(exp.model, server.global_state)
    val = validation_metrics(exp)
    # The budget's accountant only (--accountant): server.epsilon() runs both.
    eps = server.accountant.epsilon(server.dp.delta, server.budget_accountant) if server.dp else None
    norms = [n for n in totals.update_norms if not math.isnan(n)]
    # Public: the server's own validation split, the guarantee spent (no timing: it depends on exact counts).
    row = {
        "round": phase.round,
        **{f"val_{k}": v for k, v in val.items()},
        "epsilon": eps,
        **({"record_epsilon_max": server.record.epsilon_max()} if server.record else {}),
        **reproducible_noise_label(settings.privacy.reproducible_noise),  # each row says: NO privacy guarantee
    }
    # Server-private: computed from the clients' data without noise.
    private = {
        "round": phase.round,
        "train_loss": totals.loss / totals.images if totals.images else None,  # None: the sites kept it
        "seconds": totals.seconds,  # wall time of the round's phases: depends on the clients' exact counts
        "images_per_s": totals.images / max(totals.seconds, 1e-9),
        "mean_update_norm": float(np.mean(norms)) if norms else None,  # None: norms stayed with the clients
        "participants_per_phase": list(totals.participants),
    }
    recent = server.releases[-len(totals.participants) :]
    if all("noise_shares" in r for r in recent):  # distributed noise: [k, d] per phase (k is the participant count)
        private["noise_shares_per_phase"] = [[r["noise_shares"], r["share_divisor"]] for r in recent]
    progress.rows.append(row)
    progress.private_rows.append(private)
    append_jsonl(out / METRICS, row)
    append_jsonl(out / DIAGNOSTICS, private)
    score = val["auc"] if val["auc"] is not None else val["accuracy"]
    if progress.best is None or score > progress.best.score:
        progress.best = BestRound(score=score, round=phase.round, state=dict(server.global_state))
    auc = "n/a" if val["auc"] is None else f"{val['auc']:.3f}"
    eps_text = "" if eps is None else f" eps {eps:.2f}"
    # Logs are public: the training loss is a client statistic, shown only when nothing is private.
    loss_text = ""
    if settings.privacy.dp == "none" and private["train_loss"] is not None:
        loss_text = f" (train loss {private['train_loss']:.4f}, {private['images_per_s']:.1f} img/s)"
    say(
        f"round {phase.round + 1}/{settings.federation.rounds}: val acc {val['accuracy']:.3f} bal acc "
        f"{val['balanced_accuracy']:.3f} auc {auc}{eps_text}{loss_text}"
    )
