"""Shared fixtures: a tiny random ViT (seconds on CPU) and the shared MedMNIST folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

ROOT = Path(__file__).resolve().parents[1]
MEDMNIST_DIR = ROOT.parent / "shared" / "data" / "medmnist"


def tiny_vit(seed: int = 0, hidden: int = 32, num_labels: int = 2) -> ViTForImageClassification:
    """A 2-layer random ViT for 28x28 grayscale images (about 20k parameters)."""
    torch.manual_seed(seed)
    config = ViTConfig(
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        image_size=28,
        patch_size=7,
        num_channels=1,
        num_labels=num_labels,
    )
    return ViTForImageClassification(config).eval()


@pytest.fixture
def medmnist_dir() -> Path:
    if not (MEDMNIST_DIR / "pneumoniamnist.npz").is_file():
        pytest.skip(f"real MedMNIST files not found at {MEDMNIST_DIR} (expected ../shared/data/medmnist)")
    return MEDMNIST_DIR
