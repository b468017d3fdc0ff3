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

The module imports neither ``datasets`` nor ``flwr_datasets`` nor ``matplotlib`` at import time.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from .intensity import HIGH_BIT_MODES, pil_to_array, to_uint8

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

# --------------------------------------------------------------------------------------------
# Containers
# --------------------------------------------------------------------------------------------


def _as_uint8_images(images: Any) -> np.ndarray:
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
        images = _as_uint8_images(self.images)
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


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

#: Class names of the single-label 2D MedMNIST v2 tasks (index = label).
MEDMNIST_2D_CLASS_NAMES: dict[str, list[str]] = {
    "pathmnist": [
        "adipose",
        "background",
        "debris",
        "lymphocytes",
        "mucus",
        "smooth muscle",
        "normal colon mucosa",
        "cancer-associated stroma",
        "colorectal adenocarcinoma epithelium",
    ],
    "dermamnist": [
        "actinic keratoses and intraepithelial carcinoma",
        "basal cell carcinoma",
        "benign keratosis-like lesions",
        "dermatofibroma",
        "melanoma",
        "melanocytic nevi",
        "vascular lesions",
    ],
    "octmnist": ["choroidal neovascularization", "diabetic macular edema", "drusen", "normal"],
    "pneumoniamnist": ["normal", "pneumonia"],
    "retinamnist": ["0", "1", "2", "3", "4"],
    "breastmnist": ["malignant", "normal/benign"],
    "bloodmnist": [
        "basophil",
        "eosinophil",
        "erythroblast",
        "immature granulocytes",
        "lymphocyte",
        "monocyte",
        "neutrophil",
        "platelet",
    ],
    "tissuemnist": [
        "collecting duct, connecting tubule",
        "distal convoluted tubule",
        "glomerular endothelial cells",
        "interstitial endothelial cells",
        "leukocytes",
        "podocytes",
        "proximal tubule segments",
        "thick ascending limb",
    ],
    "organamnist": [
        "bladder",
        "femur-left",
        "femur-right",
        "heart",
        "kidney-left",
        "kidney-right",
        "liver",
        "lung-left",
        "lung-right",
        "pancreas",
        "spleen",
    ],
}
MEDMNIST_2D_CLASS_NAMES["organcmnist"] = list(MEDMNIST_2D_CLASS_NAMES["organamnist"])
MEDMNIST_2D_CLASS_NAMES["organsmnist"] = list(MEDMNIST_2D_CLASS_NAMES["organamnist"])

_MEDMNIST_MULTILABEL = {"chestmnist"}
_MEDMNIST_SIZES = (28, 64, 128, 224)
_SPEC_HELP = (
    "use 'medmnist:<name>' (e.g. medmnist:pneumoniamnist), 'imagefolder:<path>', "
    "or a Hugging Face hub dataset id (e.g. 'user/dataset', optionally prefixed 'hf:')"
)


def default_cache_dir() -> Path:
    """Where MedMNIST files are cached/downloaded: ``$PEFT_DEER_DATA`` or
    ``~/.cache/peft_deer/medmnist``."""
    env = os.environ.get("PEFT_DEER_DATA")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "peft_deer" / "medmnist"


def _medmnist_search_dirs(data_dir: str | Path | None) -> list[Path]:
    dirs: list[Path] = []
    if data_dir is not None:
        dirs.append(Path(data_dir).expanduser())
    env = os.environ.get("PEFT_DEER_DATA")
    if env:
        dirs += [Path(env).expanduser(), Path(env).expanduser() / "medmnist"]
    dirs += [Path.home() / ".cache" / "peft_deer" / "medmnist", Path.home() / ".medmnist"]
    out: list[Path] = []
    for d in dirs:
        if d not in out:
            out.append(d)
    return out


