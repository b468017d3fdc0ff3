"""Accounting: ledger epsilon equals opacus for the same (sigma, q, releases, delta); budget stop."""

from __future__ import annotations

import math

import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant

from peft_deer.federated import (
    ClientDP,
    ClientUpdate,
    DPRandomness,
    FederatedServer,
    PrivacyBudgetExceeded,
    calibrate_noise_multiplier,
    check_delta,
    iter_phases,
)
from peft_deer.federated.adapter_state import AdapterLayout, LoraFactors


def toy_server(method: str, dp: ClientDP | None, num_clients: int = 4, per_phase: int = 4, b_scale: float = 0.0):
    layout = AdapterLayout((LoraFactors("m", "m.A", "m.B", 1.0),), ("h",))
    g = torch.Generator().manual_seed(0)
    state = {
        "m.A": torch.randn(2, 5, generator=g),
        "m.B": torch.randn(4, 2, generator=g) * b_scale,
        "h": torch.zeros(3),
    }
    return FederatedServer(  # RDP: these tests compare with opacus RDP (the default accountant is PRV)
        method=method,
        layout=layout,
        global_state=state,
        num_clients=num_clients,
        clients_per_phase=per_phase,
        dp=dp,
        randomness=DPRandomness.from_seed(0),
        budget_accountant="rdp",
    )


def fake_updates(server: FederatedServer, phase, participants):
    keys = server.trained_keys(phase)
    return [
        ClientUpdate(c, {k: torch.randn(server.global_state[k].shape) * 0.1 for k in keys}, 10) for c in participants
    ]


def run(server: FederatedServer, rounds: int):
    for phase in iter_phases(server.method, rounds):
        server.check_budget(phase)
        server.finish_phase(phase, fake_updates(server, phase, server.participants(phase)))


@pytest.mark.parametrize("method,per_round", [("deer", 2), ("rolora", 2), ("lora", 1), ("ffa", 1)])
def test_ledger_epsilon_equals_opacus(method, per_round):
    dp = ClientDP(noise_multiplier=1.1, clip_norm=1.0, delta=1e-3)
    server = toy_server(method, dp, num_clients=8, per_phase=2)
    run(server, rounds=3)
    ledger = server.ledger()
    assert ledger["releases"] == 3 * per_round
    rdp, prv = RDPAccountant(), PRVAccountant()
    for _ in range(3 * per_round):
        rdp.step(noise_multiplier=1.1, sample_rate=0.25)
        prv.step(noise_multiplier=1.1, sample_rate=0.25)
    assert ledger["epsilon"] == pytest.approx(rdp.get_epsilon(delta=1e-3), rel=1e-9)
    assert ledger["epsilon_prv"] == pytest.approx(prv.get_epsilon(delta=1e-3), rel=1e-6)
    assert ledger["level"] == "client" and ledger["sample_rate"] == 0.25 and ledger["sampling"] == "poisson"


def test_calibrated_sigma_meets_the_target():
    sigma = calibrate_noise_multiplier(2.0, 1e-5, sample_rate=0.5, releases=20)
    rdp = RDPAccountant()
    rdp.history = [(sigma, 0.5, 20)]
    eps = rdp.get_epsilon(1e-5)
    assert 1.95 <= eps <= 2.0
    with pytest.raises(ValueError, match="must be finite and > 0"):
        calibrate_noise_multiplier(0.0, 1e-5, 0.5, 20)


def test_budget_stop_fires_before_the_release_that_would_exceed_it():
    dp = ClientDP(noise_multiplier=2.0, clip_norm=1.0, delta=1e-3, target_epsilon=3.0)
    server = toy_server("deer", dp)
    with pytest.raises(PrivacyBudgetExceeded, match="target 3.0"):
        run(server, rounds=50)
    assert server.stopped_by_budget and server.ledger()["stopped_by_budget"]
    assert server.epsilon()["rdp"] <= 3.0
    rdp = RDPAccountant()
    rdp.history = [(2.0, 1.0, len(server.releases) + 1)]
    assert rdp.get_epsilon(1e-3) > 3.0  # one more release would have exceeded it


def test_reference_mechanism_reports_its_true_epsilon():
    dp = ClientDP(noise_multiplier=1.0, clip_norm=1.0, delta=1e-3)
    server = toy_server("deer-reference", dp, b_scale=3.0)  # sigma_max(B) > 1 from the start
    run(server, rounds=2)
    ledger = server.ledger()
    assert all(s < 1.0 for s in ledger["effective_noise_multipliers"])
    assert ledger["epsilon"] > ledger["nominal_epsilon"] > 0


@pytest.mark.parametrize("delta,num_clients", [(0.5, 6), (0.2, 5), (0.0, 3), (1e-5, 1_000_000)])
def test_delta_must_be_below_one_over_num_clients(delta, num_clients):
    with pytest.raises(ValueError, match="--delta"):
        check_delta(delta, num_clients)


def test_no_dp_ledger_says_so():
    server = toy_server("deer", None)
    run(server, rounds=1)
    ledger = server.ledger()
    assert ledger["level"] == "none" and ledger["releases"] == 2


