"""`Experiment`: what a run's server side holds (data, model, federated server, client engine), and
`build_experiment`, which loads and checks all of it before any output file is touched.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftModel
from torch.utils.data import Dataset, TensorDataset

from ..backbones.load import Backbone
from ..backbones.prefix_cache import (
    CACHE_DTYPES,
    cache_key,
    check_prefix_is_deterministic,
    compute_prefix_features,
    load_or_compute,
    prefix_digest,
    skip_prefix,
)
from ..federated import (
    AdapterLayout,
    DPRandomness,
    FederatedServer,
    SequentialEngine,
    ServerOptimizer,
    get_adapter_state,
)
from ..federated.batched import select_engine
from ..settings import RunSettings
from .privacy import client_dp, client_sigma, local_training, record_level, run_randomness
from .task import RunData, adapted_blocks, build_model, check_forward, load_run_backbone, load_run_data, tensor_dataset


def base_model_dir(settings: RunSettings) -> Path:
    """Where a random backbone is saved with the run (its adapters point there)."""
    return (Path(settings.output.output_dir) / "base-model").resolve()


@dataclass(kw_only=True)
class Experiment:
    """Everything a run's server side holds: data, the model, the federated server and its engine."""

    settings: RunSettings
    data: RunData
    backbone: Backbone
    model: PeftModel
    layout: AdapterLayout
    server: FederatedServer
    engine: Any  # a ClientEngine for in-process client training
    base_name: str  # base_model_name_or_path written into the adapters
    val_data: Dataset
    test_data: Dataset
    client_data: list[Dataset] | None
    base_copy: torch.nn.Module | None = None  # a random backbone, saved with the run
    prefix_end: int | None = None  # datasets hold the output of blocks [0, prefix_end) (frozen-prefix cache)
    data_sha256: dict[str, str] = field(default_factory=dict)  # per split; a resume on changed data is refused
    deployment_fingerprint: dict[str, Any] = field(default_factory=dict)  # a transport's mechanism settings

    def fingerprint(self) -> dict[str, Any]:
        """What a resumed run must share with the run it continues: the settings' fingerprint plus the
        transport's mechanism settings (e.g. Flower's secagg-noise)."""
        return {**self.settings.fingerprint(), **self.deployment_fingerprint}

    def model_inputs(self) -> contextlib.AbstractContextManager:
        """Context in which `model` takes the run's datasets: cached prefix features, or images."""
        return contextlib.nullcontext() if self.prefix_end is None else skip_prefix(self.model, self.prefix_end)

    @property
    def base_dir(self) -> Path | None:
        return base_model_dir(self.settings) if self.base_copy is not None else None

    def save_base_model(self, run_dir: Path | None = None) -> None:
        """Save a random backbone into `run_dir`/base-model (the adapters point at it), then drop the copy.

        Without `run_dir` only for a resumed run, into its output dir (if it lacks one); a new run's directory
        gets it when `start_or_resume` creates it.
        """
        if self.base_copy is None:
            return
        if run_dir is None:
            if not (self.settings.output.resume and self.base_dir.parent.is_dir()):
                return
            run_dir = self.base_dir.parent
        if not (run_dir / "base-model").exists():
            self.base_copy.save_pretrained(run_dir / "base-model")
        self.base_copy = None


