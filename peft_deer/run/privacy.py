"""A run's DP settings as the core's objects: sigma, the client-level mechanism, record-level DP-SGD,
local training and the run's DP randomness.

The client-level mechanism is written into the adapter's `DeerLoraConfig` (`noise_multiplier`,
`clip_norm`, `regulator_ridge`, `dp_delta`, `target_epsilon`, `noise_placement`) and the server reads
it back from there (`client_dp`), so a saved adapter states the mechanism it was trained under.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

from ..federated import ClientDP, DPRandomness, LocalTraining, calibrate_noise_multiplier, method_spec
from ..federated.accountant import WeakDeltaWarning
from ..federated.collusion import accounting_sample_rate
from ..federated.head_refit import calibrate_with_refit
from ..federated.record_dp import (
    DECLARED_RULE,
    RecordDP,
    RecordLevel,
    calibrate_record_sigmas,
    public_size,
    record_sample_rate,
    record_steps,
)
from ..settings import RunSettings
from ..tuner.config import DeerLoraConfig


def local_training(settings: RunSettings, record: RecordLevel | None = None) -> LocalTraining:
    """What a client does in a phase (with DP-SGD when `record` is given)."""
    return LocalTraining.from_settings(settings, record.dp if record else None)


SKELLAM_CALIBRATION_MARGIN = 0.999  # integer (Skellam) shares: calibrated for 0.999 epsilon (see below)


def skellam_multiplier(epsilon: float, delta: float) -> float:
    """m whose one client-level release with integer (Skellam) shares (`federated.skellam`: the ledger's integer RDP
    orders, range failure out of delta) reaches SKELLAM_CALIBRATION_MARGIN x `epsilon` against the sites' colluders:
    bisection on a reference plan (length 1, one share). Longer vectors only shrink the rounding's share of the
    bound, so the server's check of the actual plan passes with the margin to spare."""
    from ..federated.skellam import RANGE_FAILURE, plan_skellam, skellam_ledger

    if not delta > 10 * RANGE_FAILURE:
        raise ValueError(f"delta {delta:g} is too small for integer (Skellam) shares: their range failure "
                         f"({RANGE_FAILURE:g} per release) comes out of it")  # fmt: skip

    def eps(m: float) -> float:  # delta less the actual plan's range failure (up to RANGE_FAILURE)
        plan = plan_skellam(m, 1.0, 1, 1, 1)
        return skellam_ledger([dataclasses.asdict(plan)], delta - RANGE_FAILURE, [(1, 1)], 0)["t_colluding_sites"]

    target, low, high = epsilon * SKELLAM_CALIBRATION_MARGIN, 1e-2, 1e3
    if eps(high) > target:
        raise ValueError(f"client-level epsilon {epsilon} at delta {delta} needs a noise multiplier above {high:g}")
    for _ in range(60):
        mid = math.sqrt(low * high)
        low, high = (mid, high) if eps(mid) > target else (low, mid)
    return high


def refit_multiplier(settings: RunSettings, integer_noise: bool = False) -> float | None:
    """The head refit's noise multiplier when the run ends with one (--head-refit stats), else None.

    With training (--rounds >= 1) it is --refit-noise-multiplier and training's sigma takes the rest of the budget.
    Statistics only (--rounds 0): the refit is the run's one release, so its multiplier is calibrated to meet
    every target alone (--epsilon at q = 1, 1 release; --record-epsilon likewise; the larger of the two), or is
    the fixed --noise-multiplier / --record-noise-multiplier; without DP it is --refit-noise-multiplier (unused).
    `integer_noise` (SecAgg+ with Skellam shares, `flower/secagg_refit.py`): the client-level target is met under
    the Skellam ledger (`skellam_multiplier`); the server checks the actual release's Skellam epsilon before it."""
    if settings.refit.head_refit != "stats":
        return None
    if settings.federation.rounds == 0:
        return _statistics_only_multiplier(settings, integer_noise)
    return settings.refit.refit_noise_multiplier


