"""Attacks on `--head-refit stats` as an outsider (issue 25): the released vector's sensitivity against adversarial
records and hospitals, the ledger of a statistics-only run against opacus, per-adversary accounting of distributed
refit noise, timing in published files, the secret streams of the refit's draws, a crash between release and
checkpoint, and `dirichlet-mix`. Unit attacks use numpy only; the end-to-end ones use the tiny ViT with
--rounds 0 (no training) on real MedMNIST images."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from test_fed_driver import exit_code, run_argv

from peft_deer.data.partition import partition_clients
from peft_deer.federated import randomness as randomness_module
from peft_deer.federated.collusion import adversary_multipliers
from peft_deer.federated.head_refit import (
    CLIENT_SENSITIVITY,
    RECORD_SENSITIVITY,
    Projection,
    hospital_contribution,
)
from peft_deer.run import lifecycle
from peft_deer.run import refit as refit_module
from peft_deer.run.run_dir import PRIVATE_DIR
from train import fed

ROOT3 = math.sqrt(3.0)
STATS_ONLY = ["--head-refit", "stats", "--refit-dims", "4", "--rounds", "0", "--train-subset", "120"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def _identity(k: int) -> Projection:
    return Projection(np.eye(k), np.zeros(k), 1.0)


def _vector(x: np.ndarray, y: np.ndarray, classes: int, weight: float = 1.0, bound: float | None = None) -> np.ndarray:
    return hospital_contribution(_identity(x.shape[1]).clipped(x), y, classes, weight, bound).vector()


def _adversarial_rows(k: int, rng: np.random.Generator) -> np.ndarray:
    unit = np.eye(k)[0]
    diag = np.ones(k) / math.sqrt(k)  # |z| = 1 exactly, spread over every coordinate
    rows = [unit, -unit, diag, 1e6 * diag, 1e-300 * unit, np.zeros(k), 3.0 * rng.normal(size=k), 1e150 * unit]
    return np.stack([*rows, *rng.normal(size=(8, k)) * rng.uniform(0.1, 5, size=(8, 1))])


def _rdp(m: float, delta: float) -> float:
    acc = RDPAccountant()
    acc.history = [(m, 1.0, 1)]
    return acc.get_epsilon(delta)


def _prv(m: float, delta: float) -> float:
    acc = PRVAccountant()
    acc.history = [(m, 1.0, 1)]
    return acc.get_epsilon(delta)


# --------------------------------------------------------------------------------------------- sensitivity


def test_one_record_changes_the_release_by_at_most_sqrt3():
    """Add/remove one adversarial record (|z| = 1 exactly, far outside the ball, tiny, zero, any class): the released
    vector moves by <= sqrt(3), and |z| = 1 reaches it (the bound is tight, not loose)."""
    rng = np.random.default_rng(0)
    k, classes = 5, 3
    base_x, base_y = rng.normal(size=(20, k)) * 2, rng.integers(0, classes, 20)
    base = _vector(base_x, base_y, classes)
    worst = 0.0
    for row in _adversarial_rows(k, rng):
        for c in range(classes):
            grown = _vector(np.vstack([base_x, row]), np.append(base_y, c), classes)
            worst = max(worst, float(np.linalg.norm(grown - base)))
    assert worst <= RECORD_SENSITIVITY * (1 + 1e-12)
    assert worst >= RECORD_SENSITIVITY * (1 - 1e-9)  # |z| = 1 attains it


@pytest.mark.parametrize("public_size", [None, 1, 3, 50])
def test_one_hospital_changes_the_sum_by_at_most_sqrt3(public_size):
    """Client level: a hospital's whole vector (weight 1 / n_h; or 1 / s_h for any declared s_h, clipped) has norm
    <= sqrt(3), for a single record at |z| = 1, one class only, an empty class, and far-out features; and under
    weights 1 / s_h one record moves it by <= sqrt(3) / s_h (record level inside client level)."""
    rng = np.random.default_rng(1)
    k, classes = 4, 3
    rows = _adversarial_rows(k, rng)
    hospitals = [
        (rows[:1], np.array([0])),  # a single record at |z| = 1: the bound is reached
        (rows[2:4], np.array([2, 2])),  # one class only; class 0 and 1 empty
        (rows, rng.integers(0, classes, len(rows))),
        (np.repeat(rows[3:4], 40, axis=0), np.ones(40, int)),  # 40 far-out records of one class
    ]
    norms = []
    for x, y in hospitals:
        weight = 1.0 / len(y) if public_size is None else 1.0 / public_size
        bound = None if public_size is None else CLIENT_SENSITIVITY
        v = _vector(x, y, classes, weight, bound)
        norms.append(float(np.linalg.norm(v)))
        if public_size is not None:
            for extra in rows[:4]:
                grown = _vector(np.vstack([x, extra]), np.append(y, 1), classes, weight, bound)
                assert np.linalg.norm(grown - v) <= RECORD_SENSITIVITY * weight * (1 + 1e-12)
    assert max(norms) <= CLIENT_SENSITIVITY * (1 + 1e-12)
    assert norms[0] >= CLIENT_SENSITIVITY * (1 - 1e-9) or public_size not in (None, 1)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e308])
def test_a_non_finite_feature_cannot_break_the_release(bad):
    """A record whose head input is NaN, +-inf or overflows the projection must not make the release NaN (a NaN in the
    release reveals that record outright): its clipped feature stays finite with norm <= 1, and adding it moves the
    vector by <= sqrt(3)."""
    k, classes = 3, 2
    x, y = np.random.default_rng(2).normal(size=(10, k)), np.arange(10) % 2
    row = np.array([bad, 0.5, bad])
    z = _identity(k).clipped(row[None])
    assert np.isfinite(z).all() and np.linalg.norm(z) <= 1 + 1e-12
    moved = _vector(np.vstack([x, row]), np.append(y, 1), classes) - _vector(x, y, classes)
    assert np.isfinite(moved).all() and np.linalg.norm(moved) <= RECORD_SENSITIVITY * (1 + 1e-12)


@pytest.mark.parametrize("label", [-1, 2, 7])
def test_a_label_out_of_range_is_refused(label):
    x = np.zeros((3, 2))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\)"):
        _vector(x, np.array([0, 1, label]), 2)


# --------------------------------------------------------------------------------------------- end to end


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _published(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.is_file() and PRIVATE_DIR not in p.relative_to(out).parts]


@pytest.mark.parametrize(
    ("level", "flags"),
    [
        ("client", ["--dp", "client", "--epsilon", "3", "--delta", "1e-3", "--accountant", "prv"]),
        ("record", ["--dp", "record", "--record-epsilon", "3", "--record-delta", "1e-4"]),
        (
            "client,record",
            ["--dp", "client,record", "--epsilon", "3", "--delta", "1e-3", "--record-epsilon", "2",
             "--record-delta", "1e-4", "--record-public-sizes", "40,40,40"],
        ),  # fmt: skip
    ],
)
def test_statistics_only_ledger_is_opacus_for_one_release(level, flags, tmp_path, medmnist_dir):
    """--rounds 0: the ledger's epsilon (RDP and PRV) at each level is opacus's for (m, q = 1, 1 step), within the
    target, and nothing published carries a wall time (timing depends on the hospitals' exact counts)."""
    out = tmp_path / "r"
    assert fed.main(run_argv(medmnist_dir, out, "deer", *STATS_ONLY, *flags)) == 0
    ledger = _json(out / "privacy.json")
    refit = ledger["head_refit"]
    assert refit["applied"]
    if "client" in refit:
        m = refit["client"]["noise_multiplier"]
        assert ledger["epsilon_rdp"] == pytest.approx(_rdp(m, 1e-3), rel=1e-9)
        assert ledger["epsilon_prv"] == pytest.approx(_prv(m, 1e-3), rel=1e-6)
        assert min(ledger["epsilon_rdp"], ledger["epsilon_prv"]) <= 3.0
    if "record" in refit:
        m = refit["record"]["noise_multiplier"]
        rec = ledger["record"]
        assert all(e == pytest.approx(_rdp(m, 1e-4), rel=1e-9) for e in rec["epsilon_per_client_rdp"].values())
        assert max(rec["epsilon_per_client"].values()) <= (2.0 if "client" in refit else 3.0)
    if level == "client,record":  # one multiplier for both: the larger, so the record target (2) binds
        assert refit["client"]["noise_multiplier"] == refit["record"]["noise_multiplier"]
        assert ledger["epsilon_rdp"] < 3.0 * 0.9
    for path in _published(out):
        if path.suffix in (".json", ".jsonl", ".md", ".txt"):
            assert '"seconds"' not in path.read_text(), f"{path.relative_to(out)} publishes a wall time"


def test_statistics_only_overrides_are_used_and_reported(tmp_path, medmnist_dir):
    """--noise-multiplier / --record-noise-multiplier with --rounds 0: the refit's multiplier is the (larger)
    override, its noise std m sqrt(3), and the ledger accounts exactly that."""
    out = tmp_path / "o"
    flags = ["--dp", "client,record", "--noise-multiplier", "2.5", "--delta", "1e-3", "--record-noise-multiplier",
             "3.5", "--record-delta", "1e-4", "--record-public-sizes", "40,40,40"]  # fmt: skip
    assert fed.main(run_argv(medmnist_dir, out, "deer", *STATS_ONLY, *flags)) == 0
    ledger = _json(out / "privacy.json")
    refit = ledger["head_refit"]
    assert refit["client"]["noise_multiplier"] == refit["record"]["noise_multiplier"] == 3.5
    assert refit["client"]["noise_std_on_sum"] == pytest.approx(3.5 * ROOT3)
    assert ledger["epsilon_rdp"] == pytest.approx(_rdp(3.5, 1e-3), rel=1e-9)
    assert all(e == pytest.approx(_rdp(3.5, 1e-4)) for e in ledger["record"]["epsilon_per_client_rdp"].values())


def test_distributed_refit_noise_is_in_every_adversarys_ledger(tmp_path, medmnist_dir):
    """Distributed placement: the refit's shares (variance m^2 3 / (k - t) each) are one more release against the
    public, one site and t colluders; `epsilon_against` must count it (else the trust table under-reports)."""
    out = tmp_path / "d"
    flags = ["--dp", "client", "--noise-multiplier", "1.5", "--delta", "1e-3", "--noise-placement", "distributed"]
    assert fed.main(run_argv(medmnist_dir, out, "deer", *STATS_ONLY, *flags)) == 0
    ledger = _json(out / "privacy.json")
    against = ledger["epsilon_against"]
    k, t = 3, 1
    multipliers = adversary_multipliers(1.5, k, k - t, t)
    labels = {"outsiders": "outsiders", "one_site": "one_participating_site", "colluders": "t_colluding_sites"}
    for who, label in labels.items():
        assert against[label]["rdp"] == pytest.approx(_rdp(multipliers[who], 1e-3), rel=1e-9), who
    public = ledger["trust_model_table"]["against"]["public"]["client_level_epsilon"]
    assert public == pytest.approx(against["outsiders"][ledger["accountant"]], rel=1e-9)


def test_refit_draws_come_from_distinct_256_bit_streams(tmp_path, medmnist_dir, monkeypatch):
    """client,record with distributed noise: every refit draw reads its own SecureStream (256-bit key), labelled per
    hospital and level; no label repeats, and none is a training label."""
    seen: list[tuple[bytes, str]] = []
    real = randomness_module.SecureStream.__init__

    def spy(self, key, label, *args, **kwargs):
        seen.append((bytes(key), label))
        real(self, key, label, *args, **kwargs)

    monkeypatch.setattr(randomness_module.SecureStream, "__init__", spy)
    flags = ["--dp", "client,record", "--noise-multiplier", "2", "--delta", "1e-3", "--record-noise-multiplier",
             "2", "--record-delta", "1e-4", "--record-public-sizes", "40,40,40", "--noise-placement",
             "distributed"]  # fmt: skip
    assert fed.main(run_argv(medmnist_dir, tmp_path / "s", "deer", *STATS_ONLY, *flags)) == 0
    refit = [label for _, label in seen if label.startswith("refit")]
    assert sorted(refit) == sorted([f"refit:record:{c}" for c in range(3)] + [f"refit:share:{c}" for c in range(3)])
    assert len(set(refit)) == len(refit)
    assert all(len(key) == 32 for key, label in seen if label.startswith("refit"))


def test_a_crash_between_release_and_checkpoint_releases_nothing_new(tmp_path, medmnist_dir, monkeypatch, capsys):
    """--rounds 0 has no checkpoint before the refit: killed after the release (its validation AUC on the console)
    but before the checkpoint, a resumed run must not draw fresh noise (a second, unaccounted release)."""
    out = tmp_path / "c"
    argv = run_argv(medmnist_dir, out, "deer", *STATS_ONLY, "--dp", "client", "--noise-multiplier", "2",
                    "--delta", "1e-3")  # fmt: skip
    released: list[np.ndarray] = []
    real_stats, real_save = refit_module.account_release, lifecycle.save_run_checkpoint

    def spy(*args, **kwargs):
        stats = real_stats(*args, **kwargs)
        released.append(stats.vector())
        return stats

    def crash_once(exp, *args, **kwargs):
        if exp.server.refit is None:  # a checkpoint before the release is allowed (and keeps the DP key)
            return real_save(exp, *args, **kwargs)
        monkeypatch.setattr(lifecycle, "save_run_checkpoint", real_save)
        raise KeyboardInterrupt  # killed after the release, before its checkpoint

    monkeypatch.setattr(refit_module, "account_release", spy)
    monkeypatch.setattr(lifecycle, "save_run_checkpoint", crash_once)
    code, _ = exit_code(lambda: fed.main(argv))
    assert code != 0 and not (out / "summary.json").exists() and len(released) == 1
    code, _ = exit_code(lambda: fed.main([*argv, "--resume"]))
    assert code == 0 and len(released) == 2
    np.testing.assert_array_equal(released[0], released[1])  # the same noise: nothing new about the hospitals


# --------------------------------------------------------------------------------------------- dirichlet-mix


@pytest.mark.parametrize(("n", "k", "alpha", "seed"), [(101, 7, 0.1, 0), (60, 60, 0.5, 3), (500, 12, 100.0, 9)])
def test_dirichlet_mix_is_deterministic_disjoint_and_covering(n, k, alpha, seed):
    labels = np.random.default_rng(seed).choice(3, size=n, p=[0.7, 0.2, 0.1])
    parts = partition_clients(labels, k, "dirichlet-mix", alpha, seed)
    again = partition_clients(labels, k, "dirichlet-mix", alpha, seed)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    flat = np.concatenate(parts)
    assert len(flat) == n and np.array_equal(np.sort(flat), np.arange(n))
    assert {len(p) for p in parts} <= {n // k, -(-n // k)}  # sizes from N and K only: they reveal no label
    other = partition_clients(labels, k, "dirichlet-mix", alpha, seed + 1)
    assert k == n or any(not np.array_equal(a, b) for a, b in zip(parts, other, strict=True))
