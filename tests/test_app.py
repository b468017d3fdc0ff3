"""The Gradio demo (app/): prediction on real MedMNIST images with a tiny trained run, the served
app through gradio_client, and bad inputs (corrupt/empty image, broken or foreign adapters)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import MEDMNIST_DIR, ROOT, tiny_vit
from PIL import Image

from app.__main__ import main as app_main
from app.predict import AdapterError, Classifier, load_classifier
from app.ui import build_demo, describe, launch
from peft_deer.data import load_dataset_spec
from peft_deer.evaluation import classification_metrics

DATASET = "medmnist:pneumoniamnist"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny-vit run with client-level DP (one round, 200 training images)."""
    if not (MEDMNIST_DIR / "pneumoniamnist.npz").is_file():
        pytest.skip(f"real MedMNIST files not found at {MEDMNIST_DIR}")
    from train.fed import main as fed_main

    out = tmp_path_factory.mktemp("run")
    argv = ["--model", "tiny-vit", "--dataset", DATASET, "--data-dir", str(MEDMNIST_DIR), "--train-subset", "200",
            "--rounds", "1", "--num-clients", "2", "--dp", "client", "--epsilon", "5", "--delta", "1e-3",
            "--output-dir", str(out), "--overwrite"]  # fmt: skip
    assert fed_main(argv) == 0
    return out


@pytest.fixture(scope="module")
def clf(run_dir: Path) -> Classifier:
    return load_classifier(run_dir / "adapter")