def test_a_large_delta_is_refused_or_warned_about_with_the_reason():
    import warnings

    from peft_deer.federated.accountant import WeakDeltaWarning, check_delta

    with pytest.raises(ValueError, match="must be in"):
        check_delta(0.2, 6)  # >= 1/N: one client may be revealed outright
    with pytest.raises(ValueError, match="must be in"):
        check_delta(float("nan"), 6)
    with pytest.warns(WeakDeltaWarning, match=r"above 1/\(10 num_clients\).*probability up to 0\.96"):
        check_delta(0.16, 6)  # < 1/6, but 6 clients x 0.16: nearly certain exposure is allowed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_delta(1e-5, 6)  # the default: no warning


def test_secret_randomness_is_fresh_per_run_and_reproducible_only_when_asked():
    from peft_deer.federated import DPRandomness

    a, b = DPRandomness.secret(), DPRandomness.secret()
    assert (
        a.key != b.key
        and not torch.equal(a.stream(0, 0, "noise").uniform(4), b.stream(0, 0, "noise").uniform(4))
        and not a.reproducible
    )
    assert "key" not in repr(a) and a.key.hex() not in repr(a)
    again = DPRandomness.from_state_dict(a.state_dict())  # what the checkpoint keeps
    assert again == a and torch.equal(again.stream(1, 0, 3, "noise").uniform(4), a.stream(1, 0, 3, "noise").uniform(4))
    public = DPRandomness.from_seed(0)
    assert public == DPRandomness.from_seed(0) and public.reproducible and "NO privacy" in public.guarantee_note
    # Every draw has its own stream: rounds, phases, clients and purposes never share one.
    seeds = {
        tuple(a.stream(r, p, c, what).uniform(2).tolist())
        for r in range(4)
        for p in range(2)
        for c in range(6)
        for what in ("noise", "x")
    }
    assert len(seeds) == 4 * 2 * 6 * 2


def _analytic_gaussian_epsilon(sigma: float, delta: float) -> float:
    """Exact epsilon of one Gaussian release (sensitivity 1) at delta (Balle & Wang 2018), by bisection."""
    from statistics import NormalDist

    phi = NormalDist().cdf

    def delta_of(eps: float) -> float:
        return phi(-eps * sigma + 0.5 / sigma) - math.exp(eps) * phi(-eps * sigma - 0.5 / sigma)

    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_of(mid) > delta else (lo, mid)
    return hi


def test_prv_matches_the_exact_gaussian_epsilon_within_its_error_and_is_below_rdp():
    from peft_deer.federated import ReleaseAccountant

    for sigma in (0.8, 2.0):
        acc = ReleaseAccountant([(sigma, 1.0, 1)])
        exact = _analytic_gaussian_epsilon(sigma, 1e-5)
        prv, rdp = acc.epsilon(1e-5, "prv"), acc.epsilon(1e-5, "rdp")
        assert exact <= prv <= exact + 0.03  # the upper bound: eps_error 0.01 plus delta_error, never below
        assert prv < rdp
    many = ReleaseAccountant([(1.0, 0.1, 200)])
    assert many.epsilon(1e-5, "prv") < many.epsilon(1e-5, "rdp")
    with pytest.raises(ValueError, match="accountant 'pld' must be one of"):
        many.epsilon(1e-5, "pld")


@pytest.mark.parametrize("target,q", [(2.0, 1.0), (8.0, 1.0)])
def test_prv_calibration_reaches_the_target_with_less_noise_than_rdp(target, q):
    sigma_prv = calibrate_noise_multiplier(target, 1e-5, sample_rate=q, releases=4, accountant="prv")
    sigma_rdp = calibrate_noise_multiplier(target, 1e-5, sample_rate=q, releases=4, accountant="rdp")
    prv = PRVAccountant()
    prv.history = [(sigma_prv, q, 4)]
    assert target - 0.05 <= prv.get_epsilon(1e-5) <= target  # conservative: the upper bound stays within
    assert sigma_prv < sigma_rdp


def test_budget_stop_uses_the_calibration_accountant_and_the_ledger_shows_both():
    dp = ClientDP(noise_multiplier=6.0, clip_norm=1.0, delta=1e-3, target_epsilon=2.5)
    layout = AdapterLayout((LoraFactors("m", "m.A", "m.B", 1.0),), ("h",))
    state = {"m.A": torch.randn(2, 5), "m.B": torch.zeros(4, 2), "h": torch.zeros(3)}
    counts = {}
    for kind in ("rdp", "prv"):
        randomness = DPRandomness.from_seed(0)
        server = FederatedServer(
            method="lora",
            layout=layout,
            global_state=dict(state),
            num_clients=4,
            clients_per_phase=4,
            dp=dp,
            randomness=randomness,
            budget_accountant=kind,
        )
        with pytest.raises(PrivacyBudgetExceeded, match=kind.upper()):
            run(server, rounds=60)
        ledger = server.ledger()
        assert ledger["accountant"] == kind and ledger["epsilon"] == ledger[f"epsilon_{kind}"] <= 2.5
        assert ledger["epsilon_prv"] < ledger["epsilon_rdp"]
        counts[kind] = len(server.releases)
    for kind, accountant in (("rdp", RDPAccountant()), ("prv", PRVAccountant())):
        accountant.history = [(6.0, 1.0, counts[kind])]  # the last release made stayed within, the next would not
        assert accountant.get_epsilon(1e-3) <= 2.5
        accountant.history = [(6.0, 1.0, counts[kind] + 1)]
        assert accountant.get_epsilon(1e-3) > 2.5
    assert counts["prv"] > counts["rdp"]  # the tight accountant allows more releases at the same budget
    with pytest.raises(ValueError, match="accountant"):
        FederatedServer(
            method="lora",
            layout=layout,
            global_state=dict(state),
            num_clients=4,
            clients_per_phase=4,
            dp=dp,
            budget_accountant="exact",
        )


