"""`DeerLoraConfig`: what a user sets for a DEeR adapter (a LoRA adapter with a federated phase)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from peft import LoraConfig

PHASES = ("A", "B")
METHODS = ("deer", "rolora", "ffa", "lora", "deer-reference")


class DeerPeftType(enum.StrEnum):
    """PEFT's `PeftType` is a closed enum; this str-Enum carries our key (transformers calls `.value`)."""

    DEER_LORA = "DEER_LORA"


@dataclass
class DeerLoraConfig(LoraConfig):
    """LoRA config plus the DEeR state: which factor trains now and the federated/DP settings.

    `phase="B"` trains `lora_B` (A frozen), `phase="A"` trains `lora_A` (B frozen); an Embedding's
    factors are `lora_embedding_B`/`lora_embedding_A`. Method `lora` trains both factors whatever the
    phase; `ffa` trains only B. `use_dora`, `lora_bias` and `bias` other than 'none' are refused for
    every method: they add trained weights that the federated core never aggregates nor privatizes.
    """

    phase: str = field(default="B", metadata={"help": "Factor that trains now: 'B' (A frozen) or 'A' (B frozen)."})
    method: str = field(
        default="deer",
        metadata={"help": f"Federated method, one of {METHODS}; decides which factors train in a phase."},
    )
    clip_norm: float = field(
        default=1.0,
        metadata={"help": "Client-level DP clip norm C of a whole client update (metric norm for `deer`)."},
    )
    noise_multiplier: float = field(
        default=0.0, metadata={"help": "Gaussian noise multiplier sigma per release; 0 disables DP noise."}
    )
    regulator_ridge: float = field(
        default=1e-6,
        metadata={
            "help": "Ridge lambda >= 0 added to the regulator metric M = s^2 Y^T Y + lambda I (keeps M invertible)."
        },
    )
    dp_delta: float = field(default=1e-5, metadata={"help": "Target delta of the (epsilon, delta) guarantee."})
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
        # The federated core aggregates, clips and noises exactly the A/B factors and the head; these
        # LoRA options add trained weights it never aggregates, so they are refused for every method.
        if self.use_dora:
            raise ValueError("use_dora=True is not supported by DEER_LORA (the DoRA magnitude is never aggregated)")
        if self.lora_bias:
            raise ValueError("lora_bias=True is not supported by DEER_LORA (a LoRA bias is never aggregated)")
        if self.bias != "none":
            raise ValueError(f"bias={self.bias!r} is not supported by DEER_LORA (base biases are never aggregated)")
        super().__post_init__()
        self.peft_type = DeerPeftType.DEER_LORA
        if self.phase not in PHASES:
            raise ValueError(f"phase={self.phase!r} is not one of {PHASES}")
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is not one of {METHODS}")
        if self.method == "ffa" and self.phase != "B":
            raise ValueError("method='ffa' trains only B: phase must be 'B'")
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


def trained_factors(method: str, phase: str) -> tuple[str, ...]:
    """Factors trained by `method` in `phase`: `lora` trains both, everything else only `phase`."""
    return ("A", "B") if method == "lora" else (phase,)
