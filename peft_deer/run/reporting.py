"""Human-facing outputs of a run: the accuracy/AUC/epsilon curves and the adapter's model card."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def curves_figure(rows: Sequence[dict[str, Any]], privacy: dict[str, Any] | None = None):
    """The run's curves as a matplotlib Figure: validation accuracy/AUC/balanced accuracy, and epsilon spent
    (client-level, and record-level as the max over clients), against whole rounds, from `metrics.jsonl` rows.

    `privacy` (the ledger) names delta and tells a run without DP from one whose epsilon was not tracked.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    rounds = [r["round"] + 1 for r in rows]
    fig = Figure(figsize=(9, 3.4))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    for key, label in (("val_accuracy", "accuracy"), ("val_auc", "AUC"), ("val_balanced_accuracy", "balanced acc.")):
        values = [r.get(key) for r in rows]
        ax1.plot(rounds, [math.nan if v is None else v for v in values], marker="o", label=label)
    ax1.set_title("validation")
    ax1.set_ylim(0, 1)
    ax1.legend()
    spent = {
        "client-level": [r.get("epsilon") for r in rows],
        "record-level, max over clients": [r.get("record_epsilon_max") for r in rows],
    }
    spent = {name: eps for name, eps in spent.items() if any(e is not None for e in eps)}
    for (name, eps), color in zip(spent.items(), ("tab:red", "tab:purple"), strict=False):
        last = next(e for e in reversed(eps) if e is not None)
        label = f"{name}: \u03b5 = {last:.2f}"
        ax2.plot(rounds, [math.nan if e is None else e for e in eps], marker="o", color=color, label=label)
    level = (privacy or {}).get("level")
    if spent:
        deltas = [(privacy or {}).get("delta"), ((privacy or {}).get("record") or {}).get("delta")]
        deltas = list(dict.fromkeys(d for d in deltas if d))
        ax2.set_title("\u03b5 spent" + (f" (\u03b4 = {', '.join(f'{d:g}' for d in deltas)})" if deltas else ""))
        ax2.legend()
    else:
        text = "no differential privacy" if level in (None, "none") else f"{level}-level DP: \u03b5 not recorded"
        ax2.text(0.5, 0.5, text, ha="center", va="center", transform=ax2.transAxes)
        ax2.set_title("\u03b5")
    for ax in (ax1, ax2):
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig


def plot_curves(rows: Sequence[dict[str, Any]], path: str | Path, privacy: dict[str, Any] | None = None) -> Path:
    """`curves_figure` saved as a PNG at `path`."""
    path = Path(path)
    curves_figure(rows, privacy).savefig(path, dpi=110)
    return path


def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _calibration_lines(calibration: dict[str, dict[str, Any]]) -> list[str]:
    """The model card's calibration section: each adapter's temperature and its NLL / ECE before and after."""
    if not calibration:
        return []
    lines = [
        "## Calibrated probabilities",
        "",
        "| adapter | temperature T | val NLL (T = 1 -> T) | val ECE | test ECE |",
        "|---|---|---|---|---|",
    ]
    for name, c in calibration.items():
        pairs = [(c.get(f"{k}_before"), c.get(f"{k}_after")) for k in ("val_nll", "val_ece", "test_ece")]
        lines.append(
            f"| {name} | {c['temperature']:.4g} | " + " | ".join(f"{_cell(a)} -> {_cell(b)}" for a, b in pairs) + " |"
        )
    lines += [
        "",
        "The probabilities above (and the threshold) are softmax(logits / T). The adapter's own logits are not "
        "calibrated: divide them by T, stored as `temperature` in `peft_deer_run.json` next to the adapter, before "
        "the softmax. T minimises the negative log-likelihood on the validation split, which the server holds: "
        "post-processing of the DP release, so epsilon is unchanged. ECE: 15 equal-width bins of the top-class "
        "probability.",
        "",
    ]
    return lines


NO_GUARANTEE_NOTE = (
    "reproducible noise (--reproducible-noise, tests and debugging only): the DP noise was derived from the public "
    "seed, so there is NO privacy guarantee, whatever epsilon says"
)
PRIVACY_SCOPE = (
    "Client-level DP protects each hospital's whole contribution, record-level DP each patient's record within a "
    "hospital, against anyone who sees the published adapter, metrics and ledger (`privacy.json`). It does not cover "
    "what the base model learnt before, the server's held-out validation and test splits, or `server-private/`."
)
CARD_METRICS = ("accuracy", "roc_auc", "f1", "balanced_accuracy")


def reproducible_noise_label(reproducible: bool) -> dict[str, Any]:
    """The label every output that reports epsilon carries for a `--reproducible-noise` run ({} otherwise)."""
    return {"reproducible_noise": True, "privacy_note": NO_GUARANTEE_NOTE} if reproducible else {}


def _card_dataset(spec: str) -> str:
    """The dataset as the Hub's `datasets:` field names it: a hub id as it is, a local folder by its kind only."""
    kind, sep, rest = spec.partition(":")
    if sep and kind == "hf":
        return rest
    return "imagefolder" if sep and kind == "imagefolder" else spec


