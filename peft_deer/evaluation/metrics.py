"""Evaluation of a classifier on an in-memory split: class probabilities and scikit-learn metrics.

Accuracy flatters a classifier on an imbalanced split (a constant "pneumonia" scores 0.625 on a 62.5 %
positive split), so the metrics also give balanced accuracy and, for binary tasks, sensitivity and
specificity at a decision threshold on P(class 1) chosen on the validation split (Youden's J).
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import accuracy_score, precision_recall_fscore_support, roc_auc_score
from torch.utils.data import DataLoader, TensorDataset

from ..federated.local_training import autocast_for
from .calibration import softmax_t


@torch.no_grad()
def predict_logits(
    model: torch.nn.Module, dataset: TensorDataset, batch_size: int = 256, mixed_precision: str = "no"
) -> np.ndarray:
    """The model's logits (N, num_classes) float64 for the (pixel_values, label) `dataset`.

    Calibration needs these, not probabilities: a saturated model's softmax is exactly 0 or 1 in float32.
    """
    device = next(model.parameters()).device
    autocast = autocast_for(device, mixed_precision)
    model.eval()
    out = []
    for pixel_values, _ in DataLoader(dataset, batch_size=batch_size):
        with autocast:
            logits = model(pixel_values=pixel_values.to(device)).logits
        out.append(logits.double().cpu())
    return torch.cat(out).numpy()


def predict_proba(
    model: torch.nn.Module,
    dataset: TensorDataset,
    batch_size: int = 256,
    mixed_precision: str = "no",
    temperature: float = 1.0,
) -> np.ndarray:
    """Class probabilities softmax(logits / temperature) (N, num_classes) float64 for `dataset` (see
    `predict_logits`); float64 keeps confident logits ranked. `temperature`: from `calibration.fit_temperature`."""
    return softmax_t(predict_logits(model, dataset, batch_size, mixed_precision), temperature)


def positive_scores(probs: np.ndarray) -> np.ndarray:
    """P(class 1), shape (N,), from (N, 2) class probabilities (or from an (N,) vector, returned as is)."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim == 1:
        return probs
    if probs.ndim != 2 or probs.shape[1] != 2:
        raise ValueError(f"a decision threshold needs a binary task: probabilities of shape {probs.shape}, not (N, 2)")
    return probs[:, 1]


def choose_threshold(labels: np.ndarray, probs: np.ndarray) -> float:
    """The decision threshold t (class 1 iff P(class 1) >= t) that maximises Youden's J on (labels, probs).

    J = sensitivity + specificity - 1. `probs`: (N, 2) class probabilities or (N,) P(class 1), labels in
    {0, 1}. Candidates: 0.5 (the argmax rule), 0, and the midpoints between consecutive distinct scores
    (with 0 and 1 as end points), so each distinct decision on these N images is tried once. Ties go to the
    candidate closest to 0.5 (then the lower one): argmax wins whenever it is as good. Labels of one class
    only leave J undefined: 0.5. Choose it on the validation split, never on the test split.
    """
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    scores = positive_scores(probs)
    if len(scores) != len(labels):
        raise ValueError(f"{len(labels)} labels but {len(scores)} probabilities")
    if not set(np.unique(labels)) <= {0, 1}:
        raise ValueError(f"labels {sorted(set(np.unique(labels).tolist()))} are not binary (0/1)")
    positives, negatives = labels == 1, labels == 0
    if not positives.any() or not negatives.any():
        return 0.5
    ends = np.unique(np.concatenate([[0.0], scores, [1.0]]))
    candidates = np.unique(np.concatenate([[0.0, 0.5], (ends[:-1] + ends[1:]) / 2]))
    # Images scored below t are called class 0: count them per candidate in the sorted scores, O(N log N).
    pos, neg = np.sort(scores[positives]), np.sort(scores[negatives])
    sensitivity = 1.0 - np.searchsorted(pos, candidates, side="left") / len(pos)
    specificity = np.searchsorted(neg, candidates, side="left") / len(neg)
    youden = sensitivity + specificity - 1.0
    best = np.flatnonzero(youden >= youden.max() - 1e-12)
    return float(candidates[best[np.argmin(np.abs(candidates[best] - 0.5))]])


