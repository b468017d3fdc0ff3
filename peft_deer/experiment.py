"""One federated run from its settings to its outputs, whatever moves the client updates.

`train/fed.py` (accelerate simulation) and the Flower `ServerApp` share all of it: the data and
partitions (`load_run_data`), the model (`build_model`), the server (`build_experiment`), the phase
loop with its budget stop, per-round validation, best adapter and atomic checkpoints (`run_phases`),
and the output layout (`finalize`). They differ only in `release_phase`: how a phase's client
updates are produced and handed to `FederatedServer.finish_phase`.

Output layout of a run directory: adapter/, adapter-best/, adapter-lora/ (plain LoRA export),
privacy.json, metrics.jsonl, summary.json (written last), curves.png, examples/, base-model/ (random
backbones only) -- all of it publishable: nothing in it is computed from a client's data without noise.
`server-private/` holds what is (training losses, update norms, participants, per-client label counts,
dropped updates); `checkpoint.pt` (while unfinished) also holds the run's DP secret. Never publish either.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftModel, get_peft_model
from torch.utils.data import Dataset, TensorDataset
from tqdm.auto import tqdm

from .backbones import Backbone, load_backbone
from .checkpoint import load_checkpoint, save_checkpoint
from .config import DeerLoraConfig
from .data import (
    DatasetSplits,
    format_label_table,
    label_count_table,
    load_dataset_spec,
    make_tensor_dataset,
    partition_clients,
    plot_label_counts,
)
from .evaluation import choose_threshold, classification_metrics, predict_proba
from .export import export_lora_adapter
from .federated import (
    AdapterLayout,
    ClientDP,
    ClientTask,
    ClientUpdate,
    DPRandomness,
    FederatedServer,
    LocalTraining,
    Phase,
    PhaseRelease,
    PrivacyBudgetExceeded,
    SequentialEngine,
    ServerOptimizer,
    adapter_layout,
    calibrate_noise_multiplier,
    derive_seed,
    get_adapter_state,
    iter_phases,
    load_adapter_state,
    method_spec,
)
from .federated.batched import select_engine
from .federated.record_dp import RecordDP, RecordLevel, calibrate_record_sigmas
from .io import dumps_strict, write_json_atomic
from .prefix_cache import (
    CACHE_DTYPES,
    blocks_pattern,
    cache_key,
    check_prefix_is_deterministic,
    compute_prefix_features,
    load_or_compute,
    num_blocks,
    parse_lora_layers,
    prefix_digest,
    skip_prefix,
)
from .reporting import model_card, plot_curves
from .run_dir import CHECKPOINT, create_staging, live_dir, publish, remove_temp_files
from .run_dir import prepare_output_dir as prepare_output_dir  # the drivers import it from here
from .settings import run_fingerprint

PRIVATE_DIR = "server-private"  # un-noised per-client diagnostics: never published with the adapter
DECISION_RULE = "class 1 when P(class 1) >= decision_threshold (Youden's J on the validation split)"

# (phase, participating client ids) -> (the updates that were aggregated, the release)
ReleasePhase = Callable[[Phase, list[int]], tuple[list[ClientUpdate], PhaseRelease]]


class SettingsMismatch(ValueError):
    """`--resume` of a run whose checkpoint was written with other settings."""


# ----------------------------------------------------------------------------- data and model


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
    args: argparse.Namespace,
    dataset: str | None = None,
    data_dir: str | None = None,
    num_partitions: int | None = None,
) -> RunData:
    """Load `args.dataset` (or `dataset`) and split its training images into `num_partitions` clients.

    Defaults reproduce the simulation exactly: the same seeded subset and partition of the same data.
    """
    splits = load_dataset_spec(dataset or args.dataset, data_dir=data_dir or args.data_dir, seed=args.seed)
    train_idx = (
        stratified_subset(splits.train.labels, args.train_subset, args.seed)
        if args.train_subset
        else np.arange(len(splits.train))
    )
    partitions = partition_clients(
        splits.train.labels[train_idx],
        num_partitions or args.num_clients,
        args.partition,
        args.dirichlet_alpha,
        seed=args.seed,
    )
    return RunData(splits, train_idx, partitions)


def tensor_dataset(backbone: Backbone, split, idx: np.ndarray | None = None) -> Dataset:
    """(pixel_values, label) tensors of `split[idx]`, resized and normalised for `backbone`."""
    return make_tensor_dataset(split, idx, backbone.image_size, backbone.num_channels, backbone.mean, backbone.std)


def client_dataset(data: RunData, backbone: Backbone, partition: int) -> Dataset:
    """The training images of one partition, ready for the model."""
    return tensor_dataset(backbone, data.splits.train, data.train_idx[data.partitions[partition]])


def load_run_backbone(args: argparse.Namespace, splits: DatasetSplits, say: Callable = print) -> Backbone:
    """The run's backbone; a random one (tiny-vit) takes the data's channels, a pretrained one its own (and
    the run says how the images are converted)."""
    random_weights = args.model.strip().lower() == "tiny-vit"
    backbone = load_backbone(
        args.model,
        splits.num_classes,
        image_size=args.image_size,
        num_channels=splits.num_channels if random_weights else None,
        id2label=dict(enumerate(splits.class_names)),
        seed=args.seed,
    )
    if backbone.num_channels != splits.num_channels:
        how = "each gray channel is repeated" if splits.num_channels == 1 else "RGB becomes gray (channel mean)"
        say(
            f"note: {splits.name} has {splits.num_channels}-channel images, {args.model} takes "
            f"{backbone.num_channels}: {how}"
        )
    return backbone


def adapted_blocks(args: argparse.Namespace, model: torch.nn.Module) -> list[int] | None:
    """Indices of the blocks that get LoRA (--lora-layers), or None for every block."""
    return None if args.lora_layers == "all" else parse_lora_layers(args.lora_layers, num_blocks(model))


def lora_config(args: argparse.Namespace, backbone: Backbone, noise_multiplier: float) -> DeerLoraConfig:
    blocks = adapted_blocks(args, backbone.model)
    return DeerLoraConfig(
        layers_to_transform=blocks,
        layers_pattern=None if blocks is None else blocks_pattern(backbone.model),
        r=args.rank,
        lora_alpha=args.lora_alpha,
        target_modules=args.target_modules or backbone.target_modules,
        modules_to_save=backbone.head_modules,
        method=args.method,
        clip_norm=args.clip_norm,
        noise_multiplier=noise_multiplier,
        regulator_ridge=args.regulator_ridge,
        dp_delta=args.delta,
        target_epsilon=args.epsilon,
        noise_placement=args.noise_placement,
    )


def build_model(
    args: argparse.Namespace, backbone: Backbone, noise_multiplier: float, device: torch.device
) -> tuple[PeftModel, AdapterLayout]:
    """The DEER_LORA model of the run (LoRA initialised from the run's seed) and its adapter layout.

    With `--head-init zero` the trained head (PEFT's `modules_to_save` copy: weight and bias) starts at 0.
    LoRA is injected in place: deep-copy `backbone.model` first if the plain backbone is still needed.
    """
    config = lora_config(args, backbone, noise_multiplier)
    torch.manual_seed(derive_seed(args.seed, "lora-init"))
    try:
        model = get_peft_model(backbone.model, config).to(device)
    except ValueError as err:
        raise ValueError(f"LoRA target modules {sorted(config.target_modules)}: {str(err).strip()}") from err
    layout = adapter_layout(model)
    if args.head_init == "zero":
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


def local_training(args: argparse.Namespace, record: RecordLevel | None = None) -> LocalTraining:
    return LocalTraining(
        args.local_epochs,
        args.batch_size,
        args.lr,
        args.momentum,
        args.weight_decay,
        args.optimizer,
        args.mixed_precision,
        logit_adjustment=args.logit_adjustment,
        record_dp=record.dp if record else None,
    )


def calibrate_sigma(args: argparse.Namespace, sample_rate: float, releases: int) -> float:
    """sigma for --epsilon over the run's `releases` releases; a ValueError names the impossible target."""
    try:
        return calibrate_noise_multiplier(args.epsilon, args.delta, sample_rate, releases)
    except ValueError as err:
        raise ValueError(
            f"cannot calibrate a noise multiplier for --epsilon {args.epsilon:g} at --delta {args.delta:g} over "
            f"{releases} releases (sample rate {sample_rate:g}): {err}"
        ) from err


def client_dp(args: argparse.Namespace) -> ClientDP | None:
    """Client-level DP settings of the run (sigma calibrated from --epsilon unless given); None without."""
    if "client" not in args.dp.split(","):
        return None
    spec = method_spec(args.method)
    sample_rate = (args.clients_per_round or args.num_clients) / args.num_clients
    sigma = args.noise_multiplier or calibrate_sigma(args, sample_rate, args.rounds * spec.releases_per_round)
    # deer-reference reproduces the authors: --epsilon is their nominal target; the ledger shows the true one.
    budget = args.epsilon if spec.enforces_budget else None
    return ClientDP(sigma, args.clip_norm, args.regulator_ridge, args.noise_placement, args.delta, budget)


def make_record_level(args: argparse.Namespace, client_sizes: list[int]) -> RecordLevel | None:
    """Record-level DP-SGD settings (sigma calibrated per client for the whole planned run); None without."""
    if "record" not in args.dp.split(","):
        return None
    spec = method_spec(args.method)
    if min(client_sizes) < 1:
        raise ValueError("--dp record needs every client to hold at least one image")
    if args.record_delta >= 1.0 / max(client_sizes):
        raise ValueError(
            f"--record-delta {args.record_delta:g} must be < 1 / largest client size ({max(client_sizes)})"
        )
    updates = args.rounds * spec.releases_per_round
    if args.record_noise_multiplier is not None:
        sigmas, calibration = (args.record_noise_multiplier,) * len(client_sizes), "fixed (--record-noise-multiplier)"
    else:
        sigmas = calibrate_record_sigmas(
            args.record_epsilon, args.record_delta, client_sizes, args.batch_size, args.local_epochs, updates
        )
        calibration = f"per client: epsilon {args.record_epsilon:g} after {updates} updates (all phases)"
    noise = spec.record_noise
    rdp = RecordDP(
        sigmas,
        args.record_clip_norm,
        args.record_delta,
        noise,
        args.regulator_ridge,
        args.max_physical_batch_size,
        args.record_epsilon,
        calibration,
    )
    return RecordLevel(rdp, args.batch_size, args.local_epochs)


def base_model_dir(args: argparse.Namespace) -> Path:
    """Where a random backbone is saved with the run (its adapters point there)."""
    return (Path(args.output_dir) / "base-model").resolve()


@dataclass
class Experiment:
    """Everything a run's server side holds: data, the model, the federated server and its engine."""

    args: argparse.Namespace
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

    def model_inputs(self) -> contextlib.AbstractContextManager:
        """Context in which `model` takes the run's datasets: cached prefix features, or images."""
        return contextlib.nullcontext() if self.prefix_end is None else skip_prefix(self.model, self.prefix_end)

    @property
    def base_dir(self) -> Path | None:
        return base_model_dir(self.args) if self.base_copy is not None else None

    def save_base_model(self, run_dir: Path | None = None) -> None:
        """Save a random backbone into `run_dir`/base-model (the adapters point at it), then drop the copy.

        Without `run_dir` only for a resumed run, into its output dir (if it lacks one); a new run's directory
        gets it when `start_or_resume` creates it.
        """
        if self.base_copy is None:
            return
        if run_dir is None:
            if not (self.args.resume and self.base_dir.parent.is_dir()):
                return
            run_dir = self.base_dir.parent
        if not (run_dir / "base-model").exists():
            self.base_copy.save_pretrained(run_dir / "base-model")
        self.base_copy = None


def run_randomness(args: argparse.Namespace) -> DPRandomness:
    """The run's DP randomness: a fresh OS secret with DP, unless --reproducible-noise (or no DP) asks for
    draws derived from --seed (then nothing is private: the ledger says so)."""
    if args.dp != "none" and not args.reproducible_noise:
        return DPRandomness.secret()
    return DPRandomness.from_seed(args.seed)


def build_experiment(
    args: argparse.Namespace,
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
    data = load_run_data(args)
    backbone = load_run_backbone(args, data.splits, say)
    record = make_record_level(args, [len(p) for p in data.partitions])
    dp = client_dp(args)
    base_copy = copy.deepcopy(backbone.model) if args.model == "tiny-vit" else None
    # DINOv2-S is named portably ("dinov2-s": load_backbone rebuilds it and checks its weights' digest on any
    # machine); a random backbone is saved with the run and named by that directory.
    base_name = str(base_model_dir(args)) if base_copy is not None else backbone.name_or_path
    model, layout = build_model(args, backbone, dp.noise_multiplier if dp else 0.0, device)
    model.peft_config["default"].base_model_name_or_path = base_name
    clients_per_phase = args.clients_per_round or args.num_clients
    server = FederatedServer(
        args.method,
        layout,
        get_adapter_state(model, layout),
        args.num_clients,
        clients_per_phase,
        dp,
        share(run_randomness(args)),
        record,
        ServerOptimizer(args.server_optimizer, args.server_lr, args.server_momentum),
    )
    engine = select_engine(args.engine, SequentialEngine(local_training(args, record)), model, layout, say)
    blocks = adapted_blocks(args, model)
    prefix_end = blocks[0] if blocks and blocks[0] > 0 else None
    val_data, test_data = tensor_dataset(backbone, data.splits.val), tensor_dataset(backbone, data.splits.test)
    train_data = tensor_dataset(backbone, data.splits.train, data.train_idx) if with_client_data else None
    check_forward(args, model, val_data[0][0][None].to(device))
    if prefix_end is not None:
        check_prefix_is_deterministic(model, prefix_end, val_data[0][0][None].to(device))
        cached = cached_prefix(args, model, prefix_end, data, {"train": train_data, "val": val_data, "test": test_data})
        train_data, val_data, test_data = cached["train"], cached["val"], cached["test"]
    client_data = None
    if train_data is not None:
        client_data = [
            TensorDataset(*(t[data.partitions[c]] for t in train_data.tensors)) for c in range(args.num_clients)
        ]
    return Experiment(
        args,
        data,
        backbone,
        model,
        layout,
        server,
        engine,
        base_name,
        val_data,
        test_data,
        client_data,
        base_copy,
        prefix_end,
    )


@torch.no_grad()
def check_forward(args: argparse.Namespace, model: PeftModel, pixels: torch.Tensor) -> None:
    """One image through the model before anything is written; a ValueError (one line) if the settings
    cannot work together (e.g. an --image-size the model cannot take)."""
    try:
        logits = model(pixel_values=pixels).logits
    except (RuntimeError, ValueError, IndexError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ValueError(
            f"--model {args.model} cannot take {tuple(pixels.shape[1:])} inputs (--image-size {args.image_size}): "
            f"{first}; use the model's own size (omit --image-size)"
        ) from None
    if not torch.isfinite(logits).all():
        raise ValueError(f"--model {args.model} gives NaN/inf logits on a validation image; check the model")


def cached_prefix(
    args: argparse.Namespace, model: PeftModel, end: int, data: RunData, splits: dict[str, Dataset | None]
) -> dict[str, TensorDataset | None]:
    """Each split's output of blocks [0, end), computed once (and kept in --prefix-cache-dir if given).

    A cache file is named by a hash of the prefix's weights, the images, the indices and the precision,
    so runs that share a backbone, resolution and dataset share it, and nothing stale is ever reused.
    """
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
            dtype=args.prefix_cache_dtype,
            size=args.image_size,
            images=hashlib.sha256(split.images.tobytes()).hexdigest(),
            rows=hashlib.sha256(np.asarray(data.train_idx if name == "train" else []).tobytes()).hexdigest(),
        )
        out[name] = load_or_compute(
            args.prefix_cache_dir,
            key,
            lambda dataset=dataset, name=name: compute_prefix_features(
                model, dataset, end, args.eval_batch_size, CACHE_DTYPES[args.prefix_cache_dtype], f"prefix cache {name}"
            ),
        )
    return out


def simulated_release(
    exp: Experiment, rank: int = 0, world: int = 1, gather: Callable[[list], list] | None = None
) -> ReleasePhase:
    """Train the phase's clients in this process (clients c with c % world == rank) and aggregate.

    `gather` collects every process's updates (accelerate's gather_object) when world > 1.
    """

    def release(phase: Phase, participants: list[int]) -> tuple[list[ClientUpdate], PhaseRelease]:
        randomness = exp.server.randomness
        tasks = [
            ClientTask(
                c,
                exp.client_data[c],
                derive_seed(exp.args.seed, *phase.step, c, "train"),
                dp_seed=randomness.seed(*phase.step, c, "record-dp"),
            )
            for c in participants[rank::world]
        ]
        local = exp.engine.train_clients(exp.model, exp.layout, exp.server.global_state, phase, tasks)
        updates = gather(local) if world > 1 and gather is not None else local
        return updates, exp.server.finish_phase(phase, updates)

    return release


# ----------------------------------------------------------------------------- output dir and checkpoints


def save_example_images(split, out_dir: Path, per_class: int = 2) -> list[dict[str, Any]]:
    """A few test images per class as PNGs (the demo's one-click examples)."""
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for c, name in enumerate(split.class_names):
        for j, i in enumerate(np.flatnonzero(split.labels == c)[:per_class]):
            img = split.images[i]
            file = out_dir / f"{c}_{j}.png"
            Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(file)
            rows.append({"file": file.name, "label": int(c), "class_name": name})
    write_json_atomic(out_dir / "examples.json", rows)
    return rows


@dataclass
class RunProgress:
    """What the phase loop carries between phases and across a resume."""

    next_phase: tuple[int, int] = (0, 0)
    rows: list[dict] = field(default_factory=list)  # one metrics.jsonl row per finished round (public)
    best: dict | None = None  # {"score", "round", "state"} of the best validated round
    round_acc: dict = field(default_factory=lambda: _new_round_acc())
    private_rows: list[dict] = field(default_factory=list)  # server-private/diagnostics.jsonl rows


def _new_round_acc() -> dict:
    """What a round's phases add up for its diagnostics (all of it computed from client data, un-noised)."""
    return {"loss": 0.0, "images": 0, "seconds": 0.0, "update_norms": [], "participants": []}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        f.writelines(dumps_strict(r) + "\n" for r in rows)


def _append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(dumps_strict(row) + "\n")


def start_or_resume(exp: Experiment, out: Path, main_proc: bool = True, say: Callable = print) -> RunProgress:
    """Restore the server and progress from the checkpoint (--resume), else create the run's staging dir
    (`peft_deer.run_dir`) with its first outputs.

    Raises `SettingsMismatch` if the checkpoint was written with other settings, `DamagedFileError` if it
    cannot be read, `OutputDirError` if the run dir cannot be created (each a one-line ValueError).
    """
    args = exp.args
    if args.resume:
        ckpt = load_checkpoint(out / CHECKPOINT)
        if not isinstance(ckpt["fingerprint"], dict):
            raise SettingsMismatch(f"{out / CHECKPOINT} holds no settings; pass --overwrite to start again")
        if ckpt["fingerprint"] != run_fingerprint(args):
            saved, mine = ckpt["fingerprint"], run_fingerprint(args)
            changed = sorted(k for k in {*saved, *mine} if saved.get(k) != mine.get(k))
            raise SettingsMismatch(
                f"--resume with different settings {changed}; resume with the run's settings (its summary "
                "lists them once finished) or pass --overwrite to start again"
            )
        try:
            exp.server.load_state_dict(ckpt["server"])
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise SettingsMismatch(
                f"{out / CHECKPOINT} does not fit this run ({type(err).__name__}: {str(err)[:100]}); pass --overwrite "
                "to start again"
            ) from None
        progress = RunProgress(
            tuple(ckpt["next_phase"]), ckpt["rows"], ckpt["best"], ckpt["round_acc"], ckpt["private_rows"]
        )
    else:
        progress = RunProgress()
        if main_proc:
            run_dir = create_staging(out)
            exp.save_base_model(run_dir)
            private = run_dir / PRIVATE_DIR
            # Per-client label counts are client statistics: server-private, and printed only without DP.
            private.mkdir(parents=True, exist_ok=True)
            splits = exp.data.splits
            label_rows = label_count_table(exp.data.train_labels, exp.data.partitions, splits.class_names)
            table = format_label_table(label_rows)
            (private / "label_counts.txt").write_text(table + "\n")
            write_json_atomic(private / "label_counts.json", label_rows)
            plot_label_counts(label_rows, splits.class_names, private / "label_counts.png")
            save_example_images(splits.test, run_dir / "examples")
            if args.dp == "none":
                say(table)
    if main_proc:
        run_dir = live_dir(out)
        (run_dir / PRIVATE_DIR).mkdir(parents=True, exist_ok=True)
        _write_jsonl(run_dir / "metrics.jsonl", progress.rows)
        _write_jsonl(run_dir / PRIVATE_DIR / "diagnostics.jsonl", progress.private_rows)
    return progress


# ----------------------------------------------------------------------------- the phase loop


def _next_step(phase: Phase, per_round: int) -> tuple[int, int]:
    return (phase.round + 1, 0) if phase.index + 1 == per_round else (phase.round, phase.index + 1)


def run_phases(
    exp: Experiment,
    out: Path,
    progress: RunProgress,
    release_phase: ReleasePhase,
    main_proc: bool = True,
    barrier: Callable[[], None] = lambda: None,
    say: Callable = print,
) -> str | None:
    """Run the remaining phases; returns why it stopped early ("budget", "max-phases") or None.

    Every phase: budget check, sampling, `release_phase`; after the last phase of a round the main
    process validates, appends to metrics.jsonl and tracks the best adapter; then a checkpoint.
    """
    args, server = exp.args, exp.server
    spec = server.spec
    acc = progress.round_acc
    phases = list(iter_phases(args.method, args.rounds, progress.next_phase))
    done_this_call, stopped = 0, None
    bar = tqdm(phases, desc=f"{args.method} phases", disable=not main_proc, unit="phase")
    for phase in bar:
        if args.max_phases is not None and done_this_call >= args.max_phases:
            stopped = "max-phases"
            break
        try:
            server.check_budget(phase)
        except PrivacyBudgetExceeded as err:
            say(f"budget stop: {err}")
            stopped = "budget"
            break
        t0 = time.perf_counter()
        with exp.model_inputs():
            updates, release = release_phase(phase, server.participants(phase))
        acc["seconds"] += time.perf_counter() - t0
        acc["images"] += sum(u.images_seen for u in updates)
        acc["loss"] += sum(u.mean_loss * u.images_seen for u in updates)
        acc["update_norms"].append(release.mean_update_norm)
        acc["participants"].append(len(release.participants))
        done_this_call += 1
        last_of_round = phase.index == spec.releases_per_round - 1
        if last_of_round and main_proc:
            with exp.model_inputs():
                _validate_round(exp, live_dir(out), progress, phase, acc, bar.write)
        if last_of_round:
            acc = progress.round_acc = _new_round_acc()
        progress.next_phase = _next_step(phase, spec.releases_per_round)
        if main_proc:
            save_checkpoint(
                live_dir(out) / CHECKPOINT,
                {
                    "fingerprint": run_fingerprint(args),
                    "server": server.state_dict(),
                    "next_phase": progress.next_phase,
                    "rows": progress.rows,
                    "best": progress.best,
                    "round_acc": acc,
                    "private_rows": progress.private_rows,
                },
            )
            publish(out)  # a new run's directory appears now, with a checkpoint to resume from
        barrier()
    bar.close()
    return stopped


def validation_metrics(exp: Experiment) -> dict[str, float | None]:
    """Metrics of the model's loaded adapter on the validation split, at the decision threshold chosen on that
    split (Youden's J; binary tasks; `threshold` None, i.e. argmax, for more classes)."""
    args, labels = exp.args, exp.data.splits.val.labels
    probs = predict_proba(exp.model, exp.val_data, args.eval_batch_size, args.mixed_precision)
    threshold = choose_threshold(labels, probs) if probs.shape[1] == 2 else None
    return classification_metrics(labels, probs, threshold)


def _validate_round(exp: Experiment, out: Path, progress: RunProgress, phase: Phase, acc: dict, say) -> None:
    args, server = exp.args, exp.server
    load_adapter_state(exp.model, server.global_state)
    val = validation_metrics(exp)
    # RDP only (the budget's accountant): server.epsilon() also runs PRV, seconds per call.
    eps = server.accountant.epsilon(server.dp.delta, "rdp") if server.dp else None
    norms = [n for n in acc["update_norms"] if not math.isnan(n)]
    # Public: the server's own validation split, the guarantee spent, wall time.
    row = {
        "round": phase.round,
        **{f"val_{k}": v for k, v in val.items()},
        "epsilon": eps,
        **({"record_epsilon_max": server.record.epsilon_max()} if server.record else {}),
        "seconds": acc["seconds"],
    }
    # Server-private: computed from the clients' data without noise.
    private = {
        "round": phase.round,
        "train_loss": acc["loss"] / max(acc["images"], 1),
        "images_per_s": acc["images"] / max(acc["seconds"], 1e-9),
        "mean_update_norm": float(np.mean(norms)) if norms else None,  # None: norms stayed with the clients
        "participants_per_phase": list(acc["participants"]),
    }
    progress.rows.append(row)
    progress.private_rows.append(private)
    _append_jsonl(out / "metrics.jsonl", row)
    _append_jsonl(out / PRIVATE_DIR / "diagnostics.jsonl", private)
    score = val["auc"] if val["auc"] is not None else val["accuracy"]
    if progress.best is None or score > progress.best["score"]:
        progress.best = {"score": score, "round": phase.round, "state": dict(server.global_state)}
    auc = "n/a" if val["auc"] is None else f"{val['auc']:.3f}"
    eps_text = "" if eps is None else f" eps {eps:.2f}"
    # Logs are public: the training loss is a client statistic, shown only when nothing is private.
    loss_text = ""
    if args.dp == "none":
        loss_text = f" (train loss {private['train_loss']:.4f}, {private['images_per_s']:.1f} img/s)"
    say(
        f"round {phase.round + 1}/{args.rounds}: val acc {val['accuracy']:.3f} bal acc "
        f"{val['balanced_accuracy']:.3f} auc {auc}{eps_text}{loss_text}"
    )


# ----------------------------------------------------------------------------- final outputs


def finalize(
    exp: Experiment,
    out: Path,
    progress: RunProgress,
    stopped: str | None,
    extra_privacy: dict | None = None,
    private_extra: dict | None = None,
) -> dict[str, Any]:
    """Write adapters, ledger, test metrics, curves and the model card; `summary.json` last. Returns the summary.

    `extra_privacy` is merged into the ledger (a deployment states its transport and trust model there);
    `private_extra` goes to `server-private/deployment.json` (e.g. which clients' updates were dropped).
    """
    args, model, server, splits, backbone = exp.args, exp.model, exp.server, exp.data.splits, exp.backbone
    published, out = out, live_dir(out)  # a run that ended before its first checkpoint is still staged
    remove_temp_files(out)  # from a run killed while writing its outputs, now resumed
    test = {}
    adapters = {"final": server.global_state}
    if progress.best is not None:
        adapters["best"] = progress.best["state"]
    for name, state in adapters.items():
        load_adapter_state(model, state)
        with exp.model_inputs():
            val = validation_metrics(exp)  # this adapter's decision threshold, chosen on validation only
            probs = predict_proba(model, exp.test_data, args.eval_batch_size, args.mixed_precision)
        test[name] = classification_metrics(splits.test.labels, probs, val["threshold"])
        target = out / ("adapter" if name == "final" else "adapter-best")
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, save_embedding_layers=False)  # vision backbones: no resized vocabulary to save
        write_json_atomic(
            tmp / "peft_deer_run.json",
            {
                "class_names": splits.class_names,
                "image_size": backbone.image_size,
                "num_channels": backbone.num_channels,
                "mean": list(backbone.mean),
                "std": list(backbone.std),
                "base_model": exp.base_name,
                "base_model_sha256": backbone.weights_sha256,
                "model": args.model,
                "base_description": backbone.description,
                "method": args.method,
                "dataset": args.dataset,
                "decision_threshold": val["threshold"],
                "decision_rule": DECISION_RULE if val["threshold"] is not None else "argmax",
                "val_sensitivity": val["sensitivity"],
                "val_specificity": val["specificity"],
            },
        )
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    load_adapter_state(model, server.global_state)
    export_lora_adapter(out / "adapter", out / "adapter-lora")
    shutil.copy2(out / "adapter" / "peft_deer_run.json", out / "adapter-lora" / "peft_deer_run.json")

    ledger = {**server.ledger(), "dataset": args.dataset, **(extra_privacy or {})}
    write_json_atomic(out / "privacy.json", ledger)
    if private_extra:
        write_json_atomic(out / PRIVATE_DIR / "deployment.json", private_extra)
    if progress.rows:
        plot_curves(progress.rows, out / "curves.png", ledger)
    rounds_done = len(server.releases) // server.spec.releases_per_round
    info = {
        "method": args.method,
        "dataset": args.dataset,
        "base_model": exp.base_name,
        "base_model_sha256": backbone.weights_sha256,
        "base_description": backbone.description,
        "class_names": splits.class_names,
        "num_clients": args.num_clients,
        "partition": args.partition + (f" alpha={args.dirichlet_alpha}" if args.partition == "dirichlet" else ""),
        "image_size": backbone.image_size,
        "rank": args.rank,
        "lora_alpha": args.lora_alpha,
        "server_optimizer": server.optimizer.describe(),
        "rounds_completed": rounds_done,
        "privacy": ledger,
        "test": test,
    }
    (out / "adapter" / "README.md").write_text(model_card(info))
    for name in ("adapter-best", "adapter-lora"):
        if (out / name).exists():
            shutil.copy2(out / "adapter" / "README.md", out / name / "README.md")
    summary = {
        **{k: v for k, v in info.items() if k != "privacy"},
        "epsilon": ledger.get("epsilon"),
        "delta": ledger.get("delta"),
        "privacy_level": ledger["level"],
        "stopped": stopped,
        "best_round": None if progress.best is None else progress.best["round"],
        "total_seconds": sum(r["seconds"] for r in progress.rows),
        "args": {k: v for k, v in vars(args).items()},
        "args_sha256": hashlib.sha256(json.dumps(run_fingerprint(args), sort_keys=True).encode()).hexdigest(),
    }
    write_json_atomic(out / "summary.json", summary)
    (out / CHECKPOINT).unlink(missing_ok=True)
    publish(published)
    return summary


def final_line(summary: dict[str, Any], out: Path) -> str:
    """The one-line result a driver prints at the end."""
    final = summary["test"]["final"]
    auc = "n/a" if final["auc"] is None else f"{final['auc']:.4f}"
    eps = summary.get("epsilon")
    return (
        f"done: {summary['method']} test acc {final['accuracy']:.4f} bal acc {final['balanced_accuracy']:.4f} auc {auc}"
        + ("" if eps in (None, float("inf")) else f" eps {eps:.3f}")
        + f" -> {out}"
    )