def _statistics_only_multiplier(settings: RunSettings, integer_noise: bool = False) -> float:
    privacy, record = settings.privacy, settings.record
    found = []
    if privacy.client_level:
        if privacy.noise_multiplier is not None:
            found.append(privacy.noise_multiplier)
        elif integer_noise:
            found.append(skellam_multiplier(privacy.epsilon, privacy.delta))
        else:
            found.append(calibrate_noise_multiplier(privacy.epsilon, privacy.delta, 1.0, 1, privacy.accountant))
    if privacy.record_level:
        found.append(
            record.record_noise_multiplier
            if record.record_noise_multiplier is not None
            else calibrate_noise_multiplier(record.record_epsilon, record.record_delta, 1.0, 1, privacy.accountant)
        )
    return max(found) if found else settings.refit.refit_noise_multiplier


def client_sigma(settings: RunSettings, accountant: str | None = None) -> float:
    """The client-level noise multiplier per release: --noise-multiplier, else calibrated for --epsilon over
    the planned run with `accountant` (default --accountant; pass the same one to
    `FederatedServer(budget_accountant=)`) (0.0 without client-level DP). With --head-refit stats the refit's
    release is part of the plan.
    A ValueError names an impossible target."""
    privacy, data = settings.privacy, settings.data
    if not privacy.client_level:
        return 0.0
    if privacy.noise_multiplier is not None:
        return privacy.noise_multiplier
    if settings.federation.rounds == 0:  # statistics only: the refit is the one release
        return refit_multiplier(settings)
    accountant = accountant or privacy.accountant
    releases = settings.federation.rounds * method_spec(settings.federation.method).releases_per_round
    sample_rate = (settings.federation.clients_per_round or data.num_clients) / data.num_clients
    distributed = privacy.noise_placement == "distributed"  # the server accounts at this q too
    sample_rate = accounting_sample_rate(sample_rate, distributed, privacy.collusion_threshold)
    try:
        if refit_multiplier(settings) is not None:
            return calibrate_with_refit(
                privacy.epsilon, privacy.delta, sample_rate, releases, refit_multiplier(settings), accountant
            )
        return calibrate_noise_multiplier(privacy.epsilon, privacy.delta, sample_rate, releases, accountant)
    except ValueError as err:
        raise ValueError(
            f"cannot calibrate a noise multiplier for --epsilon {privacy.epsilon:g} at --delta {privacy.delta:g} "
            f"over {releases} releases (sample rate {sample_rate:g}): {err}"
        ) from err


def client_dp(config: DeerLoraConfig) -> ClientDP | None:
    """The client-level mechanism an adapter config states (None: noise multiplier 0, no client-level DP)."""
    return ClientDP.from_config(config)


