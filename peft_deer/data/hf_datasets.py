"""Hugging Face datasets (`imagefolder:<path>` and hub ids) read into `DatasetSplits`; a missing
val/test split is carved out of train, stratified by label. `datasets` is imported only when used."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .images import DatasetSplits, ImageDataset
from .intensity import HIGH_BIT_MODES, to_uint8

SPEC_HELP = (
    "use 'medmnist:<name>' (e.g. medmnist:pneumoniamnist), 'imagefolder:<path>', "
    "or a Hugging Face hub dataset id (e.g. 'user/dataset', optionally prefixed 'hf:')"
)


def _stratified_split(labels: np.ndarray, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Split indices of ``labels`` into len(fractions)+1 sorted parts; part i (i < len) gets about
    ``fractions[i]`` of every class, the last part the rest."""
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        start = 0
        for i, frac in enumerate(fractions):
            n = round(frac * len(idx))
            parts[i].append(idx[start : start + n])
            start += n
        parts[-1].append(idx[start:])
    return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]


def _split_missing(
    train: ImageDataset,
    val: ImageDataset | None,
    test: ImageDataset | None,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> tuple[ImageDataset, ImageDataset, ImageDataset]:
    """Carve the missing val and/or test split out of train (stratified by label)."""
    fracs: list[float] = []
    if val is None:
        fracs.append(val_fraction)
    if test is None:
        fracs.append(test_fraction)
    if not fracs:
        assert val is not None and test is not None
        return train, val, test
    for f in fracs:
        if not 0.0 < f < 1.0:
            raise ValueError(f"split fractions must be in (0, 1), got {f}")
    if sum(fracs) >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got {sum(fracs)}")
    parts = _stratified_split(train.labels, fracs, seed)
    carved = [train.subset(p) for p in parts[:-1]]
    new_train = train.subset(parts[-1])
    if val is None:
        val = carved.pop(0)
    if test is None:
        test = carved.pop(0)
    return new_train, val, test


_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


def _pil_list_to_array(pil_images: list[Any], mode: str, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    h, w = size[1], size[0]
    c = 1 if mode == "L" else 3
    out = np.empty((len(pil_images), h, w, c), dtype=np.uint8)
    for i, img in enumerate(pil_images):
        if img.mode in HIGH_BIT_MODES:  # the demo's rule too (peft_deer.data.intensity)
            img = Image.fromarray(to_uint8(np.asarray(img)))
        img = img.convert(mode)
        if img.size != size:
            img = img.resize(size, Image.Resampling.BILINEAR)
        a = np.asarray(img, dtype=np.uint8)
        out[i] = a[..., None] if a.ndim == 2 else a
    return out


def _detect_columns(features: Any) -> tuple[str, str, list[str] | None]:
    """(image column, label column, class names or None) of a HF ``datasets`` feature dict."""
    import datasets

    image_cols = [k for k, f in features.items() if isinstance(f, datasets.Image)]
    if not image_cols:
        raise ValueError(f"no image column (datasets.Image feature) found among columns {list(features)}")
    class_cols = [k for k, f in features.items() if isinstance(f, datasets.ClassLabel)]
    if class_cols:
        label_col = "label" if "label" in class_cols else class_cols[0]
        return image_cols[0], label_col, list(features[label_col].names)
    for name in ("label", "labels"):
        f = features.get(name)
        if isinstance(f, datasets.Value) and ("int" in f.dtype):
            return image_cols[0], name, None
        if f is not None:
            raise ValueError(
                f"label column {name!r} has feature {f}; peft_deer needs single-label "
                f"classification (a ClassLabel or integer column)"
            )
    raise ValueError(
        f"no label column (a ClassLabel feature, or an integer column named 'label'/'labels') "
        f"found among columns {list(features)}"
    )


def _hf_dict_to_splits(
    dsd: Any,
    name: str,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> DatasetSplits:
    """Convert a HF ``DatasetDict`` to :class:`DatasetSplits`, resizing every image to the most
    common (W, H) with PIL bilinear and converting to L (all grayscale) or RGB."""
    split_names = list(dsd.keys())
    aliases = {
        "train": ("train",),
        "val": ("validation", "val", "valid", "dev"),
        "test": ("test",),
    }
    chosen: dict[str, str | None] = {
        role: next((s for s in names if s in dsd), None) for role, names in aliases.items()
    }
    if chosen["train"] is None:
        if len(split_names) == 1:
            chosen["train"] = split_names[0]
        else:
            raise ValueError(f"{name}: no 'train' split among splits {split_names}")
    first = dsd[chosen["train"]]
    image_col, label_col, class_names = _detect_columns(first.features)

    raw: dict[str, tuple[list[Any], np.ndarray]] = {}
    for role, split in chosen.items():
        if split is None:
            continue
        ds = dsd[split]
        labels = np.asarray(ds.with_format("arrow")[label_col], dtype=np.int64)
        if labels.size and labels.min() < 0:
            raise ValueError(
                f"{name}: split {split!r} holds unlabeled examples (label {labels.min()}); "
                f"peft_deer needs labels in every split it uses"
            )
        raw[role] = (list(ds[image_col]), labels)
    all_imgs = [img for imgs, _ in raw.values() for img in imgs]
    if not all_imgs:
        raise ValueError(f"{name}: the dataset holds no images")
    size = Counter(img.size for img in all_imgs).most_common(1)[0][0]
    mode = "L" if all(img.mode in _GRAY_MODES for img in all_imgs) else "RGB"
    if class_names is None:
        k = int(max(int(lab.max()) for _, lab in raw.values() if lab.size)) + 1
        class_names = [str(i) for i in range(k)]
    sets = {
        role: ImageDataset(_pil_list_to_array(imgs, mode, size), labs, class_names)
        for role, (imgs, labs) in raw.items()
    }
    train, val, test = _split_missing(
        sets["train"], sets.get("val"), sets.get("test"), val_fraction, test_fraction, seed
    )
    return DatasetSplits(train, val, test, name=name)


def load_imagefolder(
    path: str, val_fraction: float, test_fraction: float, seed: int, cache_dir: str | None
) -> DatasetSplits:
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ValueError(f"imagefolder: {root} is not a directory")
    import datasets

    try:
        dsd = datasets.load_dataset("imagefolder", data_dir=str(root), cache_dir=cache_dir)
    except Exception as err:
        raise ValueError(
            f"imagefolder: could not read images from {root} ({type(err).__name__}: {err}); "
            f"expected <dir>/<class>/<image> or <dir>/<train|val|test>/<class>/<image>"
        ) from err
    return _hf_dict_to_splits(dsd, f"imagefolder:{root}", val_fraction, test_fraction, seed)


def load_hub(
    repo_id: str, val_fraction: float, test_fraction: float, seed: int, cache_dir: str | None
) -> DatasetSplits:
    import datasets

    try:
        dsd = datasets.load_dataset(repo_id, cache_dir=cache_dir)
    except Exception as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise RuntimeError(
            f"could not load Hugging Face dataset {repo_id!r} ({type(err).__name__}: {msg}); "
            f"check the id and your network (offline: HF_HUB_OFFLINE/HF_DATASETS_OFFLINE need "
            f"the dataset in the local cache), or {SPEC_HELP}"
        ) from err
    if not isinstance(dsd, datasets.DatasetDict):
        dsd = datasets.DatasetDict({"train": dsd})
    return _hf_dict_to_splits(dsd, f"hf:{repo_id}", val_fraction, test_fraction, seed)
