"""`DeerLoraModel`: a `LoraModel` whose trainable factor follows the DEeR phase."""

from __future__ import annotations

from peft.tuners.lora import LoraModel
from peft.tuners.lora.layer import LoraLayer
from torch import nn

from .config import PHASES, DeerLoraConfig, trained_factors


class DeerLoraModel(LoraModel):
    """LoRA injection as in PEFT; after every (re)marking only the phase's factor(s) train.

    PEFT marks all adapter weights trainable on injection, on `set_adapter` and on
    `from_pretrained(is_trainable=True)`; overriding the marking hook keeps the phase on every path.
    """

    prefix: str = "lora_"

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        self._apply_phase(model)

    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        if not inference_mode:
            self._apply_phase(self.model)

    def set_deer_phase(self, phase: str, adapter_name: str | None = None) -> None:
        """Switch the trained factor to `phase` ('A' or 'B') for `adapter_name` (default: active)."""
        if phase not in PHASES:
            raise ValueError(f"phase={phase!r} is not one of {PHASES}")
        name = adapter_name or self.active_adapters[0]
        config: DeerLoraConfig = self.peft_config[name]
        if config.method == "ffa" and phase != "B":
            raise ValueError("method='ffa' trains only B: phase must be 'B'")
        config.phase = phase
        self._apply_phase(self.model)

    def _apply_phase(self, model: nn.Module) -> None:
        for name in self.active_adapters:
            config = self.peft_config[name]
            if config.inference_mode or not isinstance(config, DeerLoraConfig):
                continue
            factors = trained_factors(config.method, config.phase)
            for module in model.modules():
                if isinstance(module, LoraLayer) and name in module.lora_A:
                    module.lora_A[name].weight.requires_grad_("A" in factors)
                    module.lora_B[name].weight.requires_grad_("B" in factors)