def _parse_medmnist_name(name: str) -> tuple[str, int | None]:
    """'pneumoniamnist' -> ('pneumoniamnist', None); 'pathmnist_224' -> ('pathmnist', 224)."""
    flag, size = name.strip().lower(), None
    if "_" in flag:
        base, _, tail = flag.rpartition("_")
        if tail.isdigit():
            flag, size = base, int(tail)
    valid = sorted(MEDMNIST_2D_CLASS_NAMES)
    if flag in _MEDMNIST_MULTILABEL:
        raise ValueError(
            f"medmnist:{flag} is a multi-label task, which peft_deer does not support "
            f"(single-label classification only); choose one of: {', '.join(valid)}"
        )
    if flag not in MEDMNIST_2D_CLASS_NAMES:
        raise ValueError(
            f"unknown MedMNIST dataset {name!r}; valid 2D names: {', '.join(valid)} "
            f"(optionally with a size suffix _64, _128 or _224)"
        )
    if size is not None and size not in _MEDMNIST_SIZES:
        raise ValueError(f"unknown MedMNIST image size {size} in {name!r}; available: {_MEDMNIST_SIZES}")
    return flag, (None if size == 28 else size)


def _download_medmnist(flag: str, size: int | None, target: Path, searched: list[Path]) -> Path:
    fname = f"{flag}.npz" if size is None else f"{flag}_{size}.npz"
    where = ", ".join(str(d) for d in searched)
    try:
        import medmnist  # type: ignore[import-not-found]
    except ImportError as err:
        raise RuntimeError(
            f"{fname} was not found in {where}, and the optional 'medmnist' package is not "
            f"installed to download it: run `pip install medmnist`, or pass --data-dir pointing "
            f"to a folder holding {fname}"
        ) from err
    target.mkdir(parents=True, exist_ok=True)
    try:
        info = medmnist.INFO[flag]
        cls = getattr(medmnist, info["python_class"])
        kwargs: dict[str, Any] = {"split": "test", "download": True, "root": str(target)}
        if size is not None:
            kwargs["size"] = size
        cls(**kwargs)
    except Exception as err:  # network errors come in many types
        raise RuntimeError(
            f"could not download {fname} with the medmnist package ({type(err).__name__}: "
            f"{err}); without network access, put {fname} in {target} (or $PEFT_DEER_DATA) "
            f"or pass --data-dir"
        ) from err
    path = target / fname
    if not path.is_file():
        raise RuntimeError(f"the medmnist download finished but {path} does not exist")
    return path


def _load_medmnist(name: str, data_dir: str | Path | None) -> DatasetSplits:
    flag, size = _parse_medmnist_name(name)
    fname = f"{flag}.npz" if size is None else f"{flag}_{size}.npz"
    searched = _medmnist_search_dirs(data_dir)
    path = next((d / fname for d in searched if (d / fname).is_file()), None)
    if path is None:
        path = _download_medmnist(flag, size, default_cache_dir(), searched)
    class_names = list(MEDMNIST_2D_CLASS_NAMES[flag])
    arrays = read_npz(path, [f"{s}_{k}" for s in ("train", "val", "test") for k in ("images", "labels")])
    splits = {
        s: ImageDataset(arrays[f"{s}_images"], arrays[f"{s}_labels"], class_names) for s in ("train", "val", "test")
    }
    label = flag if size is None else f"{flag}_{size}"
    return DatasetSplits(splits["train"], splits["val"], splits["test"], name=f"medmnist:{label}")


_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip archive (.npz) starts with a local header or, empty, its end


def read_npz(path: Path, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """The arrays `keys` of the .npz archive at `path`, fully read (so a damaged member is found here).

    Raises ValueError with one line naming the file and the fix when it is not a readable .npz archive
    (truncated, bad CRC, not a zip at all, pickled object arrays) or lacks one of `keys`.
    """
    fix = f"delete it and download it again (or pass --data-dir to a folder with an intact {path.name})"
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic not in _ZIP_MAGIC:
            raise ValueError(f"{path} is not a .npz archive (it does not start with a zip header); {fix}")
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in keys if k not in npz.files]
            if missing:
                raise ValueError(f"{path} is not a MedMNIST file: missing arrays {missing}; {fix}")
            return {k: np.asarray(npz[k]) for k in keys}
    except ValueError as err:
        if str(err).startswith(str(path)):
            raise
        raise ValueError(f"{path} is damaged ({_first_line(err)}); {fix}") from None
    except Exception as err:  # noqa: BLE001 - numpy and zipfile fail on damaged bytes in many ways (BadZipFile,
        # zlib.error, EOFError, tokenize.TokenError in the .npy header, "is encrypted" for a flipped flag bit, ...)
        raise ValueError(f"{path} is damaged ({_first_line(err)}); {fix}") from None


