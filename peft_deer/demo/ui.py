"""The Gradio Blocks of the demo: one image or DICOM in -> class probabilities, the decision at the
run's operating threshold and where the model looked; a batch of files in -> a table and a CSV; and
the run's guarantees.

API endpoints: ``/predict`` (file -> the decision as the label, with the class probabilities; "unlike the
training images" and no probabilities for an input the OOD checks refuse), ``/explain`` (file -> overlay
image), ``/batch`` (files or zips -> table, CSV). Page and API decide by the same rule (`Classifier.decide`).
Each request reads its uploads into memory when it starts and never deletes them (identical uploads share
one path); the janitor in `uploads` does, by age.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Any

import gradio as gr
import numpy as np
from gradio.components.label import LabelConfidence, LabelData
from PIL import Image

from peft_deer.demo.explain import overlay

from . import uploads
from .batch import UNLIKE, classify_uploads, columns, to_csv
from .decode import ACCEPTED, UnreadableFile, Upload, decode, expand
from .limits import MAX_FILE_BYTES, OverBudget, check_request
from .panel import decision_md, describe, format_probability, resized_md, safe, threshold_md, unusual_md
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
    "safe",
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
def answer(clf: Classifier, probs: np.ndarray, reason: str | None) -> dict[str, Any]:
    """A Label's value, sent as it is (no postprocess, which would make the argmax the label): the decision as
    the label with the probabilities (3 decimals); "unlike the training images", no probabilities, when the
    input was refused."""
    if reason:
        return LabelData(label=UNLIKE).model_dump()
    order = np.argsort(-probs)
    confidences = [LabelConfidence(label=clf.class_names[i], confidence=round(float(probs[i]), 3)) for i in order]
    return LabelData(label=clf.class_names[clf.decide(probs)], confidences=confidences).model_dump()


def _page_probs(clf: Classifier, probs: np.ndarray, reason: str | None) -> dict[str, float]:
    """The page's probability bars (3 decimals; none for a refused input): the decision is the headline."""
    return {} if reason else {n: round(float(p), 3) for n, p in zip(clf.class_names, probs, strict=True)}


