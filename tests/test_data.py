"""Tests for peft_deer.data: loading, partitioning, tables and preprocessing (CPU, no network)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from peft_deer.data import (
    DatasetSplits,
    ImageDataset,
    format_label_table,
    label_count_table,
    load_dataset_spec,
    make_tensor_dataset,
    partition_clients,
    plot_label_counts,
    preprocess_images,
)

MEDMNIST_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "medmnist"
EXPECTED_SIZES = {"pneumoniamnist": (4707, 524, 624), "breastmnist": (546, 78, 156)}


def _require_medmnist(name: str) -> Path:
    path = MEDMNIST_DIR / f"{name}.npz"
    if not path.is_file():
        pytest.skip(f"real MedMNIST file {path} is absent (see shared/data/medmnist/README.md)")
    return path


@pytest.fixture(scope="module")
def pneumonia() -> DatasetSplits:
    _require_medmnist("pneumoniamnist")
    return load_dataset_spec("medmnist:pneumoniamnist", data_dir=MEDMNIST_DIR)


@pytest.fixture(scope="module")
def breast() -> DatasetSplits:
    _require_medmnist("breastmnist")
    return load_dataset_spec("medmnist:breastmnist", data_dir=MEDMNIST_DIR)


# ------------------------------------------------------------------------------------ loading


@pytest.mark.parametrize("name", ["pneumoniamnist", "breastmnist"])
def test_real_medmnist_splits(name: str) -> None:
    _require_medmnist(name)
    splits = load_dataset_spec(f"medmnist:{name}", data_dir=MEDMNIST_DIR)
    assert splits.name == f"medmnist:{name}"
    assert (len(splits.train), len(splits.val), len(splits.test)) == EXPECTED_SIZES[name]
    assert splits.num_classes == 2
    assert splits.num_channels == 1
    for ds in (splits.train, splits.val, splits.test):
        assert ds.images.dtype == np.uint8 and ds.images.shape[1:] == (28, 28, 1)
        assert ds.labels.dtype == np.int64 and ds.labels.shape == (len(ds),)
        assert set(np.unique(ds.labels)) == {0, 1}


def test_medmnist_class_names_and_counts(pneumonia: DatasetSplits, breast: DatasetSplits) -> None:
    assert pneumonia.class_names == ["normal", "pneumonia"]
    assert breast.class_names == ["malignant", "normal/benign"]
    # README: train holds 1213 normal, 3494 pneumonia
    assert np.bincount(pneumonia.train.labels).tolist() == [1213, 3494]


def test_rgb_npz_loads_with_three_channels(tmp_path: Path, breast: DatasetSplits) -> None:
    arrays = {}
    for split in ("train", "val", "test"):
        ds = getattr(breast, split)
        arrays[f"{split}_images"] = np.repeat(ds.images, 3, axis=-1)  # (N, 28, 28, 3)
        arrays[f"{split}_labels"] = ds.labels[:, None]  # (N, 1) as in MedMNIST
    np.savez(tmp_path / "breastmnist.npz", **arrays)
    rgb = load_dataset_spec("medmnist:breastmnist", data_dir=tmp_path)
    assert rgb.num_channels == 3
    assert rgb.train.images.shape == (546, 28, 28, 3)
    np.testing.assert_array_equal(rgb.train.images[..., 2], breast.train.images[..., 0])
    np.testing.assert_array_equal(rgb.test.labels, breast.test.labels)


def test_missing_medmnist_file_without_package(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PEFT_DEER_DATA", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setitem(sys.modules, "medmnist", None)  # import medmnist -> ImportError
    with pytest.raises(RuntimeError, match="pip install medmnist") as info:
        load_dataset_spec("medmnist:dermamnist", data_dir=tmp_path / "empty")
    assert "dermamnist.npz" in str(info.value) and "--data-dir" in str(info.value)


def _write_pngs(folder: Path, images: np.ndarray, tag: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img[..., 0]).save(folder / f"{tag}_{i}.png")


def _lookup(images: np.ndarray) -> dict[bytes, int]:
    return {img.tobytes(): i for i, img in enumerate(images)}


def test_imagefolder_flat_layout(tmp_path: Path, breast: DatasetSplits) -> None:
    src = breast.train
    by_class = {
        "malignant": src.images[src.labels == 0][:10],
        "benign": src.images[src.labels == 1][:10],
    }
    for cls, imgs in by_class.items():
        _write_pngs(tmp_path / "imgs" / cls, imgs, cls)
    splits = load_dataset_spec(
        f"imagefolder:{tmp_path / 'imgs'}",
        val_fraction=0.2,
        test_fraction=0.2,
        seed=1,
        hf_cache_dir=tmp_path / "hf",
    )
    assert splits.class_names == ["benign", "malignant"]  # alphabetical folder order
    assert (len(splits.train), len(splits.val), len(splits.test)) == (12, 4, 4)
    assert splits.num_channels == 1 and splits.train.images.shape[1:] == (28, 28, 1)
    # stratified: every split holds both classes equally
    for ds in (splits.train, splits.val, splits.test):
        assert np.bincount(ds.labels, minlength=2).tolist() == [len(ds) // 2] * 2
        for img, lab in zip(ds.images, ds.labels, strict=True):
            assert img.tobytes() in _lookup(by_class[splits.class_names[lab]])


def test_imagefolder_split_dirs_and_resize(tmp_path: Path, breast: DatasetSplits) -> None:
    src = breast.train
    root = tmp_path / "imgs"
    for split, sl in (("train", slice(0, 6)), ("val", slice(6, 8)), ("test", slice(8, 11))):
        _write_pngs(root / split / "malignant", src.images[src.labels == 0][sl], split)
        _write_pngs(root / split / "benign", src.images[src.labels == 1][sl], split)
    # one odd-sized image: resized to the common 28x28
    Image.fromarray(src.images[src.labels == 1][20][..., 0]).resize((40, 40)).save(
        root / "train" / "benign" / "big.png"
    )
    splits = load_dataset_spec(f"imagefolder:{root}", hf_cache_dir=tmp_path / "hf")
    assert (len(splits.train), len(splits.val), len(splits.test)) == (13, 4, 6)
    assert np.bincount(splits.train.labels).tolist() == [7, 6]  # benign=0, malignant=1
    assert splits.train.images.shape == (13, 28, 28, 1)
    malignant = _lookup(src.images[src.labels == 0])
    for ds in (splits.val, splits.test):
        for img, lab in zip(ds.images, ds.labels, strict=True):
            assert (img.tobytes() in malignant) == (lab == 1)


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("medmnist:nosuchmnist", "pneumoniamnist"),  # lists the valid names
        ("medmnist:chestmnist", "multi-label"),
        ("medmnist:pathmnist_99", "size"),
        ("foo:bar", "imagefolder:"),
        ("nosuchprefix:xyz", "medmnist:"),
    ],
)
def test_bad_specs(spec: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        load_dataset_spec(spec)


def test_imagefolder_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a directory"):
        load_dataset_spec(f"imagefolder:{tmp_path / 'absent'}")


@pytest.mark.e2e
def test_hub_id_fails_clearly_offline(tmp_path: Path) -> None:
    code = textwrap.dedent(
        """
        from peft_deer.data import load_dataset_spec
        try:
            load_dataset_spec("someuser/no-such-dataset-xyz")
        except RuntimeError as err:
            print("ERR:", err)
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path))
    env["PYTHONPATH"] = os.pathsep.join([*sys.path])
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "ERR: could not load Hugging Face dataset 'someuser/no-such-dataset-xyz'" in out.stdout, (
        out.stdout + out.stderr
    )


