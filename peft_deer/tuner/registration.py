"""Registers `DEER_LORA` with PEFT (idempotent). Importing `peft_deer` calls `register()`."""

from __future__ import annotations

import peft
from peft import mapping

from .config import DeerLoraConfig, DeerPeftType
from .model import DeerLoraModel

SUPPORTED_PEFT_MINOR = "0.21"


def register() -> None:
    """Write DEER_LORA into PEFT's type mappings; `register_peft_method` refuses names outside `PeftType`."""
    if not peft.__version__.startswith(SUPPORTED_PEFT_MINOR + "."):
        raise ImportError(
            f"peft_deer supports peft {SUPPORTED_PEFT_MINOR}.x, found {peft.__version__}; "
            f"pip install 'peft=={SUPPORTED_PEFT_MINOR}.*'"
        )
    key = DeerPeftType.DEER_LORA
    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[key] = DeerLoraConfig
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[key] = DeerLoraModel
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[key] = DeerLoraModel.prefix