def build_demo(
    classifiers: Sequence[Classifier],
    *,
    output_ttl_s: int = OUTPUT_TTL_S,
    upload_ttl_s: float = uploads.UPLOAD_TTL_S,
) -> gr.Blocks:
    """The demo for one classifier, or several side by side on the same image.

    Uploads go to this process's private cache (`peft_deer.demo.uploads`): each request reads its uploads into
    memory when it starts, and every upload is deleted `upload_ttl_s` seconds after it arrived (classified or
    not); returned images and CSVs are deleted after `output_ttl_s` seconds, everything on `close`.
    """
    if not classifiers:
        raise ValueError("at least one classifier is needed")
    uploads.cache_dir()  # before the Blocks: Gradio reads GRADIO_TEMP_DIR when one is created
    first = classifiers[0]
    titles = [first.name] if len(classifiers) == 1 else [f"{chr(65 + i)}: {c.name}" for i, c in enumerate(classifiers)]
    several = len(classifiers) > 1

    # The run's public files (examples, curves): Gradio caches them once and reuses them for every click.
    uploads.set_public([p for c in classifiers for p in [*(e.path for e in c.examples), c.curves]], upload_ttl_s)
    truth = {uploads.digest(e.path): e.class_name for e in first.examples}

    def read(path: str | None) -> tuple[np.ndarray, str | None]:
        """(pixels, true label if the bytes are one of the run's examples) of the upload at `path`."""
        if path is None:
            raise gr.Error(NO_IMAGE, title="No image", print_exception=False)
        try:
            data = uploads.read(path, MAX_FILE_BYTES)  # at once: the janitor may delete the file any time after
            pixels = decode(data, os.path.basename(path))
        except (UnreadableFile, uploads.UploadGone) as exc:
            message = safe(f"{BAD_IMAGE}: {exc}", markdown=False)
            raise gr.Error(message, title="Unreadable file", print_exception=False) from None
        return pixels, truth.get(hashlib.sha256(data).hexdigest())

    def returned(image: Image.Image, name: str) -> str:  # written where the sweeper deletes it after the TTL
        path = uploads.new_output(name, output_ttl_s)
        image.save(path, format="PNG")
        return str(path)

    def predict(path: str | None) -> Any:
        pixels, _ = read(path)
        results = []
        for clf in classifiers:
            probs, reasons = clf.assess([pixels])
            results.append(answer(clf, probs[0], reasons[0]))
        return tuple(results) if several else results[0]

    def explain(path: str | None) -> Any:
        pixels, _ = read(path)
        images = tuple(returned(c.explain_overlay(pixels), "overlay.png") for c in classifiers)
        return images if several else images[0]

    def classify(path: str | None) -> tuple[Any, ...]:
        pixels, true_label = read(path)
        labels, decisions, overlays = [], [], []
        for clf in classifiers:
            probs, reasons = clf.assess([pixels])
            cam, explained = clf.explain(pixels, clf.decide(probs[0]))
            labels.append(_page_probs(clf, probs[0], reasons[0]))
            if reasons[0]:
                decisions.append(unusual_md(clf, reasons[0]) + "\n\n" + resized_md(clf, pixels))
            else:
                decisions.append(decision_md(clf, probs[0], explained, pixels=pixels, true_label=true_label))
            overlays.append(returned(overlay(pixels, cam), "overlay.png"))
        return (returned(Image.fromarray(pixels), "input.png"), *labels, *decisions, *overlays)

    def load(path: str) -> Upload:
        name = os.path.basename(path)
        try:
            data = uploads.read(path, MAX_FILE_BYTES)
        except uploads.UploadGone as exc:
            return Upload(name, None, str(exc))
        except OSError as exc:
            return Upload(name, None, f"cannot read the file ({exc.__class__.__name__})")
        return Upload(name, data) if len(data) <= MAX_FILE_BYTES else Upload(name, None, "larger than the limit")

    def batch(paths: list[str] | None) -> tuple[list[list[Any]], str]:
        if not paths:
            raise gr.Error(NO_FILES, title="No files", print_exception=False)
        try:
            check_request(paths)  # sizes and zip directories only, before anything is read or decoded
        except OverBudget as exc:
            raise gr.Error(safe(str(exc), markdown=False), title="Too much at once", print_exception=False) from None
        files = [load(p) for p in paths]  # into memory at once: the janitor may delete the files any time after
        rows = classify_uploads(classifiers, expand(files))
        csv_path = uploads.new_output("predictions.csv", output_ttl_s)
        csv_path.write_text(to_csv(columns(classifiers), rows))
        return rows, str(csv_path)

    with gr.Blocks(title="peft_deer demo") as demo:
        gr.Markdown(
            f"# DEeR federated LoRA: {first.run.get('dataset', 'image classification')}\n"
            f"Upload an image or a DICOM file ({ACCEPTED}; any size, gray or RGB), or click an example from "
            f"the run's test split. {resized_md(first)} Uploads are deleted {upload_ttl_s:g} s after they "
            "arrive, classified or not. Research demo, not a medical device."
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
                    example_labels=[f"true label: {e.class_name} ({e.path.name})" for e in first.examples],
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
            table = gr.Dataframe(
                headers=columns(classifiers), datatype="str", interactive=False, wrap=True, label="Predictions"
            )  # cells are text, never HTML
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
        # postprocess=False: the label sent is the decision (`answer`), not the argmax Label would make it
        api_predict.click(predict, inputs=file_in, outputs=out_labels, api_name="predict", postprocess=False)
        api_explain.click(explain, inputs=file_in, outputs=out_overlays, api_name="explain")
    return demo


def launch(
    demo: gr.Blocks,
    host: str = "127.0.0.1",
    port: int | None = 7860,
    *,
    prevent_thread_lock: bool = False,
    auth: tuple[str, str] | None = None,
) -> None:
    """Serve: no share link, no analytics, system fonts only; `auth` (user, password) asks for a login."""
    demo.launch(
        auth=auth,
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
