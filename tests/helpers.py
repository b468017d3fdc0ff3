"""Helpers the tests import (`from helpers import ...`): paths, a tiny random ViT and random client data.

Fixtures stay in conftest.py; pytest puts this folder on sys.path, so test modules import this one by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch.utils.data import TensorDataset
from transformers import ViTConfig, ViTForImageClassification

from peft_deer import DeerLoraConfig
from peft_deer.federated import ClientTask
from peft_deer.run.run_dir import staging_dir

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


def tiny_deer_model(method: str = "deer", seed: int = 0, targets: tuple[str, ...] = ("q_proj", "v_proj")) -> PeftModel:
    """The tiny ViT with a rank-4 DEER_LORA adapter on `targets` and a trained classifier head."""
    config = DeerLoraConfig(
        r=4, lora_alpha=8, target_modules=list(targets), modules_to_save=["classifier"], method=method
    )
    return get_peft_model(tiny_vit(seed), config)


def random_client_tasks(sizes: Sequence[int], generator: torch.Generator) -> list[ClientTask]:
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


# ------------------------------------------------------------------------------------- the driver on real MedMNIST


def tiny_fed_argv(out: Path, *extra: str, data_dir: Path = MEDMNIST_DIR, dataset: str = "breastmnist") -> list[str]:
    """`train/fed.py` arguments for a one-round, two-client tiny-ViT run on 60 real images, writing to `out`."""
    return [
        "--model", "tiny-vit", "--dataset", f"medmnist:{dataset}", "--data-dir", str(data_dir),
        "--train-subset", "60", "--num-clients", "2", "--rounds", "1", "--batch-size", "16",
        "--eval-batch-size", "512", "--output-dir", str(out), *extra,
    ]  # fmt: skip


def run_fed_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    """(exit code, non-empty stderr lines) of `train.fed.main(argv)`, whether it returns or exits."""
    from train import fed

    capsys.readouterr()
    try:
        code = fed.main(argv)
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else 1
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def assert_one_line_error(code: int, lines: list[str], *fragments: str) -> None:
    """A non-zero exit with exactly one `deer-fed: error: ...` line holding every fragment."""
    assert code != 0
    assert len(lines) == 1, lines
    assert lines[0].startswith("deer-fed: error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def assert_nothing_written(out: Path) -> None:
    """Neither the output dir nor its staging dir exists."""
    assert not out.exists(), sorted(p.name for p in out.iterdir())
    assert not staging_dir(out).exists()


def damaged_npz_folders(folder: Path) -> dict[str, Path]:
    """Folders under `folder`, each with a damaged copy of the real breastmnist.npz, by kind of damage."""
    source = (MEDMNIST_DIR / "breastmnist.npz").read_bytes()
    variants = {}
    for name, data in (
        ("truncated", source[: len(source) // 2]),
        ("bad-crc", source[:2000] + bytes([source[2000] ^ 0x01]) + source[2001:]),
        ("text", b"hello\n"),
        ("empty", b""),
    ):
        (folder / name).mkdir()
        (folder / name / "breastmnist.npz").write_bytes(data)
        variants[name] = folder / name
    return variants
