"""Frozen-prefix activation cache: run the blocks below the first adapted one once per image.

With LoRA only in the last k of a ViT's L blocks (`--lora-layers last:k`), the embeddings and blocks
0 .. L-k-1 are a fixed function of the image. `compute_prefix_features` runs them once (eval mode, no
grad) and keeps their output, (tokens, hidden) per image; `skip_prefix(model, first)` swaps those
modules for pass-throughs, so `model(pixel_values=features)` runs only the adapted blocks, the final
norm and the head. Every engine (sequential, batched, record-level DP-SGD) and evaluation then train
and predict on the features exactly as on the images, at about k/L of the encoder FLOPs per epoch.

Works with HF ViT-style models whose encoder loops `hidden = layer(hidden, ...)` over a ModuleList
(`encoder.layer` in DINOv2, `layers` in ViT) after `embeddings(pixel_values, ...)`. The prefix must be
deterministic in training mode (no dropout or drop-path there): `check_prefix_is_deterministic`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm.auto import tqdm

CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_lora_layers(spec: str, num_layers: int) -> list[int] | None:
    """Block indices that get LoRA: 'all' -> None (every block), 'last:K' -> the last K blocks.

    Raises ValueError naming the allowed forms.
    """
    if spec == "all":
        return None
    match = re.fullmatch(r"last:(\d+)", spec)
    if not match:
        raise ValueError(f"--lora-layers {spec!r} must be 'all' or 'last:K' (e.g. last:4)")
    k = int(match.group(1))
    if not 1 <= k <= num_layers:
        raise ValueError(f"--lora-layers {spec!r}: K must be in [1, {num_layers}] (the model has {num_layers} blocks)")
    return list(range(num_layers - k, num_layers))


def _blocks_of(module: nn.Module) -> nn.ModuleList | None:
    layers = getattr(getattr(module, "encoder", None), "layer", None)
    if layers is None:
        layers = getattr(module, "layers", None)
    return layers if isinstance(layers, nn.ModuleList) else None


def find_encoder(model: nn.Module) -> nn.Module:
    """The submodule holding `embeddings` and the blocks (`encoder.layer` or `layers`, a ModuleList)."""
    for module in model.modules():
        if isinstance(getattr(module, "embeddings", None), nn.Module) and _blocks_of(module) is not None:
            return module
    raise ValueError(f"{type(model).__name__} has no ViT-style embeddings and blocks: no prefix cache")


def encoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of `model`, in order."""
    return _blocks_of(find_encoder(model))


def num_blocks(model: nn.Module) -> int:
    return len(encoder_blocks(model))


def blocks_pattern(model: nn.Module) -> str:
    """The name PEFT's `layers_pattern` needs for the blocks: 'layer' (encoder.layer) or 'layers'."""
    inner = getattr(find_encoder(model), "encoder", None)
    return "layer" if isinstance(getattr(inner, "layer", None), nn.ModuleList) else "layers"


def prefix_digest(model: nn.Module, end: int) -> str:
    """SHA-256 of the embeddings' and blocks [0, end)'s parameters and buffers (what the cache depends on)."""
    encoder = find_encoder(model)
    digest = hashlib.sha256()
    for module in (encoder.embeddings, *list(_blocks_of(encoder))[:end]):
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


