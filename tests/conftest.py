"""Shared fixtures: a tiny random ViT (seconds on CPU) and the shared MedMNIST folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch.utils.data import TensorDataset
from transformers import ViTConfig, ViTForImageClassification

from peft_deer import DeerLoraConfig
from peft_deer.federated import ClientTask

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

ROOT = Path(__file__).resolve().parents[1]
MEDMNIST_DIR = ROOT.parent / "shared" / "data" / "medmnist"


def tiny_vit(
    seed: int = 0, hidden: int = 32, num_labels: int = 2, layers: int = 2, dropout: float = 0.0
) -> ViTForImageClassification:
    """A random ViT (2 blocks by default) for 28x28 grayscale images (about 20k parameters)."""
    torch.manual_seed(seed)
    config = ViTConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        hidden_dropout_prob=dropout,
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


def tiny_deer_model(method: str = "deer", seed: int = 0, targets: tuple[str, ...] = ("q_proj", "v_proj")) -> PeftModel:
    """The tiny ViT with a rank-4 DEER_LORA adapter on `targets` and a trained classifier head."""
    config = DeerLoraConfig(
        r=4, lora_alpha=8, target_modules=list(targets), modules_to_save=["classifier"], method=method
    )
    return get_peft_model(tiny_vit(seed), config)


def random_client_tasks(sizes, generator: torch.Generator) -> list[ClientTask]:
    """One client per size with random 28x28 gray images and binary labels; client i is seeded 100 + i."""
    return [
        ClientTask(
            i,
            TensorDataset(
                torch.randn(n, 1, 28, 28, generator=generator), torch.randint(0, 2, (n,), generator=generator)
            ),
            100 + i,
        )
        for i, n in enumerate(sizes)
    ]


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: OpenMP spin-waiting on the tiny ViT's matmuls made runs on a loaded
    2-core box about 10x slower (20 s vs 2.5 s), and it matches subprocess runs with OMP_NUM_THREADS=1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
