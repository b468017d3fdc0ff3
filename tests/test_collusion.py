"""Distributed noise against participants: shares calibrated for t colluders, and the ledger's epsilon per adversary."""

from __future__ import annotations

import json
import math

import pytest
import torch
from opacus.accountants import RDPAccountant

from peft_deer.federated import ClientDP, ClientUpdate, DPRandomness, FederatedServer, iter_phases
from peft_deer.federated.adapter_state import AdapterLayout, LoraFactors
from peft_deer.federated.collusion import adversary_multipliers, residual_multiplier, share_divisor


@pytest.mark.parametrize("k,t", [(2, 1), (5, 2), (6, 0)])
def test_summed_and_residual_noise_variance_match_theory(k, t):
    sigma, n = 1.3, 200_000
    d = share_divisor(k, t)
    g = torch.Generator().manual_seed(k * 10 + t)
    shares = torch.randn(n, k, 2, generator=g, dtype=torch.float64) * sigma / math.sqrt(d)  # 2 coordinates
    total = shares.sum(1)
    residual = total - shares[:, :t].sum(1)  # what t colluders face after subtracting their own shares
    for noise, known in ((total, 0), (residual, t)):
        cov = torch.cov(noise.T)
        theory = residual_multiplier(sigma, k, d, known) ** 2
        assert torch.allclose(torch.diag(cov), torch.full((2,), theory, dtype=torch.float64), rtol=0.02)
        assert abs(float(cov[0, 1])) < 0.02 * theory  # isotropic: independent coordinates
    assert residual_multiplier(sigma, k, d, t) == pytest.approx(sigma)  # d = k - t keeps sigma against t
    assert residual_multiplier(sigma, k, k, 1) == pytest.approx(sigma * math.sqrt((k - 1) / k))


def test_share_divisor_refuses_colluders_who_would_know_every_share():
    assert share_divisor(3, 1) == 2 and share_divisor(3, 0) == 3
    with pytest.raises(ValueError, match="collusion-threshold 2 must be in"):
        share_divisor(2, 2)
    assert adversary_multipliers(1.0, 2, 2, 2)["colluders"] == 0.0


def _server(t: int, k: int = 2) -> FederatedServer:
    layout = AdapterLayout((LoraFactors("m", "m.A", "m.B", 1.0),), ("h",))
    state = {"m.A": torch.randn(2, 5), "m.B": torch.zeros(4, 2), "h": torch.zeros(3)}
    dp = ClientDP(noise_multiplier=0.8, clip_norm=1.0, noise_placement="distributed", delta=1e-3)
    return FederatedServer(
        method="lora",
        layout=layout,
        global_state=state,
        num_clients=k,
        clients_per_phase=k,
        dp=dp,
        randomness=DPRandomness.from_seed(0),
        collusion_threshold=t,
    )


def _rdp(sigma: float, releases: int) -> float:
    acc = RDPAccountant()
    acc.history = [(sigma, 1.0, releases)]
    return acc.get_epsilon(1e-3)


def _release_four(server: FederatedServer, divisor: int) -> None:
    for phase in iter_phases("lora", 4):
        zero = {key: torch.zeros(server.global_state[key].shape) for key in server.trained_keys(phase)}
        server.finish_summed_phase(phase, zero, [0, 1], divisor, noise_floor=2)


def test_ledger_states_the_weaker_epsilon_against_a_participant_of_the_outsiders_mechanism():
    server = _server(t=1)
    _release_four(server, divisor=2)  # shares sigma^2 / k: the README's example (k = 2, sigma 0.8, 4 releases)
    ledger = server.ledger()
    against = ledger["epsilon_against"]
    assert against["outsiders"]["rdp"] == pytest.approx(_rdp(0.8, 4)) == pytest.approx(ledger["epsilon_rdp"])
    assert against["one_participating_site"]["rdp"] == pytest.approx(_rdp(0.8 / math.sqrt(2), 4))
    assert against["one_participating_site"]["rdp"] > 1.5 * ledger["epsilon_rdp"]  # 18.02 vs 11.27
    assert ledger["accountant"] == "prv" and ledger["epsilon"] == ledger["epsilon_prv"] < ledger["epsilon_rdp"]
    assert against["t_colluding_sites"]["t"] == 1 and "noise_shares_per_release" not in ledger
    assert [[r["noise_shares"], r["share_divisor"]] for r in server.releases] == [[2, 2]] * 4  # server-private