def _front_matter(info: dict[str, Any]) -> list[str]:
    """Hugging Face model-card metadata (YAML; every value written as JSON, which YAML reads as is)."""
    tags = ["peft_deer", "deer-lora", "lora", "federated-learning", "differential-privacy", "medical-imaging"]
    if info["privacy"].get("reproducible_noise"):
        tags.append("no-privacy-guarantee")
    meta = {
        "license": "apache-2.0",
        "library_name": "peft",
        "base_model": str(info["base_model"]),
        "datasets": [_card_dataset(str(info["dataset"]))],
        "tags": tags,
        "pipeline_tag": "image-classification",
        "metrics": list(CARD_METRICS),
    }
    return ["---", *(f"{key}: {json.dumps(value)}" for key, value in meta.items()), "---"]


def _use_and_data_lines(info: dict[str, Any]) -> list[str]:
    """The card's "Intended use", "Limitations" and "Training data" sections."""
    return [
        "## Intended use",
        "",
        "Research on privacy-preserving federated finetuning of vision foundation models for medical imaging: "
        "reproducing and comparing DEeR with other federated LoRA methods, and a starting point for sites that "
        "finetune a model together. It is not a medical device: not for diagnosis, triage or any clinical decision.",
        "",
        "## Limitations",
        "",
        f"- Trained and tested on {info['dataset']} at {info['image_size']} px only; how it does on other scanners, "
        "hospitals, populations or resolutions is unknown, and the test metrics below are one run's.",
        "- Differential privacy costs accuracy, and the guarantee below is only as strong as its epsilon and delta.",
        "- The decision threshold and the temperature were chosen on the validation split, which comes from the same "
        "distribution as the test split.",
        "- The license (Apache-2.0) is that of this adapter; the base model's and the training data's own terms apply "
        "too.",
        "",
        "## Training data",
        "",
        f"{info['dataset']} (classes {info['class_names']}): training images held by {info['num_clients']} clients "
        f"({info['partition']}), each of which trained on its own share only; the server kept the validation split "
        "(model selection, calibration) and the test split (the metrics below).",
        "",
    ]


def _privacy_scope_lines(privacy: dict[str, Any]) -> list[str]:
    if privacy.get("reproducible_noise"):
        return [NO_GUARANTEE_NOTE[0].upper() + NO_GUARANTEE_NOTE[1:] + ".", ""]
    return [] if privacy.get("level") in (None, "none") else [PRIVACY_SCOPE, ""]


def model_card(info: dict[str, Any]) -> str:
    """Markdown model card for the adapter dir: Hugging Face metadata (YAML front matter), base model, data, method,
    intended use, limitations, training data, privacy, test metrics, calibration."""
    privacy = info["privacy"]
    if privacy.get("reproducible_noise"):
        guarantee = (
            "**none**: the DP noise was derived from the public seed (`--reproducible-noise`, tests and "
            "debugging only), so anyone holding the seed can remove it"
        )
    elif privacy.get("level") in ("client", "client+record"):
        guarantee = (
            f"client-level ({privacy['epsilon']:.3f}, {privacy['delta']:g})-DP, mechanism: {privacy['mechanism']}, "
            f"trust model: {privacy['trust_model']}, {privacy['releases']} releases (opacus RDP accountant)"
        )
    elif privacy.get("level") != "record":
        guarantee = "none: trained without differential privacy"
    if "record" in privacy and not privacy.get("reproducible_noise"):
        rec = privacy["record"]
        record = (
            f"record-level ({rec['epsilon_max']:.3f}, {rec['delta']:g})-DP for every client's patients (max over "
            f"clients), mechanism: {rec['mechanism']} (opacus RDP accountant per client)"
        )
        guarantee = record if privacy.get("level") == "record" else f"{guarantee}; and {record}"
    lines = [
        *_front_matter(info),
        "",
        f"# {info['method']} adapter for {info['dataset']}",
        "",
        f"- **Base model:** {info['base_model']} ({info['base_description']}"
        + (f"; weights sha256 `{info['base_model_sha256']}`)" if info.get("base_model_sha256") else ")"),
        f"- **Data:** {info['dataset']}, classes {info['class_names']}, {info['num_clients']} clients "
        f"({info['partition']}), image size {info['image_size']} px",
        f"- **Method:** `{info['method']}` (peft_deer), rank {info['rank']}, alpha {info['lora_alpha']}, "
        f"{info['rounds_completed']} rounds, server optimizer {info['server_optimizer']}",
        "",
        *_use_and_data_lines(info),
        "## Privacy",
        "",
        f"**Guarantee:** {guarantee}.",
        "",
        *_privacy_scope_lines(privacy),
        "## Test metrics",
        "",
        "| adapter | accuracy | AUC | macro F1 | balanced accuracy | sensitivity | specificity | threshold |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in info["test"].items():
        cells = [m.get(k) for k in ("accuracy", "auc", "f1_macro", "balanced_accuracy", "sensitivity", "specificity")]
        threshold = "argmax" if m.get("threshold") is None else f"{m['threshold']:.4f}"
        lines.append(f"| {name} | " + " | ".join(_cell(v) for v in cells) + f" | {threshold} |")
    lines += [
        "",
        "Balanced accuracy (mean recall per class: 0.5 for any constant predictor, whatever the class balance), "
        "sensitivity (recall of class 1) and specificity (recall of class 0) decide class 1 when P(class 1) >= "
        "the threshold chosen on the validation split (Youden's J; argmax for > 2 classes); accuracy, AUC and "
        "macro F1 use the argmax.",
        "",
        *_calibration_lines(info.get("calibration") or {}),
        "Load with `import peft_deer; PeftModel.from_pretrained(base, this_dir)`, or use the plain LoRA "
        "export in `../adapter-lora` with vanilla PEFT.",
        "",
    ]
    return "\n".join(lines)
