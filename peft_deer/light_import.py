"""Import light parts of `peft_deer` (the settings, the command-line drivers, the demo's front) without
running `peft_deer/__init__.py`, which registers DEER_LORA with PEFT and so loads torch, transformers and
PEFT (seconds). The repository's entry points (`train/fed.py`, `python -m app`, `bench/campaign.py`, the
Flower ClientApp `peft_deer_clientapp.py`) load this file by path and call `load`, so a bad flag or a
missing adapter is reported before torch loads.

`LIGHT_MODULES` is the light boundary, the one list of modules that may be loaded this way: each imports at
module level only the standard library, `LIGHT_THIRD_PARTY` and other listed modules (tests/test_layout.py
checks the source; tests/test_light_boundary.py runs every entry point with torch, transformers and PEFT
blocked). Each module loaded is registered under its own name: when `peft_deer` is imported later, the run
code gets these same module objects.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent  # the peft_deer package folder

# The light boundary: a package's `__init__` is listed too, as loading a submodule runs it first.
LIGHT_MODULES: tuple[str, ...] = (
    "peft_deer.light_import",
    "peft_deer.defaults",
    "peft_deer.extras",
    "peft_deer.methods",
    "peft_deer.settings",
    "peft_deer.settings.cli",
    "peft_deer.settings.groups",
    "peft_deer.settings.run_settings",
    "peft_deer.settings.values",
    "peft_deer.commands",
    "peft_deer.commands.fed",
    "peft_deer.run",  # its names load on first use
    "peft_deer.run.files",
    "peft_deer.run.io",
    "peft_deer.run.run_dir",
    "peft_deer.evaluation",
    "peft_deer.evaluation.calibration",
    "peft_deer.demo",
    "peft_deer.demo.__main__",
    "peft_deer.demo.run",
    "peft_deer.audit",  # its names load on first use
    "peft_deer.audit.cli",
    "peft_deer.audit.from_run",
    "peft_deer.campaign",
    "peft_deer.campaign.cli",
    "peft_deer.campaign.grid",
    "peft_deer.campaign.store",
    "peft_deer.flower",  # its names load on first use
    "peft_deer.flower.mask_hardening",
    "peft_deer.flower.secagg_guard",
    "peft_deer.flower.wire",
    "peft_deer.flower.worker_link",
)
# What a light module may import besides the standard library and other light modules (none loads torch).
LIGHT_THIRD_PARTY: tuple[str, ...] = ("numpy", "yaml", "flwr")


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
        if dotted not in LIGHT_MODULES:
            raise ValueError(f"{dotted!r} is not in peft_deer.light_import.LIGHT_MODULES (the light boundary)")
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
