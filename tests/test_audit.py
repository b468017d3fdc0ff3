"""`deer-audit`: the empirical lower bound is sound for the real mechanisms and catches broken ones.

Every audit here seeds the mechanism's noise (`noise_seed`, unused by the adversary) so that the tests
are deterministic; the trial counts and margins were chosen so that the statements hold for almost
every seed (see the comments), not tuned to one.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from peft_deer.audit import (
    build_audit_adapter,
    epsilon_lower_bound,
    gaussian_epsilon,
    main,
    profile_test,
    run_client_audit,
    run_record_audit,
    tight_epsilons,
)
from peft_deer.audit.verdict import delta_grid, rdp_epsilon
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


@pytest.mark.e2e  # a whole audit, over 5 s
def test_ledger_is_the_servers_own_epsilon():
    """The audit's epsilon_ledger equals `FederatedServer.epsilon()['rdp']` after the same release."""
    for method in ("deer", "deer-reference"):
        result = run_client_audit(
            method=method, noise_multiplier=2.0, trials=40, delta=1e-5, num_clients=4, noise_seed=0
        )
        _, layout, state = build_audit_adapter(method, 2, 4, 3.0)
        server = FederatedServer(  # RDP: the audit's ledger epsilon is opacus RDP
            method=method,
            layout=layout,
            global_state=state,
            num_clients=4,
            clients_per_phase=4,
            dp=ClientDP(noise_multiplier=2.0, clip_norm=1.0, delta=1e-5),
            randomness=DPRandomness.from_seed(0),
            budget_accountant="rdp",
        )
        phase = next(iter_phases(method, 1))
        keys = server.trained_keys(phase)
        server.finish_phase(phase, [ClientUpdate(c, {k: state[k] * 0 for k in keys}, 1) for c in range(4)])
        assert result.epsilon_ledger == pytest.approx(server.epsilon()["rdp"])
        if method == "deer-reference":
            assert result.epsilon_nominal == pytest.approx(server.ledger()["nominal_epsilon"])
            assert result.epsilon_ledger > 3 * result.epsilon_nominal  # frozen factors with sigma_max 3


@pytest.mark.e2e  # a whole audit, over 5 s
def test_real_deer_is_sound_and_the_audit_is_not_vacuous():
    # sigma = 1, one release, q = 1: exact epsilon 1.57 at delta 0.05. With 16000 trials the bound is
    # >= 0.5 * exact for > 99.9 % of seeds (simulated) and exceeds the ledger (RDP 2.04) for none.
    r = run_client_audit(method="deer", noise_multiplier=1.0, trials=16000, delta=DELTA, num_clients=2, noise_seed=1)
    assert r.epsilon_tight == pytest.approx(gaussian_epsilon(1.0, DELTA))
    assert r.epsilon_tight < r.epsilon_ledger
    assert r.epsilon_lower <= r.epsilon_tight
    assert r.epsilon_lower >= 0.5 * r.epsilon_tight
    assert not r.detected


def test_tight_epsilon_is_exact_at_q1_and_below_rdp():
    deltas = np.array([1e-5, 1e-3, 0.1])
    exact = tight_epsilons([(2.0, 1.0, 4)], deltas)  # four releases at sigma 2 = one at sigma 1
    assert exact == pytest.approx([gaussian_epsilon(1.0, d) for d in deltas])
    prv_q1 = tight_epsilons([(1.0, 1.0, 1), (2.0, 0.999999, 1)], deltas)  # the PRV path, nearly q = 1
    assert prv_q1 == pytest.approx(tight_epsilons([(1.0, 1.0, 1), (2.0, 1.0, 1)], deltas), abs=0.05)
    sub = tight_epsilons([(1.0, 0.5, 2)], deltas)
    for d, e in zip(deltas, sub, strict=True):
        assert 0 <= e <= rdp_epsilon([(1.0, 0.5, 2)], d)
    assert np.all(np.diff(sub) < 0)  # epsilon falls as delta grows


def test_profile_test_against_theory():
    """Gaussian statistics with the exact claim: false alarms at most at the 5 % level, power where theory says."""
    rng = np.random.default_rng(0)
    deltas = delta_grid(1e-5)
    claimed = tight_epsilons([(1.0, 1.0, 1)], deltas)  # mu = 1
    false_alarms = 0
    for _ in range(40):
        worlds = rng.permutation(np.arange(2000) < 1000)
        honest = rng.standard_normal(2000) + worlds  # exactly the claimed mechanism
        false_alarms += profile_test(honest, worlds, deltas, claimed).detected
        halved = 0.5 * rng.standard_normal(2000) + worlds  # noise x 0.5: mu = 2
        verdict = profile_test(halved, worlds, deltas, claimed)
        assert verdict.detected and verdict.epsilon_lower > verdict.epsilon_tight
        assert verdict.delta > 1e-3  # shown at a moderate delta, where 2000 trials measure the rates
    assert false_alarms <= 2  # 95 % confidence: expected <= 2 of 40


