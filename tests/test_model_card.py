"""The adapter's model card: Hugging Face metadata that parses as YAML, and the sections a card needs."""

from __future__ import annotations

import pytest
import yaml

from peft_deer.reporting import NO_GUARANTEE_NOTE, model_card, reproducible_noise_label

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
