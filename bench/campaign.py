"""`python bench/campaign.py ...`: the results campaign, `peft_deer.campaign.cli` (the same as `deer-campaign`;
`--help` for the grid format and the outputs). Loaded without importing the `peft_deer` package first (that
loads torch, transformers and PEFT), so `--help`, `--dry-run` and a bad grid answer at once.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

# The light modules the campaign's command line imports, each after those it imports (peft_deer.light_import).
LIGHT = (
    "peft_deer.defaults", "peft_deer.methods", "peft_deer.settings", "peft_deer.run.io", "peft_deer.run.run_dir",
    "peft_deer.campaign.grid", "peft_deer.campaign.store", "peft_deer.campaign.cli",
)  # fmt: skip


def _load_cli():
    package = importlib.util.find_spec("peft_deer")  # finds the package without importing it
    if package is None or not package.submodule_search_locations:
        raise ImportError("peft_deer is not installed; run `pip install -e .` in the repository")
    path = Path(list(package.submodule_search_locations)[0]) / "light_import.py"
    spec = importlib.util.spec_from_file_location("_peft_deer_light_import", path)
    light = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(light)
    light.load("peft_deer.extras").require_extra("bench/campaign.py", "train")  # one line if the extra is missing
    return light.load(*LIGHT)


main = _load_cli().main

if __name__ == "__main__":
    sys.exit(main(prog="bench/campaign.py"))
