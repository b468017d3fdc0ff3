"""peft_deer: DEeR federated LoRA with sound client-level differential privacy, as a PEFT method."""

from .tuner import METHODS, PHASES, DeerLoraConfig, DeerLoraModel, DeerPeftType, export_lora_adapter, register

register()

__all__ = [
    "METHODS",
    "PHASES",
    "DeerLoraConfig",
    "DeerLoraModel",
    "DeerPeftType",
    "export_lora_adapter",
    "register",
]