@pytest.fixture(scope="module")
def test_split(run_dir: Path):
    return load_dataset_spec(DATASET, data_dir=MEDMNIST_DIR, seed=0).test


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(clf: Classifier) -> Iterator[str]:
    """The single-adapter demo on a free localhost port; always closed."""
    demo = build_demo([clf])
    port = _free_port()
    launch(demo, port=port, prevent_thread_lock=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


def _probs(label: dict) -> dict[str, float]:
    return {c["label"]: c["confidence"] for c in label["confidences"]}


# ------------------------------------------------------------------------------------------------
# prediction


def test_predictions_reproduce_the_runs_test_metrics(run_dir: Path, clf: Classifier, test_split) -> None:
    """Merged adapter + app preprocessing give the run's own test metrics on the real test split."""
    summary = json.loads((run_dir / "summary.json").read_text())
    probs = clf.probabilities(test_split.images)
    assert probs.shape == (len(test_split), 2)
    metrics = classification_metrics(test_split.labels, probs)
    for key in ("accuracy", "auc", "f1_macro"):
        assert metrics[key] == pytest.approx(summary["test"]["final"][key], abs=1e-6)
    lora = load_classifier(run_dir / "adapter-lora")  # the plain LORA export serves the same model
    np.testing.assert_allclose(lora.probabilities(test_split.images[:64]), probs[:64], atol=1e-5)


def test_predict_gray_rgb_any_size(clf: Classifier, test_split) -> None:
    gray = test_split.images[0][..., 0]
    expected = clf.predict(Image.fromarray(gray))
    assert list(expected) == ["normal", "pneumonia"]
    assert sum(expected.values()) == pytest.approx(1.0)
    rgb = Image.fromarray(np.repeat(gray[..., None], 3, axis=-1))  # gray -> RGB -> mean is the same image
    assert clf.predict(rgb) == pytest.approx(expected, abs=1e-6)
    assert clf.predict(gray) == pytest.approx(expected, abs=1e-6)
    for image in (rgb.resize((301, 157)), Image.fromarray(gray.astype(np.uint16) * 257), rgb.convert("RGBA")):
        assert sum(clf.predict(image).values()) == pytest.approx(1.0)


def test_panel_shows_what_users_must_know(clf: Classifier) -> None:
    md = describe(clf)
    for text in ("tiny random ViT", "method: deer", "client-level (ε, δ)-DP", "ε = ", "δ = 0.001", "mechanism:",
                 "trust model: central", "accuracy", "AUC", "| final |", "balanced accuracy", "sensitivity",
                 "specificity", "pneumonia when its probability ≥ "):  # fmt: skip
        assert text in md, text
    assert clf.curves is not None and clf.curves.is_file()
    assert len(clf.examples) == 4 and {e.class_name for e in clf.examples} == {"normal", "pneumonia"}


def test_panel_without_dp_or_run_files(clf: Classifier) -> None:
    no_dp = Classifier(clf.model, clf.adapter_dir, clf.run, clf.base_model, privacy={"level": "none"})
    assert "Privacy: none" in describe(no_dp) and "Test metrics: unknown" in describe(no_dp)
    unknown = Classifier(clf.model, clf.adapter_dir, clf.run, clf.base_model)
    assert "Privacy: unknown" in describe(unknown)
    # A run whose noise came from the public seed claims nothing, whatever its ledger's epsilon.
    public = {**clf.privacy, "reproducible_noise": True}
    md = describe(Classifier(clf.model, clf.adapter_dir, clf.run, clf.base_model, privacy=public))
    assert "Privacy: NO guarantee" in md and "(ε, δ)-DP with" not in md
    assert "neighbouring datasets: add/remove one client" in describe(clf)


# ------------------------------------------------------------------------------------------------
# the served app


def test_served_app_predicts_and_survives_bad_input(served: str, clf: Classifier, tmp_path: Path) -> None:
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(served, verbose=False)
    assert "/predict" in client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    example = clf.examples[-1]
    label = client.predict(handle_file(str(example.path)), api_name="/predict")
    probs = _probs(label)
    assert set(probs) == {"normal", "pneumonia"} and sum(probs.values()) == pytest.approx(1.0, abs=1e-6)
    assert probs == pytest.approx(clf.predict(example.path), abs=1e-6)

    corrupt = tmp_path / "scan.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    for bad in (corrupt, text):
        with pytest.raises(AppError, match="Could not read the upload as an image"):
            client.predict(handle_file(str(bad)), api_name="/predict")
    with pytest.raises(AppError, match="No image"):
        client.predict(None, api_name="/predict")
    # still serving
    assert _probs(client.predict(handle_file(str(example.path)), api_name="/predict")) == pytest.approx(probs)


def test_served_page_is_offline_and_local(served: str) -> None:
    assert served.startswith("http://127.0.0.1:")
    page = urllib.request.urlopen(served, timeout=10).read().decode()
    css = urllib.request.urlopen(served + "theme.css", timeout=10).read().decode()
    config = json.loads(urllib.request.urlopen(served + "config", timeout=10).read())
    assert "fonts.googleapis.com" not in page + css
    assert not config["stylesheets"] and not config["analytics_enabled"]


def test_compare_mode_side_by_side(run_dir: Path, clf: Classifier) -> None:
    from gradio_client import Client, handle_file

    demo = build_demo([clf, load_classifier(run_dir / "adapter-best")])
    port = _free_port()
    launch(demo, port=port, prevent_thread_lock=True)
    try:
        a, b = Client(f"http://127.0.0.1:{port}/", verbose=False).predict(
            handle_file(str(clf.examples[0].path)), api_name="/predict"
        )
    finally:
        demo.close()
    for label in (a, b):
        assert sum(_probs(label).values()) == pytest.approx(1.0, abs=1e-6)


# ------------------------------------------------------------------------------------------------
# bad adapters: a clear one-line error, exit code != 0


def _copy_adapter(run_dir: Path, dest: Path) -> Path:
    """An adapter outside its run directory (so RUN_DIR/base-model is not next to it)."""
    shutil.copytree(run_dir / "adapter", dest)
    return dest


def _set_base(adapter: Path, base: str) -> None:
    cfg_path = adapter / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = base
    cfg_path.write_text(json.dumps(cfg))


def test_bad_adapters_fail_with_a_clear_message(run_dir: Path, tmp_path: Path, capsys) -> None:
    missing_weights = _copy_adapter(run_dir, tmp_path / "missing" / "adapter")
    (missing_weights / "adapter_model.safetensors").unlink()
    other_base = _copy_adapter(run_dir, tmp_path / "other" / "adapter")
    tiny_vit(hidden=64).save_pretrained(tmp_path / "vit64")  # same family, other width
    _set_base(other_base, str(tmp_path / "vit64"))
    gone_base = _copy_adapter(run_dir, tmp_path / "gone" / "adapter")
    _set_base(gone_base, str(tmp_path / "no-such-base"))
    cases = {
        tmp_path / "nowhere": "adapter directory not found",
        missing_weights: "missing adapter_model.safetensors",
        other_base: "belongs to another base model",
        gone_base: "base model directory .* not found",
    }
    for adapter, message in cases.items():
        with pytest.raises(AdapterError, match=message):
            load_classifier(adapter)
        capsys.readouterr()
        assert app_main(["--adapter", str(adapter), "--port", str(_free_port())]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("deer-app: error:") and "\n" not in err and "Traceback" not in err
    with pytest.raises(AdapterError, match="belongs to another base model"):
        load_classifier(run_dir / "adapter", base_model=str(tmp_path / "vit64"))
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()  # main() hides them for the CLI


def test_cli_exit_code_and_help() -> None:
    """The real command: one error line on stderr, exit code 1, no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "app", "--adapter", "/nonexistent/adapter"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip() == "deer-app: error: adapter directory not found: /nonexistent/adapter"
    with pytest.raises(SystemExit) as exc:
        app_main(["--help"])
    assert exc.value.code == 0
