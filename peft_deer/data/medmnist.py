"""MedMNIST files: class names, where `<name>.npz` is looked up or downloaded, and a checked `read_npz`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .images import DatasetSplits, ImageDataset

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


def load_medmnist(name: str, data_dir: str | Path | None) -> DatasetSplits:
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
