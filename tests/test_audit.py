"""`deer-audit`: the empirical lower bound is sound for the real mechanisms and catches broken ones.

Every audit here seeds the mechanism's noise (`noise_seed`, unused by the adversary) so that the tests
are deterministic; the trial counts and margins were chosen so that the statements hold for almost
every seed (see the comments), not tuned to one.
"""

from __future__ import annotations

import json
import math

import pytest

import peft_deer.federated.aggregate as aggregate
from peft_deer.audit import (
    build_audit_adapter,
    epsilon_lower_bound,
    gaussian_epsilon,
    main,
    run_client_audit,
    run_record_audit,
)
from peft_deer.federated import ClientDP, ClientUpdate, FederatedServer, iter_phases
from peft_deer.federated.randomness import DPRandomness

DELTA = 0.05  # a large delta makes the audit tight with few trials (valid for num_clients < 20)


def test_gaussian_epsilon_solves_the_analytic_equation():
    from scipy.stats import norm

    for sigma, delta in ((1.0, 1e-5), (2.0, 0.05), (0.5, 1e-3)):
        eps = gaussian_epsilon(sigma, delta)
        got = norm.cdf(-eps * sigma + 0.5 / sigma) - math.exp(eps) * norm.cdf(-eps * sigma - 0.5 / sigma)
        assert got == pytest.approx(delta, rel=1e-6)
    assert gaussian_epsilon(1.0, 1e-5) == pytest.approx(4.377, abs=2e-3)  # below the RDP bound 4.73


def test_bound_uses_a_threshold_from_the_first_half_only():
    import numpy as np

    rng = np.random.default_rng(0)
    worlds = rng.permutation(np.arange(4000) < 2000)
    stats = rng.standard_normal(4000)  # the canary changes nothing: no privacy loss to find
    assert epsilon_lower_bound(stats, worlds, 1e-5).epsilon_lower < 0.3
    perfect = epsilon_lower_bound(worlds.astype(float), worlds, 1e-5)  # perfectly separated
    assert perfect.fpr == perfect.fnr == 0
    f, n = perfect.fpr_upper, perfect.fnr_upper
    assert perfect.epsilon_lower == pytest.approx(max(math.log((1 - 1e-5 - n) / f), math.log((1 - 1e-5 - f) / n)))
    assert 5 < perfect.epsilon_lower < math.log(1000)  # 0 errors in ~1000 trials per world: ~log(1000 / 3.7)


def test_ledger_is_the_servers_own_epsilon():
    """The audit's epsilon_ledger equals `FederatedServer.epsilon()['rdp']` after the same release."""
    for method in ("deer", "deer-reference"):
        result = run_client_audit(method, noise_multiplier=2.0, trials=40, delta=1e-5, num_clients=4, noise_seed=0)
        _, layout, state = build_audit_adapter(method, 2, 4, 3.0)
        server = FederatedServer(
            method, layout, state, 4, 4, dp=ClientDP(2.0, 1.0, delta=1e-5), randomness=DPRandomness.from_seed(0)
        )
        phase = next(iter_phases(method, 1))
        keys = server.trained_keys(phase)
        server.finish_phase(phase, [ClientUpdate(c, {k: state[k] * 0 for k in keys}, 1) for c in range(4)])
        assert result.epsilon_ledger == pytest.approx(server.epsilon()["rdp"])
        if method == "deer-reference":
            assert result.epsilon_nominal == pytest.approx(server.ledger()["nominal_epsilon"])
            assert result.epsilon_ledger > 3 * result.epsilon_nominal  # frozen factors with sigma_max 3