def _first_line(err: BaseException) -> str:
    text = (str(err).strip().splitlines() or [""])[0].split(". ")[0][:120]  # the first sentence
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


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
        if img.mode in HIGH_BIT_MODES:  # the demo's rule too (peft_deer.intensity)
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


def _load_imagefolder(
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


def _load_hub(
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
            f"the dataset in the local cache), or {_SPEC_HELP}"
        ) from err
    if not isinstance(dsd, datasets.DatasetDict):
        dsd = datasets.DatasetDict({"train": dsd})
    return _hf_dict_to_splits(dsd, f"hf:{repo_id}", val_fraction, test_fraction, seed)


def load_dataset_spec(
    spec: str,
    data_dir: str | Path | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    *,
    test_fraction: float = 0.2,
    hf_cache_dir: str | Path | None = None,
) -> DatasetSplits:
    """Load a dataset named by ``spec`` into memory as uint8 NHWC train/val/test splits.

    Specs:
        ``medmnist:<name>`` — a single-label 2D MedMNIST task (``pneumoniamnist``,
        ``breastmnist``, ...; a size suffix ``_64/_128/_224`` picks MedMNIST+ files). The file
        ``<name>.npz`` is looked up in ``data_dir``, ``$PEFT_DEER_DATA``,
        ``~/.cache/peft_deer/medmnist`` and ``~/.medmnist``, else downloaded with the optional
        ``medmnist`` package into :func:`default_cache_dir`. The official splits are used
        (``val_fraction``/``seed`` are ignored). Grayscale or RGB files are accepted.
        ``imagefolder:<path>`` — ``<path>/<class>/<img>`` or
        ``<path>/<train|val|validation|test>/<class>/<img>`` via ``datasets``' imagefolder.
        ``hf:<id>`` or ``<id>`` — a Hugging Face hub dataset with an ``Image`` column and a
        ``ClassLabel`` (or integer ``label``/``labels``) column.

    For imagefolder and hub datasets, images are converted to L (if all are grayscale) or RGB
    and resized with PIL bilinear to the most common (W, H) among them; a missing val/test split
    is carved out of train, stratified by label, with ``val_fraction``/``test_fraction`` of each
    class and ``seed``.

    Raises:
        ValueError: unknown prefix or MedMNIST name, bad files or columns.
        RuntimeError: a file that is absent and cannot be downloaded, or a hub load that fails.
    """
    spec = spec.strip()
    cache = None if hf_cache_dir is None else str(hf_cache_dir)
    prefix, sep, rest = spec.partition(":")
    if sep:
        prefix = prefix.lower()
        if prefix == "medmnist":
            return _load_medmnist(rest, data_dir)
        if prefix == "imagefolder":
            return _load_imagefolder(rest, val_fraction, test_fraction, seed, cache)
        if prefix in ("hf", "hub"):
            return _load_hub(rest, val_fraction, test_fraction, seed, cache)
        raise ValueError(f"unknown dataset prefix {prefix + ':'!r} in {spec!r}; {_SPEC_HELP}")
    if not spec:
        raise ValueError(f"empty dataset spec; {_SPEC_HELP}")
    return _load_hub(spec, val_fraction, test_fraction, seed, cache)


# --------------------------------------------------------------------------------------------
# Partitioning
# --------------------------------------------------------------------------------------------

PARTITION_SCHEMES = ("iid", "dirichlet")


def partition_clients(
    labels: np.ndarray,
    num_clients: int,
    scheme: str = "iid",
    dirichlet_alpha: float = 0.1,
    seed: int = 0,
    min_size: int = 1,
    *,
    self_balancing: bool = False,
    max_draws: int = 1000,
) -> list[np.ndarray]:
    """Split example indices across ``num_clients`` clients.

    Args:
        labels: int array (N,) of training labels.
        num_clients: number of clients (1 <= num_clients <= N).
        scheme: ``"iid"`` (a seeded shuffle cut into near-equal contiguous shards with
            ``flwr_datasets`` ``IidPartitioner``) or ``"dirichlet"`` (per-class proportions drawn
            from Dir(alpha) with ``DirichletPartitioner``; smaller alpha = stronger label skew).
        dirichlet_alpha: Dirichlet concentration (> 0); used by ``"dirichlet"`` only.
        seed: RNG seed; the result is a deterministic function of the arguments.
        min_size: every client gets at least this many examples (Dirichlet re-draws the
            proportions until it holds, at most ``max_draws`` times, then raises ValueError).
        self_balancing: Dirichlet only; stop giving examples to clients already above N/K.

    Returns:
        ``num_clients`` sorted int64 index arrays, disjoint and covering ``range(N)``.
    """
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise ValueError(f"labels must have shape (N,), got {labels.shape}")
    labels = labels.astype(np.int64)
    n = int(labels.shape[0])
    scheme = scheme.lower()
    if scheme not in PARTITION_SCHEMES:
        raise ValueError(f"unknown partition scheme {scheme!r}; choose one of {', '.join(PARTITION_SCHEMES)}")
    if int(num_clients) != num_clients or num_clients < 1:
        raise ValueError(f"--num-clients must be a positive integer, got {num_clients}")
    num_clients = int(num_clients)
    if num_clients > n:
        raise ValueError(f"--num-clients {num_clients} exceeds the {n} training examples")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    if max_draws < 1:
        raise ValueError(f"max_draws must be >= 1, got {max_draws}")
    if min_size * num_clients > n:
        raise ValueError(
            f"{num_clients} clients with at least {min_size} examples each need "
            f"{min_size * num_clients} examples, but there are only {n}"
        )

    import datasets

    ids = np.arange(n, dtype=np.int64)
    if scheme == "iid":
        from flwr_datasets.partitioner import IidPartitioner

        # IidPartitioner has no seed and no shuffle (contiguous shards): shuffle first.
        perm = np.random.default_rng(seed).permutation(n)
        part = IidPartitioner(num_partitions=num_clients)
        part.dataset = datasets.Dataset.from_dict({"label": labels[perm], "idx": ids[perm]}).with_format("arrow")
        parts = [np.asarray(part.load_partition(i)["idx"]) for i in range(num_clients)]
        sizes = [len(p) for p in parts]
        if min(sizes) < min_size:
            raise ValueError(
                f"IID split of {n} examples over {num_clients} clients gives clients of "
                f"{min(sizes)} examples, fewer than min_size={min_size}"
            )
    else:
        alpha = float(dirichlet_alpha)
        if not np.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"--dirichlet-alpha must be > 0, got {dirichlet_alpha}")
        from flwr_datasets.partitioner import DirichletPartitioner

        # One DirichletPartitioner draws at most 11 times (then raises a generic ValueError),
        # which is often too few for small alpha (alpha=0.1, 12 clients, 2 classes: roughly 1 in
        # 25 draws leaves no client empty). Run fresh partitioners with seeds derived from
        # (seed, attempt) until one succeeds or ``max_draws`` draws are spent; deterministic.
        # Arrow format: otherwise ``dataset["label"]`` in datasets 4 is a lazy Column that
        # flwr_datasets' ``np.array(...)`` converts row by row (~0.1-0.7 s per partitioner).
        dataset = datasets.Dataset.from_dict({"label": labels, "idx": ids}).with_format("arrow")
        draws, attempt = 0, 0
        parts = None
        while draws < max_draws:
            sub_seed = seed if attempt == 0 else int(np.random.SeedSequence([seed, attempt]).generate_state(1)[0])
            part = DirichletPartitioner(
                num_partitions=num_clients,
                partition_by="label",
                alpha=alpha,
                min_partition_size=min_size,
                self_balancing=self_balancing,
                shuffle=True,
                seed=sub_seed,
            )
            part.dataset = dataset
            with warnings.catch_warnings(record=True) as caught:
                # flwr_datasets warns on every re-draw; count them instead of printing.
                warnings.simplefilter("always")
                try:
                    parts = [np.asarray(part.load_partition(i)["idx"]) for i in range(num_clients)]
                except ValueError as err:
                    if "attempts" not in str(err):
                        raise
                    parts = None
            # each failed draw warns once; a successful draw does not
            draws += sum("min_partition_size" in str(w.message) for w in caught)
            draws += parts is not None
            attempt += 1
            if parts is not None:
                break
        if parts is None:
            raise ValueError(
                f"Dirichlet alpha={alpha:g} with {num_clients} clients left a client with "
                f"fewer than {min_size} example(s) in each of {draws} draws; raise "
                f"--dirichlet-alpha or lower --num-clients"
            )

    out = [np.sort(p.astype(np.int64)) for p in parts]
    flat = np.concatenate(out) if out else np.empty(0, dtype=np.int64)
    if len(flat) != n or not np.array_equal(np.sort(flat), ids):
        raise RuntimeError(
            f"flwr_datasets {scheme} partitioner returned an invalid partition ({len(flat)} indices for {n} examples)"
        )
    if min(len(p) for p in out) < min_size:
        raise ValueError(f"{scheme} partition left a client with fewer than {min_size} examples; lower --num-clients")
    return out


