"""`DeerLoraConfig`: what a user sets for a DEeR adapter (a LoRA adapter with a federated phase)."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields

from peft import LoraConfig, PeftConfig

from .. import defaults
from ..methods import METHODS, method_spec

PHASES = ("A", "B")


class DeerPeftType(enum.StrEnum):
    """PEFT's `PeftType` is a closed enum; this str-Enum carries our key (transformers calls `.value`)."""

    DEER_LORA = "DEER_LORA"


@dataclass
class DeerLoraConfig(LoraConfig):
    """LoRA config plus the DEeR state: which factor trains now and the federated/DP settings.

    `phase="B"` trains `lora_B` (A frozen), `phase="A"` trains `lora_A` (B frozen); an Embedding's
    factors are `lora_embedding_B`/`lora_embedding_A`. Method `lora` trains both factors whatever the
    phase; `ffa` trains only B. LoRA options the federated core cannot honour (`REFUSED_OPTIONS`: DoRA
    and the other variants, `lora_bias`, `bias`, `trainable_token_indices`, data-driven or
    base-rewriting inits, ...) are refused for every method, as is any LoRA field not reviewed here.
    """

    phase: str = field(default="B", metadata={"help": "Factor that trains now: 'B' (A frozen) or 'A' (B frozen)."})
    method: str = field(
        default="deer",
        metadata={"help": f"Federated method, one of {METHODS}; decides which factors train in a phase."},
    )
    clip_norm: float = field(
        default=defaults.CLIP_NORM,
        metadata={"help": "Client-level DP clip norm C of a whole client update (metric norm for `deer`)."},
    )
    noise_multiplier: float = field(
        default=0.0, metadata={"help": "Gaussian noise multiplier sigma per release; 0 disables DP noise."}
    )
    regulator_ridge: float = field(
        default=defaults.RIDGE,
        metadata={
            "help": "Ridge lambda >= 0 added to the regulator metric M = s^2 Y^T Y + lambda I (keeps M invertible)."
        },
    )
    dp_delta: float = field(
        default=defaults.DELTA, metadata={"help": "Target delta of the (epsilon, delta) guarantee."}
    )
    target_epsilon: float | None = field(
        default=None, metadata={"help": "Privacy budget; a run stops before a release that would exceed it."}
    )
    noise_placement: str = field(
        default="central",
        metadata={"help": "'central' (server adds noise) or 'distributed' (each client adds 1/sqrt(m) of it)."},
    )

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r={self.r!r} must be an integer >= 1 (the LoRA rank)")
        refused = refused_option(self)
        if refused is not None:
            name, why = refused
            raise ValueError(f"{name}={getattr(self, name)!r} is not supported by DEER_LORA ({why}); remove it")
        super().__post_init__()
        self.peft_type = DeerPeftType.DEER_LORA
        if self.phase not in PHASES:
            raise ValueError(f"phase={self.phase!r} is not one of {PHASES}")
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is not one of {METHODS}")
        method_spec(self.method).check_phase(self.phase)
        if self.clip_norm <= 0:
            raise ValueError(f"clip_norm={self.clip_norm} must be > 0")
        if self.noise_multiplier < 0:
            raise ValueError(f"noise_multiplier={self.noise_multiplier} must be >= 0")
        if self.regulator_ridge < 0:
            raise ValueError(f"regulator_ridge={self.regulator_ridge} must be >= 0")
        if not 0 < self.dp_delta < 1:
            raise ValueError(f"dp_delta={self.dp_delta} must be in (0, 1); use e.g. 1e-5")
        if self.target_epsilon is not None and self.target_epsilon <= 0:
            raise ValueError(f"target_epsilon={self.target_epsilon} must be > 0")
        if self.noise_placement not in ("central", "distributed"):
            raise ValueError(f"noise_placement={self.noise_placement!r} is not 'central' or 'distributed'")

    @property
    def trained_factors(self) -> tuple[str, ...]:
        """LoRA factors ('A', 'B') that train in the current phase under this method."""
        return trained_factors(self.method, self.phase)


