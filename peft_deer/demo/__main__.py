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
temporary directory and deleted 120 s after they arrive, classified or not; it is removed when the
server stops. Inputs unlike the training images (tiny, blank, or far from the validation images'
features: RUN_DIR/ood.npz, or calibrated at start with --data-dir) get no class. Runs offline,
without a share link; binds to 127.0.0.1 unless --host says otherwise: any other address needs
--auth USER:PASSWORD or --no-auth-i-understand."""

LOOPBACK = ("127.0.0.1", "localhost", "::1")


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
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        default=None,
        help="where the run's dataset is: calibrate the OOD guard on its validation split when the run has no ood.npz",
    )
    parser.add_argument("--auth", metavar="USER:PASSWORD", default=None, help="ask for this login (any --host)")
    parser.add_argument(
        "--no-auth-i-understand",
        action="store_true",
        help="serve on a non-loopback --host without a login: anyone who can reach the port can upload images",
    )
    return parser


def check_exposure(host: str, auth: str | None, no_auth: bool) -> tuple[str, str] | None:
    """The (user, password) to ask for; ValueError (one line) for a non-loopback host with neither --auth nor
    --no-auth-i-understand, or a malformed --auth. Prints a warning for any non-loopback host."""
    login = None
    if auth is not None:
        user, sep, password = auth.partition(":")
        if not sep or not user or not password:
            raise ValueError("--auth must be USER:PASSWORD, both non-empty")
        login = (user, password)
    if host not in LOOPBACK:
        if login is None and not no_auth:
            raise ValueError(
                f"--host {host} serves beyond this machine: pass --auth USER:PASSWORD, or --no-auth-i-understand "
                "to serve without a login"
            )
        print(
            f"deer-app: warning: serving on {host}, reachable from other machines"
            + ("" if login else " WITHOUT a login: anyone who reaches the port can upload images"),
            file=sys.stderr,
        )
    return login


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Load the adapter(s), build the demo and serve it until interrupted; exit code 1 on bad input."""
    args = build_parser().parse_args(argv)
    adapters = [Path(a).expanduser().resolve() for a in (args.adapter, args.compare) if a]
    try:
        login = check_exposure(args.host, args.auth, args.no_auth_i_understand)
    except ValueError as exc:
        print(f"deer-app: error: {exc}", file=sys.stderr)
        return 2
    try:
        for adapter in adapters:  # cheap checks first: fail before importing torch and gradio
            resolve_base(check_adapter_dir(adapter)[0], adapter, args.base_model)
        from transformers.utils import logging as hf_logging

        from .predict import calibrate_ood, load_classifier

        hf_logging.disable_progress_bar()
        classifiers = [load_classifier(adapter, args.base_model, args.device) for adapter in adapters]
        for clf in classifiers:
            if clf.ood is None and args.data_dir:
                calibrate_ood(clf, args.data_dir)
            print(f"deer-app: {clf.name}: {clf.ood_note}", file=sys.stderr)
    except AdapterError as exc:
        print(f"deer-app: error: {exc}", file=sys.stderr)
        return 1
    from . import uploads
    from .ui import build_demo, launch

    # SIGTERM stops the server like Ctrl-C, so that the private upload cache is removed.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        launch(build_demo(classifiers), args.host, args.port, auth=login)
    except OSError as exc:
        print(f"deer-app: error: cannot serve on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    finally:
        uploads.remove()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
