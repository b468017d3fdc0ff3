"""What a backbone is to the rest of the project: the `Backbone` record (model, input format, LoRA targets,
head), the digest that names its weights, and the discovery of its attention projections and head.

Loading lives in `load.py`; this module reads any `nn.Module` and loads nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

# Attribute names of classifier heads in HF image-classification models, most common first.
_HEAD_ATTRS = ("classifier", "head", "fc", "score")
# Attention projections per naming scheme, preferred first (transformers 5, transformers 4, fused).
_QKV_SCHEMES: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("query", "key", "value"),
    ("qkv",),
)


@dataclass
class Backbone:
    """A classification model and what is needed to feed and adapt it.

    Attributes:
        model: image-classification model; input pixel_values (B, num_channels, image_size,
            image_size) float32, normalised with mean/std; output logits (B, num_labels).
        image_size: side of the square input in pixels.
        num_channels: input channels the model expects (1 = gray, 3 = RGB).
        mean: per-channel normalisation mean, for pixel values in [0, 1].
        std: per-channel normalisation std, for pixel values in [0, 1].
        target_modules: LoRA `target_modules` (leaf names of the q/k/v projections).
        head_modules: PEFT `modules_to_save` (the freshly initialised classifier head).
        name_or_path: `load_backbone` name that rebuilds this backbone (adapter base_model_name_or_path).
        description: human readable provenance of the weights.
        weights_sha256: `weights_digest` of the pretrained weights (head excluded); None for random ones.
    """

    model: PreTrainedModel
    image_size: int
    num_channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    target_modules: list[str]
    head_modules: list[str]
    name_or_path: str
    description: str
    weights_sha256: str | None = None


def weights_digest(model: nn.Module) -> str:
    """sha256 over a model's state dict: every tensor's name, dtype, shape and bytes, in name order.

    Independent of the file format it was stored in, so it names the weights themselves.
    """
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def default_target_modules(model: nn.Module) -> list[str]:
    """Leaf names of the attention q/k/v projections of `model` (LoRA targets, as in the paper).

    Detects the naming from the modules present: ``q_proj/k_proj/v_proj`` (transformers 5),
    ``query/key/value`` (transformers 4) or a fused ``qkv``. Head modules are ignored.

    Raises:
        ValueError: no attention projection found.
    """
    head = set(_present_head_attrs(model))
    leaf_names: set[str] = set()
    for name, module in model.named_modules():
        if not name or name.split(".")[0] in head:
            continue
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
            leaf_names.add(name.rsplit(".", 1)[-1])
    for scheme in _QKV_SCHEMES:
        if all(n in leaf_names for n in scheme):
            return list(scheme)
    raise ValueError(
        f"no attention q/k/v projections found in {type(model).__name__} "
        f"(looked for {' | '.join('/'.join(s) for s in _QKV_SCHEMES)} among linear layers); "
        "pass target_modules explicitly"
    )


def _present_head_attrs(model: nn.Module) -> list[str]:
    return [a for a in _HEAD_ATTRS if isinstance(getattr(model, a, None), nn.Module)]


def default_head_modules(model: nn.Module) -> list[str]:
    """Names of the classifier head of `model` for PEFT ``modules_to_save`` (e.g. ``["classifier"]``).

    Raises:
        ValueError: no known head attribute (``classifier``, ``head``, ``fc``, ``score``).
    """
    present = _present_head_attrs(model)
    if not present:
        raise ValueError(
            f"{type(model).__name__} has no classifier head attribute (looked for {', '.join(_HEAD_ATTRS)})"
        )
    return present[:1]


def reset_head(model: nn.Module, head_modules: Sequence[str], std: float) -> None:
    """Freshly initialise the head: Linear weights ~ trunc N(0, std²), biases 0; others reset."""
    for attr in head_modules:
        for module in getattr(model, attr).modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif hasattr(module, "reset_parameters") and not list(module.children()):
                module.reset_parameters()
