"""The Gradio Blocks of the demo: image in, class probabilities out, and the run's guarantees."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gradio as gr

from .predict import Classifier, to_image

__all__ = ["BAD_IMAGE", "NO_IMAGE", "THEME", "image_input", "build_demo", "describe", "launch"]

# System fonts only: the default themes fetch web fonts, the demo must work offline.
THEME = gr.themes.Default(
    font=["ui-sans-serif", "system-ui", "Segoe UI", "Roboto", "Helvetica", "Arial", "sans-serif"],
    font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"],
)
NO_IMAGE = "No image: upload or paste an image first, or click one of the examples."
BAD_IMAGE = "Could not read the upload as an image (corrupt or unsupported file). Use a PNG, JPEG, BMP or TIFF image."
# Small scans (MedMNIST is 28 px) are shown enlarged, pixels kept sharp.
CSS = "#input-image img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }"
METRICS = (("accuracy", "accuracy"), ("auc", "AUC"), ("balanced_accuracy", "balanced accuracy"),
           ("sensitivity", "sensitivity"), ("specificity", "specificity"), ("f1_macro", "macro F1"),
           ("precision_macro", "macro precision"), ("recall_macro", "macro recall"),
           ("threshold", "threshold"))  # fmt: skip


def image_input(**kwargs: Any) -> gr.Image:
    """A `gr.Image` whose decoding errors become a clear `gr.Error` instead of a server traceback.

    The instance's preprocess is wrapped (subclassing a Gradio component writes a .pyi stub).
    """
    image = gr.Image(**kwargs)
    decode = image.preprocess

    def preprocess(payload: Any) -> Any:
        try:
            return decode(payload)
        except Exception as exc:  # noqa: BLE001 - any decoding failure of an upload is a user error
            raise gr.Error(BAD_IMAGE, title="Unreadable image", print_exception=False) from exc

    image.preprocess = preprocess  # type: ignore[method-assign]
    return image


def _num(value: Any, fmt: str = ".3f") -> str:
    return format(value, fmt) if isinstance(value, int | float) else "n/a"


def _privacy_md(privacy: dict[str, Any] | None) -> str:
    if not privacy:
        return "**Privacy: unknown.** `privacy.json` was not found next to the adapter: no guarantee can be shown."
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
    if privacy.get("reproducible_noise"):
        return (
            f"**Privacy: NO guarantee.** The run's DP noise was derived from its public seed "
            f"(`--reproducible-noise`, for tests and debugging): anyone with the seed can remove it. The ledger's "
            f"ε = {_num(eps, '.3g')}, δ = {_num(delta, 'g')} would hold only for secret noise."
        )
    lines = [
        f"**Privacy: {level}-level (ε, δ)-DP with ε = {_num(eps, '.3g')}, δ = {_num(delta, 'g')}** — "
        f"the released adapter is almost equally likely whether or not {unit} took part.",
        f"- mechanism: {privacy.get('mechanism', 'n/a')}",
        f"- trust model: {privacy.get('trust_model', 'n/a')}",
    ]
    if privacy.get("neighbouring_relation"):
        lines.append(f"- neighbouring datasets: {privacy['neighbouring_relation']}")
    if privacy.get("epsilon_semantics") == "running tally":
        lines.append("- ε is a running tally of the releases made (reproduction of the published mechanism)")
    if privacy.get("accountant"):
        lines.append(f"- accountant: {privacy['accountant']}")
    if privacy.get("noise_multiplier") is not None:
        lines.append(
            f"- noise multiplier σ = {_num(privacy['noise_multiplier'], '.4g')}, clip norm "
            f"{_num(privacy.get('clip_norm'), 'g')}, {privacy.get('releases', 'n/a')} releases, "
            f"{privacy.get('num_clients', 'n/a')} clients ({privacy.get('sampling', 'n/a')})"
        )
    return "\n".join(lines)


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


def describe(clf: Classifier, title: str | None = None) -> str:
    """Markdown: what a user must know to trust the classifier (model, method, privacy, metrics)."""
    run, summary = clf.run, clf.summary or {}
    model = [
        f"### {title or clf.name}",
        f"- base model: {run.get('base_description', 'n/a')} (`{run.get('model', clf.base_model)}`)",
        f"- method: {run.get('method', 'n/a')}, LoRA rank {summary.get('rank', 'n/a')}, "
        f"{summary.get('num_clients', 'n/a')} clients, {summary.get('partition', 'n/a')} partition, "
        f"{summary.get('rounds_completed', 'n/a')} rounds",
        f"- dataset: {run.get('dataset', 'n/a')}; classes: {', '.join(clf.class_names)}",
        f"- input: {run['image_size']} px, {run['num_channels']} channel(s), same preprocessing as training",
    ]
    if run.get("decision_threshold") is not None and len(clf.class_names) == 2:
        model.append(
            f"- decision: {clf.class_names[1]} when its probability ≥ {_num(run['decision_threshold'], '.7g')} "
            "(chosen on "
            f"the validation split: sensitivity {_num(run.get('val_sensitivity'))}, specificity "
            f"{_num(run.get('val_specificity'))})"
        )
    return "\n".join(model) + "\n\n" + _privacy_md(clf.privacy) + "\n\n" + _metrics_md(clf.summary)


def build_demo(classifiers: Sequence[Classifier]) -> gr.Blocks:
    """The demo for one classifier, or several side by side on the same image."""
    if not classifiers:
        raise ValueError("at least one classifier is needed")
    first = classifiers[0]
    titles = [first.name] if len(classifiers) == 1 else [f"{chr(65 + i)}: {c.name}" for i, c in enumerate(classifiers)]

    def classify(image: Any) -> dict[str, float] | tuple[dict[str, float], ...]:
        if image is None:
            raise gr.Error(NO_IMAGE, title="No image", print_exception=False)
        try:
            img = to_image(image)
            results = tuple(clf.predict(img) for clf in classifiers)
        except (ValueError, RuntimeError) as exc:
            raise gr.Error(BAD_IMAGE, title="Unreadable image", print_exception=False) from exc
        return results[0] if len(results) == 1 else results

    with gr.Blocks(title="peft_deer demo") as demo:
        gr.Markdown(
            f"# DEeR federated LoRA: {first.run.get('dataset', 'image classification')}\n"
            "Upload or paste a grayscale or RGB image (any size), or click an example from the run's test split. "
            "Research demo, not a medical device."
        )
        with gr.Row():
            with gr.Column(scale=1):
                image = image_input(
                    type="pil",
                    image_mode=None,
                    format="png",
                    sources=["upload", "clipboard"],
                    label="Image",
                    height=300,
                    elem_id="input-image",
                )
                button = gr.Button("Classify", variant="primary")
            labels = [
                gr.Label(num_top_classes=min(5, len(c.class_names)), label=f"{t} (class probabilities)", scale=1)
                for c, t in zip(classifiers, titles, strict=True)
            ]
        if first.examples:
            gr.Examples(
                examples=[[str(e.path)] for e in first.examples],
                example_labels=[f"{e.class_name} ({e.path.name})" for e in first.examples],
                inputs=image,
                outputs=labels,
                fn=classify,
                run_on_click=True,
                cache_examples=False,
                label="Examples from the run's test split (click to classify)",
            )
        gr.Markdown("## What you need to know to trust it")
        with gr.Row():
            for clf, title in zip(classifiers, titles, strict=True):
                with gr.Column():
                    gr.Markdown(describe(clf, title))
                    if clf.curves is not None:
                        gr.Image(str(clf.curves), label="validation accuracy and ε per round", interactive=False)
        button.click(classify, inputs=image, outputs=labels, api_name="predict")
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
    )
