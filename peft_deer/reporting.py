"""Human-facing outputs of a run: the accuracy/AUC/epsilon curves and the adapter's model card."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def plot_curves(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Validation accuracy/AUC/balanced accuracy and epsilon against rounds, from `metrics.jsonl` rows, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] + 1 for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    for key, label in (("val_accuracy", "accuracy"), ("val_auc", "AUC"), ("val_balanced_accuracy", "balanced acc.")):
        values = [r.get(key) for r in rows]
        ax1.plot(rounds, [math.nan if v is None else v for v in values], marker="o", label=label)
    ax1.set_xlabel("round")
    ax1.set_title("validation")
    ax1.set_ylim(0, 1)
    ax1.legend()
    spent = {
        "client-level": [r.get("epsilon") for r in rows],
        "record-level (max over clients)": [r.get("record_epsilon_max") for r in rows],
    }
    spent = {name: eps for name, eps in spent.items() if any(e is not None for e in eps)}
    for (name, eps), color in zip(spent.items(), ("tab:red", "tab:purple"), strict=False):
        ax2.plot(rounds, [math.nan if e is None else e for e in eps], marker="o", color=color, label=name)
    if spent:
        ax2.set_title("epsilon spent")
        ax2.legend()
    else:
        ax2.text(0.5, 0.5, "no differential privacy", ha="center", va="center", transform=ax2.transAxes)
        ax2.set_title("epsilon")
    ax2.set_xlabel("round")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def model_card(info: dict[str, Any]) -> str:
    """Markdown model card for the adapter dir: base model, data, method, privacy, test metrics."""
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
        "---",
        "library_name: peft",
        f"base_model: {info['base_model']}",
        "tags: [peft_deer, lora, federated-learning, differential-privacy, medical-imaging]",
        "---",
        "",
        f"# {info['method']} adapter for {info['dataset']}",
        "",
        f"- **Base model:** {info['base_model']} ({info['base_description']})",
        f"- **Data:** {info['dataset']}, classes {info['class_names']}, {info['num_clients']} clients "
        f"({info['partition']}), image size {info['image_size']} px",
        f"- **Method:** `{info['method']}` (peft_deer), rank {info['rank']}, alpha {info['lora_alpha']}, "
        f"{info['rounds_completed']} rounds, server optimizer {info['server_optimizer']}",
        f"- **Privacy:** {guarantee}",
        "",
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
        "Load with `import peft_deer; PeftModel.from_pretrained(base, this_dir)`, or use the plain LoRA "
        "export in `../adapter-lora` with vanilla PEFT.",
        "",
    ]
    return "\n".join(lines)