# The federated core aggregates, clips and noises exactly the A/B factors of plain LoRA layers and the
# head. LoRA options that train anything else, change what a factor is, or draw the initial adapter
# from local data would train outside the algorithm: each is refused, with why (field -> (refused?, why)).
_PLAIN_INITS = ("gaussian", "orthogonal")  # besides True and False: random A and B, the base model untouched
REFUSED_OPTIONS: dict[str, tuple[Callable[[object], bool], str]] = {
    "use_dora": (bool, "the DoRA magnitude vector trains but is never aggregated or privatized"),
    "lora_bias": (bool, "a LoRA bias trains but is never aggregated or privatized"),
    "bias": (lambda v: v != "none", "base biases would train but are never aggregated or privatized"),
    "trainable_token_indices": (
        bool,
        "the TrainableTokens embedding rows would train but are never aggregated or privatized",
    ),
    "target_parameters": (bool, "LoRA on bare nn.Parameters is a layer kind the federated core does not cover"),
    "init_lora_weights": (
        lambda v: v not in (True, False) and str(v).lower() not in _PLAIN_INITS,
        "only True, False, 'gaussian' and 'orthogonal' read no data and leave the base model as published: "
        "EVA/CorDA/LoRA-GA read local data without noise, PiSSA/OLoRA/LoftQ rewrite the base, MiCA freezes B itself",
    ),
    "velora_config": (
        bool,
        "VeLoRA approximates A's gradient in a custom backward that the batched engine and record-level DP do not run",
    ),
    "alora_invocation_tokens": (
        bool,
        "Activated LoRA applies the adapter only after invocation tokens; the federated engines apply it everywhere",
    ),
    "monteclora_config": (bool, "MonteCLoRA's variational parameters train but are never aggregated or privatized"),
    "use_bdlora": (
        bool,
        "a block-diagonal factor is a shape the layout, regulator metric and batched engine do not read",
    ),
    "arrow_config": (bool, "Arrow routes between several adapters; a federated adapter is one LoRA"),
    "kasa_config": (bool, "KaSA truncates the base weights and trains singular values that are never aggregated"),
    "use_qalora": (bool, "QALoRA pools A's input (GPTQ layers), which the federated engines do not implement"),
    "megatron_config": (bool, "Megatron's parallel LoRA layers are a layer kind the federated core does not cover"),
    "ensure_weight_tying": (
        bool,
        "tied layers would share one factor, which the federated core treats as independent ones",
    ),
}
# LoraConfig fields DEER_LORA honours as PEFT does: they choose where plain LoRA goes and how it is scaled.
HONOURED_OPTIONS = (
    "r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out", "use_rslora",
    "modules_to_save", "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern",
    "layer_replication",  # shares frozen base layers only; each copy gets its own plain LoRA factors
    "runtime_config", "megatron_core",  # device offloading; the Megatron module path (megatron_config is refused)
    "loftq_config", "eva_config", "corda_config", "lora_ga_config", "qalora_group_size",  # read only by refused options
)  # fmt: skip


def refused_option(config: LoraConfig) -> tuple[str, str] | None:
    """The first LoRA field of `config` that DEER_LORA refuses, with why (None: all are honoured).

    A field of the installed PEFT's `LoraConfig` that is neither refused nor honoured above (a newer PEFT
    option, or a LoRA variant PEFT tags with `is_lora_variant`) is refused unless left at its default.
    """
    own = {f.name for f in fields(PeftConfig)}
    for f in fields(LoraConfig):
        if f.name in own or f.name in HONOURED_OPTIONS:
            continue
        value = getattr(config, f.name)
        if f.name in REFUSED_OPTIONS:
            is_refused, why = REFUSED_OPTIONS[f.name]
            if is_refused(value):
                return f.name, why
        elif value != (f.default_factory() if f.default is MISSING else f.default):
            return f.name, "a LoRA option not reviewed for the federated core"
    return None


def trained_factors(method: str, phase: str) -> tuple[str, ...]:
    """Factors trained by `method` in `phase`: both for a joint method (`lora`), else only `phase`."""
    return method_spec(method).trained_factors(phase)
