"""The Gradio demo (peft_deer/demo, `python -m app`): prediction on real MedMNIST images with a tiny trained
run, the served app through gradio_client (/predict, /explain, /batch, DICOM), the operating threshold and trust
panel, uploads deleted after each request and on shutdown, and bad inputs (corrupt/empty image,
broken, corrupt or foreign adapters)."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import MEDMNIST_DIR, ROOT, tiny_vit
from PIL import Image

from peft_deer.data import load_dataset_spec
from peft_deer.data.intensity import to_uint8
from peft_deer.demo import uploads
from peft_deer.demo.__main__ import main as app_main
from peft_deer.demo.decode import decode
from peft_deer.demo.explain import SCALE_WIDTH
from peft_deer.demo.panel import format_threshold
from peft_deer.demo.predict import AdapterError, Classifier, load_classifier
from peft_deer.demo.ui import build_demo, close, decision_md, describe, format_probability, launch
from peft_deer.evaluation.calibration import softmax_t
from peft_deer.evaluation.metrics import classification_metrics

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
    demo = build_demo([clf], output_ttl_s=OUTPUT_TTL_S, upload_ttl_s=UPLOAD_TTL_S)
    port = _free_port()
    launch(demo, port=port, prevent_thread_lock=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        close(demo)


OUTPUT_TTL_S = 2  # returned images are swept from the private cache after this long (tests only)
UPLOAD_TTL_S = 10  # uploads are swept after this long (tests only; long enough for a queue of 50 calls)


def _probs(label: dict) -> dict[str, float]:
    return {c["label"]: c["confidence"] for c in label["confidences"]}


# ------------------------------------------------------------------------------------------------
# prediction


@pytest.mark.e2e  # the run_dir fixture's driver run, over 5 s
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


@pytest.mark.e2e  # the run_dir fixture's driver run, over 5 s
def test_probabilities_use_the_runs_temperature(run_dir: Path, clf: Classifier, test_split) -> None:
    """The demo shows softmax(logits / T) with the T in peft_deer_run.json (a run file without one: T = 1, as
    before calibration), and decides at the threshold on those probabilities: the run's test sensitivity and
    specificity come back."""
    import torch

    run = json.loads((run_dir / "adapter" / "peft_deer_run.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert clf.temperature == run["temperature"] == summary["calibration"]["final"]["temperature"] > 0
    images = test_split.images[:32]
    with torch.inference_mode():
        logits = clf.model(pixel_values=clf._inputs(images)).logits.double().numpy()
    old_run = {k: v for k, v in clf.run.items() if k != "temperature"}
    for stored, expected_t in ((clf.run, run["temperature"]), ({**clf.run, "temperature": 3.0}, 3.0), (old_run, 1.0)):
        other = Classifier(clf.model, clf.adapter_dir, stored, clf.base_model)
        expected = softmax_t(logits, expected_t)
        np.testing.assert_allclose(other.probabilities(images), expected, rtol=1e-9, atol=1e-12)
        # another batch size: float32 kernels may differ in the last bits (1e-8 seen, on main too)
        np.testing.assert_allclose(other.probabilities_of(list(images[:3])), expected[:3], rtol=1e-5, atol=1e-6)
    assert not np.allclose(softmax_t(logits, 3.0), softmax_t(logits))  # the three cases differ
    assert "softmax(logits / T) with T = " in describe(clf) and "uncalibrated, T = 1" in describe(
        Classifier(clf.model, clf.adapter_dir, old_run, clf.base_model)
    )
    probs = clf.probabilities(test_split.images)
    decisions = np.array([clf.decide(p) for p in probs])
    labels = np.asarray(test_split.labels)
    test = summary["test"]["final"]
    assert np.mean(decisions[labels == 1] == 1) == pytest.approx(test["sensitivity"], abs=1e-9)
    assert np.mean(decisions[labels == 0] == 0) == pytest.approx(test["specificity"], abs=1e-9)


@pytest.mark.e2e  # the run_dir fixture's driver run, over 5 s
def test_predict_gray_rgb_any_size(clf: Classifier, test_split) -> None:
    gray = test_split.images[0][..., 0]
    expected = clf.predict(Image.fromarray(gray))
    assert list(expected) == ["normal", "pneumonia"]
    assert sum(expected.values()) == pytest.approx(1.0)
    rgb = Image.fromarray(np.repeat(gray[..., None], 3, axis=-1))  # gray -> RGB -> mean is the same image
    assert clf.predict(rgb) == pytest.approx(expected, abs=1e-5)  # CPU kernels differ by ~2e-6 run to run under load
    assert clf.predict(gray) == pytest.approx(expected, abs=1e-5)
    for image in (rgb.resize((301, 157)), Image.fromarray(gray.astype(np.uint16) * 257), rgb.convert("RGBA")):
        assert sum(clf.predict(image).values()) == pytest.approx(1.0)


@pytest.mark.e2e  # the run_dir fixture's driver run, over 5 s
def test_panel_shows_what_users_must_know(clf: Classifier) -> None:
    md = describe(clf)
    threshold = clf.run["decision_threshold"]
    for text in ("tiny random ViT", "method: deer", "client-level (ε, δ)-DP", "ε = ", "δ = 0.001", "mechanism:",
                 "trust model: central", "accuracy", "AUC", "| final |", "balanced accuracy", "sensitivity",
                 "specificity", f"Operating threshold: **pneumonia** when P(pneumonia) ≥ {format_threshold(threshold)}",
                 "Chosen on the run's validation split (Youden's J)", "guarantee: holds",
                 "empirical audit: none recorded"):  # fmt: skip
        assert text in md, text
    assert clf.curves is not None and clf.curves.is_file()
    assert len(clf.examples) == 4 and {e.class_name for e in clf.examples} == {"normal", "pneumonia"}


@pytest.mark.e2e  # the run_dir fixture's driver run, over 5 s
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


@pytest.mark.e2e  # starts a Gradio server
def test_served_app_predicts_and_survives_bad_input(served: str, clf: Classifier, tmp_path: Path) -> None:
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(served, verbose=False)
    assert "/predict" in client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    example = clf.examples[-1]
    label = client.predict(handle_file(str(example.path)), api_name="/predict")
    probs = _probs(label)
    assert set(probs) == {"normal", "pneumonia"} and sum(probs.values()) == pytest.approx(1.0, abs=1e-6)
    assert probs == pytest.approx(clf.predict(example.path), abs=5e-4)  # rounded to 3 decimals

    corrupt = tmp_path / "scan.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    for bad in (corrupt, text):
        with pytest.raises(AppError, match="Could not read the upload as an image: not a readable image or DICOM"):
            client.predict(handle_file(str(bad)), api_name="/predict")
    with pytest.raises(AppError, match="No image"):
        client.predict(None, api_name="/predict")
    # still serving
    assert _probs(client.predict(handle_file(str(example.path)), api_name="/predict")) == pytest.approx(probs)


@pytest.mark.e2e  # starts a Gradio server
def test_served_page_is_offline_and_local(served: str) -> None:
    assert served.startswith("http://127.0.0.1:")
    page = urllib.request.urlopen(served, timeout=10).read().decode()
    css = urllib.request.urlopen(served + "theme.css", timeout=10).read().decode()
    config = json.loads(urllib.request.urlopen(served + "config", timeout=10).read())
    assert "fonts.googleapis.com" not in page + css
    assert not config["stylesheets"] and not config["analytics_enabled"]


@pytest.mark.e2e  # the run_dir fixture's driver run, over 5 s
def test_compare_mode_side_by_side(run_dir: Path, clf: Classifier) -> None:
    from gradio_client import Client, handle_file

    demo = build_demo(
        [clf, load_classifier(run_dir / "adapter-best")], output_ttl_s=OUTPUT_TTL_S, upload_ttl_s=UPLOAD_TTL_S
    )  # (the upload TTL is per process: the last demo built sets it)
    port = _free_port()
    launch(demo, port=port, prevent_thread_lock=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        a, b = client.predict(handle_file(str(clf.examples[0].path)), api_name="/predict")
        overlays = client.predict(handle_file(str(clf.examples[0].path)), api_name="/explain")
        table = client.predict([handle_file(str(clf.examples[0].path))], api_name="/batch")[0]
    finally:
        demo.close()
    for label in (a, b):
        assert sum(_probs(label).values()) == pytest.approx(1.0, abs=1e-6)
    assert len(overlays) == 2 and all(Image.open(o).size == (320 + SCALE_WIDTH, 320) for o in overlays)
    assert table["headers"] == ["file"] + [f"{m}: {c}" for m in "AB" for c in ("prediction", "probability", "decision")]


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


@pytest.mark.e2e  # the run_dir fixture's driver run, over 5 s
def test_bad_adapters_fail_with_a_clear_message(run_dir: Path, tmp_path: Path, capsys) -> None:
    missing_weights = _copy_adapter(run_dir, tmp_path / "missing" / "adapter")
    (missing_weights / "adapter_model.safetensors").unlink()
    other_base = _copy_adapter(run_dir, tmp_path / "other" / "adapter")
    tiny_vit(hidden=64).save_pretrained(tmp_path / "vit64")  # same family, other width
    _set_base(other_base, str(tmp_path / "vit64"))
    gone_base = _copy_adapter(run_dir, tmp_path / "gone" / "adapter")
    _set_base(gone_base, str(tmp_path / "no-such-base"))
    bad_temperature = _copy_adapter(run_dir, tmp_path / "temperature" / "adapter")
    run_file = bad_temperature / "peft_deer_run.json"
    run_file.write_text(json.dumps({**json.loads(run_file.read_text()), "temperature": -2.0}))
    cases = {
        tmp_path / "nowhere": "adapter directory not found",
        missing_weights: "missing adapter_model.safetensors",
        other_base: "belongs to another base model",
        gone_base: "base model directory .* not found",
        bad_temperature: "temperature -2.0 is not a positive finite number .*delete the key to use T = 1",
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


@pytest.mark.e2e
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


# ------------------------------------------------------------------------------------------------
# decisions, trust panel, explanation, DICOM, batch, and what stays on disk


@pytest.mark.e2e  # the run_dir fixture's driver run, over 5 s
def test_decision_at_the_operating_threshold(clf: Classifier) -> None:
    threshold = clf.run["decision_threshold"]
    op = clf.operating_point
    assert op is not None and op.threshold == threshold and op.val_sensitivity == clf.run["val_sensitivity"]
    above, below = np.array([1 - threshold, threshold]), np.array([1 - threshold + 1e-3, threshold - 1e-3])
    assert clf.decide(above) == 1 and clf.decide(below) == 0
    md = decision_md(clf, below, explained=0)
    assert "Decision at the operating threshold: normal" in md and f"< {format_threshold(threshold)}" in md
    assert "validation split" in md and "Heatmap: where the image speaks for *normal*" in md
    assert format_threshold(1 - 4.7e-6) == "1 − 4.7e-06" and format_threshold(0.87742) == "0.877"
    assert format_probability(0.25) == "25.0 %" and format_probability(0.98765) == "98.8 %"
    assert format_probability(1 - 4.7e-6) == "> 99.9 %" and format_probability(1e-5) == "< 0.1 %"
    multi = Classifier(clf.model, clf.adapter_dir, {**clf.run, "class_names": ["a", "b", "c"]}, clf.base_model)
    assert multi.operating_point is None and multi.decide(np.array([0.2, 0.5, 0.3])) == 1
    assert "no operating threshold" in decision_md(multi, np.array([0.2, 0.5, 0.3]))


@pytest.mark.e2e  # the run_dir fixture's driver run, over 5 s
def test_trust_panel_shows_record_level_and_audit(clf: Classifier) -> None:
    record = {"level": "record", "epsilon": 7.99, "delta": 1e-5, "guarantee": "holds as stated",
              "record": {"epsilon_per_client": {"0": 7.99, "1": 7.5}, "delta": 1e-5, "clip_norm": 1.0,
                         "sampling": "poisson", "calibration": "per client: epsilon 8"}}  # fmt: skip
    audit = {"epsilon_lower": 2.15, "epsilon_ledger": 4.73, "trials": 100000}
    md = describe(Classifier(clf.model, clf.adapter_dir, clf.run, clf.base_model, privacy=record, audit=audit))
    for text in ("record-level (ε, δ)-DP with ε = 7.99", "record-level ε per client", "0: 7.99, 1: 7.5",
                 "per-sample clip norm 1", "ε ≥ 2.15", "ledger ε = 4.73", "consistent with the ledger"):  # fmt: skip
        assert text in md, text
    leaky = {**audit, "epsilon_lower": 8.2}
    md = describe(Classifier(clf.model, clf.adapter_dir, clf.run, clf.base_model, privacy=record, audit=leaky))
    assert "leaks more than the ledger claims" in md
    public = {**record, "reproducible_noise": True, "audit": {**audit, "epsilon_lower": 8.13}}
    md = describe(Classifier(clf.model, clf.adapter_dir, clf.run, clf.base_model, privacy=public))
    assert "Privacy: NO guarantee" in md and "ε ≥ 8.13" in md and "(ε, δ)-DP with" not in md


@pytest.mark.e2e  # the run_dir fixture's driver run, over 5 s
def test_sixteen_bit_png_scaled_as_in_training(clf: Classifier, test_split, tmp_path: Path) -> None:
    """A 16-bit PNG reaches the model as training's loader reads it (to_uint8), not min-max scaled."""
    arr = (test_split.images[3][..., 0].astype(np.uint16) * 12 + 1000).astype(np.uint16)  # offset, 12-bit range
    path = tmp_path / "scan16.png"
    Image.fromarray(arr).save(path)
    assert np.array_equal(decode(path), to_uint8(arr))
    expected = clf.probabilities(to_uint8(arr))[0]
    assert list(clf.predict(path).values()) == pytest.approx(list(expected), abs=1e-12)
    lo, hi = arr.min(), arr.max()
    min_max = ((arr - lo) / (hi - lo) * 255).round().astype(np.uint8)  # the old app rule
    assert not np.array_equal(decode(path), min_max)