@pytest.mark.e2e  # a whole audit, over 5 s
@pytest.mark.parametrize("level", ["client", "record"])
def test_planted_noise_factor_is_detected_and_honest_noise_is_not(level):
    # with 600 trials: F = 0.25 (true mu 4 against a claimed 1 at client level) is caught for essentially
    # every seed; F = 1 is flagged with probability < 5 %
    audit = run_client_audit if level == "client" else run_record_audit
    got = {
        f: audit(method="deer", noise_multiplier=1.0, trials=600, delta=1e-5, noise_seed=5, plant_noise_factor=f)
        for f in (1.0, 0.25)
    }
    assert not got[1.0].detected and got[0.25].detected
    for r in got.values():  # the claim keeps the nominal sigma
        assert r.epsilon_tight == pytest.approx(got[1.0].epsilon_tight)
        assert r.epsilon_ledger == pytest.approx(got[1.0].epsilon_ledger)
    assert got[0.25].epsilon_lower_at_delta > got[0.25].epsilon_tight_at_delta
    if level == "client":  # the server itself ran with sigma x F
        assert got[0.25].details["effective_noise_multipliers"] == [pytest.approx(0.25)]


def test_reproducible_noise_voids_the_guarantee():
    r = run_client_audit(method="deer", noise_multiplier=2.0, trials=1000, delta=1e-5, reproducible_noise=True)
    assert r.fpr == 0 and r.fnr == 0  # rerun and subtract: the canary's contribution or exactly 0
    assert r.epsilon_lower > r.epsilon_ledger  # 4.2 (limited by 1000 trials) > 2.17


@pytest.mark.e2e  # a whole audit, over 5 s
def test_deer_reference_breaks_its_nominal_claim():
    # frozen factors with sigma_max 3 on two modules: true multiplier 4 / sqrt(18) = 0.94
    r = run_client_audit(
        method="deer-reference",
        noise_multiplier=4.0,
        trials=6000,
        delta=DELTA,
        num_clients=2,
        frozen_scale=3.0,
        noise_seed=3,
    )
    assert r.details["effective_noise_multipliers"][0] == pytest.approx(4 / math.sqrt(18), rel=1e-3)
    assert r.epsilon_lower > r.epsilon_nominal  # bound ~ 1.0-1.3 > nominal 0.24: the published claim fails
    assert r.epsilon_lower <= r.epsilon_ledger  # the ledger's true epsilon (2.2) holds


@pytest.mark.e2e  # a whole audit, over 5 s
def test_record_level_dp_sgd():
    leaked = run_record_audit(method="deer", noise_multiplier=3.0, trials=400, delta=1e-5, reproducible_noise=True)
    assert leaked.fpr == 0  # without the canary the rerun is bit-identical
    assert leaked.epsilon_lower > leaked.epsilon_ledger
    real = run_record_audit(method="deer", noise_multiplier=1.0, trials=1500, delta=DELTA, noise_seed=4)
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
        "detected",
        "epsilon_claimed_rdp",
        "epsilon_tight",
        "tight_method",
        "plant_noise_factor",
        "detected_at_delta",
    ):
        assert key in out
    assert isinstance(out["detected"], bool) and out["plant_noise_factor"] == 1.0
    assert out["epsilon_claimed_rdp"] == out["epsilon_ledger"] >= out["epsilon_tight"] > 0
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
        ["--plant-noise-factor", "0"],
        ["--plant-noise-factor", "nan"],
        ["--run", "/nonexistent/run"],
    ],
)
def test_cli_rejects_bad_values(argv, capsys):
    with pytest.raises(SystemExit) as info:
        code = main(argv)
        raise SystemExit(code)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("deer-audit: error:") and "\n" not in err


def _client_run(tmp_path, sample_rate_clients=4):
    """A real client-level ledger: one release of a FederatedServer, written as a run's privacy.json."""
    _, layout, state = build_audit_adapter("rolora", 2, 4, 3.0)
    server = FederatedServer(
        method="rolora",
        layout=layout,
        global_state=state,
        num_clients=6,
        clients_per_phase=sample_rate_clients,
        dp=ClientDP(noise_multiplier=1.5, clip_norm=0.5, delta=0.01),
        randomness=DPRandomness.from_seed(0),
    )
    phase = next(iter_phases("rolora", 1))
    keys = server.trained_keys(phase)
    server.finish_phase(
        phase, [ClientUpdate(c, {k: state[k] * 0 for k in keys}, 1) for c in server.participants(phase)]
    )
    ledger = server.ledger()
    (tmp_path / "privacy.json").write_text(json.dumps(ledger))
    return ledger


