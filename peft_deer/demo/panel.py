"""The demo's text (Markdown, no Gradio): the decision and its rule, what the input became, and the trust panel
(model, method, privacy guarantee, test metrics). Probabilities and thresholds are shown to 3 decimals or one
decimal of a percent; any text that comes from a file (names, DICOM header values in error messages) is
escaped (`safe`) before it reaches HTML, Markdown or a toast.
"""

from __future__ import annotations

import html
from typing import Any

import numpy as np

from .predict import Classifier

__all__ = ["UNLIKE_MD", "decision_md", "describe", "format_probability", "safe", "threshold_md", "unusual_md"]

MARKDOWN_SPECIAL = set("\\`*_[]()#|!~")
UNLIKE_MD = "**Unlike the training images: no class is given.**"
METRICS = (("accuracy", "accuracy"), ("auc", "AUC"), ("balanced_accuracy", "balanced accuracy"),
           ("sensitivity", "sensitivity"), ("specificity", "specificity"), ("f1_macro", "macro F1"),
           ("precision_macro", "macro precision"), ("recall_macro", "macro recall"),
           ("threshold", "threshold"))  # fmt: skip


def _num(value: Any, fmt: str = ".3f") -> str:
    return format(value, fmt) if isinstance(value, int | float) and not isinstance(value, bool) else "n/a"


def _record_lines(record: dict[str, Any]) -> list[str]:
    lines = []
    per_client = record.get("epsilon_per_client")
    if isinstance(per_client, dict) and per_client:
        eps = ", ".join(f"{k}: {_num(v, '.4g')}" for k, v in per_client.items())
        lines.append(f"- record-level ε per client (δ = {_num(record.get('delta'), 'g')}): {eps}")
    if record.get("clip_norm") is not None:
        lines.append(
            f"- DP-SGD: per-sample clip norm {_num(record['clip_norm'], 'g')}, {record.get('sampling', 'n/a')}; "
            f"{record.get('calibration', '')}".rstrip("; ")
        )
    return lines


def _audit_lines(audit: dict[str, Any] | None) -> list[str]:
    if not isinstance(audit, dict) or not isinstance(audit.get("epsilon_lower"), int | float):
        return ["- empirical audit: none recorded (`deer-audit --json > RUN_DIR/audit.json` adds one)"]
    lower, ledger = audit["epsilon_lower"], audit.get("epsilon_ledger")
    verdict = ""
    if isinstance(ledger, int | float):
        verdict = (
            " — **leaks more than the ledger claims**"
            if lower > ledger
            else " — consistent with the ledger (a lower bound cannot prove the guarantee)"
        )
    return [
        f"- empirical audit (`deer-audit`, {audit.get('trials', 'n/a')} trials): ε ≥ {_num(lower, '.3g')} "
        f"with 95 % confidence, ledger ε = {_num(ledger, '.3g')}{verdict}"
    ]