def test_shares_calibrated_for_a_participant_keep_sigma_against_it_and_give_outsiders_more():
    server = _server(t=1)
    _release_four(server, divisor=server.share_divisor(2))  # d = k - t = 1: each site adds the full sigma^2
    against = server.ledger()["epsilon_against"]
    assert against["one_participating_site"]["rdp"] == pytest.approx(_rdp(0.8, 4))
    assert against["outsiders"]["rdp"] == pytest.approx(_rdp(0.8 * math.sqrt(2), 4))
    assert against["outsiders"]["prv"] < against["outsiders"]["rdp"]
    again = _server(t=1)
    again.load_state_dict(server.state_dict())  # the per-adversary accountants survive a restart
    assert again.adversary_epsilons() == server.adversary_epsilons()


def test_colluders_who_know_every_share_get_no_guarantee_and_too_few_shares_are_refused():
    server = _server(t=2)
    _release_four(server, divisor=2)
    assert server.ledger()["epsilon_against"]["t_colluding_sites"]["rdp"] == math.inf
    phase = next(iter(iter_phases("lora", 1)))
    zero = {key: torch.zeros(server.global_state[key].shape) for key in server.trained_keys(phase)}
    with pytest.raises(ValueError, match="fewer than the noise floor k=3"):
        _server(t=1, k=3).finish_summed_phase(phase, zero, [0, 1], 2, noise_floor=3)


def _simulated(t: int, clients: int = 3) -> FederatedServer:
    layout = AdapterLayout((LoraFactors("m", "m.A", "m.B", 1.0),), ("h",))
    state = {"m.A": torch.randn(2, 5), "m.B": torch.zeros(4, 2), "h": torch.zeros(3)}
    dp = ClientDP(noise_multiplier=0.8, clip_norm=1.0, noise_placement="distributed", delta=1e-3)
    return FederatedServer(
        method="lora",
        layout=layout,
        global_state=state,
        num_clients=clients,
        clients_per_phase=clients,
        dp=dp,
        randomness=DPRandomness.from_seed(0),
        collusion_threshold=t,
    )


def _zero_updates(server: FederatedServer, phase) -> list[ClientUpdate]:
    keys = server.trained_keys(phase)
    return [ClientUpdate(c, {k: torch.zeros(server.global_state[k].shape) for k in keys}, 10) for c in range(3)]


@pytest.mark.parametrize("t,divisor", [(0, 3), (1, 2), (2, 1)])
def test_the_simulated_distributed_run_sizes_shares_for_t_colluders_and_its_ledger_states_both(t, divisor):
    """Each simulated client adds sigma^2 C^2 / (k - t): the release's noise variance is k / (k - t) sigma^2 C^2,
    and the ledger states sigma sqrt(k / d) against outsiders and sigma against t colluding sites."""
    phase = next(iter(iter_phases("lora", 1)))
    sums = []
    for seed in range(150):
        server = _simulated(t)
        server.randomness = DPRandomness.from_seed(seed)
        release = server.finish_phase(phase, _zero_updates(server, phase))
        sums.append(torch.cat([v.flatten() * 3 for v in release.delta.values()]))  # times the denominator k = 3
    variance = float(torch.stack(sums).double().var())
    assert variance == pytest.approx(0.8**2 * 3 / divisor, rel=0.1)
    server = _simulated(t)
    for phase in iter_phases("lora", 4):
        server.finish_phase(phase, _zero_updates(server, phase))
    ledger = server.ledger()
    against = ledger["epsilon_against"]
    assert ledger["collusion_threshold"] == t and "noise_shares_per_release" not in ledger
    assert [[r["noise_shares"], r["share_divisor"]] for r in server.releases] == [[3, divisor]] * 4
    assert against["outsiders"]["rdp"] == pytest.approx(_rdp(0.8 * math.sqrt(3 / divisor), 4))
    assert against["t_colluding_sites"]["rdp"] == pytest.approx(_rdp(0.8, 4))
    assert ledger["epsilon_rdp"] == pytest.approx(_rdp(0.8, 4))  # accounted at sigma, whatever d


