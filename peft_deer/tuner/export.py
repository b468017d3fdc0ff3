"""Export a DEER_LORA adapter as a plain PEFT `LORA` adapter (same tensors) for vanilla PEFT."""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import fields
from pathlib import Path

from peft import LoraConfig, PeftModel

from .config import DeerLoraConfig

ADAPTER_CONFIG = "adapter_config.json"
DEER_ONLY_FIELDS = {f.name for f in fields(DeerLoraConfig)} - {f.name for f in fields(LoraConfig)}


def export_lora_adapter(source: PeftModel | str | Path, out_dir: str | Path, adapter_name: str = "default") -> Path:
    """Write a `LORA` adapter to `out_dir` from a DEER_LORA `PeftModel` or a saved adapter dir.

    The weights file is copied unchanged (DEER_LORA uses LoRA's `lora_` keys); the config drops the
    DEeR-only fields and says `"peft_type": "LORA"`, so `PeftModel.from_pretrained` loads it
    without `peft_deer` installed. The other files of a saved adapter dir are copied as they are; for a run's
    adapter that includes `peft_deer_run.json`, whose `temperature` T gives the calibrated probabilities
    softmax(logits / T). T is not folded into the weights: the tensors stay exactly the DP-trained ones, and a
    merged model's logits must be divided by T before the softmax (the demo does).
    """
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        if isinstance(source, PeftModel):
            source.save_pretrained(tmp, selected_adapters=[adapter_name], save_embedding_layers=False)
            src = Path(tmp) if adapter_name == "default" else Path(tmp) / adapter_name
        else:
            src = Path(source)
        config_path = src / ADAPTER_CONFIG
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} not found: not a saved adapter directory")
        config = json.loads(config_path.read_text())
        if config.get("peft_type") != "DEER_LORA":
            raise ValueError(f"{src} holds a {config.get('peft_type')!r} adapter, expected 'DEER_LORA'")
        for name in DEER_ONLY_FIELDS:
            config.pop(name, None)
        config["peft_type"] = "LORA"
        out_dir.mkdir(parents=True, exist_ok=True)
        for path in src.iterdir():
            if path.is_file() and path.name != ADAPTER_CONFIG:
                shutil.copy2(path, out_dir / path.name)
        (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True, allow_nan=False))
    return out_dir