def _privacy_md(privacy: dict[str, Any] | None, audit: dict[str, Any] | None = None) -> str:
    if not privacy:
        return "**Privacy: unknown.** `privacy.json` was not found next to the adapter: no guarantee can be shown."
    audit = audit or privacy.get("audit")
    level = privacy.get("level", "none")
    if level == "none":
        return (
            "**Privacy: none.** Trained without differential privacy: there is no formal guarantee, "
            "the adapter may reveal information about its training images."
        )
    unit = {"client": "any one client (hospital)", "record": "any one training record (patient image)"}.get(
        level, f"one {level}"
    )
    eps, delta = privacy.get("epsilon"), privacy.get("delta")
    if privacy.get("reproducible_noise") or str(privacy.get("guarantee", "")).upper().startswith("NONE"):
        return "\n".join(
            [
                f"**Privacy: NO guarantee.** The run's DP noise was derived from its public seed "
                f"(`--reproducible-noise`, for tests and debugging): anyone with the seed can remove it. The "
                f"ledger's ε = {_num(eps, '.3g')}, δ = {_num(delta, 'g')} would hold only for secret noise.",
                *_audit_lines(audit),
            ]
        )
    lines = [
        f"**Privacy: {level}-level (ε, δ)-DP with ε = {_num(eps, '.3g')}, δ = {_num(delta, 'g')}** — "
        f"the released adapter is almost equally likely whether or not {unit} took part.",
        f"- guarantee: {privacy.get('guarantee', 'n/a')}",
        f"- mechanism: {privacy.get('mechanism', 'n/a')}",
        f"- trust model: {privacy.get('trust_model', 'n/a')}",
    ]
    if privacy.get("neighbouring_relation"):
        lines.append(f"- neighbouring datasets: {privacy['neighbouring_relation']}")
    if privacy.get("epsilon_semantics") == "running tally":
        lines.append("- ε is a running tally of the releases made (reproduction of the published mechanism)")
    if privacy.get("noise_randomness"):
        lines.append(f"- noise: {privacy['noise_randomness']}")
    if privacy.get("accountant"):
        lines.append(f"- accountant: {privacy['accountant']}")
    if privacy.get("noise_multiplier") is not None:
        lines.append(
            f"- noise multiplier σ = {_num(privacy['noise_multiplier'], '.4g')}, clip norm "
            f"{_num(privacy.get('clip_norm'), 'g')}, {privacy.get('releases', 'n/a')} releases, "
            f"{privacy.get('num_clients', 'n/a')} clients ({privacy.get('sampling', 'n/a')})"
        )
    if isinstance(privacy.get("record"), dict):
        lines += _record_lines(privacy["record"])
    return "\n".join(lines + _audit_lines(audit))


def _metrics_md(summary: dict[str, Any] | None) -> str:
    test = (summary or {}).get("test") or {}
    if not test:
        return "**Test metrics: unknown** (`summary.json` not found next to the adapter)."
    header = "| adapter | " + " | ".join(label for _, label in METRICS) + " |"
    rows = [header, "|---" * (len(METRICS) + 1) + "|"]
    for name, values in test.items():
        cells = [_num((values or {}).get(k)) for k, _ in METRICS]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    note = (
        "Balanced accuracy, sensitivity (recall of the second class) and specificity (recall of the first) decide "
        "at the threshold on its probability chosen on the validation split (n/a: argmax); a constant guess "
        "scores balanced accuracy 0.5."
    )
    return "**Test metrics** (the run's held-out test split)\n\n" + "\n".join(rows) + "\n\n" + note


def safe(text: object, markdown: bool = True) -> str:
    """Text from a file or a user, escaped for HTML (no live element) and, for Markdown, its markup characters
    backslash-escaped (no link, no emphasis). Toasts are HTML: `markdown=False`."""
    text = str(text)
    if markdown:
        text = "".join("\\" + ch if ch in MARKDOWN_SPECIAL else ch for ch in text)
    return html.escape(text, quote=True)


def format_probability(p: float) -> str:
    """A probability as a percentage with one decimal (``98.4 %``); ``> 99.9 %`` / ``< 0.1 %`` at the ends."""
    if p > 0.9995 and p < 1.0:
        return "> 99.9 %"
    if 0.0 < p < 0.0005:
        return "< 0.1 %"
    return f"{100 * p:.1f} %"


def format_threshold(t: float) -> str:
    """A threshold on a probability, 3 decimals (``0.877``); ``1 − 4.7e-06`` for thresholds that round to 1."""
    return f"1 − {1.0 - t:.2g}" if 0.9995 <= t < 1.0 else f"{t:.3f}"


def threshold_md(clf: Classifier) -> str:
    """What the operating threshold is, where it came from and what it gave on validation."""
    op = clf.operating_point
    if op is None:
        return "Decision rule: the most probable class (this run has no operating threshold)."
    positive = clf.class_names[1]
    return (
        f"Operating threshold: **{positive}** when P({positive}) ≥ {format_threshold(op.threshold)}. Chosen on the "
        f"run's validation split (Youden's J), where it gave sensitivity {_num(op.val_sensitivity)} and "
        f"specificity {_num(op.val_specificity)}."
    )


