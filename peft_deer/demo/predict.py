"""Load a finished peft_deer run's adapter for inference.

`load_classifier(RUN_DIR/adapter)` rebuilds the base model named in ``adapter_config.json``,
loads the adapter (``DEER_LORA`` or the plain ``LORA`` export), merges it, and reads the run's
class names, preprocessing, temperature and operating threshold (``peft_deer_run.json``) plus the run files
next to the adapter (``privacy.json``, ``summary.json``, ``curves.png``, ``examples/``, an
optional ``audit.json`` from ``deer-audit --json`` and an optional OOD guard ``ood.npz``, see `ood`).
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import peft_deer  # noqa: F401  (registers DEER_LORA with PEFT)
from peft_deer.backbones.load import load_backbone
from peft_deer.data import preprocess_images
from peft_deer.demo.explain import overlay, token_gradcam
from peft_deer.evaluation.calibration import softmax_t

from .decode import decode
from .ood import OodGuard, fit_guard, input_check
from .run import AdapterError, Example, check_adapter_dir, first_line, optional_json, read_examples, resolve_base

__all__ = ["AdapterError", "Classifier", "Example", "OperatingPoint", "calibrate_ood", "load_classifier"]


@dataclass(frozen=True)
class OperatingPoint:
    """The run's decision threshold on calibrated P(class 1), chosen on the validation split (Youden's J)."""

    threshold: float
    val_sensitivity: float | None
    val_specificity: float | None


@dataclass
class Classifier:
    """A merged adapter + base model, its preprocessing and the run's published facts."""

    model: torch.nn.Module
    adapter_dir: Path
    run: dict[str, Any]
    base_model: str
    privacy: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None
    audit: dict[str, Any] | None = None
    curves: Path | None = None
    examples: list[Example] = field(default_factory=list)
    ood: OodGuard | None = None
    ood_note: str = "no OOD guard for this run"
    # One forward pass at a time: the hooks of `explain` and `_forward` are per model, Gradio runs events in threads.
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)

    @property
    def name(self) -> str:
        """Short display name: ``<run dir>/<adapter dir>``."""
        return f"{self.adapter_dir.parent.name}/{self.adapter_dir.name}"

    @property
    def class_names(self) -> list[str]:
        return list(self.run["class_names"])

    @property
    def temperature(self) -> float:
        """T of the run's calibrated probabilities softmax(logits / T), fitted on its validation split; 1.0 for
        run files written before calibration (``check_adapter_dir`` refused a present but invalid one)."""
        return float(self.run.get("temperature", 1.0))

    @property
    def operating_point(self) -> OperatingPoint | None:
        """The validation-chosen threshold of a binary run, or None (decisions are then the argmax)."""
        threshold = self.run.get("decision_threshold")
        if len(self.class_names) != 2 or not isinstance(threshold, int | float):
            return None
        sens, spec = self.run.get("val_sensitivity"), self.run.get("val_specificity")
        return OperatingPoint(
            float(threshold),
            float(sens) if isinstance(sens, int | float) else None,
            float(spec) if isinstance(spec, int | float) else None,
        )

    def _inputs(self, images: Any) -> torch.Tensor:
        x = preprocess_images(
            images, self.run["image_size"], self.run["num_channels"], self.run["mean"], self.run["std"]
        )
        return x.to(next(self.model.parameters()).device)

    @torch.inference_mode()
    def probabilities(self, images: Any) -> np.ndarray:
        """Calibrated class probabilities softmax(logits / T) (N, num_classes) for uint8 images (anything
        `preprocess_images` takes)."""
        with self.lock:
            logits = self.model(pixel_values=self._inputs(images)).logits
        return softmax_t(logits.double().cpu().numpy(), self.temperature)

    @torch.inference_mode()
    def probabilities_of(self, images: list[np.ndarray]) -> np.ndarray:
        """Calibrated (N, num_classes) for decoded images of any sizes (each preprocessed alone, one forward pass)."""
        if not images:
            return np.zeros((0, len(self.class_names)))
        with self.lock:
            logits = self.model(pixel_values=torch.cat([self._inputs(px) for px in images])).logits
        return softmax_t(logits.double().cpu().numpy(), self.temperature)

    def decide(self, probs: np.ndarray) -> int:
        """The decided class of one probability vector (num_classes,), the one rule of page, API and batch:
        binary runs P(class 1) >= the stored threshold; else argmax of log p + the run's ``class_offsets``
        when it stores them, else argmax."""
        op = self.operating_point
        if op is not None:
            return int(probs[1] >= op.threshold)
        offsets = self.run.get("class_offsets")
        if isinstance(offsets, list) and len(offsets) == len(probs):
            return int(np.argmax(np.log(np.maximum(probs, 1e-300)) + np.asarray(offsets, dtype=np.float64)))
        return int(np.argmax(probs))

    def _head(self) -> torch.nn.Module:
        head = getattr(self.model, "classifier", None)
        if not isinstance(head, torch.nn.Module):
            raise ValueError(f"{type(self.model).__name__} has no `classifier` head to read features at")
        return head

    @torch.inference_mode()
    def _forward(self, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(calibrated probabilities (N, K), the head's input features (N, D)) in one forward pass."""
        captured: list[torch.Tensor] = []
        x = torch.cat([self._inputs(px) for px in images])
        with self.lock:
            handle = self._head().register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
            try:
                logits = self.model(pixel_values=x).logits
            finally:
                handle.remove()
        feats = captured[0].reshape(len(images), -1).double().cpu().numpy()
        return softmax_t(logits.double().cpu().numpy(), self.temperature), feats

    def features(self, images: list[np.ndarray]) -> np.ndarray:
        """The features (N, D) the classification head reads, for decoded images."""
        return self._forward(images)[1]

    def assess(self, images: list[np.ndarray]) -> tuple[np.ndarray, list[str | None]]:
        """Calibrated probabilities (N, K) and, per image, why it is unlike the training images (None: it is
        not): the cheap pixel checks, then the OOD guard when the run has one."""
        if not images:
            return np.zeros((0, len(self.class_names))), []
        probs, feats = self._forward(images)
        reasons = [input_check(px) for px in images]
        if self.ood is not None:
            for i, d in enumerate(self.ood.distance(feats)):
                reasons[i] = reasons[i] or self.ood.reason(float(d))
        return probs, reasons

    def predict(self, image: Any) -> dict[str, float]:
        """{class name: probability} for one image (path, bytes, PIL image, uint8 array; PNG, JPEG, DICOM...)."""
        probs = self.probabilities(decode(image))[0]
        return {name: float(p) for name, p in zip(self.class_names, probs, strict=True)}

    def explain(self, pixels: np.ndarray, target: int | None = None) -> tuple[np.ndarray, int]:
        """(Grad-CAM map (gh, gw) >= 0, explained class) for decoded uint8 pixels; default: the decided class."""
        if target is None:
            target = self.decide(self.probabilities(pixels)[0])
        with self.lock:
            cam = token_gradcam(self.model, self._inputs(pixels), int(target))[0]
        return cam.cpu().numpy(), int(target)

    def explain_overlay(self, pixels: np.ndarray) -> Any:
        """The input with the map of the decided class's evidence on top (PIL RGB image)."""
        return overlay(pixels, self.explain(pixels)[0])


def _load_merged(adapter_dir: Path, config: dict[str, Any], run: dict[str, Any], base: str) -> torch.nn.Module:
    """Base model + adapter, merged; AdapterError when the adapter does not fit the base."""
    from peft import PeftModel

    from peft_deer.run.checkpoint import DamagedFileError, check_adapter

    try:
        check_adapter(adapter_dir)  # one line naming the damaged file, before anything is loaded
    except DamagedFileError as exc:
        raise AdapterError(str(exc)) from exc
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


def calibrate_ood(clf: Classifier, data_dir: str | Path | None, chunk: int = 256) -> None:
    """Give `clf` an OOD guard: ``RUN_DIR/ood.npz`` if the run stores one, else one fitted on half the run's
    validation split and calibrated on the other half when `data_dir` is given (then saved there when the
    run directory is writable); else none, and `clf.ood_note` says why."""
    stored = clf.adapter_dir.parent / "ood.npz"
    if stored.is_file():
        try:
            clf.ood = OodGuard.load(stored)
            clf.ood_note = f"OOD guard ({stored.name}): {clf.ood.describe()}"
            return
        except ValueError as exc:
            clf.ood_note = f"no OOD guard for this run ({first_line(exc)})"
    if data_dir is None:
        clf.ood_note = "no OOD guard for this run (no ood.npz; start with --data-dir to calibrate one)"
        return
    from peft_deer.data import load_dataset_spec

    try:
        val = load_dataset_spec(str(clf.run.get("dataset")), data_dir=data_dir, seed=0).val
        images = list(val.images)
        feats = np.concatenate([clf.features(images[i : i + chunk]) for i in range(0, len(images), chunk)])
        order = np.random.default_rng(0).permutation(len(feats))
        half = len(feats) // 2
        clf.ood = fit_guard(feats[order[:half]], feats[order[half:]])
    except Exception as exc:  # noqa: BLE001 - no data, another dataset, too few images: serve without a guard
        clf.ood_note = f"no OOD guard for this run (validation split not available: {first_line(exc)})"
        return
    clf.ood_note = f"OOD guard (computed at start): {clf.ood.describe()}"
    try:
        clf.ood.save(stored)
    except OSError:
        pass


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
    clf = Classifier(
        model=model,
        adapter_dir=adapter_dir,
        run=run,
        base_model=base,
        privacy=optional_json(run_dir / "privacy.json"),
        summary=optional_json(run_dir / "summary.json"),
        audit=optional_json(run_dir / "audit.json"),
        curves=curves if curves.is_file() else None,
        examples=read_examples(run_dir),
    )
    calibrate_ood(clf, None)  # a guard stored with the run
    return clf
