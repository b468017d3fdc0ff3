"""The DEER_LORA PEFT method, in the shape of PEFT's `tuners/lora`: `config.py` (`DeerLoraConfig` and its
refused/honoured option table), `model.py` (`DeerLoraModel`), `registration.py` (registers DEER_LORA with PEFT)
and `export.py` (the plain-LoRA export)."""

from .config import METHODS, PHASES, DeerLoraConfig, DeerPeftType
from .export import export_lora_adapter
from .model import DeerLoraModel
from .registration import register

__all__ = ["METHODS", "PHASES", "DeerLoraConfig", "DeerLoraModel", "DeerPeftType", "export_lora_adapter", "register"]
