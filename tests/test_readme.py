"""The README's library snippet runs as written (docs that match the code)."""

from __future__ import annotations

import re
import subprocess
import tomllib
import warnings

import numpy as np
from conftest import MEDMNIST_DIR, ROOT


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_library_snippet_runs(tmp_path, monkeypatch):
    """The README's first Python example runs as written, without a single UserWarning (PEFT's "multiple
    adapters" warning came from loading the saved adapter onto the base model that already held it)."""
    snippet = next(b for b in _blocks("python") if "DeerLoraConfig" in b)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(snippet, "README.md", "exec"), namespace)
    user_warnings = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert user_warnings == []
    again = namespace["again"]
    trainable = {n for n, p in again.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "modules_to_save" in n for n in trainable)
    assert (tmp_path / "adapter-lora" / "adapter_config.json").is_file()


def test_main_job_config_parses_and_states_an_honest_guarantee():
    """The README's main job: its config passes deer-fed's own checks and keeps a real DP guarantee
    (epsilon <= 8, delta <= 1e-5, noise from the OS secret, not the seed)."""
    from peft_deer.settings import parse_args

    args = parse_args(["--config", str(ROOT / "train" / "configs" / "pneumonia_deer.yaml")])
    assert args.privacy.dp == "record" and args.record.record_epsilon <= 8 and args.record.record_delta <= 1e-5
    assert not args.privacy.reproducible_noise and args.federation.method == "deer" and args.data.train_subset is None
    assert "train/configs/pneumonia_deer.yaml" in (ROOT / "README.md").read_text()


def test_the_flower_config_step_can_be_pasted_twice(tmp_path):
    """The README's Flower config step writes a private FLWR_HOME's config.toml (overwrites it): pasting it twice
    still leaves valid TOML (appending to ~/.flwr/config.toml twice gave a duplicate table), and `flwr run` is
    pointed at that FLWR_HOME."""
    block = next(b for b in _blocks("bash") if "config.toml" in b)
    step = next(line for line in block.splitlines() if "config.toml" in line and not line.startswith("#"))
    run = next(line for line in block.splitlines() if "flwr run" in line)
    home = re.search(r"FLWR_HOME=\$PWD/(\S+)", run)
    assert home is not None, run
    for _ in range(2):
        subprocess.run(["bash", "-c", step], cwd=tmp_path, env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
                       check=True)  # fmt: skip
    config = tomllib.loads((tmp_path / home.group(1) / "config.toml").read_text())
    connection = run.split("flwr run . ")[1].split()[0]
    assert config["superlink"][connection] == {"address": "127.0.0.1:9093", "insecure": True}


def test_readme_counts_the_training_images_the_data_has():
    path = MEDMNIST_DIR / "pneumoniamnist.npz"
    if not path.is_file():
        import pytest

        pytest.skip(f"{path} not found")
    n = len(np.load(path)["train_labels"])
    text = (ROOT / "README.md").read_text()
    assert f"({n:,} images)" in text


def test_readme_install_commands_name_every_extra_a_command_needs():
    """Each extra a command checks (peft_deer.extras) has its own `pip install -e ".[extra]"` line in the README,
    and every extra the README installs exists in pyproject.toml."""
    from peft_deer.extras import EXTRA_MODULES

    text = (ROOT / "README.md").read_text()
    installed = {x for group in re.findall(r'pip install -e "\.\[([a-z,]+)\]"', text) for x in group.split(",")}
    defined = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    assert set(EXTRA_MODULES) <= installed <= defined, (installed, defined)