@pytest.mark.parametrize(
    ("images", "labels", "needle"),
    [
        (np.zeros((4, 8, 8, 1), np.uint8), np.array([0, 1, 2, 1]), "label 2 out of range"),
        (np.zeros((4, 8, 8, 1), np.uint8), np.array([0, -1, 1, 1]), "label -1 out of range"),
        (np.zeros((4, 8), np.uint8), np.array([0, 1, 1, 1]), "ndim=2"),
        (np.zeros((4, 8, 8, 2), np.uint8), np.array([0, 1, 1, 1]), "channels"),
        (np.zeros((3, 8, 8, 1), np.uint8), np.array([0, 1, 1, 1]), "differ in length"),
        (np.zeros((4, 8, 8, 1), np.float32), np.array([0, 1, 1, 1]), "uint8"),
    ],
)
def test_image_dataset_validation(images: np.ndarray, labels: np.ndarray, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        ImageDataset(images, labels, ["a", "b"])


def test_image_dataset_accepts_nhw_and_column_labels() -> None:
    ds = ImageDataset(np.zeros((3, 5, 6), np.uint8), np.array([[0], [1], [1]]), ["a", "b"])
    assert ds.images.shape == (3, 5, 6, 1) and ds.labels.shape == (3,) and len(ds) == 3
    assert ds.labels.dtype == np.int64


# ------------------------------------------------------------------------------- partitioning


def _check_partition(parts: list[np.ndarray], n: int, k: int) -> None:
    assert len(parts) == k
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)  # sorted, unique
    flat = np.concatenate(parts)
    assert len(flat) == n and np.array_equal(np.sort(flat), np.arange(n))  # disjoint, covering


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "dirichlet-mix"])
def test_partitions_disjoint_covering_deterministic(pneumonia: DatasetSplits, scheme: str) -> None:
    labels = pneumonia.train.labels
    a = partition_clients(labels, 12, scheme=scheme, dirichlet_alpha=0.5, seed=3)
    _check_partition(a, len(labels), 12)
    b = partition_clients(labels, 12, scheme=scheme, dirichlet_alpha=0.5, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    c = partition_clients(labels, 12, scheme=scheme, dirichlet_alpha=0.5, seed=4)
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_iid_sizes_balanced(pneumonia: DatasetSplits) -> None:
    parts = partition_clients(pneumonia.train.labels, 12, scheme="iid", seed=0)
    assert sorted({len(p) for p in parts}) == [392, 393]


def test_dirichlet_is_label_skewed(pneumonia: DatasetSplits) -> None:
    labels = pneumonia.train.labels
    global_frac = labels.mean()  # fraction of class 1 (pneumonia), about 0.74

    def max_gap(parts: list[np.ndarray]) -> float:
        return max(abs(labels[p].mean() - global_frac) for p in parts)

    skewed = partition_clients(labels, 12, scheme="dirichlet", dirichlet_alpha=0.1, seed=0)
    _check_partition(skewed, len(labels), 12)
    assert min(len(p) for p in skewed) >= 1
    assert max_gap(skewed) > 0.5
    assert max_gap(partition_clients(labels, 12, scheme="iid", seed=0)) < 0.1


@pytest.mark.parametrize("clients", [48, 192])
def test_dirichlet_mix_holds_for_many_clients_and_is_skewed(pneumonia: DatasetSplits, clients: int) -> None:
    labels = pneumonia.train.labels
    with pytest.raises(ValueError, match="dirichlet-mix"):  # the per-class split leaves some client empty
        partition_clients(labels, clients, scheme="dirichlet", dirichlet_alpha=0.1, max_draws=20)
    parts = partition_clients(labels, clients, scheme="dirichlet-mix", dirichlet_alpha=0.1, seed=0)
    _check_partition(parts, len(labels), clients)
    assert {len(p) for p in parts} <= {len(labels) // clients, len(labels) // clients + 1}  # equal sizes
    majority = [max(labels[p].mean(), 1 - labels[p].mean()) for p in parts]
    assert np.mean(majority) > 0.85  # alpha 0.1: most hospitals hold mostly one class
    pooled = np.mean([labels[p].mean() for p in parts])
    assert abs(pooled - labels.mean()) < 0.02  # E[mix] = the split's class frequencies
    mild = partition_clients(labels, clients, scheme="dirichlet-mix", dirichlet_alpha=100.0, seed=0)
    assert max(abs(labels[p].mean() - labels.mean()) for p in mild) < 0.35  # large alpha: near IID


def test_dirichlet_min_size(pneumonia: DatasetSplits) -> None:
    parts = partition_clients(pneumonia.train.labels, 12, scheme="dirichlet", dirichlet_alpha=0.3, min_size=20)
    assert min(len(p) for p in parts) >= 20


def test_dirichlet_impossible_raises(pneumonia: DatasetSplits) -> None:
    with pytest.raises(ValueError, match=r"Dirichlet alpha=0\.01 with 12 clients") as info:
        partition_clients(pneumonia.train.labels, 12, scheme="dirichlet", dirichlet_alpha=0.01, max_draws=50)
    assert "--dirichlet-alpha" in str(info.value) and "--num-clients" in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"num_clients": 5000}, "--num-clients 5000 exceeds the 4707 training examples"),
        ({"num_clients": 0}, "positive integer"),
        ({"num_clients": 4, "scheme": "dirichlet", "dirichlet_alpha": 0.0}, "must be > 0"),
        ({"num_clients": 4, "scheme": "dirichlet", "dirichlet_alpha": -1.0}, "must be > 0"),
        ({"num_clients": 4, "scheme": "pathological"}, "unknown partition scheme 'pathological'"),
        ({"num_clients": 100, "min_size": 50}, "only 4707"),
    ],
)
def test_partition_bad_inputs(pneumonia: DatasetSplits, kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        partition_clients(pneumonia.train.labels, **kwargs)


# ------------------------------------------------------------------------------ label tables


def test_label_table_and_plot(pneumonia: DatasetSplits, tmp_path: Path) -> None:
    labels = pneumonia.train.labels
    parts = partition_clients(labels, 5, scheme="dirichlet", dirichlet_alpha=0.5, seed=0)
    rows = label_count_table(labels, parts, pneumonia.class_names)
    assert [r["client"] for r in rows] == list(range(5))
    for row, part in zip(rows, parts, strict=True):
        assert row["n"] == len(part) == row["normal"] + row["pneumonia"]
        assert row["pneumonia"] == int(labels[part].sum())
    text = format_label_table(rows)
    lines = text.splitlines()
    assert "normal" in lines[0] and "pneumonia" in lines[0]
    assert lines[-1].split() == ["total", "4707", "1213", "3494"]
    assert len({len(line) for line in lines}) == 1  # aligned
    out = plot_label_counts(rows, pneumonia.class_names, tmp_path / "plots" / "labels.png")
    data = Path(out).read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- preprocessing


def test_preprocess_constant_image_normalization() -> None:
    imgs = np.full((2, 28, 28, 1), 128, np.uint8)
    x = preprocess_images(imgs, 56, 3, mean=[0.5, 0.4, 0.3], std=[0.25, 0.5, 0.1])
    assert x.shape == (2, 3, 56, 56) and x.dtype == torch.float32
    v = 128 / 255
    expected = torch.tensor([(v - 0.5) / 0.25, (v - 0.4) / 0.5, (v - 0.3) / 0.1])
    torch.testing.assert_close(x[:, :, 10, 17], expected.expand(2, 3), rtol=0, atol=1e-5)


def test_preprocess_gray_to_rgb_repeats_and_rgb_to_gray_means() -> None:
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    x = preprocess_images(gray, 28, 3, mean=0.0, std=1.0)
    assert x.shape == (3, 3, 28, 28)
    torch.testing.assert_close(x[:, 0], x[:, 2])
    torch.testing.assert_close(x[:, 1], torch.from_numpy(gray).float() / 255)
    rgb = rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)  # a single HWC image
    y = preprocess_images(rgb, 14, 1, mean=[0.5], std=[0.5])
    assert y.shape == (1, 1, 14, 14)
    full = preprocess_images(rgb, 28, 1, mean=0.0, std=1.0)
    torch.testing.assert_close(full[0, 0], torch.from_numpy(rgb).float().mean(-1) / 255)