def offset_decisions(probs: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Decided classes (N,): argmax over classes of log p + offsets (the demo's `Classifier.decide` rule)."""
    return np.argmax(np.log(np.maximum(probs, 1e-300)) + np.asarray(offsets, np.float64), axis=1)


def _balanced_accuracy(labels: np.ndarray, decisions: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Mean recall over `classes` of each row of `decisions` (M, N) against labels (N,): (M,)."""
    return np.mean([(decisions[:, labels == c] == c).mean(axis=1) for c in classes], axis=0)


def choose_class_offsets(labels: np.ndarray, probs: np.ndarray, sweeps: int = 3, candidates: int = 256) -> list[float]:
    """Per-class offsets o (o_0 = 0) of the rule argmax_c log p_c + o_c that maximise balanced accuracy on
    (labels, probs): the multi-class analogue of Youden's J, against the drift of argmax to the majority class.

    Coordinate descent from o = 0 (argmax): for each class in turn, the offset at which each image would switch
    to or from it is a breakpoint; up to `candidates` of them (quantiles, plus the current value) are scored and
    a move is taken only if it improves balanced accuracy, so the result is never worse than argmax on these
    images. Choose them on the validation split, never on the test split.
    """
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    scores = np.log(np.maximum(np.asarray(probs, np.float64), 1e-300))
    n, num_classes = scores.shape
    if len(labels) != n:
        raise ValueError(f"{len(labels)} labels but {n} probability rows")
    classes = np.unique(labels)
    offsets = np.zeros(num_classes)
    best = _balanced_accuracy(labels, offset_decisions(probs, offsets)[None], classes)[0]
    for _ in range(sweeps):
        moved = False
        for c in range(1, num_classes):
            others = np.delete(scores + offsets, c, axis=1).max(axis=1)
            switch = np.unique(others - scores[:, c])  # image i is decided c iff o_c > switch_i
            switch = switch[np.isfinite(switch)]
            if not len(switch):
                continue
            picks = np.unique(np.quantile(switch, np.linspace(0, 1, min(candidates, len(switch)))))
            trial = np.concatenate([picks + 1e-9, [picks[0] - 1.0]])
            grid = np.repeat(offsets[None], len(trial), axis=0)
            grid[:, c] = trial
            decisions = np.argmax(scores[None] + grid[:, None, :], axis=2)
            values = _balanced_accuracy(labels, decisions, classes)
            if values.max() > best + 1e-12:
                best, offsets = float(values.max()), grid[int(values.argmax())]
                moved = True
        if not moved:
            break
    return [float(o) for o in offsets]


def classification_metrics(
    labels: np.ndarray, probs: np.ndarray, threshold: float | None = None, offsets: np.ndarray | None = None
) -> dict[str, float | None]:
    """Metrics of class probabilities `probs` (N, num_classes) against integer `labels` (N,).

    - `accuracy`, macro `precision_macro`/`recall_macro`/`f1_macro` (argmax decisions) and `auc`
      (one-vs-rest macro for > 2 classes; None with one class in `labels`): as before, threshold-free.
    - `balanced_accuracy` (mean recall over the classes in `labels`: 0.5 for any constant binary
      predictor) and, for 2 classes, `sensitivity` (recall of class 1) and `specificity` (recall of
      class 0), None when `labels` lack that class or for > 2 classes. They use the decision rule
      `threshold`: class 1 iff P(class 1) >= threshold (binary only; choose it with `choose_threshold`
      on the validation split), or argmax when None; with `offsets` (more classes, `choose_class_offsets`)
      argmax of log p + offsets.
    - `threshold`: the rule used (None: argmax or offsets).
    """
    labels = np.asarray(labels)
    num_classes = probs.shape[1]
    preds = probs.argmax(axis=1)
    precision, recall, f1, _ = precision_recall_fscore_support(
        labels, preds, average="macro", labels=list(range(num_classes)), zero_division=0
    )
    auc: float | None
    if len(np.unique(labels)) < 2:
        auc = None
    elif num_classes == 2:
        auc = float(roc_auc_score(labels, probs[:, 1]))
    else:
        auc = float(roc_auc_score(labels, probs, multi_class="ovr", average="macro", labels=list(range(num_classes))))
    if threshold is not None:
        decisions = (positive_scores(probs) >= threshold).astype(np.int64)
    elif offsets is not None:
        decisions = offset_decisions(probs, offsets)
    else:
        decisions = preds
    recalls = {int(c): float(np.mean(decisions[labels == c] == c)) for c in np.unique(labels)}
    return {
        "accuracy": float(accuracy_score(labels, preds)),
        "precision_macro": float(precision),
        "recall_macro": float(recall),
        "f1_macro": float(f1),
        "auc": auc,
        "balanced_accuracy": float(np.mean(list(recalls.values()))),
        "sensitivity": recalls.get(1) if num_classes == 2 else None,
        "specificity": recalls.get(0) if num_classes == 2 else None,
        "threshold": None if threshold is None else float(threshold),
    }
