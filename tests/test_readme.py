"""The README's library snippet runs as written (docs that match the code)."""

from __future__ import annotations

import re

from conftest import ROOT


def test_readme_library_snippet_runs(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    snippet = next(b for b in blocks if "DeerLoraConfig" in b)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
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