# --------------------------------------------------------------------------------------------
# Describing a partition
# --------------------------------------------------------------------------------------------


def label_count_table(
    labels: np.ndarray, partitions: Sequence[np.ndarray], class_names: Sequence[str]
) -> list[dict[str, Any]]:
    """Per-client label counts.

    Returns one row per client: ``{"client": i, "n": size, <class name>: count, ...}`` with the
    class columns in ``class_names`` order.
    """
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    names = [str(c) for c in class_names]
    clash = {"client", "n"} & set(names)
    if clash or len(set(names)) != len(names):
        raise ValueError(f"class names must be unique and not 'client'/'n', got {names}")
    rows: list[dict[str, Any]] = []
    for i, idx in enumerate(partitions):
        counts = np.bincount(labels[np.asarray(idx, dtype=np.int64)], minlength=len(names))
        if len(counts) > len(names):
            raise ValueError(f"labels go up to {len(counts) - 1} but there are {len(names)} names")
        row: dict[str, Any] = {"client": i, "n": len(idx)}
        row.update({name: int(c) for name, c in zip(names, counts, strict=True)})
        rows.append(row)
    return rows


def format_label_table(rows: Sequence[dict[str, Any]]) -> str:
    """An aligned plain-text table of :func:`label_count_table` rows, with a total line."""
    if not rows:
        return "(no clients)"
    cols = list(rows[0].keys())
    total: dict[str, Any] = {c: sum(int(r[c]) for r in rows) for c in cols}
    total["client"] = "total"
    body = [[str(r[c]) for c in cols] for r in [*rows, total]]
    widths = [max(len(c), *(len(b[j]) for b in body)) for j, c in enumerate(cols)]

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(cell.rjust(w) for cell, w in zip(cells, widths, strict=True))

    lines = [fmt(cols), "  ".join("-" * w for w in widths)]
    lines += [fmt(b) for b in body[:-1]]
    lines += ["  ".join("-" * w for w in widths), fmt(body[-1])]
    return "\n".join(lines)