def test_with_more_colluders_than_shares_each_share_is_full_and_the_ledger_gives_no_guarantee_against_them():
    server = _simulated(t=3)
    assert server.share_divisor(3) == 1 and server.share_divisor(5) == 2
    for phase in iter_phases("lora", 2):
        server.finish_phase(phase, _zero_updates(server, phase))
    against = server.ledger()["epsilon_against"]
    assert against["t_colluding_sites"]["rdp"] == math.inf
    assert against["outsiders"]["rdp"] == pytest.approx(_rdp(0.8 * math.sqrt(3), 2))


def test_poisson_sampled_distributed_noise_with_colluders_is_accounted_without_amplification():
    """N = 6, q = 0.5, t = 1 (/tmp/attack24/collusion_poisson.py): shares of sigma^2 C^2 / (k - 1) make the
    release's noise k/(k-1) sigma^2 C^2, which reveals k; so every epsilon is opacus at q = 1 (not 0.5), sigma is
    calibrated at q = 1, and the ledger publishes no per-release k."""
    from peft_deer.federated.collusion import accounting_sample_rate

    layout = AdapterLayout((LoraFactors("m", "m.A", "m.B", 1.0),), ("h",))
    state = {"m.A": torch.randn(2, 5), "m.B": torch.zeros(4, 2), "h": torch.zeros(3)}
    dp = ClientDP(noise_multiplier=0.9, clip_norm=1.0, noise_placement="distributed", delta=1e-4)
    server = FederatedServer(
        method="lora",
        layout=layout,
        global_state=state,
        num_clients=6,
        clients_per_phase=3,
        dp=dp,
        randomness=DPRandomness.from_seed(1),
        collusion_threshold=1,
    )
    assert server.sample_rate == 0.5 and server.accounting_rate == 1.0
    ks = []
    for phase in iter_phases("lora", 12):
        parts = server.participants(phase)
        if len(parts) < 2:
            continue
        keys = server.trained_keys(phase)
        zero = [ClientUpdate(c, {k: torch.zeros(server.global_state[k].shape) for k in keys}, 10) for c in parts]
        server.finish_phase(phase, zero)
        ks.append(len(parts))
    assert len(set(ks)) > 1  # k varies: it would be visible
    ledger = server.ledger()
    assert "noise_shares_per_release" not in ledger and str(ks) not in json.dumps(ledger)
    assert ledger["accounting_sample_rate"] == 1.0 and "no amplification" in ledger["amplification_note"]

    def opacus(history: list[tuple[float, float, int]]) -> float:
        acc = RDPAccountant()
        acc.history = history
        return acc.get_epsilon(1e-4)

    assert ledger["epsilon_rdp"] == pytest.approx(opacus([(0.9, 1.0, len(ks))]))
    assert ledger["epsilon_rdp"] > opacus([(0.9, 0.5, len(ks))])  # what amplification would have claimed
    against = ledger["epsilon_against"]
    assert against["outsiders"]["rdp"] == pytest.approx(opacus([(0.9 * math.sqrt(k / (k - 1)), 1.0, 1) for k in ks]))
    assert against["t_colluding_sites"]["rdp"] == pytest.approx(opacus([(0.9, 1.0, len(ks))]))
    # the rule keeps amplification where the noise does not depend on k (t = 0, or central noise)
    assert accounting_sample_rate(0.5, True, 0) == accounting_sample_rate(0.5, False, 1) == 0.5


def test_sigma_is_calibrated_at_the_q_the_server_accounts_with():
    from peft_deer.federated import calibrate_noise_multiplier
    from peft_deer.run.privacy import client_sigma
    from peft_deer.settings import parse_args

    base = [
        "--num-clients",
        "6",
        "--clients-per-round",
        "3",
        "--rounds",
        "2",
        "--method",
        "lora",
        "--dp",
        "client",
        "--epsilon",
        "8",
        "--delta",
        "1e-4",
        "--noise-placement",
        "distributed",
        "--accountant",
        "rdp",
    ]
    sigma = client_sigma(parse_args([*base, "--collusion-threshold", "1"]))
    assert sigma == pytest.approx(calibrate_noise_multiplier(8, 1e-4, 1.0, 2, "rdp"))
    sigma0 = client_sigma(parse_args([*base, "--collusion-threshold", "0"]))
    assert sigma0 == pytest.approx(calibrate_noise_multiplier(8, 1e-4, 0.5, 2, "rdp")) and sigma0 < sigma