def build_experiment(
    settings: RunSettings,
    device: torch.device,
    with_client_data: bool = True,
    say: Callable = print,
    share: Callable[[DPRandomness], DPRandomness] = lambda r: r,
) -> Experiment:
    """Load data, backbone and model and set up the server; touches no output file.

    Bad settings or data raise ValueError, RuntimeError or FileNotFoundError with a one-line message.
    `with_client_data=False` (a Flower server) keeps no client training images in memory. `share` makes
    every process use the main process's DP randomness (a broadcast; identity in one process); a
    resumed run replaces it with the checkpoint's.
    """
    fed = settings.federation
    data = load_run_data(settings)
    backbone = load_run_backbone(settings, data.splits, say)
    record = record_level(settings, [len(p) for p in data.partitions])
    sigma = client_sigma(settings)  # calibrated with --accountant, which the budget stop then uses
    base_copy = copy.deepcopy(backbone.model) if settings.model.model == "tiny-vit" else None
    # DINOv2-S is named portably ("dinov2-s": load_backbone rebuilds it and checks its weights' digest on any
    # machine); a random backbone is saved with the run and named by that directory.
    base_name = str(base_model_dir(settings)) if base_copy is not None else backbone.name_or_path
    model, layout = build_model(settings, backbone, sigma, device)
    config = model.peft_config["default"]
    config.base_model_name_or_path = base_name
    server = FederatedServer(
        method=fed.method,
        layout=layout,
        global_state=get_adapter_state(model, layout),
        num_clients=settings.data.num_clients,
        clients_per_phase=fed.clients_per_round or settings.data.num_clients,
        dp=client_dp(config),  # the mechanism the adapter config states
        randomness=share(run_randomness(settings)),
        record=record,
        optimizer=ServerOptimizer(fed.server_optimizer, fed.server_lr, fed.server_momentum),
        budget_accountant=settings.privacy.accountant,
        collusion_threshold=settings.privacy.collusion_threshold,
    )
    engine = select_engine(fed.engine, SequentialEngine(local_training(settings, record)), model, layout, say)
    blocks = adapted_blocks(settings, model)
    prefix_end = blocks[0] if blocks and blocks[0] > 0 else None
    val_data, test_data = tensor_dataset(backbone, data.splits.val), tensor_dataset(backbone, data.splits.test)
    train_data = tensor_dataset(backbone, data.splits.train, data.train_idx) if with_client_data else None
    check_forward(settings, model, val_data[0][0][None].to(device))
    if prefix_end is not None:
        check_prefix_is_deterministic(model, prefix_end, val_data[0][0][None].to(device))
        splits = {"train": train_data, "val": val_data, "test": test_data}
        cached = cached_prefix(settings, model, prefix_end, data, splits)
        train_data, val_data, test_data = cached["train"], cached["val"], cached["test"]
    client_data = None
    if train_data is not None:
        client_data = [
            TensorDataset(*(t[part] for t in train_data.tensors))
            for part in data.partitions[: settings.data.num_clients]
        ]
    return Experiment(
        settings=settings,
        data=data,
        backbone=backbone,
        model=model,
        layout=layout,
        server=server,
        engine=engine,
        base_name=base_name,
        val_data=val_data,
        test_data=test_data,
        client_data=client_data,
        base_copy=base_copy,
        prefix_end=prefix_end,
    )


def cached_prefix(
    settings: RunSettings, model: PeftModel, end: int, data: RunData, splits: dict[str, Dataset | None]
) -> dict[str, TensorDataset | None]:
    """Each split's output of blocks [0, end), computed once (and kept in --prefix-cache-dir if given).

    A cache file is named by a hash of the prefix's weights, the images, the indices and the precision,
    so runs that share a backbone, resolution and dataset share it, and nothing stale is ever reused.
    """
    cfg = settings.model
    weights = prefix_digest(model, end)
    images = {"train": data.splits.train, "val": data.splits.val, "test": data.splits.test}
    out: dict[str, TensorDataset | None] = {}
    for name, dataset in splits.items():
        if dataset is None:
            out[name] = None
            continue
        split = images[name]
        key = cache_key(
            prefix=weights,
            end=end,
            dtype=cfg.prefix_cache_dtype,
            size=cfg.image_size,
            images=hashlib.sha256(split.images.tobytes()).hexdigest(),
            rows=hashlib.sha256(np.asarray(data.train_idx if name == "train" else []).tobytes()).hexdigest(),
        )
        out[name] = load_or_compute(
            cfg.prefix_cache_dir,
            key,
            lambda dataset=dataset, name=name: compute_prefix_features(
                model,
                dataset,
                end,
                settings.output.eval_batch_size,
                CACHE_DTYPES[cfg.prefix_cache_dtype],
                f"prefix cache {name}",
            ),
        )
    return out