def _cache_files() -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in uploads.cache_dir().rglob("*") if p.is_file()}


@pytest.mark.e2e  # starts a Gradio server
def test_served_explain_dicom_batch_and_no_upload_left(served: str, clf: Classifier, tmp_path: Path) -> None:
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError
    from test_app_dicom import dicom_bytes

    client = Client(served, verbose=False)
    assert {"/predict", "/explain", "/batch"} <= set(client.view_api(print_info=False, return_format="dict")[
        "named_endpoints"])  # fmt: skip
    pixels = np.asarray(Image.open(clf.examples[2].path))
    scan = (pixels.astype(np.uint16) * 16).astype(np.uint16)  # a 12-bit scan of a real test image
    dcm = tmp_path / "patient.dcm"
    dcm.write_bytes(dicom_bytes(scan, bits_stored=12, PatientName="Doe^Jane"))
    png = tmp_path / "patient.png"
    Image.fromarray(to_uint8(scan)).save(png)

    before = set(_cache_files())  # (other demos of this module share the process's private cache)
    # /predict takes DICOM through the same preprocessing: same probabilities as the equivalent PNG
    probs_dcm = _probs(client.predict(handle_file(str(dcm)), api_name="/predict"))
    assert probs_dcm == pytest.approx(_probs(client.predict(handle_file(str(png)), api_name="/predict")), abs=1e-9)
    assert probs_dcm == pytest.approx(clf.predict(to_uint8(scan)), abs=5e-4)
    time.sleep(UPLOAD_TTL_S + 1.5)  # uploads are deleted by age, not by their request (identical uploads share a path)
    stored = _cache_files()
    uploaded = {dcm.read_bytes(), png.read_bytes()}
    assert not uploaded & set(stored.values()), "an upload is still on disk after its request"
    new = [p for p, data in stored.items() if p not in before and data and uploads.digest(p) not in _public(clf)]
    assert not new, f"files left by /predict: {new}"

    # /explain returns the overlay; it is swept from the server's cache shortly after
    overlay_path = client.predict(handle_file(str(dcm)), api_name="/explain")
    picture = np.asarray(Image.open(overlay_path).convert("RGB"))
    assert picture.shape == (320, 320 + SCALE_WIDTH, 3) and picture.std() > 0
    time.sleep(max(OUTPUT_TTL_S * 2, UPLOAD_TTL_S) + 1.5)  # the overlay and the upload itself
    leftover = [p for p, d in _cache_files().items() if p not in before and d and uploads.digest(p) not in _public(clf)]
    assert not leftover, leftover
    # the run's examples are still cached for the page, although uploads with their bytes came and went
    assert _public(clf) <= {uploads.digest(p) for p in _cache_files()}

    # a corrupt DICOM: a clear message, the server keeps serving
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(dcm.read_bytes()[:300])
    with pytest.raises(AppError, match="Could not read the upload as an image: .*DICOM"):
        client.predict(handle_file(str(broken)), api_name="/predict")

    # batch: files and a zip (with a bad member) -> table and CSV
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(dcm, "series/1.dcm")
        zf.write(png, "series/2.png")
        zf.writestr("series/notes.txt", "not an image")
    table, csv_path = client.predict(
        [handle_file(str(p)) for p in (clf.examples[0].path, archive, broken)], api_name="/batch"
    )
    assert table["headers"] == ["file", "prediction", "probability", "decision"]
    rows = {r[0]: r for r in table["data"]}
    assert list(rows) == [clf.examples[0].path.name, "study.zip/series/1.dcm", "study.zip/series/2.png",
                          "study.zip/series/notes.txt", "broken.dcm"]  # fmt: skip
    name, prediction, probability, decision = rows["study.zip/series/1.dcm"]
    assert prediction == max(probs_dcm, key=probs_dcm.get) and probability == pytest.approx(max(probs_dcm.values()))
    probs_dcm = clf.predict(to_uint8(scan))  # unrounded, for the threshold
    expected = "pneumonia" if probs_dcm["pneumonia"] >= clf.run["decision_threshold"] else "normal"
    assert decision == expected
    assert rows["study.zip/series/notes.txt"][1].startswith("error: not a readable image")
    assert rows["broken.dcm"][1].startswith("error:") and rows["broken.dcm"][2:] == ["", ""]
    with open(csv_path, newline="") as fh:
        csv_rows = list(csv.reader(fh))
    assert csv_rows[0] == table["headers"] and len(csv_rows) == 6
    assert [r[0] for r in csv_rows[1:]] == list(rows) and csv_rows[2][3] == decision
    with pytest.raises(AppError, match="No files"):
        client.predict([], api_name="/batch")
    time.sleep(UPLOAD_TTL_S + 1.5)
    stored = _cache_files()
    assert not ({archive.read_bytes(), broken.read_bytes()} & set(stored.values()))


