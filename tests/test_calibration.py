"""Temperature scaling (peft_deer/evaluation/calibration.py): the fit recovers a known temperature, never raises the
validation NLL, keeps binary AUC and the argmax, un-saturates an over-confident model's threshold, handles
degenerate validation sets, and the logits path of `predict_proba`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import tiny_vit
from sklearn.metrics import roc_auc_score
from torch.utils.data import TensorDataset

from peft_deer.evaluation.calibration import (
    T_MAX,
    calibration_report,
    expected_calibration_error,
    fit_temperature,
    nll,
    softmax_t,
)
from peft_deer.evaluation.metrics import choose_threshold, classification_metrics, predict_logits, predict_proba


def sample_labels(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> np.ndarray:
    """Labels drawn from softmax(logits / temperature), one per row: a model calibrated at that temperature."""
    p = softmax_t(logits, temperature)
    return (rng.random(len(p))[:, None] > np.cumsum(p, axis=1)).sum(axis=1)


@pytest.mark.parametrize("num_classes", [2, 4])
@pytest.mark.parametrize("t0", [0.5, 3.0])
@pytest.mark.parametrize("n", [500, 5000])
def test_the_fit_recovers_a_known_temperature(num_classes, t0, n):
    """The fitted beta = 1/T is the maximum-likelihood estimate of 1/t0: its standard deviation is
    1 / sqrt(n * I), I = mean over images of Var_softmax(z/t0)(z) (the NLL's curvature in beta). The fit
    must land within 5 of those (and so closer for larger n)."""
    rng = np.random.default_rng(1000 * num_classes + n + int(10 * t0))
    z = rng.normal(scale=3.0, size=(n, num_classes))
    labels = sample_labels(z, t0, rng)
    fit = fit_temperature(z, labels)
    p = softmax_t(z, t0)
    info = np.mean((p * z**2).sum(1) - (p * z).sum(1) ** 2)
    sd = 1 / math.sqrt(n * info)
    assert fit.reason == "minimum of the validation NLL"
    assert abs(1 / fit.temperature - 1 / t0) < 5 * sd, (fit.temperature, t0, sd)
    assert fit.nll_after < fit.nll_before
    assert fit_temperature(z, labels) == fit  # deterministic: a run finalized twice gets the same T


@pytest.mark.parametrize("seed", range(6))
def test_the_fit_never_raises_the_nll_and_sits_at_its_minimum(seed):
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(3, 300)), int(rng.integers(2, 6))
    z = rng.normal(scale=rng.uniform(0.1, 30), size=(n, k)).astype(np.float32)  # as a model's float32 logits
    labels = rng.integers(0, k, n) if seed % 2 else sample_labels(z, rng.uniform(0.2, 20), rng)
    fit = fit_temperature(z, labels)
    assert fit.nll_before == pytest.approx(nll(z, labels))
    assert fit.nll_after == pytest.approx(nll(z, labels, fit.temperature))
    assert fit.nll_after <= fit.nll_before
    if fit.reason == "minimum of the validation NLL":
        for step in (0.999, 1.001, 0.9, 1.1):
            assert nll(z, labels, fit.temperature * step) >= fit.nll_after - 1e-12


def test_binary_auc_argmax_and_ranking_do_not_depend_on_the_temperature():
    rng = np.random.default_rng(3)
    z = rng.normal(scale=4.0, size=(400, 2))
    labels = sample_labels(z, 2.5, rng)
    t = fit_temperature(z, labels).temperature
    assert t == pytest.approx(2.5, rel=0.3)
    raw, calibrated = classification_metrics(labels, softmax_t(z)), classification_metrics(labels, softmax_t(z, t))
    for key in ("auc", "accuracy", "f1_macro", "precision_macro", "recall_macro"):
        assert calibrated[key] == raw[key], key
    order = np.argsort(softmax_t(z)[:, 1], kind="stable")
    assert np.all(np.diff(softmax_t(z, t)[order, 1]) >= 0)


def test_a_saturated_model_gets_t_above_one_and_a_threshold_inside_0_1():
    """Like the main job: logit margins of tens, every image called class 1, errors among them. At T = 1 the
    probabilities are exactly 1.0 in float64 for most images and the threshold is 1 to 9 digits; the fitted T
    softens them and the threshold on calibrated probabilities lies well inside (0, 1)."""
    rng = np.random.default_rng(7)
    labels = (rng.random(524) < 0.74).astype(np.int64)
    margin = np.where(labels == 1, rng.normal(45, 8, 524), rng.normal(30, 8, 524))  # z_1 - z_0
    z = np.stack([np.zeros(524), margin], axis=1).astype(np.float32)
    assert np.mean(softmax_t(z)[:, 1] == 1.0) > 0.5  # saturated
    raw_threshold = choose_threshold(labels, softmax_t(z))
    assert raw_threshold > 1 - 1e-9
    fit = fit_temperature(z, labels)
    assert fit.temperature > 1 and fit.reason == "minimum of the validation NLL"
    probs = softmax_t(z, fit.temperature)
    threshold = choose_threshold(labels, probs)
    assert 0.01 < threshold < 0.99 and np.all((probs[:, 1] > 0) & (probs[:, 1] < 1))
    raw = classification_metrics(labels, softmax_t(z), raw_threshold)
    calibrated = classification_metrics(labels, probs, threshold)
    # Calibrated AUC is the AUC of the logit margin; at T = 1 the images tied at exactly 1.0 lose their order.
    assert calibrated["auc"] == roc_auc_score(labels, margin.astype(np.float32)) >= raw["auc"]
    assert calibrated["balanced_accuracy"] >= raw["balanced_accuracy"]  # ties broken: every raw threshold is open
    # T cannot remove the bias towards class 1 (the argmax stays), but it takes most of the over-confidence.
    assert fit.nll_after < 0.1 * fit.nll_before
    assert expected_calibration_error(probs, labels) < expected_calibration_error(softmax_t(z), labels)


def test_degenerate_validation_sets_keep_a_sane_temperature_and_say_why():
    z = np.array([[0.0, 2.0], [1.0, -1.0], [0.0, 3.0]])
    cases = {
        "one class": (z, np.array([1, 1, 1]), 1.0),
        "right on every validation image": (z, np.array([1, 0, 1]), 1.0),
        "equal within every image": (np.full((3, 2), 5.0), np.array([0, 1, 1]), 1.0),
        "no better than chance": (z, np.array([0, 1, 0]), T_MAX),  # the argmax is wrong on every image
        "no validation images": (np.zeros((0, 2)), np.zeros(0, dtype=int), 1.0),
    }
    for reason, (logits, labels, expected) in cases.items():
        fit = fit_temperature(logits, labels)
        assert reason in fit.reason and fit.temperature == expected, (reason, fit)
        assert len(labels) == 0 or fit.nll_after <= fit.nll_before
    with pytest.raises(ValueError, match="NaN or infinity"):
        fit_temperature(np.array([[0.0, np.nan]]), np.array([0]))
    with pytest.raises(ValueError, match="not \\(N, num_classes >= 2\\)"):
        fit_temperature(np.zeros(3), np.zeros(3, dtype=int))
    with pytest.raises(ValueError, match="outside 0..1"):
        fit_temperature(np.zeros((2, 2)), np.array([0, 2]))
    with pytest.raises(ValueError, match="positive finite"):
        softmax_t(z, 0.0)


def test_expected_calibration_error_by_hand():
    # Top-class probabilities 0.9, 0.9 (bin (13/15, 14/15]), 0.6, 0.55 (bin (8/15, 9/15]); right, wrong, right, right.
    probs = np.array([[0.1, 0.9], [0.9, 0.1], [0.6, 0.4], [0.45, 0.55]])
    labels = np.array([1, 1, 0, 1])
    # |1 + 0 - 1.8| = 0.8 and |1 + 1 - 1.15| = 0.85, over 4 images.
    assert expected_calibration_error(probs, labels) == pytest.approx((0.8 + 0.85) / 4)
    assert expected_calibration_error(np.array([[1 / 3, 1 / 3, 1 / 3]]), np.array([0])) == pytest.approx(2 / 3)
    rng = np.random.default_rng(0)
    z = rng.normal(scale=2.0, size=(20000, 3))
    assert expected_calibration_error(softmax_t(z), sample_labels(z, 1.0, rng)) < 0.02  # calibrated by design


def test_the_report_holds_what_a_run_publishes():
    rng = np.random.default_rng(5)
    val, test = rng.normal(scale=6.0, size=(300, 2)), rng.normal(scale=6.0, size=(200, 2))
    val_labels, test_labels = sample_labels(val, 3.0, rng), sample_labels(test, 3.0, rng)
    report = calibration_report(fit_temperature(val, val_labels), val, val_labels, test, test_labels)
    assert report["temperature"] == pytest.approx(3.0, rel=0.3) and "epsilon unchanged" in report["privacy"]
    assert report["val_nll_after"] < report["val_nll_before"] and report["val_ece_after"] < report["val_ece_before"]
    assert report["test_nll_after"] < report["test_nll_before"] and report["test_ece_after"] < report["test_ece_before"]
    assert report["test_ece_before"] == expected_calibration_error(softmax_t(test), test_labels)


def test_predict_proba_is_the_softmax_of_predict_logits():
    torch.manual_seed(0)
    model = tiny_vit()
    data = TensorDataset(torch.randn(10, 1, 28, 28), torch.randint(0, 2, (10,)))
    logits = predict_logits(model, data, batch_size=4)
    with torch.no_grad():
        direct = model(pixel_values=data.tensors[0]).logits.double().numpy()
    assert logits.shape == (10, 2) and logits.dtype == np.float64
    np.testing.assert_allclose(logits, direct, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(predict_proba(model, data), softmax_t(logits), rtol=1e-12)
    np.testing.assert_allclose(predict_proba(model, data, temperature=4.0), softmax_t(logits / 4.0), rtol=1e-12)
