"""Evaluation a constant predictor cannot flatter: balanced accuracy, sensitivity/specificity at a decision
threshold chosen on the validation split (Youden's J), and its wiring into metrics.jsonl, summary.json,
peft_deer_run.json and the model card."""

from __future__ import annotations

import json

import numpy as np
import pytest

from peft_deer.evaluation.metrics import choose_threshold, classification_metrics
from peft_deer.run import evaluate


def binary_probs(p1) -> np.ndarray:
    """(N, 2) class probabilities from P(class 1)."""
    p1 = np.asarray(p1, dtype=np.float64)
    return np.stack([1 - p1, p1], axis=1)


# 62.5 % positive, like PneumoniaMNIST's test split (390 of 624).
LABELS = np.array([1, 1, 1, 1, 1, 0, 0, 0])


@pytest.mark.parametrize("p1, sensitivity, specificity", [(0.7, 1.0, 0.0), (0.2, 0.0, 1.0)])
def test_a_constant_predictor_gets_balanced_accuracy_one_half(p1, sensitivity, specificity):
    probs = binary_probs([p1] * len(LABELS))
    m = classification_metrics(LABELS, probs)
    assert m["accuracy"] == pytest.approx(0.625 if p1 > 0.5 else 0.375)
    assert m["balanced_accuracy"] == 0.5
    assert (m["sensitivity"], m["specificity"], m["threshold"]) == (sensitivity, specificity, None)
    # No threshold helps a constant: every decision has J = 0, so the tie goes to 0.5 (argmax).
    t = choose_threshold(LABELS, probs)
    assert t == 0.5
    assert classification_metrics(LABELS, probs, t)["balanced_accuracy"] == 0.5


def test_existing_keys_keep_their_meaning_at_any_threshold():
    probs = binary_probs([0.9, 0.8, 0.6, 0.4, 0.55, 0.3, 0.7, 0.1])
    argmax = classification_metrics(LABELS, probs)
    at = classification_metrics(LABELS, probs, 0.65)
    for key in ("accuracy", "precision_macro", "recall_macro", "f1_macro", "auc"):
        assert at[key] == argmax[key], key
    assert argmax["accuracy"] == 0.75 and argmax["auc"] == pytest.approx(12 / 15)
    # At t = 0.65: positives 0.9, 0.8 called 1 (2/5); negatives 0.3, 0.1 called 0, 0.7 called 1 (2/3).
    assert (at["sensitivity"], at["specificity"], at["threshold"]) == (pytest.approx(0.4), pytest.approx(2 / 3), 0.65)
    assert at["balanced_accuracy"] == pytest.approx((0.4 + 2 / 3) / 2)


def test_the_chosen_threshold_separates_a_separable_validation_set():
    # Argmax calls every image class 1; any t in (0.75, 0.8] separates the classes.
    labels = np.array([0, 0, 0, 1, 1])
    probs = binary_probs([0.6, 0.7, 0.75, 0.8, 0.9])
    assert classification_metrics(labels, probs)["specificity"] == 0.0
    t = choose_threshold(labels, probs)
    assert 0.75 < t <= 0.8 and t == pytest.approx(0.775)  # the midpoint between the classes
    m = classification_metrics(labels, probs, t)
    assert (m["sensitivity"], m["specificity"], m["balanced_accuracy"]) == (1.0, 1.0, 1.0)
    assert choose_threshold(labels, probs[:, 1]) == t  # P(class 1) alone gives the same
    # Separable on both sides of 0.5: every separating t ties at J = 1 and 0.5 itself is one of them.
    assert choose_threshold(labels, binary_probs([0.1, 0.2, 0.3, 0.6, 0.9])) == 0.5
    # Reversed scores: 0.5 gets J = -1; calling every image one class gets J = 0, either t = 0 (all class 1)
    # or t = 0.95 (all class 0, between the top score and 1), and 0.95 is closer to 0.5.
    assert choose_threshold(labels, binary_probs([0.9, 0.8, 0.7, 0.2, 0.1])) == pytest.approx(0.95)
    assert choose_threshold(np.ones(4, dtype=int), binary_probs([0.1, 0.2, 0.3, 0.4])) == 0.5  # one class


def test_more_than_two_classes_have_no_sensitivity_or_specificity():
    labels = np.array([0, 1, 2, 2, 2, 2])
    probs = np.array([[0.8, 0.1, 0.1], [0.1, 0.2, 0.7], [0.1, 0.1, 0.8], [0.2, 0.1, 0.7], [0.1, 0.1, 0.8],
                      [0.6, 0.2, 0.2]])  # fmt: skip
    m = classification_metrics(labels, probs)
    assert m["sensitivity"] is None and m["specificity"] is None and m["threshold"] is None
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((1 + 0 + 3 / 4) / 3)  # recall per class, at argmax
    with pytest.raises(ValueError, match="binary"):
        classification_metrics(labels, probs, 0.5)
    with pytest.raises(ValueError, match="binary"):
        choose_threshold(labels, probs)


