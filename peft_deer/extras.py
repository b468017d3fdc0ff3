"""The optional dependency groups (`pyproject.toml`'s extras) and the console scripts that need them.

The PEFT method itself (`import peft_deer`, `get_peft_model(model, DeerLoraConfig(...))`, save and load) needs
only the core dependencies: torch, peft, transformers, safetensors, numpy. Each command checks its extra before
it imports anything from it, and a missing one is a single line naming what to install, e.g.
`deer-app: error: gradio, pydicom not installed; pip install 'peft-deer[demo]'`.

Standard library only, no package-relative imports: `peft_deer.light_import` can load it by path.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Sequence

PACKAGE = "peft-deer"
# extra -> the top-level modules it provides (import names), and the extras it includes (pyproject's self-references).
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "backbones": ("onnx",),
    "train": (
        "accelerate", "opacus", "datasets", "flwr_datasets", "sklearn", "scipy", "matplotlib", "yaml", "tqdm", "PIL",
    ),
    "demo": ("gradio", "pydicom"),
    "flower": ("flwr",),
}  # fmt: skip
EXTRA_INCLUDES: dict[str, tuple[str, ...]] = {"train": ("backbones",), "demo": ("train",), "flower": ("train",)}


def extra_modules(extra: str) -> tuple[str, ...]:
    """Every top-level module `extra` installs, its included extras' modules first."""
    if extra not in EXTRA_MODULES:
        raise ValueError(f"unknown extra {extra!r}; one of {sorted(EXTRA_MODULES)}")
    included = tuple(m for inc in EXTRA_INCLUDES.get(extra, ()) for m in extra_modules(inc))
    return included + EXTRA_MODULES[extra]


def missing_modules(extra: str) -> list[str]:
    """The modules of `extra` that cannot be imported here (not installed, or blocked)."""
    missing = []
    for name in extra_modules(extra):
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a blocked module, or one whose import failed earlier
            found = False
        if not found:
            missing.append(name)
    return missing


def missing_extra_message(extra: str) -> str | None:
    """One line naming the missing modules and the pip command that installs them; None when all are there."""
    missing = missing_modules(extra)
    if not missing:
        return None
    return f"{', '.join(missing)} not installed; pip install '{PACKAGE}[{extra}]'"


def require_extra(prog: str, extra: str) -> None:
    """Exit 1 with `prog: error: <missing> not installed; pip install 'peft-deer[extra]'` if `extra` is missing."""
    message = missing_extra_message(extra)
    if message is not None:
        raise SystemExit(f"{prog}: error: {message}")


def _command(prog: str, extra: str, target: str) -> Callable[[Sequence[str] | None], int]:
    def run(argv: Sequence[str] | None = None) -> int:
        require_extra(prog, extra)
        module, _, function = target.partition(":")
        return getattr(importlib.import_module(module), function)(argv)

    run.__doc__ = f"`{prog}` (needs `pip install '{PACKAGE}[{extra}]'`): `{target}` after the extra is checked."
    return run


# The console scripts (`[project.scripts]`): each checks its extra, then imports and runs the command.
deer_fed = _command("deer-fed", "train", "peft_deer.commands.fed:main")
deer_app = _command("deer-app", "demo", "peft_deer.demo.__main__:main")
deer_build_dinov2 = _command("deer-build-dinov2", "backbones", "peft_deer.backbones:main")
deer_audit = _command("deer-audit", "train", "peft_deer.audit:main")
deer_campaign = _command("deer-campaign", "train", "peft_deer.campaign.cli:main")