def test_preprocess_single_inputs_and_errors() -> None:
    img = np.arange(28 * 28, dtype=np.int64).reshape(28, 28) % 256
    a = preprocess_images(img.astype(np.uint8), 32, 1, 0.5, 0.5)
    b = preprocess_images(Image.fromarray(img.astype(np.uint8)).convert("RGB"), 32, 1, 0.5, 0.5)
    assert a.shape == b.shape == (1, 1, 32, 32)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="expected 1 or 3"):
        preprocess_images(np.zeros((28, 28), np.uint8), 28, 3, [0.5, 0.5], [0.5, 0.5])
    with pytest.raises(ValueError, match="std must be > 0"):
        preprocess_images(np.zeros((28, 28), np.uint8), 28, 1, 0.5, 0.0)
    with pytest.raises(ValueError, match="num_channels"):
        preprocess_images(np.zeros((28, 28), np.uint8), 28, 2, 0.5, 0.5)


def test_make_tensor_dataset(breast: DatasetSplits) -> None:
    idx = np.array([5, 0, 17, 200, 3])
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    tds = make_tensor_dataset(breast.train, idx, 42, 3, mean, std, chunk_size=2)
    x, y = tds.tensors
    assert x.shape == (5, 3, 42, 42) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.tolist() == breast.train.labels[idx].tolist()
    ref = preprocess_images(breast.train.images[idx], 42, 3, mean, std)
    torch.testing.assert_close(x, ref)
    assert len(make_tensor_dataset(breast.val, None, 28, 1, 0.5, 0.5)) == len(breast.val)
