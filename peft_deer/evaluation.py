"""Evaluation of a classifier on an in-memory split: class probabilities and scikit-learn metrics."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import accuracy_score, precision_recall_fscore_support, roc_auc_score
from torch.utils.data import DataLoader, TensorDataset

from .federated.client import autocast_for


@torch.no_grad()
def predict_proba(
    model: torch.nn.Module, dataset: TensorDataset, batch_size: int = 256, mixed_precision: str = "no"
) -> np.ndarray:
    """Softmax class probabilities (N, num_classes) float64 for the (pixel_values, label) `dataset`."""
    device = next(model.parameters()).device
    autocast = autocast_for(device, mixed_precision)
    model.eval()
    out = []
    for pixel_values, _ in DataLoader(dataset, batch_size=batch_size):
        with autocast:
            logits = model(pixel_values=pixel_values.to(device)).logits
        out.append(torch.softmax(logits.float(), dim=-1).cpu().double())
    return torch.cat(out).numpy()


def classification_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float | None]:
    """accuracy, macro precision/recall/F1 and AUC (one-vs-rest macro for > 2 classes; None if undefined)."""
    labels = np.asarray(labels)
    preds = probs.argmax(axis=1)
    precision, recall, f1, _ = precision_recall_fscore_support(
        labels, preds, average="macro", labels=list(range(probs.shape[1])), zero_division=0
    )
    auc: float | None
    if len(np.unique(labels)) < 2:
        auc = None
    elif probs.shape[1] == 2:
        auc = float(roc_auc_score(labels, probs[:, 1]))
    else:
        auc = float(
            roc_auc_score(labels, probs, multi_class="ovr", average="macro", labels=list(range(probs.shape[1])))
        )
    return {
        "accuracy": float(accuracy_score(labels, preds)),
        "precision_macro": float(precision),
        "recall_macro": float(recall),
        "f1_macro": float(f1),
        "auc": auc,
    }