def plot_label_counts(rows: Sequence[dict[str, Any]], class_names: Sequence[str], path: str | Path) -> Path:
    """Save a stacked bar chart (one bar per client, one colour per class) as PNG at ``path``.

    Uses matplotlib's Agg canvas directly (no pyplot, no global backend change).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [str(c) for c in class_names]
    clients = [str(r["client"]) for r in rows]
    fig = Figure(figsize=(max(4.0, 0.45 * len(rows) + 2.0), 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    bottom = np.zeros(len(rows))
    for name in names:
        vals = np.array([float(r.get(name, 0)) for r in rows])
        ax.bar(clients, vals, bottom=bottom, label=name)
        bottom += vals
    ax.set_xlabel("client")
    ax.set_ylabel("examples")
    ax.set_title("label counts per client")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


# --------------------------------------------------------------------------------------------
# Tensors for the model
# --------------------------------------------------------------------------------------------


def _channel_stats(values: float | Sequence[float], num_channels: int, what: str) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float32).reshape(-1)
    if t.numel() == 1:
        t = t.repeat(num_channels)
    if t.numel() != num_channels:
        raise ValueError(f"{what} has {t.numel()} values, expected 1 or {num_channels}")
    if what == "std" and bool((t <= 0).any()):
        raise ValueError(f"std must be > 0, got {t.tolist()}")
    return t.view(1, num_channels, 1, 1)


def _to_nhwc(images: Any) -> np.ndarray:
    """uint8 NHWC from an (N,H,W,C), (N,H,W), (H,W,C) or (H,W) array or a PIL image."""
    if hasattr(images, "convert") and hasattr(images, "mode"):  # PIL image
        images = pil_to_array(images)
    arr = _as_uint8_images(images)
    if arr.ndim == 2:  # (H, W)
        arr = arr[None, ..., None]
    elif arr.ndim == 3:
        # (H, W, C) single image when the last axis looks like channels, else (N, H, W).
        arr = arr[None] if arr.shape[-1] in (1, 3, 4) else arr[..., None]
    if arr.ndim != 4:
        raise ValueError(f"expected images of ndim 2, 3 or 4, got shape {arr.shape}")
    if arr.shape[-1] == 4:  # RGBA: drop alpha
        arr = arr[..., :3]
    if arr.shape[-1] not in (1, 3):
        raise ValueError(f"expected 1 or 3 channels in the last axis, got shape {arr.shape}")
    return arr


def preprocess_images(
    images: Any,
    image_size: int,
    num_channels: int,
    mean: float | Sequence[float],
    std: float | Sequence[float],
) -> torch.Tensor:
    """uint8 images -> normalized float32 tensor (N, num_channels, image_size, image_size).

    ``images`` is uint8 (N,H,W,C), (N,H,W), a single (H,W,C) or (H,W) array (a 3-D array whose
    last axis is 1, 3 or 4 is read as one HWC image), or a PIL image. Steps: scale to [0, 1];
    gray -> RGB by repeating the channel, RGB -> gray by the channel mean; bilinear resize
    (``antialias=False, align_corners=False``) to ``image_size`` px; ``(x - mean) / std`` with
    per-channel ``mean``/``std`` (length ``num_channels`` or 1) in [0, 1] units.
    """
    if num_channels not in (1, 3):
        raise ValueError(f"num_channels must be 1 or 3, got {num_channels}")
    size = int(image_size)
    if size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    arr = _to_nhwc(images)
    m = _channel_stats(mean, num_channels, "mean")
    s = _channel_stats(std, num_channels, "std")
    if not arr.flags.writeable:  # e.g. np.asarray(PIL image); torch warns on read-only arrays
        arr = arr.copy()
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).to(torch.float32) / 255.0
    c = x.shape[1]
    if c == 1 and num_channels == 3:
        x = x.expand(-1, 3, -1, -1)
    elif c == 3 and num_channels == 1:
        x = x.mean(dim=1, keepdim=True)
    if tuple(x.shape[-2:]) != (size, size):
        x = torch.nn.functional.interpolate(
            x,
            size=(size, size),
            mode="bilinear",
            align_corners=False,
            antialias=False,
        )
    return ((x - m) / s).contiguous()


def make_tensor_dataset(
    ds: ImageDataset,
    indices: Sequence[int] | np.ndarray | None,
    image_size: int,
    num_channels: int,
    mean: float | Sequence[float],
    std: float | Sequence[float],
    *,
    chunk_size: int = 512,
) -> TensorDataset:
    """Precompute model inputs for ``ds[indices]`` (all rows when ``indices`` is None).

    Returns a ``TensorDataset`` of (pixel_values float32 (n, num_channels, image_size,
    image_size), labels int64 (n,)), processed by :func:`preprocess_images` in chunks of
    ``chunk_size`` images to bound peak memory.
    """
    idx = np.arange(len(ds)) if indices is None else np.asarray(indices, dtype=np.int64)
    if idx.ndim != 1:
        raise ValueError(f"indices must be 1-D, got shape {idx.shape}")
    n, size, step = len(idx), int(image_size), max(1, int(chunk_size))
    out = torch.empty((n, num_channels, size, size), dtype=torch.float32)
    for start in range(0, n, step):
        sl = idx[start : start + step]
        out[start : start + len(sl)] = preprocess_images(ds.images[sl], image_size, num_channels, mean, std)
    labels = torch.from_numpy(ds.labels[idx].astype(np.int64))
    return TensorDataset(out, labels)
