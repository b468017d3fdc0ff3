"""`deer-audit`: an empirical privacy audit of the project's own DP mechanisms (runs on CPU in minutes).

Modules: `bounds` (statistics and the bound), `verdict` (claimed profile, tight epsilon, `detected`),
`setting` (the audited adapter), `game` (what both levels share), `client_level`, `record_level`,
`from_run` (`--run`), `cli`.

The audit plays the distinguishing game behind the definition of (epsilon, delta)-DP and turns the
adversary's success into a statistical **lower bound** on the epsilon the mechanism really has:

1. *Setting.* A tiny adapter (rank-2 LoRA on two 4 x 4 linear layers; one 4 -> 2 layer at record
   level) whose frozen factors have largest singular value `--frozen-scale` (default 3). The adversary
   knows everything except one bit: whether the canary took part.
2. *Client level* (default). N clients; client 0 is the canary, every other client sends a zero update
   (the adversary knows them). A trial picks "in" or "out" (balanced, from `--seed`), then runs
   `--releases` releases through a fresh `FederatedServer` -- the project's own client sampling,
   clipping, noise and accounting, not a re-implementation -- following `iter_phases(method, ...)`.
   In the "out" world client 0 is dropped from every phase. The canary sends 10x (`CANARY_SCALE`) the
   worst-case clipped update for the mechanism, so that the release shifts by the clipped size only if
   clipping works (a clip at 2C, or none, is `detected`): for 'regulated' and 'plain' noise
   `whitener.color(u)` with u a fixed whitened vector of norm 10 C (clipped to metric norm C); for
   'reference' (the authors' mechanism) per matrix a rank-one update of Frobenius norm 10 C along the top
   eigenvector of that matrix's metric M_j (clipped to C per matrix), whose whitened norm is then
   C sqrt(sum_j lambda_max(M_j)) -- more than C once the frozen factor's largest singular value passes 1.
3. *Test statistic* (the likelihood-ratio test for the Gaussian). Per release the adversary takes the
   released sum (delta times the public denominator q N), whitens it with the whiteners the mechanism
   used (`build_whiteners` on the public global state), projects it on the canary's whitened direction
   and divides by the canary's whitened norm and sigma C; the statistic sums this over the releases.
4. *Bound.* Trials are split in two halves. The threshold is chosen on the first half (the one with the
   largest bound there, computed as below at a stricter 99.9 % level so that no tail threshold fitted
   to a few trials is picked); on the second half FPR and FNR get the upper ends of their two-sided
   95 % Clopper-Pearson intervals (each holds with 97.5 %, both together with >= 95 %), and
       epsilon_lower = max(0, log((1 - delta - FNR_up) / FPR_up), log((1 - delta - FPR_up) / FNR_up)).
   One threshold is tested on fresh trials, so with probability >= 95 % the mechanism's true epsilon
   at `--delta` is at least epsilon_lower.
5. *Verdict* (`verdict`). The ledger claims epsilon(delta') at every delta', and one test's rates bound
   epsilon at every delta' at once; `detected` is true when the bound exceeds the **tight** claimed
   epsilon (exact Gaussian for q = 1, else opacus PRV) at any delta' of a grid from `--delta` to 0.5
   (threshold for the largest margin chosen on the first half, rates from the second). At large delta'
   a few thousand trials suffice: the defaults catch halved noise at both levels in CPU minutes.
   `--plant-noise-factor F` runs the mechanism with sigma x F (the server's / DP-SGD's own noise path)
   while every claimed epsilon keeps sigma, so anyone can measure this power.
6. *Seed known to the adversary* (`--reproducible-noise`): the mechanism draws from
   `DPRandomness.from_seed(trial seed)` with a public per-trial seed; the adversary reruns the trial in
   the "out" world with the same seed and subtracts (statistic: whitened norm of the difference, 0 in
   the "out" world, the canary's contribution in the "in" world), which breaks any claimed epsilon.
   Without it every trial uses `DPRandomness.secret()` (OS entropy), as a real run does.
7. *Record level* (`--level record`): one client's DP-SGD (`train_client` with `RecordDP`, opacus
   Poisson batches, per-sample clipping and noise; whitened for `deer`). Its dataset has zero-input
   records (zero LoRA gradient) and, in the "in" world, one canary record with a large input whose
   per-sample gradient has whitened norm >= 10 C (clipped to C only if clipping works); the "out" world
   replaces it by another zero record. Statistic: the client's delta projected on the canary's first-step
   gradient direction (whitened), in units of sigma C.
8. *A finished run* (`--run RUN_DIR`, `from_run`): its privacy.json's level, method, sigma, C, delta,
   sample rate and releases (or the most exposed client's DP-SGD q and steps) on the audit's adapter.

Reported: epsilon_lower; epsilon_ledger (= epsilon_claimed_rdp: the ledger's RDP epsilon, from the
effective multipliers for `deer-reference`, or opacus RDP over the DP-SGD steps); epsilon_tight (the
same claimed mechanism, tight); epsilon_nominal (sigma alone, the published mechanism's claim for
`deer-reference`); detected, with the delta where the verdict is most decisive.
"""

from importlib import import_module
from typing import Any

# name -> the submodule that defines it; loaded on first use, so `python -m peft_deer.audit` can check the
# `train` extra (one line when missing, `peft_deer.extras`) before anything needs it.
_EXPORTS = {
    **dict.fromkeys(
        ("CONFIDENCE", "AuditResult", "Bound", "clopper_pearson_upper", "epsilon_from_rates", "epsilon_lower_bound",
         "gaussian_epsilon"), "bounds"),
    "AuditSettings": "audit_settings",
    **dict.fromkeys(("build_parser", "main"), "cli"),
    **dict.fromkeys(("canary_update", "run_client_audit"), "client_level"),
    "run_record_audit": "record_level",
    "build_audit_adapter": "setting",
    **dict.fromkeys(("Verdict", "profile_test", "tight_epsilons"), "verdict"),
}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CONFIDENCE",
    "AuditResult",
    "AuditSettings",
    "Bound",
    "Verdict",
    "build_audit_adapter",
    "build_parser",
    "canary_update",
    "clopper_pearson_upper",
    "epsilon_from_rates",
    "epsilon_lower_bound",
    "gaussian_epsilon",
    "main",
    "profile_test",
    "run_client_audit",
    "run_record_audit",
    "tight_epsilons",
]