def _public(clf: Classifier) -> set[str]:
    return {uploads.digest(p) for p in [*(e.path for e in clf.examples), clf.curves] if p}


@pytest.mark.e2e
def test_server_shutdown_leaves_no_upload(run_dir: Path, tmp_path: Path) -> None:
    """The real command: after a request and SIGTERM, nothing of the upload remains in the temp dir."""
    from gradio_client import Client, handle_file

    temp = tmp_path / "gradio-temp"
    port = _free_port()
    env = {**os.environ, "GRADIO_TEMP_DIR": str(temp), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "app", "--adapter", str(run_dir / "adapter"), "--port", str(port)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read()
                assert time.time() < deadline, "the app did not start in 180 s"
                time.sleep(0.5)
        private = [p for p in temp.iterdir() if p.name.startswith("deer-app-")]
        assert len(private) == 1 and (private[0].stat().st_mode & 0o777) == 0o700
        scan = tmp_path / "upload.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40), dtype=np.uint8)).save(scan)
        client = Client(url, verbose=False)
        client.predict(handle_file(str(scan)), api_name="/predict")
        client.predict(handle_file(str(scan)), api_name="/explain")  # leaves an overlay in the cache
        files = [p for p in temp.rglob("*") if p.is_file()]
        assert scan.read_bytes() in {p.read_bytes() for p in files}  # within its TTL: still there until shutdown
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "Traceback" not in out
    # (Gradio itself creates an empty vibe_edit_history/ folder in GRADIO_TEMP_DIR when imported.)
    left = [p for p in temp.rglob("*") if p.is_file() or p.name.startswith("deer-app-")]
    assert not left, f"left behind: {left}"


@pytest.mark.e2e  # the run_dir fixture's driver run, over 5 s
def test_corrupt_adapter_weights_one_line(run_dir: Path, tmp_path: Path, capsys) -> None:
    weights = (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    for name, data in (("truncated", weights[: len(weights) // 2]), ("random", os.urandom(4096)), ("empty", b""),
                       ("header", weights[:20])):  # fmt: skip
        adapter = _copy_adapter(run_dir, tmp_path / name / "adapter")
        (adapter / "adapter_model.safetensors").write_bytes(data)
        _set_base(adapter, str(run_dir / "base-model"))
        with pytest.raises(AdapterError, match="adapter_model.safetensors is unreadable or damaged"):
            load_classifier(adapter)
        capsys.readouterr()
        assert app_main(["--adapter", str(adapter), "--port", str(_free_port())]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("deer-app: error:") and "\n" not in err and "unreadable or damaged" in err, err
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()


# ------------------------------------------------------------------------------------------------
# a real browser


def _screenshot_tool():
    spec = importlib.util.spec_from_file_location("app_screenshot", ROOT / "bench" / "app_screenshot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.e2e  # starts a browser
def test_real_browser_classifies_an_example(clf: Classifier, tmp_path: Path) -> None:
    """Headless Chromium loads the page, clicks an example, sees the decision and heatmap; a screenshot is saved."""
    tool = _screenshot_tool()
    binary = tool.find_chromium()
    if binary is None:
        reason = "no Chromium on PATH (.ci/install installs Debian's chromium where apt-get is permitted)"
        print(f"SKIPPED browser test: {reason}", file=sys.stderr)
        pytest.skip(reason)
    example = clf.examples[-1]
    probs = clf.probabilities(decode(example.path))[0]
    decided = clf.class_names[clf.decide(probs)]
    demo = build_demo([clf])
    port = _free_port()
    launch(demo, port=port, prevent_thread_lock=True)
    out = tmp_path / "app.png"
    try:
        shown = tool.classify_example_in_browser(
            f"http://127.0.0.1:{port}/", f"true label: {example.class_name} ({example.path.name})", out, binary
        )
    finally:
        close(demo)
    assert f"Decision at the operating threshold: {decided}" in shown["decision"]
    assert f"P(pneumonia) = {format_probability(probs[1])}" in shown["decision"]
    assert shown["heatmaps"] >= 1
    picture = Image.open(out)
    assert picture.size == tuple(shown["size"]) and picture.size[0] == 1280 and picture.size[1] > 900
    assert np.asarray(picture.convert("L")).std() > 10  # not a blank page
