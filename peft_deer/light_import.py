"""Import light parts of `peft_deer` (the settings, the command-line drivers, the demo's front) without
running `peft_deer/__init__.py`, which registers DEER_LORA with PEFT and so loads torch, transformers and
PEFT (seconds). The repository's entry points (`train/fed.py`, `python -m app`) load this file by path
and call `load`, so a bad flag or a missing adapter is reported before torch loads.

Each module named is registered under its own name: when `peft_deer` is imported later, the run code
gets these same module objects. Standard library only; the modules named must import nothing heavy at
module level, and only each other (or the standard library) by relative import.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent  # the peft_deer package folder


def load(*names: str) -> ModuleType:
    """Import `names` (e.g. "peft_deer.defaults", "peft_deer.settings", "peft_deer.commands.fed") in order,
    each after the modules it imports; returns the last one.

    Once `peft_deer` itself is imported this is plain `importlib.import_module`.
    """
    module = None
    for name in names:
        module = importlib.import_module(name) if "peft_deer" in sys.modules else _load_by_path(name)
    if module is None:
        raise ValueError("name at least one module to load")
    return module


def _load_by_path(name: str) -> ModuleType:
    parts = name.split(".")
    if parts[0] != "peft_deer" or len(parts) < 2:
        raise ValueError(f"{name!r} is not a peft_deer submodule")
    for depth in range(2, len(parts) + 1):
        dotted = ".".join(parts[:depth])
        if dotted in sys.modules:
            continue
        path = ROOT.joinpath(*parts[1:depth])
        if path.is_dir():
            spec = importlib.util.spec_from_file_location(
                dotted, path / "__init__.py", submodule_search_locations=[str(path)]
            )
        else:
            spec = importlib.util.spec_from_file_location(dotted, path.with_suffix(".py"))
        if spec is None or spec.loader is None:
            raise ImportError(f"{dotted} not found under {ROOT}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[dotted] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[dotted]
            raise
    return sys.modules[name]
