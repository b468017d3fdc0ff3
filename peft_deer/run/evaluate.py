"""How a run scores its loaded adapter: validation metrics at the threshold chosen on validation, and
test metrics at that same threshold (the test split never chooses anything)."""

from __future__ import annotations

from ..evaluation import choose_threshold, classification_metrics, predict_proba
from .experiment import Experiment


def validation_metrics(exp: Experiment) -> dict[str, float | None]:
    """Metrics of the model's loaded adapter on the validation split, at the decision threshold chosen on that
    split (Youden's J; binary tasks; `threshold` None, i.e. argmax, for more classes)."""
    labels, out = exp.data.splits.val.labels, exp.settings
    probs = predict_proba(exp.model, exp.val_data, out.output.eval_batch_size, out.local.mixed_precision)
    threshold = choose_threshold(labels, probs) if probs.shape[1] == 2 else None
    return classification_metrics(labels, probs, threshold)


def test_metrics(exp: Experiment, threshold: float | None) -> dict[str, float | None]:
    """Metrics of the model's loaded adapter on the test split at `threshold` (chosen on validation)."""
    settings = exp.settings
    probs = predict_proba(exp.model, exp.test_data, settings.output.eval_batch_size, settings.local.mixed_precision)
    return classification_metrics(exp.data.splits.test.labels, probs, threshold)


test_metrics.__test__ = False  # not a pytest test
