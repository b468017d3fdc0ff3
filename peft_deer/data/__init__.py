"""Datasets and client partitioning for federated image classification.

Everything is held in memory as uint8 NHWC arrays (the datasets we target are small):

- :func:`load_dataset_spec` loads ``medmnist:<name>``, ``imagefolder:<path>`` or a Hugging Face
  hub id into :class:`DatasetSplits` (train / val / test :class:`ImageDataset`).
- :func:`partition_clients` splits training labels across simulated clients (IID or Dirichlet
  label skew, via ``flwr_datasets`` partitioners).
- :func:`label_count_table`, :func:`format_label_table`, :func:`plot_label_counts` describe a
  partition.
- :func:`preprocess_images` / :func:`make_tensor_dataset` turn uint8 images into normalized
  float32 NCHW tensors for a backbone (also used by the Gradio app for single images).

The package imports neither ``datasets`` nor ``flwr_datasets`` nor ``matplotlib`` at import time.
"""

from .images import DatasetSplits, ImageDataset
from .label_tables import format_label_table, label_count_table, plot_label_counts
from .loading import load_dataset_spec
from .medmnist import MEDMNIST_2D_CLASS_NAMES, default_cache_dir
from .medmnist import read_npz as read_npz
from .partition import PARTITION_SCHEMES as PARTITION_SCHEMES
from .partition import partition_clients
from .preprocess import make_tensor_dataset, preprocess_images

__all__ = [
    "MEDMNIST_2D_CLASS_NAMES",
    "DatasetSplits",
    "ImageDataset",
    "default_cache_dir",
    "format_label_table",
    "label_count_table",
    "load_dataset_spec",
    "make_tensor_dataset",
    "partition_clients",
    "plot_label_counts",
    "preprocess_images",
]