def calibration_md(clf: Classifier) -> str:
    """Where the shown probabilities come from: the run's temperature, or none for runs that predate it."""
    if "temperature" not in clf.run:
        return "softmax of the logits (this run file has no temperature: uncalibrated, T = 1)"
    return (
        f"calibrated, softmax(logits / T) with T = {clf.temperature:.4g} fitted on the run's validation split "
        "(post-processing of the released model: ε unchanged)"
    )


def resized_md(clf: Classifier, pixels: np.ndarray | None = None) -> str:
    """What the model reads: the input resized to the run's N x N px (and from what size)."""
    n = clf.run["image_size"]
    size = f"{pixels.shape[1]} x {pixels.shape[0]} px " if pixels is not None else ""
    return f"The model reads the input {size}resized to {n} x {n} px (the run's input size)."


def unusual_md(clf: Classifier, reason: str) -> str:
    """Markdown for an input refused as unlike the training images (no class given)."""
    return f"{UNLIKE_MD} The input is not classified because {safe(reason)}. {clf.ood_note.capitalize()}."


def decision_md(
    clf: Classifier,
    probs: np.ndarray,
    explained: int | None = None,
    *,
    pixels: np.ndarray | None = None,
    true_label: str | None = None,
) -> str:
    """Markdown: the decided class for probabilities (num_classes,), the rule, what the model read, the true label
    of a clicked example, and what the heatmap shows."""
    decided = clf.decide(probs)
    op = clf.operating_point
    if op is None:
        rule = "the most probable class" if "class_offsets" not in clf.run else "the run's per-class offsets"
        head = f"**Decision: {clf.class_names[decided]}** ({rule}, p = {format_probability(float(probs[decided]))})"
    else:
        p1, sign = float(probs[1]), "≥" if decided == 1 else "<"
        head = (
            f"**Decision at the operating threshold: {clf.class_names[decided]}** "
            f"(P({clf.class_names[1]}) = {format_probability(p1)} {sign} {format_threshold(op.threshold)})"
        )
    lines = [head, "", threshold_md(clf), "", resized_md(clf, pixels)]
    if true_label is not None:
        lines += ["", f"True label of this example (the run's test split): **{safe(true_label)}**"]
    if explained is not None:
        lines += [
            "",
            f"Heatmap: where the image speaks for *{clf.class_names[explained]}* (Grad-CAM on the patch tokens "
            "of the last block; colour scale on the right, from no evidence to the map's maximum).",
        ]
    return "\n".join(lines)


def describe(clf: Classifier, title: str | None = None) -> str:
    """Markdown: what a user must know to trust the classifier (model, method, decision rule, privacy, metrics)."""
    run, summary = clf.run, clf.summary or {}
    model = [
        f"### {title or clf.name}",
        f"- base model: {run.get('base_description', 'n/a')} (`{run.get('model', clf.base_model)}`)",
        f"- method: {run.get('method', 'n/a')}, LoRA rank {summary.get('rank', 'n/a')}, "
        f"{summary.get('num_clients', 'n/a')} clients, {summary.get('partition', 'n/a')} partition, "
        f"{summary.get('rounds_completed', 'n/a')} rounds",
        f"- dataset: {run.get('dataset', 'n/a')}; classes: {', '.join(clf.class_names)}",
        f"- input: resized to {run['image_size']} x {run['image_size']} px, {run['num_channels']} channel(s), "
        "same preprocessing as training",
        f"- inputs unlike the training images: {clf.ood_note}",
        f"- probabilities: {calibration_md(clf)}",
        f"- decision: {threshold_md(clf)}",
    ]
    return "\n".join(model) + "\n\n" + _privacy_md(clf.privacy, clf.audit) + "\n\n" + _metrics_md(clf.summary)


