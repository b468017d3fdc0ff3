"""How a run scores its loaded adapter.

- Every round (`validation_metrics`): the validation split at T = 1, at the threshold chosen on it.
- At the end (`final_evaluation`): a temperature T fitted on the validation split (`peft_deer.evaluation.calibration`),
  the decision threshold (binary) or per-class offsets (more classes: `choose_class_offsets`, maximising
  balanced accuracy) chosen on the calibrated validation probabilities, and the test split scored with that T
  and that rule (the test split never chooses anything).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..evaluation.calibration import calibration_report, fit_temperature, softmax_t
from ..evaluation.metrics import choose_class_offsets, choose_threshold, classification_metrics, predict_logits
from .experiment import Experiment


def _logits(exp: Experiment, split: str) -> np.ndarray:
    """The loaded adapter's logits (N, num_classes) on the "val" or "test" split."""
    settings = exp.settings
    dataset = exp.val_data if split == "val" else exp.test_data
    return predict_logits(exp.model, dataset, settings.output.eval_batch_size, settings.local.mixed_precision)


def _scored(labels: np.ndarray, probs: np.ndarray) -> dict[str, float | None]:
    """Metrics at the decision threshold chosen on (labels, probs) (Youden's J; binary; argmax for more classes)."""
    threshold = choose_threshold(labels, probs) if probs.shape[1] == 2 else None
    return classification_metrics(labels, probs, threshold)


def validation_metrics(exp: Experiment) -> dict[str, float | None]:
    """Metrics of the model's loaded adapter on the validation split with uncalibrated probabilities (T = 1),
    at the decision threshold chosen on that split (Youden's J; binary tasks; `threshold` None, i.e. argmax,
    for more classes). The per-round rows of metrics.jsonl."""
    return _scored(exp.data.splits.val.labels, softmax_t(_logits(exp, "val")))


@dataclass(frozen=True)
class FinalEvaluation:
    """The loaded adapter's published evaluation: metrics with calibrated probabilities softmax(logits / T).

    val / test: `classification_metrics` at the threshold chosen on calibrated validation probabilities;
    calibration: `calibration_report` (T, how it was fitted, NLL and ECE before / after on both splits).
    """

    val: dict[str, float | None]
    test: dict[str, float | None]
    calibration: dict[str, Any]
    class_offsets: list[float] | None = None  # more than 2 classes: decide argmax(log p + offsets)

    @property
    def temperature(self) -> float:
        return float(self.calibration["temperature"])


def final_evaluation(exp: Experiment) -> FinalEvaluation:
    """Fit T on the validation split, choose the threshold there on softmax(logits / T), score the test split
    with the same T and threshold. Deterministic given the adapter: finalizing twice gives the same result."""
    splits = exp.data.splits
    val_logits, test_logits = _logits(exp, "val"), _logits(exp, "test")
    fit = fit_temperature(val_logits, splits.val.labels)
    val_probs, test_probs = softmax_t(val_logits, fit.temperature), softmax_t(test_logits, fit.temperature)
    report = calibration_report(fit, val_logits, splits.val.labels, test_logits, splits.test.labels)
    if val_probs.shape[1] > 2:
        offsets = choose_class_offsets(splits.val.labels, val_probs)
        val = classification_metrics(splits.val.labels, val_probs, None, offsets)
        return FinalEvaluation(
            val, classification_metrics(splits.test.labels, test_probs, None, offsets), report, offsets
        )
    val = _scored(splits.val.labels, val_probs)
    test = classification_metrics(splits.test.labels, test_probs, val["threshold"])
    return FinalEvaluation(val, test, report)