def test_the_accountant_setting_defaults_to_prv_drives_client_calibration_and_refuses_resume():
    from peft_deer.run.privacy import client_sigma
    from peft_deer.settings import parse_args

    argv = ["--dp", "client", "--epsilon", "3", "--num-clients", "4", "--delta", "1e-3", "--rounds", "2"]
    prv_settings = parse_args(argv)
    rdp_settings = parse_args([*argv, "--accountant", "rdp"])
    assert prv_settings.privacy.accountant == "prv" and rdp_settings.privacy.accountant == "rdp"
    sigma_prv, sigma_rdp = client_sigma(prv_settings), client_sigma(rdp_settings)
    assert sigma_prv == calibrate_noise_multiplier(3.0, 1e-3, 1.0, 4, "prv") < sigma_rdp
    check = PRVAccountant()
    check.history = [(sigma_prv, 1.0, 4)]
    assert 2.95 <= check.get_epsilon(1e-3) <= 3.0
    # The accountant is part of the run's fingerprint: a resume with the other one is refused.
    assert prv_settings.fingerprint() != rdp_settings.fingerprint()
    saved, mine = prv_settings.fingerprint(), rdp_settings.fingerprint()
    assert {k for k in saved if saved[k] != mine[k]} == {"accountant"}
    with pytest.raises(SystemExit):
        parse_args([*argv, "--accountant", "pld"])


def test_record_calibration_and_ledger_use_the_accountant_and_show_both():
    from peft_deer.federated.record_dp import RecordDP, RecordLevel, calibrate_record_sigmas, record_steps

    sizes, batch, epochs, updates, target = [40, 13], 8, 1, 4, 3.0
    prv = calibrate_record_sigmas(target, 1e-5, sizes, batch, epochs, updates, accountant="prv")
    rdp = calibrate_record_sigmas(target, 1e-5, sizes, batch, epochs, updates, accountant="rdp")
    assert all(p < r for p, r in zip(prv, rdp, strict=True))
    record = RecordLevel(RecordDP(noise_multipliers=prv, clip_norm=1.0, delta=1e-5, accountant="prv"), batch, epochs)
    for _ in range(updates):
        record.account([ClientUpdate(c, {}, n) for c, n in enumerate(sizes)])
    ledger = record.ledger()
    for c, n in enumerate(sizes):
        fresh = PRVAccountant()
        fresh.history = [(prv[c], batch / n, updates * record_steps(n, batch, epochs))]
        eps = ledger["epsilon_per_client"][str(c)]
        assert eps == ledger["epsilon_per_client_prv"][str(c)] == pytest.approx(fresh.get_epsilon(1e-5), rel=1e-6)
        assert target - 0.1 < eps <= target < ledger["epsilon_per_client_rdp"][str(c)]
    assert ledger["epsilon_max"] == record.epsilon_max() == max(ledger["epsilon_per_client"].values())
    assert ledger["accountant"].startswith("opacus PRV")
    with pytest.raises(ValueError, match="accountant 'exact'"):
        RecordDP(noise_multipliers=prv, clip_norm=1.0, delta=1e-5, accountant="exact")


@pytest.mark.parametrize("epsilon,q,steps", [(2.0, 0.5, 20), (8.0, 0.25, 36)])
def test_prv_calibration_reaches_the_target_within_1e_3_of_the_smallest_sigma(epsilon, q, steps):
    """The PRV sigma (RDP bracket, one reused PRV domain) meets the target under opacus's own PRVAccountant (the
    ledger's and the budget stop's), and 0.1 % less noise would not: within a relative 1e-3 of the smallest sigma."""
    from peft_deer.federated.accountant import _calibrate

    _calibrate.cache_clear()
    sigma = calibrate_noise_multiplier(epsilon, 1e-5, q, steps, "prv")

    def prv(s: float) -> float:
        acc = PRVAccountant()
        acc.history = [(s, q, steps)]
        return acc.get_epsilon(1e-5)

    assert prv(sigma) <= epsilon < prv(sigma * (1 - 1e-3))
    rdp = RDPAccountant()
    rdp.history = [(sigma, q, steps)]
    assert rdp.get_epsilon(1e-5) > epsilon  # the tight accountant's sigma is below RDP's
