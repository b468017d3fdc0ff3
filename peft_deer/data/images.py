"""In-memory image datasets: `ImageDataset` (uint8 NHWC images, int labels, class names) and
`DatasetSplits` (train / val / test)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


def as_uint8_images(images: Any) -> np.ndarray:
    arr = np.asarray(images)
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"images must be uint8 in [0, 255], got dtype {arr.dtype}")
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ValueError(f"images must be uint8 in [0, 255], got values in [{arr.min()}, {arr.max()}]")
        arr = arr.astype(np.uint8)
    return arr


@dataclass
class ImageDataset:
    """An in-memory labelled image set.

    Attributes:
        images: uint8 array (N, H, W, C), C in {1, 3}; (N, H, W) is accepted and gets C = 1.
        labels: int64 array (N,); (N, 1) is accepted and flattened. Values in [0, num_classes).
        class_names: one name per class; ``num_classes == len(class_names)``.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]

    def __post_init__(self) -> None:
        images = as_uint8_images(self.images)
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4:
            raise ValueError(
                f"images must have shape (N, H, W, C) or (N, H, W), got ndim={images.ndim} (shape {images.shape})"
            )
        if images.shape[-1] not in (1, 3):
            raise ValueError(
                f"images must have 1 (grayscale) or 3 (RGB) channels in the last axis, got shape {images.shape}"
            )
        labels = np.asarray(self.labels)
        if labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if labels.ndim != 1:
            raise ValueError(
                f"labels must have shape (N,) or (N, 1) (single-label classification), got shape {labels.shape}"
            )
        is_int = np.issubdtype(labels.dtype, np.integer)
        if labels.size and not is_int and not np.all(np.equal(np.mod(labels, 1), 0)):
            raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
        labels = labels.astype(np.int64)
        if len(labels) != len(images):
            raise ValueError(f"images and labels differ in length: {len(images)} images, {len(labels)} labels")
        self.class_names = [str(c) for c in self.class_names]
        k = len(self.class_names)
        if k < 1:
            raise ValueError("class_names must not be empty")
        bad = labels[(labels < 0) | (labels >= k)]
        if bad.size:
            raise ValueError(f"label {int(bad[0])} out of range [0, {k}) for {k} classes {self.class_names}")
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        """Number of classes (``len(class_names)``)."""
        return len(self.class_names)

    @property
    def num_channels(self) -> int:
        """Channels C of the stored images (1 or 3)."""
        return int(self.images.shape[-1])

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the stored images in pixels."""
        return int(self.images.shape[1]), int(self.images.shape[2])

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageDataset:
        """A new dataset holding the rows ``indices`` (copies)."""
        idx = np.asarray(indices, dtype=np.int64)
        return ImageDataset(self.images[idx], self.labels[idx], list(self.class_names))


@dataclass
class DatasetSplits:
    """Train / validation / test splits of one dataset (same classes and channels)."""

    train: ImageDataset
    val: ImageDataset
    test: ImageDataset
    name: str

    def __post_init__(self) -> None:
        for split_name in ("val", "test"):
            split: ImageDataset = getattr(self, split_name)
            if split.class_names != self.train.class_names:
                raise ValueError(
                    f"{split_name} classes {split.class_names} differ from train classes {self.train.class_names}"
                )
            if split.num_channels != self.train.num_channels:
                raise ValueError(f"{split_name} has {split.num_channels} channels, train has {self.train.num_channels}")

    @property
    def num_channels(self) -> int:
        """Channels of the stored images (1 = grayscale, 3 = RGB)."""
        return self.train.num_channels

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return self.train.num_classes

    @property
    def class_names(self) -> list[str]:
        """Class names, index = label."""
        return list(self.train.class_names)
