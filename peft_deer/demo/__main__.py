"""``python -m app`` / ``deer-app``: serve a finished run's adapter as a local Gradio demo."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from .run import AdapterError, check_adapter_dir, resolve_base

DESCRIPTION = """\
Serve the aggregated adapter of a finished deer-fed run as a local Gradio demo: upload an
image or a DICOM file, get class probabilities, the decision at the run's validation-chosen
operating threshold and a heatmap of where the model looked; classify a batch of files (or a
zip) into a table and a CSV; and see the base model, method, privacy guarantee (privacy.json),
test metrics (summary.json) and training curves (curves.png) of the run. The adapter
(DEER_LORA or the plain LoRA export) is merged onto the base model named in its
adapter_config.json. API endpoints: /predict, /explain, /batch. Uploads are kept in a private
temporary directory only until their request is done; it is removed when the server stops.
Runs offline, without a share link; binds to 127.0.0.1 unless --host says otherwise."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deer-app", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--adapter",
        required=True,
        metavar="DIR",
        help="adapter directory of a run: RUN_DIR/adapter, RUN_DIR/adapter-best or RUN_DIR/adapter-lora",
    )
    parser.add_argument(
        "--compare",
        metavar="DIR",
        default=None,
        help="a second adapter directory, shown side by side on the same image",
    )
    parser.add_argument(
        "--base-model",
        metavar="NAME_OR_DIR",
        default=None,
        help="load this base model instead of the adapter config's base_model_name_or_path",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="torch device for inference (default: %(default)s)")
    return parser


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Load the adapter(s), build the demo and serve it until interrupted; exit code 1 on bad input."""
    args = build_parser().parse_args(argv)
    adapters = [Path(a).expanduser().resolve() for a in (args.adapter, args.compare) if a]
    try:
        for adapter in adapters:  # cheap checks first: fail before importing torch and gradio
            resolve_base(check_adapter_dir(adapter)[0], adapter, args.base_model)
        from transformers.utils import logging as hf_logging

        from .predict import load_classifier

        hf_logging.disable_progress_bar()
        classifiers = [load_classifier(adapter, args.base_model, args.device) for adapter in adapters]
    except AdapterError as exc:
        print(f"deer-app: error: {exc}", file=sys.stderr)
        return 1
    from . import uploads
    from .ui import build_demo, launch

    # SIGTERM stops the server like Ctrl-C, so that the private upload cache is removed.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        launch(build_demo(classifiers), args.host, args.port)
    except OSError as exc:
        print(f"deer-app: error: cannot serve on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    finally:
        uploads.remove()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
