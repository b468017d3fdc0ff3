"""Logit adjustment for label-skewed clients (local training only).

Under label skew (Dirichlet alpha = 0.1: many hospitals hold one class almost only), plain
cross-entropy lets each client lower its loss by pushing every image towards its majority class;
averaged, those pushes fight each other. Logit-adjusted cross-entropy trains on
`logits + tau * log(prior)`, where `prior` is the client's own label distribution, so the part of a
class's score explained by the local prior is not learned (Menon et al. 2021; FedLC, Zhang et al.
2022). The model that is shared and evaluated is the plain one: the offset exists only inside the
local loss. A client's prior is computed from its own labels and never leaves it.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, TensorDataset


def label_counts(dataset: Dataset, num_classes: int) -> torch.Tensor:
    """(num_classes,) float64 count of each label in `dataset` of (input, label) pairs."""
    if isinstance(dataset, TensorDataset):
        labels = dataset.tensors[1]
    else:
        labels = torch.as_tensor([int(dataset[i][1]) for i in range(len(dataset))])
    return torch.bincount(labels.reshape(-1).long().cpu(), minlength=num_classes)[:num_classes].double()


def logit_offsets(dataset: Dataset, num_classes: int, tau: float) -> torch.Tensor:
    """(num_classes,) float32 `tau * log(prior)`, the prior smoothed by one image per class (Laplace).

    Smoothing keeps a class a client never saw at a finite offset: its images of other classes still
    teach the model that the class is less likely, just less strongly than an unsmoothed prior would.
    """
    counts = label_counts(dataset, num_classes) + 1.0
    return (tau * torch.log(counts / counts.sum())).float()


def adjusted_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, offsets: torch.Tensor | None, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy of `logits + offsets` ((B, C) + (C,) or (B, C)); plain cross-entropy when `offsets` is None."""
    if offsets is not None:
        logits = logits + offsets.to(logits.device, logits.dtype)
    return torch.nn.functional.cross_entropy(logits, labels, reduction=reduction)
