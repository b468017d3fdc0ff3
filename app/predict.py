"""Load a finished peft_deer run's adapter for inference.

`load_classifier(RUN_DIR/adapter)` rebuilds the base model named in ``adapter_config.json``,
loads the adapter (``DEER_LORA`` or the plain ``LORA`` export), merges it, and reads the run's
class names and preprocessing (``peft_deer_run.json``) plus the run files next to the adapter
(``privacy.json``, ``summary.json``, ``curves.png``, ``examples/``).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import peft_deer  # noqa: F401  (registers DEER_LORA with PEFT)
from peft_deer.backbones import load_backbone
from peft_deer.data import preprocess_images

from .run import AdapterError, Example, check_adapter_dir, first_line, optional_json, read_examples, resolve_base

__all__ = ["AdapterError", "Classifier", "Example", "load_classifier", "to_image"]

MAX_SIDE = 2048  # larger uploads are first shrunk (bounded memory); the model sees image_size px anyway


@dataclass
class Classifier:
    """A merged adapter + base model, its preprocessing and the run's published facts."""

    model: torch.nn.Module
    adapter_dir: Path
    run: dict[str, Any]
    base_model: str
    privacy: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None
    curves: Path | None = None
    examples: list[Example] = field(default_factory=list)

    @property
    def name(self) -> str:
        """Short display name: ``<run dir>/<adapter dir>``."""
        return f"{self.adapter_dir.parent.name}/{self.adapter_dir.name}"

    @property
    def class_names(self) -> list[str]:
        return list(self.run["class_names"])

    @torch.inference_mode()
    def probabilities(self, images: Any) -> np.ndarray:
        """Class probabilities (N, num_classes) for uint8 images (anything `preprocess_images` takes)."""
        x = preprocess_images(
            images, self.run["image_size"], self.run["num_channels"], self.run["mean"], self.run["std"]
        )
        device = next(self.model.parameters()).device
        logits = self.model(pixel_values=x.to(device)).logits
        return torch.softmax(logits.double(), dim=-1).cpu().numpy()

    def predict(self, image: Any) -> dict[str, float]:
        """{class name: probability} for one image (PIL image, uint8 array, path or bytes)."""
        probs = self.probabilities(to_image(image))[0]
        return {name: float(p) for name, p in zip(self.class_names, probs, strict=True)}


def to_image(image: Any) -> Image.Image | np.ndarray:
    """A decoded gray/RGB image from a PIL image, an array, a path or bytes.

    16-bit / float gray images are rescaled from their own min..max to 0..255; images larger than
    `MAX_SIDE` are shrunk first. Raises ValueError when the input is not a readable image.
    """
    if image is None:
        raise ValueError("no image given")
    if isinstance(image, np.ndarray):
        return image
    if isinstance(image, bytes | bytearray):
        image = io.BytesIO(image)
    try:
        img = image if isinstance(image, Image.Image) else Image.open(image)
        img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"not a readable image ({exc.__class__.__name__})") from exc
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(arr.round().astype(np.uint8))
    elif img.mode not in ("L", "RGB"):
        img = img.convert("L" if img.mode in ("1", "LA", "La") else "RGB")
    if max(img.size) > MAX_SIDE:
        img = img.copy()
        img.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.BILINEAR)
    return img


def _load_merged(adapter_dir: Path, config: dict[str, Any], run: dict[str, Any], base: str) -> torch.nn.Module:
    """Base model + adapter, merged; AdapterError when the adapter does not fit the base."""
    from peft import PeftModel

    names = [str(c) for c in run["class_names"]]
    try:
        backbone = load_backbone(
            base,
            len(names),
            image_size=int(run["image_size"]),
            num_channels=int(run["num_channels"]),
            id2label=dict(enumerate(names)),
        )
    except (OSError, RuntimeError, ValueError) as exc:
        raise AdapterError(f"cannot load base model {base!r} of {adapter_dir}: {first_line(exc)}") from exc
    expected = (config.get("auto_mapping") or {}).get("base_model_class")
    actual = type(backbone.model).__name__
    if expected and expected != actual:
        raise AdapterError(
            f"{adapter_dir} belongs to another base model: it was trained on a {expected}, {base!r} is a {actual}"
        )
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = PeftModel.from_pretrained(backbone.model, str(adapter_dir))
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        raise AdapterError(
            f"{adapter_dir} does not fit base model {base!r} (belongs to another base model?): {first_line(exc)}"
        ) from exc
    key_problems = [str(w.message) for w in caught if "keys" in str(w.message).lower()]
    if key_problems:
        raise AdapterError(
            f"{adapter_dir} does not fit base model {base!r} (belongs to another base model?): "
            f"{first_line(key_problems[0])}"
        )
    return model.merge_and_unload().eval()


def load_classifier(adapter_dir: str | Path, base_model: str | None = None, device: str = "cpu") -> Classifier:
    """Load RUN_DIR/adapter (or adapter-best, adapter-lora) merged onto its base model.

    Args:
        adapter_dir: a PEFT adapter directory written by ``deer-fed`` (holds ``peft_deer_run.json``).
        base_model: load this base instead of the config's ``base_model_name_or_path``.
        device: torch device for inference.

    Raises:
        AdapterError: missing/invalid files, unloadable base, or an adapter of another base model.
    """
    adapter_dir = Path(adapter_dir).expanduser().resolve()
    config, run = check_adapter_dir(adapter_dir)
    base = resolve_base(config, adapter_dir, base_model)
    model = _load_merged(adapter_dir, config, run, base)
    try:
        model = model.to(device)
    except (AssertionError, RuntimeError, ValueError) as exc:  # torch: no CUDA, bad device string
        raise AdapterError(f"cannot use device {device!r}: {first_line(exc)}") from exc
    run_dir = adapter_dir.parent
    curves = run_dir / "curves.png"
    return Classifier(
        model=model,
        adapter_dir=adapter_dir,
        run=run,
        base_model=base,
        privacy=optional_json(run_dir / "privacy.json"),
        summary=optional_json(run_dir / "summary.json"),
        curves=curves if curves.is_file() else None,
        examples=read_examples(run_dir),
    )