def test_real_deer_is_sound_and_the_audit_is_not_vacuous():
    # sigma = 1, one release, q = 1: exact epsilon 1.57 at delta 0.05. With 16000 trials the bound is
    # >= 0.5 * exact for > 99.9 % of seeds (simulated) and exceeds the ledger (RDP 2.04) for none.
    r = run_client_audit("deer", noise_multiplier=1.0, trials=16000, delta=DELTA, num_clients=2, noise_seed=1)
    assert r.epsilon_gaussian_exact == pytest.approx(gaussian_epsilon(1.0, DELTA))
    assert r.epsilon_gaussian_exact < r.epsilon_ledger
    assert r.epsilon_lower <= r.epsilon_ledger
    assert r.epsilon_lower >= 0.5 * r.epsilon_gaussian_exact


def test_halved_noise_is_caught(monkeypatch):
    original = aggregate.sample_noise

    def half_noise(whiteners, shapes, std, generator):
        return original(whiteners, shapes, std / 2, generator)

    monkeypatch.setattr(aggregate, "sample_noise", half_noise)
    # claims sigma 1.5 (ledger 1.13), has 0.75: the bound is > 1.3 for > 99 % of seeds
    r = run_client_audit("deer", noise_multiplier=1.5, trials=6000, delta=DELTA, num_clients=2, noise_seed=2)
    assert r.epsilon_lower > r.epsilon_ledger


def test_reproducible_noise_voids_the_guarantee():
    r = run_client_audit("deer", noise_multiplier=2.0, trials=1000, delta=1e-5, reproducible_noise=True)
    assert r.fpr == 0 and r.fnr == 0  # rerun and subtract: the canary's contribution or exactly 0
    assert r.epsilon_lower > r.epsilon_ledger  # 4.2 (limited by 1000 trials) > 2.17


def test_deer_reference_breaks_its_nominal_claim():
    # frozen factors with sigma_max 3 on two modules: true multiplier 4 / sqrt(18) = 0.94
    r = run_client_audit(
        "deer-reference", noise_multiplier=4.0, trials=6000, delta=DELTA, num_clients=2, frozen_scale=3.0, noise_seed=3
    )
    assert r.details["effective_noise_multipliers"][0] == pytest.approx(4 / math.sqrt(18), rel=1e-3)
    assert r.epsilon_lower > r.epsilon_nominal  # bound ~ 1.0-1.3 > nominal 0.24: the published claim fails
    assert r.epsilon_lower <= r.epsilon_ledger  # the ledger's true epsilon (2.2) holds


def test_record_level_dp_sgd():
    leaked = run_record_audit("deer", noise_multiplier=3.0, trials=400, delta=1e-5, reproducible_noise=True)
    assert leaked.fpr == 0  # without the canary the rerun is bit-identical
    assert leaked.epsilon_lower > leaked.epsilon_ledger
    real = run_record_audit("deer", noise_multiplier=1.0, trials=1500, delta=DELTA, noise_seed=4)
    assert real.epsilon_lower <= real.epsilon_ledger
    assert real.epsilon_lower > 0  # the canary is visible: the audit is not vacuous here either
    assert real.details["steps"] == 2 and real.details["record_sample_rate"] == 0.5


def test_cli_json(capsys):
    assert main(["--json", "--trials", "200", "--method", "rolora", "--releases", "2", "--num-clients", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in (
        "epsilon_lower",
        "epsilon_ledger",
        "epsilon_nominal",
        "delta",
        "trials",
        "method",
        "level",
        "noise_multiplier",
        "threshold",
        "fpr",
        "fnr",
    ):
        assert key in out
    assert out["method"] == "rolora" and out["level"] == "client" and out["trials"] == 200 and out["releases"] == 2


@pytest.mark.parametrize(
    "argv",
    [
        ["--trials", "5"],
        ["--noise-multiplier", "0"],
        ["--delta", "0.2", "--num-clients", "10"],
        ["--sample-rate", "0.01"],
        ["--method", "nope"],
        ["--level", "record", "--releases", "2"],
    ],
)
def test_cli_rejects_bad_values(argv, capsys):
    with pytest.raises(SystemExit) as info:
        code = main(argv)
        raise SystemExit(code)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("deer-audit: error:") and "\n" not in err