def test_run_dir_audits_the_runs_own_mechanism(tmp_path, capsys):
    ledger = _client_run(tmp_path)
    assert main(["--run", str(tmp_path), "--json", "--trials", "200", "--plant-noise-factor", "0.5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["method"], out["level"], out["noise_multiplier"], out["clip_norm"]) == ("rolora", "client", 1.5, 0.5)
    assert (out["delta"], out["num_clients"], out["releases"]) == (0.01, 6, 1)
    assert out["sample_rate"] == pytest.approx(ledger["sample_rate"]) and out["sample_rate"] < 1
    assert "opacus PRV" in out["tight_method"]  # q < 1: no closed form
    assert out["run"]["epsilon_rdp"] == ledger["epsilon_rdp"] == pytest.approx(out["epsilon_claimed_rdp"])
    assert out["epsilon_tight"] <= out["epsilon_claimed_rdp"]


def test_run_dir_record_level(tmp_path, capsys):
    ledger = {
        "level": "record",
        "method": "deer",
        "record": {
            "noise_multipliers": {"0": 2.0, "1": 1.0},
            "clip_norm": 1.0,
            "delta": 1e-4,
            "steps": {"0": 4, "1": 4},
            "epsilon_per_client": {"0": 1.0, "1": 3.0},
            "sample_rate": 0.25,
        },
    }
    (tmp_path / "privacy.json").write_text(json.dumps(ledger))
    assert main(["--run", str(tmp_path), "--json", "--trials", "40"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["level"], out["noise_multiplier"], out["delta"]) == ("record", 1.0, 1e-4)  # client 1: largest eps
    assert (out["record_sample_rate"], out["steps"], out["run"]["client"]) == (0.25, 4, "1")
    del ledger["record"]["sample_rate"]
    (tmp_path / "privacy.json").write_text(json.dumps(ledger))
    assert main(["--run", str(tmp_path), "--json", "--trials", "40"]) == 2
    assert "sample rate" in capsys.readouterr().err


@pytest.mark.parametrize(
    "ledger, message",
    [
        ({"level": "none", "method": "deer"}, "no differential privacy"),
        ({"level": "client", "method": "deer", "releases": 1}, "noise_multiplier"),
        ("not json", "not readable JSON"),
    ],
)
def test_run_dir_errors(tmp_path, capsys, ledger, message):
    (tmp_path / "privacy.json").write_text(ledger if isinstance(ledger, str) else json.dumps(ledger))
    assert main(["--run", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("deer-audit: error:") and message in err and "\n" not in err


@pytest.mark.e2e  # a whole audit, over 5 s
@pytest.mark.parametrize("level", ["client", "record"])
def test_a_clipping_bug_is_detected(level, monkeypatch):
    """The canary's update is 10 C: a mechanism that clips to 2C (the ledger keeps C) shifts the release by
    2C (true mu 2 against a claimed 1, like halved noise) and is `detected`; honest clipping is not."""
    import peft_deer.federated.aggregate as aggregate
    import peft_deer.federated.dp_sgd as dp_sgd

    audit = run_client_audit if level == "client" else run_record_audit
    trials = 2000 if level == "client" else 1500
    clip_norm = 1.0 if level == "client" else 2000.0  # record: 2C > the unscaled canary gradient (~2500)

    def run() -> object:
        return audit(method="deer", noise_multiplier=1.0, clip_norm=clip_norm, trials=trials, delta=1e-5, noise_seed=7)

    honest = run()
    if level == "client":
        clip = aggregate.clip_client_update
        monkeypatch.setattr(aggregate, "clip_client_update", lambda d, w, kind, c: clip(d, w, kind, 2 * c))
    else:
        accumulate = dp_sgd.WhitenedDPOptimizer.clip_and_accumulate

        def clip_at_2c(self) -> None:  # clip to 2C; the noise (add_noise) keeps C
            self.max_grad_norm *= 2
            try:
                accumulate(self)
            finally:
                self.max_grad_norm /= 2

        monkeypatch.setattr(dp_sgd.WhitenedDPOptimizer, "clip_and_accumulate", clip_at_2c)
    buggy = run()
    assert not honest.detected and buggy.detected
    assert buggy.epsilon_tight == pytest.approx(honest.epsilon_tight)  # the claim is the same


def test_one_audit_settings_object_drives_both_levels():
    """An `AuditSettings` gives the same audit as the same fields by name; unknown or positional ones are refused."""
    from peft_deer.audit import AuditSettings

    settings = AuditSettings(method="deer", noise_multiplier=2.0, trials=40, delta=1e-3, num_clients=3, noise_seed=5)
    by_object = run_client_audit(settings)
    by_name = run_client_audit(method="deer", noise_multiplier=2.0, trials=40, delta=1e-3, num_clients=3, noise_seed=5)
    assert (by_object.trials, by_object.details["num_clients"]) == (40, 3)
    same = ("fpr", "fnr", "epsilon_ledger", "epsilon_lower")
    assert [getattr(by_object, k) for k in same] == [getattr(by_name, k) for k in same]
    record = run_record_audit(settings, trials=20, num_examples=4, batch_size=2)  # the client fields are ignored
    assert (record.trials, record.details["record_examples"], record.noise_multiplier) == (20, 4, 2.0)
    assert run_client_audit(AuditSettings(noise_seed=1, num_clients=2, delta=1e-3), trials=20).trials == 20
    with pytest.raises(TypeError, match="unknown audit settings"):
        run_client_audit(settings, ridge=1e-3)  # the one spelling is regulator_ridge
    with pytest.raises(TypeError, match="must be an AuditSettings"):
        run_client_audit("deer")
