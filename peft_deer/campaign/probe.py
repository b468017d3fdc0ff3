"""The campaign's baseline: a centralized linear probe on frozen backbone features, the reference a federated
LoRA run should beat.

Features are those DINOv2's own classification head reads: the CLS token and the mean of the patch
tokens of the final layer-normed hidden states, concatenated ((n, 2 * hidden) float32). They come
from the backbone's encoder (`prefix_cache.find_encoder`: `Dinov2Model`, `ViTModel`), so any
ViT-style model `load_backbone` returns works, with its head ignored.

The probe standardizes the features (mean/std of the training split), fits scikit-learn's
`LogisticRegression` on the training split for every C of a small grid, picks C by the validation
split's AUC (macro one-vs-rest with > 2 classes; accuracy where AUC is undefined) and reports the
chosen model's test metrics. The test split plays no part in the choice.

    from peft_deer.campaign.probe import linear_probe
    row = linear_probe("medmnist:pneumoniamnist", model="dinov2-s", image_size=56,
                       data_dir="../shared/data/medmnist", cache_dir="runs/campaign/prefix-cache")

Engine-free: imports neither accelerate nor flwr nor gradio.
"""

from __future__ import annotations

import hashlib
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits
from torch import nn
from torch.utils.data import TensorDataset

# peft_deer's modules (main's paths; the re-layout moves them), in one place:
from ..backbones.load import Backbone, load_backbone
from ..backbones.prefix_cache import cache_key, find_encoder, load_or_compute
from ..data import DatasetSplits, ImageDataset, load_dataset_spec, make_tensor_dataset
from ..evaluation.metrics import classification_metrics

#: Inverse regularization strengths tried on the validation split (scikit-learn's C).
C_GRID: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


# ----------------------------------------------------------------------------- features


@torch.no_grad()
def pooled_features(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """CLS token and mean patch token of the final layer-normed hidden states: (n, 2 * hidden).

    `pixel_values`: (n, channels, size, size) on the model's device. Register tokens (DINOv2 with
    registers: `config.num_register_tokens`) sit between CLS and the patches and are left out, as
    their classification heads do.
    """
    encoder = find_encoder(model)
    output = encoder(pixel_values=pixel_values)
    hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]  # (n, tokens, hidden)
    registers = int(getattr(getattr(model, "config", None), "num_register_tokens", 0) or 0)
    return torch.cat([hidden[:, 0], hidden[:, 1 + registers :].mean(dim=1)], dim=1).float()


