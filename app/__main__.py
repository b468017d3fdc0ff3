"""`python -m app ...`: the demo's command (`peft_deer.demo.__main__`), loaded without importing the
`peft_deer` package first, so a missing or damaged adapter is reported before torch and gradio load."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def _load_command():
    package = importlib.util.find_spec("peft_deer")  # finds the package without importing it
    if package is None or not package.submodule_search_locations:
        raise ImportError("peft_deer is not installed; run `pip install -e .` in the repository")
    path = Path(list(package.submodule_search_locations)[0]) / "light_import.py"
    spec = importlib.util.spec_from_file_location("_peft_deer_light_import", path)
    light = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(light)
    light.load("peft_deer.extras").require_extra("python -m app", "demo")  # one line if the extra is missing
    return light.load("peft_deer.evaluation.calibration", "peft_deer.demo.__main__")  # calibration: numpy only


def main(argv: list[str] | None = None) -> int:
    """The demo command's `main` (also what an older `deer-app` script, `app.__main__:main`, calls)."""
    return _load_command().main(argv)


if __name__ == "__main__":
    sys.exit(main())