def test_the_threshold_is_chosen_on_validation_when_validation_and_test_disagree():
    val_labels, test_labels = np.array([0, 0, 1, 1]), np.array([0, 0, 1, 1])
    val = binary_probs([0.6, 0.7, 0.85, 0.9])  # separated at 0.775
    test = binary_probs([0.3, 0.4, 0.6, 0.7])  # separated at 0.5, not at 0.775
    t_val, t_test = choose_threshold(val_labels, val), choose_threshold(test_labels, test)
    assert t_val == pytest.approx(0.775) and t_test == 0.5
    m = classification_metrics(test_labels, test, t_val)
    assert (m["sensitivity"], m["specificity"], m["balanced_accuracy"]) == (0.0, 1.0, 0.5)


def test_runs_choose_the_threshold_on_validation_and_report_it(tmp_path, medmnist_dir, monkeypatch, one_thread):
    """A tiny run whose classifier scores validation images 0.9 (class 1) / 0.7 (class 0) and test images
    0.6 / 0.4 (logits [0, logit(p)]). Each round's row (T = 1) puts the threshold at 0.8. At the end the
    temperature is fitted on validation and the threshold is the midpoint of the two calibrated validation
    scores (0.805), which calls every test image class 0. Had the test split chosen it (0.5), the test sensitivity
    would be 1."""
    from train import fed

    val_size = 524  # PneumoniaMNIST: validation 524 images, test 624

    def fake_predict_logits(model, dataset, batch_size=256, mixed_precision="no"):
        labels = dataset.tensors[1].numpy()
        high, low = (0.9, 0.7) if len(labels) == val_size else (0.6, 0.4)
        p1 = np.where(labels == 1, high, low)
        return np.stack([np.zeros_like(p1), np.log(p1 / (1 - p1))], axis=1)

    monkeypatch.setattr(evaluate, "predict_logits", fake_predict_logits)
    out = tmp_path / "run"
    argv = ["--model", "tiny-vit", "--data-dir", str(medmnist_dir), "--train-subset", "200", "--num-clients", "2",
            "--rounds", "1", "--partition", "iid", "--output-dir", str(out)]  # fmt: skip
    assert fed.main(argv) == 0

    (row,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert row["val_threshold"] == pytest.approx(0.8)
    assert (row["val_sensitivity"], row["val_specificity"], row["val_balanced_accuracy"]) == (1.0, 1.0, 1.0)
    assert row["val_accuracy"] == pytest.approx(0.7423664)  # argmax: every image class 1
    summary = json.loads((out / "summary.json").read_text())
    for name in ("final", "best"):
        calibration = summary["calibration"][name]
        t = calibration["temperature"]
        # NLL'(1 / T) = 0 at T = 0.9716 for 389 of 524 images at 0.9 and 135 at 0.7 (computed separately).
        assert t == pytest.approx(0.9716247, abs=1e-6) and calibration["fit"] == "minimum of the validation NLL"
        assert calibration["val_nll_after"] < calibration["val_nll_before"]
        # The calibrated validation scores are sigmoid(logit(p) / T): the threshold is their midpoint.
        threshold = (1 / (1 + 0.7 ** (-1 / t) * 0.3 ** (1 / t)) + 1 / (1 + 0.9 ** (-1 / t) * 0.1 ** (1 / t))) / 2
        test = summary["test"][name]
        assert test["threshold"] == pytest.approx(threshold) and threshold != pytest.approx(0.8, abs=1e-3)
        assert (test["sensitivity"], test["specificity"], test["balanced_accuracy"]) == (0.0, 1.0, 0.5)
        assert test["accuracy"] == 1.0  # argmax, as before (0.5 would have been the test split's own choice)
    for adapter in ("adapter", "adapter-best", "adapter-lora"):
        run = json.loads((out / adapter / "peft_deer_run.json").read_text())
        assert run["decision_threshold"] == pytest.approx(summary["test"]["final"]["threshold"])
        assert "Youden" in run["decision_rule"] and "temperature" in run["decision_rule"]
        assert (run["val_sensitivity"], run["val_specificity"]) == (1.0, 1.0)
        name = "best" if adapter == "adapter-best" else "final"
        assert run["temperature"] == summary["calibration"][name]["temperature"] == run["calibration"]["temperature"]
    card = (out / "adapter" / "README.md").read_text()
    assert "| balanced accuracy | sensitivity | specificity | threshold |" in card
    assert "| final | 1.0000 | 1.0000 |" in card and f"| 0.5000 | 0.0000 | 1.0000 | {threshold:.4f} |" in card
    assert "## Calibrated probabilities" in card and f"| final | {t:.4g} |" in card