def encoder_digest(model: nn.Module) -> str:
    """SHA-256 of the encoder's parameters and buffers (what the features depend on besides the images)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(find_encoder(model).state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def split_features(
    backbone: Backbone,
    split: ImageDataset,
    indices: np.ndarray | None = None,
    batch_size: int = 256,
    desc: str = "probe features",
) -> TensorDataset:
    """(features (n, 2 * hidden) float32, labels (n,) int64) of `split[indices]` (all rows if None).

    Images are resized and normalised for `backbone` in chunks of `batch_size`, so memory stays at one
    batch of pixels (224 px RGB: 0.6 MB per image) whatever the split's size.
    """
    from tqdm.auto import tqdm

    model = backbone.model
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    idx = np.arange(len(split)) if indices is None else np.asarray(indices, dtype=np.int64)
    feats: list[torch.Tensor] = []
    try:
        for start in tqdm(range(0, len(idx), batch_size), desc=desc, leave=False, unit="batch"):
            pixels, _ = make_tensor_dataset(
                split,
                idx[start : start + batch_size],
                backbone.image_size,
                backbone.num_channels,
                backbone.mean,
                backbone.std,
            ).tensors
            feats.append(pooled_features(model, pixels.to(device)).cpu())
    finally:
        model.train(was_training)
    hidden = feats[0].shape[1] if feats else 0
    labels = torch.from_numpy(split.labels[idx].astype(np.int64))
    return TensorDataset(torch.cat(feats) if feats else torch.empty(0, hidden), labels)


# ----------------------------------------------------------------------------- the probe


@dataclass
class ProbeFit:
    """The chosen probe: a StandardScaler + LogisticRegression pipeline fitted on the training split."""

    C: float
    pipeline: Pipeline
    val_scores: dict[float, float] = field(default_factory=dict)  # C -> validation AUC (or accuracy)
    score_name: str = "auc"


def selection_score(labels: np.ndarray, probs: np.ndarray) -> tuple[float, str]:
    """(score, name) that picks C: validation AUC, or accuracy where AUC is undefined (one class)."""
    metrics = classification_metrics(labels, probs)
    if metrics["auc"] is not None:
        return float(metrics["auc"]), "auc"
    return float(metrics["accuracy"]), "accuracy"


def _probabilities(pipeline: Pipeline, x: np.ndarray, num_classes: int) -> np.ndarray:
    """(n, num_classes) probabilities; columns of classes absent from the training split are 0."""
    probs = np.zeros((len(x), num_classes))
    probs[:, pipeline.classes_] = pipeline.predict_proba(x)
    return probs


def fit_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    num_classes: int,
    c_grid: Sequence[float] = C_GRID,
    max_iter: int = 5000,
) -> ProbeFit:
    """Fit one standardized logistic regression per C on train; keep the best on validation.

    `train_x`: (n_train, features), `val_x`: (n_val, features). Ties go to the smaller C (stronger
    regularization). Only the training and validation splits are seen here.
    """
    if not c_grid:
        raise ValueError("c_grid is empty: give at least one C > 0")
    scores: dict[float, float] = {}
    best: tuple[float, Pipeline] | None = None
    name = "auc"
    for c in sorted(float(c) for c in c_grid):
        if not c > 0:
            raise ValueError(f"C {c} must be > 0")
        pipeline = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))
        # One BLAS thread: L-BFGS on (n, 2 * hidden) features makes thousands of small BLAS calls, and
        # OpenBLAS threads spin-waiting between them made these fits 7x slower on a busy 2-core machine.
        with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="blas"):
            warnings.simplefilter("ignore", ConvergenceWarning)  # large C on separable features: still a fit
            pipeline.fit(train_x, train_y)
        scores[c], name = selection_score(val_y, _probabilities(pipeline, val_x, num_classes))
        if best is None or scores[c] > scores[best[0]]:
            best = (c, pipeline)
    assert best is not None
    return ProbeFit(best[0], best[1], scores, name)


def probe_metrics(fit: ProbeFit, x: np.ndarray, y: np.ndarray, num_classes: int) -> dict[str, float | None]:
    """`evaluation.classification_metrics` of the probe on (x, y), with balanced_accuracy in any case."""
    probs = _probabilities(fit.pipeline, x, num_classes)
    metrics = classification_metrics(y, probs)
    metrics.setdefault("balanced_accuracy", float(balanced_accuracy_score(y, probs.argmax(axis=1))))
    return metrics


# ----------------------------------------------------------------------------- from a dataset spec


def _features_cached(
    backbone: Backbone,
    splits: DatasetSplits,
    name: str,
    indices: np.ndarray | None,
    cache_dir: str | Path | None,
    weights: str,
    batch_size: int,
    say: Callable[[str], Any],
) -> tuple[np.ndarray, np.ndarray]:
    split: ImageDataset = getattr(splits, name)
    key = cache_key(
        kind="linear-probe",
        pooling="cls+mean-patch",
        encoder=weights,
        size=backbone.image_size,
        channels=backbone.num_channels,
        images=hashlib.sha256(split.images.tobytes()).hexdigest(),
        rows=hashlib.sha256(np.asarray([] if indices is None else indices, dtype=np.int64).tobytes()).hexdigest(),
    )
    data = load_or_compute(
        cache_dir,
        f"probe-{key}",
        lambda: split_features(backbone, split, indices, batch_size, f"probe features {name}"),
        say,
    )
    features, labels = data.tensors
    return features.numpy().astype(np.float64), labels.numpy()


def linear_probe(
    dataset: str,
    model: str = "dinov2-s",
    image_size: int | None = None,
    data_dir: str | Path | None = None,
    train_subset: int | None = None,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    c_grid: Sequence[float] = C_GRID,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    say: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Centralized linear probe of `model`'s frozen features on `dataset` (a `load_dataset_spec` spec).

    Args:
        dataset: e.g. ``"medmnist:pneumoniamnist"`` (any 2D MedMNIST file, gray or RGB, any classes).
        model: a `load_backbone` name (``tiny-vit``, ``dinov2-s``, an HF id or dir).
        image_size: input side in px (default: the model's).
        data_dir: folder of MedMNIST ``.npz`` files.
        train_subset: use a seeded stratified subset of this many training images (default: all).
        seed: seeds the subset and a random backbone's weights (tiny-vit).
        cache_dir: keep the features here (`prefix_cache.load_or_compute`, one file per split).
        c_grid: C values tried on the validation split.
        batch_size: images per forward pass.
        device: default CUDA if available, else CPU.

    Returns:
        {"method": "linear-probe", "dataset", "model", "image_size", "C", "c_grid", "val_scores"
        ({C: score}), "selection_metric", "test" (accuracy, precision/recall/F1 macro, AUC, balanced
        accuracy), "val" (same, for the chosen C), "train_size", "feature_dim", "seconds" (wall)}.
    """
    t0 = time.perf_counter()
    splits = load_dataset_spec(dataset, data_dir=data_dir, seed=seed)
    backbone = load_backbone(
        model, splits.num_classes, image_size=image_size, id2label=dict(enumerate(splits.class_names)), seed=seed
    )
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backbone.model.to(device)
    train_idx = None
    if train_subset:
        from ..run.task import stratified_subset  # only needed for subsets

        train_idx = stratified_subset(splits.train.labels, train_subset, seed)
    weights = encoder_digest(backbone.model)
    feats = {
        name: _features_cached(
            backbone, splits, name, train_idx if name == "train" else None, cache_dir, weights, batch_size, say
        )
        for name in ("train", "val", "test")
    }
    k = splits.num_classes
    fit = fit_probe(*feats["train"], *feats["val"], k, c_grid)
    return {
        "method": "linear-probe",
        "dataset": dataset,
        "model": model,
        "image_size": backbone.image_size,
        "C": fit.C,
        "c_grid": sorted(float(c) for c in c_grid),
        "val_scores": {str(c): s for c, s in fit.val_scores.items()},
        "selection_metric": f"validation {fit.score_name}",
        "val": probe_metrics(fit, *feats["val"], k),
        "test": probe_metrics(fit, *feats["test"], k),
        "train_size": int(len(feats["train"][1])),
        "feature_dim": int(feats["train"][0].shape[1]),
        "seconds": time.perf_counter() - t0,
    }


__all__ = [
    "C_GRID",
    "ProbeFit",
    "encoder_digest",
    "fit_probe",
    "linear_probe",
    "pooled_features",
    "probe_metrics",
    "selection_score",
    "split_features",
]