class _PassEmbeddings(nn.Module):
    """Stands in for the embeddings: the 'pixel_values' it receives already are the prefix's output.

    HF ViT casts its input to `embeddings.patch_embeddings.projection.weight.dtype` first: that stays
    answerable (the real dtype) without holding the real module.
    """

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype
        self.patch_embeddings = SimpleNamespace(projection=SimpleNamespace(weight=torch.empty(0, dtype=dtype)))

    def forward(self, pixel_values: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return pixel_values.to(self.dtype)  # features may be cached in half precision


class _PassBlock(nn.Module):
    """Stands in for a cached block: returns its hidden states unchanged."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


@contextlib.contextmanager
def skip_prefix(model: nn.Module, first: int) -> Iterator[None]:
    """Inside the context `model(pixel_values=features)` starts at block `first` (features: (n, T, H)).

    The original modules are put back on exit; no parameter is touched, so saving or loading adapters
    inside or outside the context is the same. `first=0` skips only the embeddings.
    """
    encoder = find_encoder(model)
    layers = _blocks_of(encoder)
    if not 0 <= first < len(layers):
        raise ValueError(f"first adapted block {first} is outside [0, {len(layers)})")
    saved_embeddings, saved_blocks = encoder.embeddings, [layers[i] for i in range(first)]
    encoder.embeddings = _PassEmbeddings(next(saved_embeddings.parameters()).dtype)
    for i in range(first):
        layers[i] = _PassBlock()
    try:
        yield
    finally:
        encoder.embeddings = saved_embeddings
        for i, block in enumerate(saved_blocks):
            layers[i] = block


@torch.no_grad()
def prefix_forward(model: nn.Module, pixel_values: torch.Tensor, first: int) -> torch.Tensor:
    """Output of the embeddings and blocks 0 .. first-1 for a batch of images: (n, tokens, hidden)."""
    encoder = find_encoder(model)
    hidden = encoder.embeddings(pixel_values)
    for block in list(_blocks_of(encoder))[:first]:
        hidden = block(hidden, None)
    return hidden


def check_prefix_is_deterministic(model: nn.Module, first: int, sample: torch.Tensor) -> None:
    """Raise ValueError if the prefix gives different outputs in train and eval mode (dropout, drop-path)."""
    was_training = model.training
    try:
        model.eval()
        reference = prefix_forward(model, sample, first)
        model.train()
        trained = prefix_forward(model, sample, first)
    finally:
        model.train(was_training)
    if not torch.equal(reference, trained):
        raise ValueError(
            "the frozen prefix is random in training mode (dropout or drop-path below the first adapted block): "
            "its outputs cannot be cached; use --lora-layers all or a model without them"
        )


def compute_prefix_features(
    model: nn.Module,
    dataset: Dataset,
    first: int,
    batch_size: int = 64,
    dtype: torch.dtype = torch.float16,
    desc: str = "prefix cache",
) -> TensorDataset:
    """(features (n, T, H) in `dtype`, labels (n,)) for every (pixel_values, label) of `dataset`."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    feats, labels = [], []
    try:
        for pixel_values, label in tqdm(DataLoader(dataset, batch_size=batch_size), desc=desc, leave=False):
            feats.append(prefix_forward(model, pixel_values.to(device), first).to("cpu", dtype))
            labels.append(label)
    finally:
        model.train(was_training)
    return TensorDataset(torch.cat(feats), torch.cat(labels))


def cache_key(**parts) -> str:
    """A short stable hash of what determines the features (model, image size, data, split, block, dtype)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def load_or_compute(cache_dir: str | Path | None, key: str, compute, say=print) -> TensorDataset:
    """`compute()` once per `key`, kept as `cache_dir/key.pt` (written atomically) when `cache_dir` is given."""
    if cache_dir is None:
        return compute()
    path = Path(cache_dir) / f"{key}.pt"
    if path.is_file():
        try:
            features, labels = torch.load(path, weights_only=True)
            return TensorDataset(features, labels)
        except Exception as err:  # noqa: BLE001 -- a corrupt cache file is recomputed, never trusted
            say(f"prefix cache {path} is unreadable ({type(err).__name__}); recomputing it")
    cached = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(list(cached.tensors), tmp)
    os.replace(tmp, path)
    return cached


__all__ = [
    "CACHE_DTYPES",
    "cache_key",
    "check_prefix_is_deterministic",
    "blocks_pattern",
    "compute_prefix_features",
    "encoder_blocks",
    "find_encoder",
    "load_or_compute",
    "num_blocks",
    "parse_lora_layers",
    "prefix_digest",
    "prefix_forward",
    "skip_prefix",
]
