"""The Gradio Blocks of the demo: one image or DICOM in -> class probabilities, the decision at the
run's operating threshold and where the model looked; a batch of files in -> a table and a CSV; and
the run's guarantees.

API endpoints: ``/predict`` (file -> class probabilities), ``/explain`` (file -> overlay image),
``/batch`` (files or zips -> table, CSV).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gradio as gr
import numpy as np
from PIL import Image

from peft_deer.explain import overlay

from . import uploads
from .batch import classify_uploads, columns, to_csv
from .decode import ACCEPTED, UnreadableFile, decode, read_uploads
from .predict import Classifier

__all__ = [
    "BAD_IMAGE",
    "NO_IMAGE",
    "THEME",
    "build_demo",
    "close",
    "decision_md",
    "describe",
    "format_probability",
    "launch",
]

# System fonts only: the default themes fetch web fonts, the demo must work offline.
THEME = gr.themes.Default(
    font=["ui-sans-serif", "system-ui", "Segoe UI", "Roboto", "Helvetica", "Arial", "sans-serif"],
    font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"],
)
NO_IMAGE = "No image: upload an image or DICOM file first, or click one of the examples."
BAD_IMAGE = "Could not read the upload as an image"
NO_FILES = "No files: upload images, DICOM files or a zip of them first."
# Small scans (MedMNIST is 28 px) are shown enlarged, pixels kept sharp.
CSS = ".pixelated img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }"
OUTPUT_TTL_S = 60  # returned images and CSVs are deleted from the private cache after this long (s)
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
        cells = [_num((values or {}).get(k), ".7g" if k == "threshold" else ".3f") for k, _ in METRICS]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    note = (
        "Balanced accuracy, sensitivity (recall of the second class) and specificity (recall of the first) decide "
        "at the threshold on its probability chosen on the validation split (n/a: argmax); a constant guess "
        "scores balanced accuracy 0.5."
    )
    return "**Test metrics** (the run's held-out test split)\n\n" + "\n".join(rows) + "\n\n" + note


def format_probability(p: float) -> str:
    """A probability with enough digits to compare with a threshold near 1 (``1 − 4.7e-06``)."""
    return f"1 − {1.0 - p:.2g}" if 0.9999995 <= p < 1.0 else f"{p:.7g}"


def threshold_md(clf: Classifier) -> str:
    """What the operating threshold is, where it came from and what it gave on validation."""
    op = clf.operating_point
    if op is None:
        return "Decision rule: the most probable class (this run has no operating threshold)."
    positive = clf.class_names[1]
    return (
        f"Operating threshold: **{positive}** when P({positive}) ≥ {op.threshold:.7g}. Chosen on the run's "
        f"validation split (Youden's J), where it gave sensitivity {_num(op.val_sensitivity)} and "
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


def decision_md(clf: Classifier, probs: np.ndarray, explained: int | None = None) -> str:
    """Markdown: the decided class for probabilities (num_classes,), the rule, and what the heatmap shows."""
    decided = clf.decide(probs)
    op = clf.operating_point
    if op is None:
        head = f"**Decision: {clf.class_names[decided]}** (the most probable class, p = {probs[decided]:.4f})"
    else:
        p1 = float(probs[1])
        head = (
            f"**Decision at the operating threshold: {clf.class_names[decided]}** "
            f"(P({clf.class_names[1]}) = {format_probability(p1)} {'≥' if decided == 1 else '<'} {op.threshold:.7g})"
        )
    lines = [head, "", threshold_md(clf)]
    if explained is not None:
        lines += [
            "",
            f"Heatmap: where the image speaks for *{clf.class_names[explained]}* (Grad-CAM on the patch tokens "
            "of the last block; no colour means no positive evidence).",
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
        f"- input: {run['image_size']} px, {run['num_channels']} channel(s), same preprocessing as training",
        f"- probabilities: {calibration_md(clf)}",
        f"- decision: {threshold_md(clf)}",
    ]
    return "\n".join(model) + "\n\n" + _privacy_md(clf.privacy, clf.audit) + "\n\n" + _metrics_md(clf.summary)


def _probs_dict(clf: Classifier, probs: np.ndarray) -> dict[str, float]:
    return {name: float(p) for name, p in zip(clf.class_names, probs, strict=True)}


def build_demo(classifiers: Sequence[Classifier], *, output_ttl_s: int = OUTPUT_TTL_S) -> gr.Blocks:
    """The demo for one classifier, or several side by side on the same image.

    Uploads go to this process's private cache (`peft_deer.demo.uploads`) and are deleted when their request is
    done; returned images and CSVs are deleted after `output_ttl_s` seconds, everything on `close`.
    """
    if not classifiers:
        raise ValueError("at least one classifier is needed")
    uploads.cache_dir()  # before the Blocks: Gradio reads GRADIO_TEMP_DIR when one is created
    first = classifiers[0]
    titles = [first.name] if len(classifiers) == 1 else [f"{chr(65 + i)}: {c.name}" for i, c in enumerate(classifiers)]
    several = len(classifiers) > 1

    # The run's public files (examples, curves): Gradio caches them once and reuses them for every click.
    public = {uploads.digest(p) for c in classifiers for p in [*(e.path for e in c.examples), c.curves] if p}

    def read(path: str | None) -> np.ndarray:
        if path is None:
            raise gr.Error(NO_IMAGE, title="No image", print_exception=False)
        try:
            return decode(path)
        except UnreadableFile as exc:
            raise gr.Error(f"{BAD_IMAGE}: {exc}", title="Unreadable file", print_exception=False) from exc

    def returned(image: Image.Image, name: str) -> str:  # written where the sweeper deletes it after the TTL
        path = uploads.new_output(name, output_ttl_s)
        image.save(path, format="PNG")
        return str(path)

    def predict(path: str | None) -> Any:
        try:
            pixels = read(path)
            results = tuple(_probs_dict(c, c.probabilities(pixels)[0]) for c in classifiers)
        finally:
            uploads.forget([path], public)
        return results if several else results[0]

    def explain(path: str | None) -> Any:
        try:
            pixels = read(path)
            images = tuple(returned(c.explain_overlay(pixels), "overlay.png") for c in classifiers)
        finally:
            uploads.forget([path], public)
        return images if several else images[0]

    def classify(path: str | None) -> tuple[Any, ...]:
        try:
            pixels = read(path)
            labels, decisions, overlays = [], [], []
            for clf in classifiers:
                probs = clf.probabilities(pixels)[0]
                cam, explained = clf.explain(pixels, clf.decide(probs))
                labels.append(_probs_dict(clf, probs))
                decisions.append(decision_md(clf, probs, explained))
                overlays.append(returned(overlay(pixels, cam), "overlay.png"))
        finally:
            uploads.forget([path], public)
        return (returned(Image.fromarray(pixels), "input.png"), *labels, *decisions, *overlays)

    def batch(paths: list[str] | None) -> tuple[list[list[Any]], str]:
        try:
            if not paths:
                raise gr.Error(NO_FILES, title="No files", print_exception=False)
            rows = classify_uploads(classifiers, read_uploads(paths))
        finally:
            uploads.forget(paths or [], public)
        csv_path = uploads.new_output("predictions.csv", output_ttl_s)
        csv_path.write_text(to_csv(columns(classifiers), rows))
        return rows, str(csv_path)

    with gr.Blocks(title="peft_deer demo") as demo:
        gr.Markdown(
            f"# DEeR federated LoRA: {first.run.get('dataset', 'image classification')}\n"
            f"Upload an image or a DICOM file ({ACCEPTED}; any size, gray or RGB), or click an example from "
            "the run's test split. Uploads are deleted as soon as they are classified. "
            "Research demo, not a medical device."
        )
        with gr.Tab("One image"):
            with gr.Row():
                with gr.Column(scale=1, min_width=240):
                    file_in = gr.File(label=f"Image or DICOM ({ACCEPTED})", type="filepath", elem_id="upload")
                    button = gr.Button("Classify", variant="primary", elem_id="classify")
                    shown = gr.Image(
                        label="Input as the model reads it", interactive=False, height=240,
                        elem_classes="pixelated", format="png",
                    )  # fmt: skip
                out_labels, out_decisions, out_overlays = [], [], []
                for clf, title in zip(classifiers, titles, strict=True):
                    with gr.Column(scale=2 if not several else 1):
                        out_labels.append(
                            gr.Label(
                                num_top_classes=min(5, len(clf.class_names)),
                                label=f"{title}: probabilities",
                                show_heading=False,  # the decision below is the headline, not the argmax
                            )
                        )
                        out_decisions.append(gr.Markdown(threshold_md(clf), elem_classes="decision"))
                        out_overlays.append(
                            gr.Image(
                                label=f"{title}: where the model looked",
                                interactive=False,
                                height=320,
                                format="png",
                                elem_classes="pixelated",
                            )  # fmt: skip
                        )
            ui_outputs = [shown, *out_labels, *out_decisions, *out_overlays]
            if first.examples:
                gr.Examples(
                    examples=[[str(e.path)] for e in first.examples],
                    example_labels=[f"{e.class_name} ({e.path.name})" for e in first.examples],
                    inputs=file_in,
                    outputs=ui_outputs,
                    fn=classify,
                    run_on_click=True,
                    cache_examples=False,
                    label="Examples from the run's test split (click to classify)",
                    api_visibility="private",
                )
        with gr.Tab("Batch"):
            gr.Markdown(
                "Several files, or a zip of them: one row per image with the most probable class, its probability "
                f"and the decision at the operating threshold. {threshold_md(first)}"
            )
            files_in = gr.File(label="Images, DICOM files or zips", file_count="multiple", type="filepath")
            batch_button = gr.Button("Classify all", variant="primary")
            table = gr.Dataframe(headers=columns(classifiers), interactive=False, wrap=True, label="Predictions")
            csv_out = gr.File(label="Download CSV", interactive=False)
        gr.Markdown("## What you need to know to trust it")
        with gr.Row():
            for clf, title in zip(classifiers, titles, strict=True):
                with gr.Column():
                    gr.Markdown(describe(clf, title))
                    if clf.curves is not None:
                        gr.Image(str(clf.curves), label="validation accuracy and ε per round", interactive=False)
        button.click(classify, inputs=file_in, outputs=ui_outputs, api_visibility="private")
        batch_button.click(batch, inputs=files_in, outputs=[table, csv_out], api_name="batch")
        # API-only endpoints (hidden buttons): the same work as the page, fewer outputs.
        api_predict, api_explain = gr.Button(visible=False), gr.Button(visible=False)
        api_predict.click(predict, inputs=file_in, outputs=out_labels, api_name="predict")
        api_explain.click(explain, inputs=file_in, outputs=out_overlays, api_name="explain")
    return demo


def launch(
    demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = 7860, *, prevent_thread_lock: bool = False
) -> None:
    """Serve locally: no share link, no analytics, system fonts only."""
    demo.launch(
        server_name=host,
        server_port=port,
        share=False,
        ssr_mode=False,
        show_error=False,
        prevent_thread_lock=prevent_thread_lock,
        theme=THEME,
        css=CSS,
        footer_links=["api", "settings"],
        max_file_size="256mb",
    )


def close(demo: gr.Blocks) -> None:
    """Stop serving and delete the private cache with whatever is left in it."""
    demo.close()
    uploads.remove()
