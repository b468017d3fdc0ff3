"""Shared fixtures (the shared MedMNIST folder, one torch thread). Helpers the tests import live in helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import MEDMNIST_DIR

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


@pytest.fixture
def medmnist_dir() -> Path:
    if not (MEDMNIST_DIR / "pneumoniamnist.npz").is_file():
        pytest.skip(f"real MedMNIST files not found at {MEDMNIST_DIR} (expected ../shared/data/medmnist)")
    return MEDMNIST_DIR


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: OpenMP spin-waiting on the tiny ViT's matmuls made runs on a loaded
    2-core box about 10x slower (20 s vs 2.5 s), and it matches subprocess runs with OMP_NUM_THREADS=1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def flower_task_identity():
    """The task identity a ServerApp process has (flwr's messages need one): set for a test, cleared after it."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None
