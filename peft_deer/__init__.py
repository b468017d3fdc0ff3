"""peft_deer: DEeR federated LoRA with sound client-level differential privacy, as a PEFT method."""

from .config import METHODS, PHASES, DeerLoraConfig, DeerPeftType
from .export import export_lora_adapter
from .model import DeerLoraModel
from .registration import register

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
