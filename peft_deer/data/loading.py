"""`load_dataset_spec`: one string (`medmnist:<name>`, `imagefolder:<path>`, a hub id) to `DatasetSplits`."""

from __future__ import annotations

from pathlib import Path

from .hf_datasets import SPEC_HELP, load_hub, load_imagefolder
from .images import DatasetSplits
from .medmnist import load_medmnist


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
            return load_medmnist(rest, data_dir)
        if prefix == "imagefolder":
            return load_imagefolder(rest, val_fraction, test_fraction, seed, cache)
        if prefix in ("hf", "hub"):
            return load_hub(rest, val_fraction, test_fraction, seed, cache)
        raise ValueError(f"unknown dataset prefix {prefix + ':'!r} in {spec!r}; {SPEC_HELP}")
    if not spec:
        raise ValueError(f"empty dataset spec; {SPEC_HELP}")
    return load_hub(spec, val_fraction, test_fraction, seed, cache)
