"""`DeerLoraModel`: a `LoraModel` whose trainable factor follows the DEeR phase.

The phase is one rule: in every LoRA layer of a DEER_LORA adapter only the trained factor's
parameters may require grad (`lora_A`/`lora_embedding_A` in phase A, `lora_B`/`lora_embedding_B`
in phase B), plus the adapter's `modules_to_save`. It is stated once per layer through PEFT's own
`frozen_peft_weight_names` (the hook MiCA uses), so every PEFT path that (re)marks adapter weights
trainable -- injection, `set_adapter`, `set_requires_grad`, `enable_adapters`, `load_adapter` and
`from_pretrained` with `is_trainable=True` -- reapplies it, for any adapter name.
"""

from __future__ import annotations

from peft.tuners.lora import LoraModel
from peft.tuners.lora.layer import Conv1d, Conv2d, Conv3d, Embedding, Linear, LoraLayer
from torch import nn

from ..methods import method_spec
from .config import PHASES, DeerLoraConfig, trained_factors

# The PEFT attributes (`adapter_layer_names`) that hold each factor: Linear/Conv use modules, Embedding parameters.
FACTOR_LAYER_NAMES = {"A": ("lora_A", "lora_embedding_A"), "B": ("lora_B", "lora_embedding_B")}
# Layer kinds whose update is exactly dW = s * B @ A on 2-D views (transformers' Conv1D becomes a LoRA Linear).
SUPPORTED_LAYERS = (Linear, Embedding, Conv1d, Conv2d, Conv3d)


def unsupported_layer_reason(module: LoraLayer, adapter_name: str) -> str | None:
    """Why the federated core cannot aggregate and privatize `module`'s adapter exactly (None: it can)."""
    if type(module) not in SUPPORTED_LAYERS:
        kinds = ", ".join(k.__name__ for k in SUPPORTED_LAYERS)
        return f"is a LoRA {type(module).__name__}; DEER_LORA supports {kinds} (and transformers' Conv1D)"
    if adapter_name in module.lora_variant:
        variant = type(module.lora_variant[adapter_name]).__name__
        return f"uses the LoRA variant {variant} (DoRA, ...), whose extra weights the federated core does not aggregate"
    if adapter_name in module.lora_B and module.lora_B[adapter_name].bias is not None:
        return "has a LoRA bias (lora_bias=True), which the federated core does not aggregate"
    if getattr(module.get_base_layer(), "groups", 1) > 1:
        return f"is a grouped conv (groups={module.get_base_layer().groups}): dW is not B @ A"
    return None


def has_adapter(module: LoraLayer, adapter_name: str) -> bool:
    return adapter_name in module.lora_A or adapter_name in module.lora_embedding_A


class DeerLoraModel(LoraModel):
    """LoRA injection as in PEFT; after every (re)marking only the phase's factor(s) train."""

    prefix: str = "lora_"

    def _create_and_replace(self, lora_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        super()._create_and_replace(lora_config, adapter_name, target, target_name, parent, current_key, **kwargs)
        module = getattr(parent, target_name)
        if isinstance(lora_config, DeerLoraConfig) and isinstance(module, LoraLayer):
            reason = unsupported_layer_reason(module, adapter_name)
            if reason is not None:
                raise ValueError(f"DEER_LORA target {current_key} {reason}; remove it from target_modules")
            init = lora_config.init_lora_weights
            if isinstance(module, Embedding) and (init is True or str(init).lower() == "gaussian"):
                # PEFT starts an Embedding at A = 0, B random; phase B (A frozen) would then have no gradient
                # and a singular regulator metric. Use the Linear convention (A random, B = 0): still dW = 0.
                a, b = module.lora_embedding_A[adapter_name], module.lora_embedding_B[adapter_name]
                nn.init.normal_(a.data)
                nn.init.zeros_(b.data)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        for name in self.peft_config:
            self._register_phase(name, model)
        super()._mark_only_adapters_as_trainable(model)

    def set_deer_phase(self, phase: str, adapter_name: str | None = None) -> None:
        """Switch the trained factor to `phase` ('A' or 'B') for `adapter_name` (default: active).

        Whether the adapter trains at all is unchanged: if any of its LoRA weights required grad, the
        new phase's factor does afterwards; a frozen (inference) adapter stays frozen.
        """
        if phase not in PHASES:
            raise ValueError(f"phase={phase!r} is not one of {PHASES}")
        name = adapter_name or self.active_adapters[0]
        config: DeerLoraConfig = self.peft_config[name]
        method_spec(config.method).check_phase(phase)
        layers = [m for m in self.model.modules() if isinstance(m, LoraLayer) and has_adapter(m, name)]
        was_trainable = any(
            p.requires_grad
            for m in layers
            for layer_name in FACTOR_LAYER_NAMES["A"] + FACTOR_LAYER_NAMES["B"]
            if name in getattr(m, layer_name)
            for p in _parameters(getattr(m, layer_name)[name])
        )
        config.phase = phase
        self._register_phase(name, self.model)
        if was_trainable and not config.inference_mode:
            for m in layers:  # PEFT's own switch; it reapplies the frozen factor
                m.set_requires_grad(name, True)

    def _register_phase(self, adapter_name: str, model: nn.Module) -> None:
        """Declare the phase's frozen factor of `adapter_name` in every LoRA layer, and freeze it now."""
        config = self.peft_config[adapter_name]
        if not isinstance(config, DeerLoraConfig):
            return
        trained = trained_factors(config.method, config.phase)
        frozen = tuple(n for f in ("A", "B") if f not in trained for n in FACTOR_LAYER_NAMES[f])
        for module in model.modules():
            if isinstance(module, LoraLayer) and has_adapter(module, adapter_name):
                names = dict(module.frozen_peft_weight_names)  # the class default is shared: never mutate it
                names[adapter_name] = frozen
                module.frozen_peft_weight_names = names
                module._freeze_non_trainable_peft_weights(adapter_name)


def _parameters(layer: nn.Module | nn.Parameter) -> list[nn.Parameter]:
    return [layer] if isinstance(layer, nn.Parameter) else list(layer.parameters())
