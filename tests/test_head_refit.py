"""Head refit from DP class statistics (issue 25): sensitivity, noise, exactness without noise, accounting."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

from peft_deer.federated import DPRandomness
from peft_deer.federated.head_refit import (
    CLIENT_SENSITIVITY,
    RECORD_SENSITIVITY,
    ClassStats,
    accountant_epsilon,
    calibrate_with_refit,
    class_statistics,
    fit_lda,
    gaussian_epsilon,
    gaussian_release,
    head_in_input_space,
    hospital_contribution,
    pca_projection,
)
from peft_deer.federated.record_dp import RecordAccountants


def _clipped(rng, n, k, spread=2.0):
    z = rng.normal(size=(n, k)) * spread / math.sqrt(k)
    return z * np.minimum(1.0, 1.0 / np.linalg.norm(z, axis=1, keepdims=True))


def test_record_sensitivity_brute_force_equals_bound():
    """Removing any one record moves the vector by sqrt(1 + |z|^2 + |z|^4) <= sqrt(3), = sqrt(3) at |z| = 1."""
    rng = np.random.default_rng(0)
    z, labels = _clipped(rng, 40, 5), rng.integers(0, 3, 40)
    full = class_statistics(z, labels, 3).vector()
    moves = []
    for i in range(len(z)):
        keep = np.arange(len(z)) != i
        moves.append(np.linalg.norm(full - class_statistics(z[keep], labels[keep], 3).vector()))
        r = np.linalg.norm(z[i])
        assert moves[-1] == pytest.approx(math.sqrt(1 + r**2 + r**4), rel=1e-9)
    assert max(moves) <= RECORD_SENSITIVITY + 1e-9
    assert max(moves) == pytest.approx(RECORD_SENSITIVITY, rel=1e-9)  # some records were clipped to |z| = 1


def test_client_sensitivity_bound_holds_and_is_tight():
    rng = np.random.default_rng(1)
    for _ in range(50):
        n = int(rng.integers(1, 30))
        v = hospital_contribution(_clipped(rng, n, 4), rng.integers(0, 3, n), 3, weight=1.0 / n).vector()
        assert np.linalg.norm(v) <= CLIENT_SENSITIVITY + 1e-9
    unit = np.tile(np.eye(4)[:1], (7, 1))  # one class, every record the same unit vector: the bound itself
    tight = hospital_contribution(unit, np.zeros(7, int), 3, weight=1.0 / 7).vector()
    assert np.linalg.norm(tight) == pytest.approx(CLIENT_SENSITIVITY)
    # a public weight above 1/n_h is clipped back to the bound, and one record still moves it by <= weight sqrt(3)
    z, labels = _clipped(rng, 25, 4), rng.integers(0, 2, 25)
    clipped = hospital_contribution(z, labels, 2, weight=0.5, bound=CLIENT_SENSITIVITY)
    assert np.linalg.norm(clipped.vector()) == pytest.approx(CLIENT_SENSITIVITY)
    minus = hospital_contribution(z[1:], labels[1:], 2, weight=0.5, bound=CLIENT_SENSITIVITY)
    assert np.linalg.norm(clipped.vector() - minus.vector()) <= 0.5 * RECORD_SENSITIVITY + 1e-9


def test_release_noise_covariance_is_sigma_squared_sensitivity_squared():
    multiplier, draws = 0.7, 3000
    zero = ClassStats(np.zeros(2), np.zeros((2, 2)), np.zeros((2, 2, 2)))
    rnd = DPRandomness.from_seed(3)
    noise = np.stack(
        [gaussian_release(zero, multiplier * RECORD_SENSITIVITY, rnd.stream("t", i)).vector() for i in range(draws)]
    )
    cov = np.cov(noise.T)
    expected = multiplier**2 * RECORD_SENSITIVITY**2
    assert np.diag(cov) == pytest.approx(np.full(len(cov), expected), rel=0.12)
    assert np.abs(cov - np.diag(np.diag(cov))).max() < 0.1 * expected
    assert abs(noise.mean()) < 4 * math.sqrt(expected / noise.size)


@pytest.mark.parametrize("num_classes", [2, 3])
def test_noiseless_federated_refit_equals_centralized_lda_under_any_skew(num_classes):
    """Sum of the hospitals' exact statistics = pooled statistics; LDA on them = scikit-learn's LDA on the pooled
    projected features, for skewed hospitals, with and without shrinkage; and mapped back through P it scores x."""
    rng = np.random.default_rng(2)
    d, k, n = 12, 4, 600
    labels = rng.integers(0, num_classes, n)
    x = rng.normal(size=(n, d)) + 1.5 * np.eye(num_classes, d)[labels] @ rng.normal(size=(d, d))
    proj = pca_projection(x[:200], k)
    z = proj.clipped(x)
    order = np.argsort(labels + 0.3 * rng.random(n), kind="stable")  # sorted by label: extreme skew
    parts = np.array_split(order, 5)
    fed = sum((hospital_contribution(z[p], labels[p], num_classes) for p in parts[1:]),
              hospital_contribution(z[parts[0]], labels[parts[0]], num_classes))  # fmt: skip
    pooled = class_statistics(z, labels, num_classes)
    np.testing.assert_allclose(fed.vector(), pooled.vector(), atol=1e-9)
    for shrinkage in (0.0, 0.3):
        ours = fit_lda(fed, shrinkage)
        ref = LinearDiscriminantAnalysis(solver="lsqr", shrinkage=shrinkage or None).fit(z, labels)
        logits = ours.logits(z)
        if num_classes == 2:
            np.testing.assert_allclose(logits[:, 1] - logits[:, 0], ref.decision_function(z), rtol=1e-6, atol=1e-6)
        else:
            np.testing.assert_allclose(logits, ref.decision_function(z), rtol=1e-6, atol=1e-6)
    back = head_in_input_space(fit_lda(fed, 0.1), proj)
    np.testing.assert_allclose(back.logits(x), fit_lda(fed, 0.1).logits(proj.project(x)), atol=1e-8)


def test_refit_release_composes_in_the_record_accountant_as_opacus_does():
    sgd, refit, delta = (1.1, 0.05, 300), (2.0, 1.0, 1), 1e-5
    acc = RecordAccountants()
    acc.step(0, *sgd)
    before = acc.epsilon(0, delta)
    acc.step(0, *refit)
    after = acc.epsilon(0, delta)
    opacus = RDPAccountant()
    opacus.history = [sgd, refit]
    assert after == pytest.approx(opacus.get_epsilon(delta))
    assert after > before
    # the single release alone: opacus' analysis of one Gaussian mechanism at q = 1
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    single, _ = get_privacy_spent(orders=orders, rdp=compute_rdp(q=1.0, noise_multiplier=2.0, steps=1, orders=orders),
                                  delta=delta)  # fmt: skip
    assert gaussian_epsilon([refit], delta) == pytest.approx(single, rel=1e-6)


def test_calibration_leaves_room_for_the_refit():
    target, delta, q, steps = 8.0, 1e-5, 0.1, 200
    plain = calibrate_with_refit(target, delta, q, steps, None)
    with_refit = calibrate_with_refit(target, delta, q, steps, 2.0)
    assert with_refit > plain
    assert gaussian_epsilon([(with_refit, q, steps), (2.0, 1.0, 1)], delta) <= target
    assert gaussian_epsilon([(with_refit / 1.02, q, steps), (2.0, 1.0, 1)], delta) > target
    prv = calibrate_with_refit(target, delta, q, steps, 2.0, "prv")  # tighter: a smaller sigma, still within target
    assert prv < with_refit
    assert accountant_epsilon([(prv, q, steps), (2.0, 1.0, 1)], delta, "prv") <= target
    assert accountant_epsilon([(prv / 1.02, q, steps), (2.0, 1.0, 1)], delta, "prv") > target
    with pytest.raises(ValueError, match="refit alone"):
        calibrate_with_refit(0.5, delta, q, steps, 1.0)


def test_unit_scaling_keeps_the_ranking_and_stops_float32_saturation():
    """An LDA head on noisy statistics can have |logits| ~ 1e6 (seen at client level, epsilon 8, 12 hospitals): in
    float32 every probability is then 0 or 1 and the test AUC is 0.5. Scaled, the ranking survives float32."""
    from sklearn.metrics import roc_auc_score

    from peft_deer.federated.head_refit import LinearHead, unit_scaled

    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 8))
    y = (x[:, 0] + 0.5 * rng.normal(size=400) > 0).astype(int)
    w = np.zeros((2, 8))
    w[1, 0] = 2.5e4  # a near-singular covariance's solve
    head = LinearHead(w, np.array([0.0, 3.5e6]))
    probs = lambda h: torch.softmax(torch.from_numpy(h.logits(x)).float(), dim=1)[:, 1].numpy()  # noqa: E731
    assert roc_auc_score(y, probs(head)) == 0.5  # saturated: the failure this guards against
    scaled, c = unit_scaled(head, x)
    z = scaled.logits(x)
    assert np.sqrt(np.mean((z - z.mean(axis=1, keepdims=True)) ** 2)) == pytest.approx(1.0)
    assert c > 0 and np.allclose(scaled.weight, head.weight * c) and np.allclose(scaled.bias, head.bias * c)
    exact = roc_auc_score(y, head.logits(x)[:, 1] - head.logits(x)[:, 0])
    assert roc_auc_score(y, probs(scaled)) == pytest.approx(exact, abs=1e-3)  # the ranking, in float32
    assert (z.argmax(1) == head.logits(x).argmax(1)).all()


def test_a_projection_past_the_validation_rank_is_completed_to_an_orthonormal_basis():
    """k above what the server's few validation rows span (BreastMNIST: 78 images, 768 features): the principal
    directions come first, then an orthonormal completion; k = D is a rotation that loses nothing."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 50)) @ rng.normal(size=(50, 50))
    pca = pca_projection(x, 20)
    wide = pca_projection(x, 40)
    full = pca_projection(x, 50)
    assert wide.dims == 40 and np.allclose(wide.matrix @ wide.matrix.T, np.eye(40), atol=1e-10)
    assert np.allclose(np.abs(np.sum(wide.matrix[:20] * pca.matrix, axis=1)), 1.0)  # the same leading directions
    assert np.allclose(full.matrix.T @ full.matrix, np.eye(50), atol=1e-10)  # a rotation
    y = rng.normal(size=(5, 50))
    assert np.allclose(np.linalg.norm(full.project(y), axis=1) * full.scale, np.linalg.norm(y - full.center, axis=1))
    with pytest.raises(ValueError, match="must be in"):
        pca_projection(x, 51)