def record_level(
    settings: RunSettings, client_sizes: list[int], public_sizes: list[int] | None = None
) -> RecordLevel | None:
    """Record-level DP-SGD settings (sigma calibrated per client for the whole planned run); None without.

    q, steps and sigma come from each client's declared public size (`public_sizes`, else --record-public-sizes,
    else `public_size` of its count), never from its exact count; so do the record-delta check and warning. A
    declaration above the count is allowed, without a message (the console is public): each record is still
    sampled with probability q = batch size / s, so the guarantee holds; only the expected batch is smaller.
    """
    record, local = settings.record, settings.local
    if not settings.privacy.record_level:
        return None
    if min(client_sizes) < 1:
        raise ValueError("--dp record needs every client to hold at least one image")
    if public_sizes is None:
        public_sizes = record.public_sizes  # --record-public-sizes, fixed in advance (None: derived)
    size_rule = None if public_sizes is None else DECLARED_RULE
    declared = [public_size(n) for n in client_sizes] if public_sizes is None else [int(n) for n in public_sizes]
    if len(declared) != len(client_sizes) or min(declared) < 1:
        raise ValueError(
            f"declared public sizes {declared} (--record-public-sizes) must be one integer >= 1 per client "
            f"({len(client_sizes)} clients)"
        )
    largest = max(declared)  # the checks and messages read declared sizes only: the console is public
    if record.record_delta >= 1.0 / largest:
        raise ValueError(
            f"--record-delta {record.record_delta:g} must be < 1 / largest declared client size ({largest})"
        )
    n, delta = largest, record.record_delta
    if delta > 0.1 / n:  # as check_delta warns for clients: a client's n records, each exposed with probability delta
        warnings.warn(
            f"--record-delta {delta:g} is above 1/(10 largest declared client size) = {0.1 / n:.3g}: "
            f"(epsilon, delta)-DP then still allows exposing one of a client's {n} records outright with probability "
            f"up to {n * delta:.2g}"
            "; use e.g. 1e-5",
            WeakDeltaWarning,
            stacklevel=2,
        )
    spec = method_spec(settings.federation.method)
    updates = settings.federation.rounds * spec.releases_per_round
    if updates == 0:  # statistics only (--rounds 0): no DP-SGD step; the refit's release is the record's one
        sigmas = (refit_multiplier(settings),) * len(client_sizes)
        meets = (
            "fixed (--record-noise-multiplier or the larger --noise-multiplier)"
            if record.record_noise_multiplier is not None
            else f"meets epsilon {record.record_epsilon:g} alone"
        )
        calibration = (
            f"statistics only (--rounds 0): the head refit's one release (noise multiplier "
            f"{refit_multiplier(settings):g}, q = 1, 1 step), {meets}"
        )
    elif record.record_noise_multiplier is not None:
        sigmas = (record.record_noise_multiplier,) * len(client_sizes)
        calibration = "fixed (--record-noise-multiplier)"
    elif refit_multiplier(settings) is not None:
        sigmas = _record_sigmas_with_refit(settings, declared, updates)
        calibration = (
            f"per client: epsilon {record.record_epsilon:g} ({settings.privacy.accountant.upper()}) after {updates} "
            "updates (all phases) and the head "
            f"refit's release (noise multiplier {refit_multiplier(settings):g}, q = 1, 1 step)"
        )
    else:
        sigmas = calibrate_record_sigmas(
            record.record_epsilon,
            record.record_delta,
            declared,
            local.batch_size,
            local.local_epochs,
            updates,
            settings.privacy.accountant,
        )
        calibration = (
            f"per client: epsilon {record.record_epsilon:g} ({settings.privacy.accountant.upper()}) after {updates} "
            "updates (all phases)"
        )
    rdp = RecordDP(
        noise_multipliers=sigmas,
        clip_norm=record.record_clip_norm,
        delta=record.record_delta,
        noise=spec.record_noise,
        regulator_ridge=settings.privacy.regulator_ridge,
        max_physical_batch_size=record.max_physical_batch_size,
        target_epsilon=record.record_epsilon,
        calibration=calibration,
        public_sizes=tuple(declared),
        accountant=settings.privacy.accountant,
        size_rule=size_rule,
    )
    return RecordLevel(rdp, local.batch_size, local.local_epochs)


def _record_sigmas_with_refit(settings: RunSettings, declared: list[int], updates: int) -> tuple[float, ...]:
    """Per-client DP-SGD sigma so that the planned steps and the refit's release together meet --record-epsilon."""
    record, local = settings.record, settings.local
    cache: dict[tuple[float, int], float] = {}
    out = []
    for n in declared:
        key = (record_sample_rate(n, local.batch_size), updates * record_steps(n, local.batch_size, local.local_epochs))
        if key not in cache:
            cache[key] = calibrate_with_refit(
                record.record_epsilon, record.record_delta, *key, refit_multiplier(settings)
            )
        out.append(cache[key])
    return tuple(out)


def run_randomness(settings: RunSettings) -> DPRandomness:
    """The run's DP randomness: a fresh OS secret with DP, unless --reproducible-noise (or no DP) asks for
    draws derived from --seed (then nothing is private: the ledger says so)."""
    if settings.privacy.dp != "none" and not settings.privacy.reproducible_noise:
        return DPRandomness.secret()
    return DPRandomness.from_seed(settings.federation.seed)
