"""The task of a run: its data and client partitions, its backbone, and the DEER_LORA model on it.

Both sides of a deployment build from here: the server (`experiment.py`) and a Flower site
(`peft_deer.flower.site`), so a site trains on exactly the images and model the simulation gives
that client.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from peft import PeftModel, get_peft_model
from torch.utils.data import Dataset

from ..backbones.load import Backbone, load_backbone
from ..backbones.prefix_cache import blocks_pattern, num_blocks, parse_lora_layers
from ..data import DatasetSplits, load_dataset_spec, make_tensor_dataset, partition_clients
from ..federated import AdapterLayout, ClientDP, adapter_layout, derive_seed
from ..settings import RunSettings
from ..tuner.config import DeerLoraConfig


@dataclass
class RunData:
    """The dataset splits and the client partition of the (optionally subsetted) training split."""

    splits: DatasetSplits
    train_idx: np.ndarray  # indices into splits.train used for training
    partitions: list[np.ndarray]  # client id -> indices into train_idx

    @property
    def train_labels(self) -> np.ndarray:
        return self.splits.train.labels[self.train_idx]


def stratified_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """`n` indices keeping class proportions, drawn with `seed` (sorted)."""
    if n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(derive_seed(seed, "train-subset"))
    picked = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = max(1, round(n * len(idx) / len(labels)))
        picked.append(rng.choice(idx, size=min(k, len(idx)), replace=False))
    return np.sort(np.concatenate(picked))


def load_run_data(
    settings: RunSettings,
    dataset: str | None = None,
    data_dir: str | None = None,
    num_partitions: int | None = None,
) -> RunData:
    """Load `settings.data.dataset` (or `dataset`) and split its training images into `num_partitions` clients.

    Defaults reproduce the simulation exactly: the same seeded subset and partition of the same data.
    """
    wanted, seed = settings.data, settings.federation.seed
    splits = load_dataset_spec(dataset or wanted.dataset, data_dir=data_dir or wanted.data_dir, seed=seed)
    train_idx = (
        stratified_subset(splits.train.labels, wanted.train_subset, seed)
        if wanted.train_subset
        else np.arange(len(splits.train))
    )
    partitions = partition_clients(
        splits.train.labels[train_idx],
        num_partitions or wanted.num_clients,
        wanted.partition,
        wanted.dirichlet_alpha,
        seed=seed,
    )
    return RunData(splits, train_idx, partitions)


def tensor_dataset(backbone: Backbone, split, idx: np.ndarray | None = None) -> Dataset:
    """(pixel_values, label) tensors of `split[idx]`, resized and normalised for `backbone`."""
    return make_tensor_dataset(split, idx, backbone.image_size, backbone.num_channels, backbone.mean, backbone.std)


def client_dataset(data: RunData, backbone: Backbone, partition: int) -> Dataset:
    """The training images of one partition, ready for the model."""
    return tensor_dataset(backbone, data.splits.train, data.train_idx[data.partitions[partition]])


def load_run_backbone(settings: RunSettings, splits: DatasetSplits, say: Callable = print) -> Backbone:
    """The run's backbone; a random one (tiny-vit) takes the data's channels, a pretrained one its own (and
    the run says how the images are converted)."""
    random_weights = settings.model.model.strip().lower() == "tiny-vit"
    backbone = load_backbone(
        settings.model.model,
        splits.num_classes,
        image_size=settings.model.image_size,
        num_channels=splits.num_channels if random_weights else None,
        id2label=dict(enumerate(splits.class_names)),
        seed=settings.federation.seed,
    )
    if backbone.num_channels != splits.num_channels:
        how = "each gray channel is repeated" if splits.num_channels == 1 else "RGB becomes gray (channel mean)"
        say(
            f"note: {splits.name} has {splits.num_channels}-channel images, {settings.model.model} takes "
            f"{backbone.num_channels}: {how}"
        )
    return backbone


def adapted_blocks(settings: RunSettings, model: torch.nn.Module) -> list[int] | None:
    """Indices of the blocks that get LoRA (--lora-layers), or None for every block."""
    layers = settings.model.lora_layers
    return None if layers == "all" else parse_lora_layers(layers, num_blocks(model))


def lora_config(settings: RunSettings, backbone: Backbone, noise_multiplier: float) -> DeerLoraConfig:
    """The adapter config of the run: where LoRA goes, and the client-level mechanism (`noise_multiplier`
    0.0 without client-level DP) that the server reads back from it (`privacy.client_dp`)."""
    blocks = adapted_blocks(settings, backbone.model)
    return DeerLoraConfig(
        layers_to_transform=blocks,
        layers_pattern=None if blocks is None else blocks_pattern(backbone.model),
        r=settings.model.rank,
        lora_alpha=settings.model.lora_alpha,
        target_modules=list(settings.model.target_modules or backbone.target_modules),
        modules_to_save=backbone.head_modules,
        method=settings.federation.method,
        **ClientDP.config_fields(settings, noise_multiplier),  # the mechanism, under the config's saved names
    )


def build_model(
    settings: RunSettings, backbone: Backbone, noise_multiplier: float, device: torch.device
) -> tuple[PeftModel, AdapterLayout]:
    """The DEER_LORA model of the run (LoRA initialised from the run's seed) and its adapter layout.

    With `--head-init zero` the trained head (PEFT's `modules_to_save` copy: weight and bias) starts at 0.
    LoRA is injected in place: deep-copy `backbone.model` first if the plain backbone is still needed.
    """
    config = lora_config(settings, backbone, noise_multiplier)
    torch.manual_seed(derive_seed(settings.federation.seed, "lora-init"))
    try:
        model = get_peft_model(backbone.model, config).to(device)
    except ValueError as err:
        raise ValueError(f"LoRA target modules {sorted(config.target_modules)}: {str(err).strip()}") from err
    layout = adapter_layout(model)
    if settings.model.head_init == "zero":
        zero_head(model, layout)
    return model, layout


@torch.no_grad()
def zero_head(model: PeftModel, layout: AdapterLayout) -> None:
    """Set the trained head's parameters (`layout.head_keys`) to 0; the frozen original head is untouched."""
    if not layout.head_keys:
        raise ValueError("--head-init zero: the model has no trained head (modules_to_save) to initialise")
    params = dict(model.named_parameters())
    for key in layout.head_keys:
        params[key].zero_()


@torch.no_grad()
def check_forward(settings: RunSettings, model: PeftModel, pixels: torch.Tensor) -> None:
    """One image through the model before anything is written; a ValueError (one line) if the settings
    cannot work together (e.g. an --image-size the model cannot take)."""
    try:
        logits = model(pixel_values=pixels).logits
    except (RuntimeError, ValueError, IndexError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ValueError(
            f"--model {settings.model.model} cannot take {tuple(pixels.shape[1:])} inputs "
            f"(--image-size {settings.model.image_size}): {first}; use the model's own size (omit --image-size)"
        ) from None
    if not torch.isfinite(logits).all():
        raise ValueError(f"--model {settings.model.model} gives NaN/inf logits on a validation image; check the model")
