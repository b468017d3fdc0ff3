"""The adapter's model card: Hugging Face metadata that parses as YAML, and the sections a card needs."""

from __future__ import annotations

import pytest
import yaml

from peft_deer.run.reporting import NO_GUARANTEE_NOTE, model_card, reproducible_noise_label

FIELDS = {"license", "library_name", "base_model", "datasets", "tags", "pipeline_tag", "metrics"}
SECTIONS = ("## Intended use", "## Limitations", "## Training data", "## Privacy", "## Test metrics")
CLIENT_LEDGER = {
    "level": "client", "epsilon": 3.25, "delta": 1e-5, "mechanism": "regulated", "trust_model": "trusted server",
    "releases": 4, "reproducible_noise": False,
}  # fmt: skip


def _info(dataset: str = "medmnist:pneumoniamnist", base: str = "dinov2-s", privacy: dict | None = None) -> dict:
    metrics = {"accuracy": 0.9, "auc": 0.95, "f1_macro": 0.88, "balanced_accuracy": 0.87, "sensitivity": 0.9,
               "specificity": 0.84, "threshold": 0.41}  # fmt: skip
    return {
        "method": "deer", "dataset": dataset, "base_model": base, "base_model_sha256": None,
        "base_description": "DINOv2-S", "class_names": ["normal", "pneumonia"], "num_clients": 6,
        "partition": "dirichlet alpha=0.5", "image_size": 56, "rank": 8, "lora_alpha": 8.0,
        "server_optimizer": "avg", "rounds_completed": 6, "privacy": privacy or dict(CLIENT_LEDGER),
        "test": {"final": metrics}, "calibration": {},
    }  # fmt: skip


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    head, _, _ = card[4:].partition("\n---\n")
    return yaml.safe_load(head)


@pytest.mark.parametrize(
    ("dataset", "card_dataset"),
    [("medmnist:pneumoniamnist", "medmnist:pneumoniamnist"), ("hf:owner/xrays", "owner/xrays"),
     ("imagefolder:/home/alice/private scans: v2", "imagefolder")],
)  # fmt: skip
def test_front_matter_is_yaml_with_the_hub_fields(dataset, card_dataset):
    card = model_card(_info(dataset, base="owner/base: with colon"))
    meta = _front_matter(card)
    assert FIELDS <= set(meta), FIELDS - set(meta)
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "image-classification"
    assert meta["base_model"] == "owner/base: with colon" and meta["datasets"] == [card_dataset]
    assert meta["license"] == "apache-2.0" and {"federated-learning", "differential-privacy"} <= set(meta["tags"])
    assert "accuracy" in meta["metrics"] and "no-privacy-guarantee" not in meta["tags"]
    positions = [card.index(s) for s in SECTIONS]
    assert positions[:4] == sorted(positions[:4])
    assert "not a medical device" in card and "client-level (3.250, 1e-05)-DP" in card


def test_a_reproducible_noise_card_says_no_guarantee_in_metadata_and_text():
    ledger = {**CLIENT_LEDGER, "reproducible_noise": True}
    card = model_card(_info(privacy=ledger))
    assert "no-privacy-guarantee" in _front_matter(card)["tags"]
    privacy = card[card.index("## Privacy") : card.index("## Test metrics")]
    assert "**none**" in privacy and "NO privacy guarantee" in privacy and "client-level (" not in privacy


def test_a_card_without_dp_says_so():
    card = model_card(_info(privacy={"level": "none", "epsilon": None}))
    privacy = card[card.index("## Privacy") : card.index("## Test metrics")]
    assert "trained without differential privacy" in privacy


def test_the_reproducible_noise_label():
    assert reproducible_noise_label(False) == {}
    label = reproducible_noise_label(True)
    assert label["reproducible_noise"] is True and label["privacy_note"] == NO_GUARANTEE_NOTE
    assert "NO privacy guarantee" in NO_GUARANTEE_NOTE


@pytest.mark.e2e  # a whole driver run, over 5 s
@pytest.mark.parametrize("reproducible", [True, False])
def test_every_output_that_reports_epsilon_says_whether_the_noise_was_reproducible(tmp_path, capsys, reproducible):
    """A `--reproducible-noise` run labels summary.json, every metrics.jsonl row, each adapter's
    peft_deer_run.json and the console's last line with "NO privacy guarantee"; a run with secret noise does not."""
    import json

    from helpers import MEDMNIST_DIR

    from train import fed

    out = tmp_path / "run"
    argv = [
        "--model", "tiny-vit", "--dataset", "medmnist:breastmnist", "--data-dir", str(MEDMNIST_DIR),
        "--train-subset", "60", "--num-clients", "2", "--rounds", "1", "--batch-size", "16", "--eval-batch-size", "512",
        "--dp", "client", "--noise-multiplier", "1.0", "--delta", "1e-3", "--output-dir", str(out),
        *(["--reproducible-noise"] if reproducible else []),
    ]  # fmt: skip
    if not (MEDMNIST_DIR / "breastmnist.npz").is_file():
        pytest.skip(f"no breastmnist.npz in {MEDMNIST_DIR}")
    capsys.readouterr()
    assert fed.main(argv) == 0
    last = [line for line in capsys.readouterr().out.splitlines() if line.strip()][-1]
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    runs = [json.loads((out / a / "peft_deer_run.json").read_text()) for a in ("adapter", "adapter-lora")]
    assert summary["epsilon"] > 0 and rows and all(r["epsilon"] > 0 for r in rows) and last.startswith("done:")
    assert summary["reproducible_noise"] is reproducible and all(r["reproducible_noise"] is reproducible for r in runs)
    for labelled in (summary, *rows, *runs):
        assert (labelled.get("privacy_note") == NO_GUARANTEE_NOTE) is reproducible
    assert all(r.get("reproducible_noise", False) is reproducible for r in rows)
    assert ("NO privacy guarantee" in last) is reproducible
