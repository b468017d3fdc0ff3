"""`accelerate launch train/fed.py ...` (or `python train/fed.py ...`): the `deer-fed` driver,
`peft_deer.commands.fed`, loaded without importing the `peft_deer` package first (that loads torch,
transformers and PEFT), so a bad flag or output dir is one line in a fraction of a second.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def _load_driver():
    package = importlib.util.find_spec("peft_deer")  # finds the package without importing it
    if package is None or not package.submodule_search_locations:
        raise ImportError("peft_deer is not installed; run `pip install -e .` in the repository")
    path = Path(list(package.submodule_search_locations)[0]) / "light_import.py"
    spec = importlib.util.spec_from_file_location("_peft_deer_light_import", path)
    light = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(light)
    light.load("peft_deer.extras").require_extra("train/fed.py", "train")  # one line if the extra is missing
    return light.load("peft_deer.defaults", "peft_deer.settings", "peft_deer.run.run_dir", "peft_deer.commands.fed")


_driver = _load_driver()
build_parser, main, parse_args = _driver.build_parser, _driver.main, _driver.parse_args
__all__ = ["build_parser", "main", "parse_args"]

if __name__ == "__main__":
    sys.exit(main())
