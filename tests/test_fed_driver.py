"""The accelerate driver `train/fed.py` end to end, on real MedMNIST images and a tiny random ViT (CPU).

Runs call `train.fed.main([...])` in-process (it returns an exit code); only `--help` and the
1-vs-2-process comparison start subprocesses. Every run uses 200 training images, 3-4 clients and
2 rounds, so the whole file takes a minute or two on 2 cores.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import MEDMNIST_DIR, ROOT
from opacus.accountants import PRVAccountant, RDPAccountant
from PIL import Image
from safetensors.torch import load_file

import peft_deer  # noqa: F401  (registers DEER_LORA with PEFT)
from peft_deer.data import preprocess_images
from peft_deer.evaluation.calibration import T_MAX, T_MIN
from peft_deer.run.run_dir import CHECKPOINT
from train import fed

FED = ROOT / "train" / "fed.py"
METHODS = ("deer", "rolora", "ffa", "lora", "deer-reference")
RELEASES_PER_ROUND = {"deer": 2, "rolora": 2, "deer-reference": 2, "lora": 1, "ffa": 1}
DP = ["--dp", "client", "--noise-multiplier", "1.0", "--delta", "1e-3"]
# Per method: DP or not, and the client setup. `lora` samples 2 of 4 clients per phase (Poisson, q = 0.5).
# deer's run is compared bit for bit with separate runs (resume, 2 processes), so its DP draws come from
# the public seed (--reproducible-noise: no guarantee); the other methods draw from the OS secret.
METHOD_FLAGS = {
    "deer": [*DP, "--reproducible-noise"],
    "rolora": DP,
    "ffa": ["--dp", "none"],
    "lora": [*DP, "--num-clients", "4", "--clients-per-round", "2"],
    "deer-reference": DP,
}
ROW_KEYS = {
    "round", "val_accuracy", "val_auc", "val_balanced_accuracy", "val_sensitivity", "val_specificity",
    "val_threshold", "epsilon",
}  # fmt: skip
# Computed from the clients' data without noise: only in server-private/, never in what ships with the adapter.
PRIVATE_KEYS = {"train_loss", "images_per_s", "mean_update_norm", "participants_per_phase", "seconds"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def run_argv(data_dir: Path, out: Path, method: str = "deer", *extra: str) -> list[str]:
    return [
        "--model", "tiny-vit",
        "--dataset", "medmnist:pneumoniamnist",
        "--data-dir", str(data_dir),
        "--train-subset", "200",
        "--num-clients", "3",
        "--rounds", "2",
        "--batch-size", "32",
        "--seed", "0",
        "--method", method,
        "--output-dir", str(out),
        *extra,
    ]  # fmt: skip


def method_argv(data_dir: Path, out: Path, method: str, *extra: str) -> list[str]:
    return run_argv(data_dir, out, method, *METHOD_FLAGS[method], *extra)


def read_json(path: Path):
    return json.loads(path.read_text())


def metrics_rows(out: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (out / name).read_text().splitlines() if line.strip()]


def exit_code(call) -> tuple[int, str]:
    """(exit code, SystemExit message or '') of `call()`, whether it returns or raises SystemExit."""
    try:
        return call(), ""
    except SystemExit as err:
        if isinstance(err.code, str):
            return 1, err.code
        return (0 if err.code is None else err.code), ""


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """`finished_run(method, data_dir)`: the output dir of a finished 2-round run (each run once per module)."""
    done: dict[str, Path] = {}

    def get(method: str, data_dir: Path) -> Path:
        if method not in done:
            out = tmp_path_factory.mktemp("runs") / method
            assert fed.main(method_argv(data_dir, out, method)) == 0
            done[method] = out
        return done[method]

    return get


@pytest.mark.e2e
def test_help_runs_as_a_script():
    proc = subprocess.run([sys.executable, str(FED), "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "--method" in proc.stdout and "--dp" in proc.stdout


# ------------------------------------------------------------------------------------------------
# 1. End to end, every method


@pytest.mark.parametrize("method", METHODS)
def test_end_to_end_outputs(method, finished_run, medmnist_dir):
    from peft import PeftModel
    from transformers import AutoModelForImageClassification

    out = finished_run(method, medmnist_dir)
    for name in (
        "privacy.json", "metrics.jsonl", "summary.json", "curves.png", "examples/examples.json",
        "server-private/label_counts.txt", "server-private/label_counts.json", "server-private/label_counts.png",
        "server-private/diagnostics.jsonl",
    ):  # fmt: skip
        assert (out / name).is_file(), name
    assert not (out / CHECKPOINT).exists()
    for name in ("adapter", "adapter-best", "adapter-lora"):
        for file in ("adapter_config.json", "adapter_model.safetensors", "README.md", "peft_deer_run.json"):
            assert (out / name / file).is_file(), f"{name}/{file}"
    assert read_json(out / "adapter" / "adapter_config.json")["peft_type"] == "DEER_LORA"
    assert read_json(out / "adapter-best" / "adapter_config.json")["peft_type"] == "DEER_LORA"
    assert read_json(out / "adapter-lora" / "adapter_config.json")["peft_type"] == "LORA"
    assert f"`{method}`" in (out / "adapter" / "README.md").read_text()  # the model card names the method

    examples = read_json(out / "examples" / "examples.json")
    assert examples and {e["label"] for e in examples} == {0, 1}
    for e in examples:
        assert (out / "examples" / e["file"]).is_file()
    label_rows = read_json(out / "server-private" / "label_counts.json")
    assert len(label_rows) == (4 if method == "lora" else 3) and sum(r["n"] for r in label_rows) == 200

    rows = metrics_rows(out)
    assert [r["round"] for r in rows] == [0, 1]
    for r in rows:
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
        assert not PRIVATE_KEYS & set(r), PRIVATE_KEYS & set(r)
        assert 0 <= r["val_accuracy"] <= 1
    private_rows = metrics_rows(out, "server-private/diagnostics.jsonl")
    assert [r["round"] for r in private_rows] == [0, 1]
    for r in private_rows:
        assert PRIVATE_KEYS <= set(r)
        # lora samples clients secretly (Poisson, q = 0.5): a round may draw nobody, and then trains nothing
        trained = sum(r["participants_per_phase"]) > 0
        assert (r["images_per_s"] > 0) == trained
        assert math.isfinite(r["train_loss"]) if trained else r["train_loss"] is None
    # Nothing published names a client statistic or who took part.
    published = [out / n for n in ("privacy.json", "summary.json", "metrics.jsonl", "adapter/README.md")]
    for path in published:
        text = path.read_text()
        for word in (*PRIVATE_KEYS, "label_counts", "participants", 'dropped_updates"'):
            assert word not in text, f"{word} in {path.name}"

    privacy = read_json(out / "privacy.json")
    assert privacy["method"] == method
    assert privacy["releases"] == 2 * RELEASES_PER_ROUND[method]
    summary = read_json(out / "summary.json")
    assert summary["rounds_completed"] == 2 and summary["stopped"] is None
    if method == "ffa":  # --dp none
        assert privacy["level"] == "none" and privacy["epsilon"] is None
        assert all(r["epsilon"] is None for r in rows)
    else:
        assert privacy["level"] == "client" and privacy["noise_multiplier"] == 1.0
        assert rows[-1]["epsilon"] == pytest.approx(privacy["epsilon"])
        assert privacy["neighbouring_relation"].startswith("add/remove one client") and privacy["trust_model"]
        reproducible = "--reproducible-noise" in METHOD_FLAGS[method]
        assert privacy["reproducible_noise"] is reproducible
        assert privacy["guarantee"].startswith("NONE" if reproducible else "holds")
        card = (out / "adapter" / "README.md").read_text()
        assert ("**none**" in card) is reproducible and ("client-level (" in card) is not reproducible

    # Each adapter's temperature, fitted on validation, with its NLL / ECE before and after (public: no client data).
    for name, adapter in (("final", "adapter"), ("best", "adapter-best"), ("final", "adapter-lora")):
        calibration = summary["calibration"][name]
        run = read_json(out / adapter / "peft_deer_run.json")
        assert run["temperature"] == calibration["temperature"] and run["calibration"] == calibration
        assert T_MIN <= calibration["temperature"] <= T_MAX and calibration["fit"]
        assert calibration["val_nll_after"] <= calibration["val_nll_before"]
        assert "epsilon unchanged" in calibration["privacy"]
        for key in ("val_ece_before", "val_ece_after", "test_ece_before", "test_ece_after"):
            assert 0 <= calibration[key] <= 1, key
        assert math.isfinite(calibration["test_nll_before"]) and math.isfinite(calibration["test_nll_after"])

    # The adapter loads on its saved base model with plain PEFT + transformers and classifies an image.
    info = read_json(out / "adapter" / "peft_deer_run.json")
    assert info["method"] == method and Path(info["base_model"]).is_dir()
    pixels = preprocess_images(
        np.asarray(Image.open(out / "examples" / examples[0]["file"])),
        info["image_size"], info["num_channels"], info["mean"], info["std"],
    )  # fmt: skip
    logits = {}
    for name in ("adapter", "adapter-lora"):
        base = AutoModelForImageClassification.from_pretrained(info["base_model"])
        model = PeftModel.from_pretrained(base, out / name).eval()
        with torch.no_grad():
            logits[name] = model(pixel_values=pixels).logits
    assert logits["adapter"].shape == (1, 2) and torch.isfinite(logits["adapter"]).all()
    torch.testing.assert_close(logits["adapter-lora"], logits["adapter"])


# ------------------------------------------------------------------------------------------------
# 2. Accounting


@pytest.mark.parametrize("method", [m for m in METHODS if m != "ffa"])
def test_ledger_epsilon_matches_opacus(method, finished_run, medmnist_dir):
    privacy = read_json(finished_run(method, medmnist_dir) / "privacy.json")
    sigma, q, delta = privacy["noise_multiplier"], privacy["sample_rate"], privacy["delta"]
    assert q == (0.5 if method == "lora" else 1.0) and delta == 1e-3
    releases = privacy["releases"]

    nominal = RDPAccountant()
    for _ in range(releases):
        nominal.step(noise_multiplier=sigma, sample_rate=q)
    if method == "deer-reference":
        # The authors' mechanism: the ledger's epsilon is the true one, from the per-release effective sigma.
        true = RDPAccountant()
        for s in privacy["effective_noise_multipliers"]:
            true.step(noise_multiplier=s, sample_rate=q)
        assert len(privacy["effective_noise_multipliers"]) == releases
        assert privacy["epsilon_rdp"] == pytest.approx(true.get_epsilon(delta), rel=1e-9)
        nominal_prv = PRVAccountant()
        nominal_prv.history = [(sigma, q, releases)]
        assert privacy["nominal_epsilon"] == pytest.approx(nominal_prv.get_epsilon(delta), rel=1e-6)
        assert privacy["epsilon_semantics"] == "running tally" and "does not hold" in privacy["note"]
    else:
        assert privacy["effective_noise_multipliers"] == [sigma] * releases
        assert privacy["epsilon_rdp"] == pytest.approx(nominal.get_epsilon(delta), rel=1e-9)
    assert privacy["accountant"] == "prv" and privacy["epsilon"] == privacy["epsilon_prv"] < privacy["epsilon_rdp"]


def test_target_epsilon_is_met(tmp_path, medmnist_dir):
    out = tmp_path / "eps3"
    assert fed.main(run_argv(medmnist_dir, out, "deer", "--dp", "client", "--epsilon", "3", "--delta", "1e-3")) == 0
    privacy = read_json(out / "privacy.json")
    assert privacy["target_epsilon"] == 3 and privacy["releases"] == 4 and not privacy["stopped_by_budget"]
    # sigma is calibrated for all 4 releases to opacus's tolerance (0.01), so the run lands just under 3.
    assert 2.9 < privacy["epsilon"] <= 3.0
    check = PRVAccountant()  # the default --accountant prv calibrated sigma
    check.history = [(privacy["noise_multiplier"], 1.0, 4)]
    assert check.get_epsilon(1e-3) == pytest.approx(privacy["epsilon"], rel=1e-6)


def test_budget_stop_before_exceeding(tmp_path, medmnist_dir):
    # A fixed sigma with a budget: 4 releases at sigma=2 would pass epsilon=3 (delta=1e-3), so the run
    # stops before the release that would exceed it and still writes its outputs.
    out = tmp_path / "budget"
    argv = run_argv(
        medmnist_dir, out, "deer", "--dp", "client", "--noise-multiplier", "2", "--epsilon", "3", "--delta", "1e-3"
    )
    assert fed.main(argv) == 0
    privacy, summary = read_json(out / "privacy.json"), read_json(out / "summary.json")
    assert privacy["stopped_by_budget"] and summary["stopped"] == "budget"
    assert privacy["releases"] < 4 and privacy["epsilon"] <= 3.0
    assert len(metrics_rows(out)) == privacy["releases"] // 2 == summary["rounds_completed"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and not (out / CHECKPOINT).exists()


# ------------------------------------------------------------------------------------------------
# 3. Resume


def test_resume_equals_uninterrupted(tmp_path, finished_run, medmnist_dir, capsys):
    a = finished_run("deer", medmnist_dir)
    b = tmp_path / "b"
    argv = method_argv(medmnist_dir, b, "deer")

    assert fed.main([*argv, "--max-phases", "1"]) == 0  # round 0, phase B
    assert (b / CHECKPOINT).is_file() and not (b / "summary.json").exists()
    assert metrics_rows(b) == []
    capsys.readouterr()
    assert fed.main([*argv, "--resume", "--lr", "0.1"]) == 2  # a changed setting is refused
    err = capsys.readouterr().err
    assert "deer-fed: error: --resume with different settings (lr: 0.002 -> 0.1)" in err
    assert fed.main([*argv, "--resume", "--max-phases", "2"]) == 0  # round 0 phase A, round 1 phase B
    assert len(metrics_rows(b)) == 1 and (b / CHECKPOINT).is_file()
    assert fed.main([*argv, "--resume"]) == 0  # round 1 phase A, then the outputs
    assert not (b / CHECKPOINT).exists()

    for name in ("adapter", "adapter-best", "adapter-lora"):
        ta, tb = (load_file(d / name / "adapter_model.safetensors") for d in (a, b))
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{name}: {k}"
    pa, pb = read_json(a / "privacy.json"), read_json(b / "privacy.json")
    assert pa["epsilon"] == pb["epsilon"] and pa["releases"] == pb["releases"] == 4
    timing = {"seconds", "images_per_s"}
    assert [{k: v for k, v in r.items() if k not in timing} for r in metrics_rows(a)] == [
        {k: v for k, v in r.items() if k not in timing} for r in metrics_rows(b)
    ]
    assert read_json(b / "summary.json")["test"] == read_json(a / "summary.json")["test"]
    assert read_json(b / "summary.json")["calibration"] == read_json(a / "summary.json")["calibration"]
    for name in ("adapter", "adapter-best"):  # the same temperature, threshold and report (base dirs differ)
        ra, rb = (read_json(d / name / "peft_deer_run.json") for d in (a, b))
        assert {k: v for k, v in ra.items() if k != "base_model"} == {k: v for k, v in rb.items() if k != "base_model"}

    # A finished run is neither clobbered nor resumed; --overwrite replaces it.
    for extra, message in (([], "holds a finished run"), (["--resume"], "nothing to resume")):
        capsys.readouterr()
        code, text = exit_code(lambda extra=extra: fed.main([*argv, *extra]))
        assert code != 0 and message in text + capsys.readouterr().err
    assert (b / "summary.json").is_file()
    assert fed.main([*argv, "--overwrite", "--rounds", "1"]) == 0
    assert read_json(b / "summary.json")["rounds_completed"] == 1 and len(metrics_rows(b)) == 1


def test_secret_noise_differs_between_runs_and_survives_resume(tmp_path, medmnist_dir):
    """With DP the noise, sampling and DP-SGD draws come from an OS secret, not --seed: two runs with the same
    seed release different adapters. The secret lives in the checkpoint only: resuming two copies of one
    checkpoint gives the same adapter, and once the run ends the key is in none of its files."""

    def argv(out: Path, *extra: str) -> list[str]:
        return run_argv(medmnist_dir, out, "rolora", *DP, "--rounds", "1", *extra)

    first, second = tmp_path / "first", tmp_path / "second"
    assert fed.main(argv(first)) == 0 and fed.main(argv(second)) == 0
    ta, tb = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (first, second))
    assert any(not torch.equal(ta[k], tb[k]) for k in ta), "same --seed gave the same DP noise"
    assert read_json(first / "privacy.json")["epsilon"] == read_json(second / "privacy.json")["epsilon"]

    part = tmp_path / "part"
    assert fed.main(argv(part, "--max-phases", "1")) == 0
    key = torch.load(part / CHECKPOINT, weights_only=False)["server"]["randomness"]["key"]
    assert len(bytes.fromhex(key)) == 32
    shutil.copytree(part, tmp_path / "copy")
    assert fed.main(argv(part, "--resume")) == 0 and fed.main(argv(tmp_path / "copy", "--resume")) == 0
    tp, tc = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (part, tmp_path / "copy"))
    assert all(torch.equal(tp[k], tc[k]) for k in tp)
    assert any(not torch.equal(tp[k], ta[k]) for k in tp)
    files = [p for p in part.rglob("*") if p.is_file()]
    assert files and not (part / CHECKPOINT).exists()
    for path in files:
        data = path.read_bytes()
        assert key.encode() not in data and bytes.fromhex(key) not in data, f"the DP secret is in {path}"


# ------------------------------------------------------------------------------------------------
# 4. One process vs two


@pytest.mark.e2e
def test_one_and_two_processes_agree(tmp_path, finished_run, medmnist_dir):
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.is_file():
        pytest.skip(f"torchrun not found next to {sys.executable}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # Accelerator(cpu=True) with gloo, as in CI

    def run(command: list[str], out: Path) -> None:
        proc = subprocess.run(
            [*command, *method_argv(medmnist_dir, out, "deer")],
            capture_output=True, text=True, timeout=300, cwd=ROOT, env=env,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]

    if torch.cuda.is_available():  # in-process runs use the GPU: run the CPU reference too
        one = tmp_path / "one"
        run([sys.executable, str(FED)], one)
    else:  # the module's in-process run: CPU, torch on one thread like OMP_NUM_THREADS=1
        one = finished_run("deer", medmnist_dir)
    two = tmp_path / "two"
    # --standalone: a free rendezvous port, so parallel test sessions do not collide on 29500.
    # 3 clients on 2 processes: rank 0 trains clients 0 and 2, rank 1 client 1.
    run([str(torchrun), "--standalone", "--nproc_per_node", "2", str(FED)], two)
    assert (two / "summary.json").is_file()
    # Bit-identical: each client's training is seeded from (seed, round, phase, client) and runs on
    # one thread in either layout, updates are gathered exactly (pickled tensors), sorted by client
    # id and summed in fp32 in that order, and the noise is seeded from (seed, round, phase).
    for name in ("adapter", "adapter-best"):
        t1, t2 = (load_file(d / name / "adapter_model.safetensors") for d in (one, two))
        assert t1.keys() == t2.keys()
        for k in t1:
            assert torch.equal(t1[k], t2[k]), f"{name}: {k}"
    assert read_json(one / "privacy.json")["epsilon"] == read_json(two / "privacy.json")["epsilon"]
    keys = ("round", "val_accuracy", "val_auc", "epsilon")
    rows = [[{k: r[k] for k in keys} for r in metrics_rows(d)] for d in (one, two)]
    assert rows[0] == rows[1]
    losses = [[r["train_loss"] for r in metrics_rows(d, "server-private/diagnostics.jsonl")] for d in (one, two)]
    assert losses[0] == losses[1]


# ------------------------------------------------------------------------------------------------
# 5. Bad inputs: one clear line, a non-zero exit, nothing that looks like a finished run


@pytest.fixture(scope="module")
def bad_npz_dir(tmp_path_factory) -> Path:
    """Broken copies of breastmnist.npz: labels out of range, and flat (2-D) image arrays."""
    source = MEDMNIST_DIR / "breastmnist.npz"
    if not source.is_file():
        pytest.skip(f"real MedMNIST files not found at {MEDMNIST_DIR}")
    folder = tmp_path_factory.mktemp("bad-medmnist")
    with np.load(source) as npz:
        arrays = {k: npz[k] for k in npz.files}
    labels = arrays["train_labels"].copy()
    labels[::10] = 7
    np.savez(folder / "breastmnist.npz", **{**arrays, "train_labels": labels})
    flat = arrays["train_images"].reshape(len(arrays["train_images"]), -1)
    np.savez(folder / "pathmnist.npz", **{**arrays, "train_images": flat})  # pathmnist: any valid name
    return folder


BAD_INPUTS = {
    "unknown-prefix": (["--dataset", "foo:pneumoniamnist"], "unknown dataset prefix 'foo:'"),
    "unknown-medmnist": (["--dataset", "medmnist:nosuchmnist"], "unknown MedMNIST dataset 'nosuchmnist'"),
    "unknown-model": (["--model", "no-such-org/no-such-model"], "cannot load model 'no-such-org/no-such-model'"),
    "unknown-method": (["--method", "fedprox"], "argument --method: invalid choice: 'fedprox'"),
    "clients-exceed-examples": (["--train-subset", "10", "--num-clients", "50"], "--num-clients 50 exceeds the 10"),
    "epsilon-zero": (["--dp", "client", "--epsilon", "0", "--delta", "1e-3"], "--epsilon 0.0 must be a finite"),
    "epsilon-negative": (["--dp", "client", "--epsilon", "-1", "--delta", "1e-3"], "--epsilon -1.0 must be a finite"),
    "epsilon-unreachable": (["--dp", "client", "--epsilon", "1e-9", "--delta", "1e-3"], "privacy budget is too low"),
    "delta-too-large": (
        ["--dp", "client", "--noise-multiplier", "1", "--delta", "0.5", "--num-clients", "4"],
        "--delta 0.5 must be in (0, 1/num_clients)",
    ),
    "max-phases-zero": (["--max-phases", "0"], "--max-phases 0 must be >= 1"),
    "lr-zero": (["--lr", "0"], "--lr 0.0 must be > 0"),
    "target-modules-absent": (["--target-modules", "no_such_proj"], "no_such_proj"),
    # {bad}: the folder of broken .npz files
    "labels-out-of-range": (["--dataset", "medmnist:breastmnist", "--data-dir", "{bad}"], "label 7 out of range"),
    "images-2d": (["--dataset", "medmnist:pathmnist", "--data-dir", "{bad}"], "images must have shape (N, H, W, C)"),
}


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")  # opacus, calibrating epsilon=1e-9
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_cleanly(case, tmp_path, medmnist_dir, bad_npz_dir, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    extra, message = BAD_INPUTS[case]
    extra = [a.replace("{bad}", str(bad_npz_dir)) for a in extra]
    out = tmp_path / "out"
    code, exit_text = exit_code(lambda: fed.main(run_argv(medmnist_dir, out, "deer", *extra)))
    err = capsys.readouterr().err + exit_text
    assert code != 0
    assert "Traceback" not in err
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last.startswith("deer-fed: error:") and message in last, err[-2000:]
    assert not out.exists()  # nothing written at all, so certainly no summary.json


# ------------------------------------------------------------------------------------------------
# 6. --config


def test_config_file(tmp_path, medmnist_dir, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": "tiny-vit",
                "dataset": "medmnist:pneumoniamnist",
                "data-dir": str(medmnist_dir),
                "train_subset": 200,
                "num_clients": 3,
                "rounds": 3,
                "method": "ffa",
                "lr": 0.01,
                "target_modules": ["q_proj", "v_proj"],
                "output_dir": str(tmp_path / "from-config"),
            }
        )
    )
    args = fed.parse_args(["--config", str(config)])
    flat = args.flat()
    assert (flat["method"], flat["rounds"], flat["lr"], flat["num_clients"]) == ("ffa", 3, 0.01, 3)
    assert flat["target_modules"] == ["q_proj", "v_proj"] and args.data.data_dir == str(medmnist_dir)
    args = fed.parse_args(["--config", str(config), "--rounds", "1", "--method", "lora", "--target-modules", "k_proj"])
    flat = args.flat()
    assert (flat["method"], flat["rounds"], flat["lr"], flat["target_modules"]) == ("lora", 1, 0.01, ["k_proj"])

    out = tmp_path / "cli-out"
    assert fed.main(["--config", str(config), "--rounds", "1", "--output-dir", str(out)]) == 0
    summary = read_json(out / "summary.json")
    assert summary["method"] == "ffa" and summary["rounds_completed"] == 1
    assert summary["args"]["lr"] == 0.01 and summary["args"]["target_modules"] == ["q_proj", "v_proj"]
    assert not (tmp_path / "from-config").exists()
    capsys.readouterr()

    for bad, message in (
        ({"rounds": 1, "bogus_flag": 3}, "unknown keys ['bogus_flag']"),
        ({"method": "fedprox"}, "argument --method: invalid choice: 'fedprox'"),
        ({"rounds": "many"}, "argument --rounds: invalid int value: 'many'"),
        ({"rounds": 0}, "--rounds 0 (statistics only: no training, one release) needs --head-refit stats"),
        ({"rounds": -1}, "--rounds -1 must be >= 1"),
    ):
        config.write_text(yaml.safe_dump(bad))
        with pytest.raises(SystemExit) as excinfo:
            fed.parse_args(["--config", str(config)])
        assert excinfo.value.code == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        fed.parse_args(["--config", str(tmp_path / "missing.yaml")])
    assert "does not exist" in capsys.readouterr().err


def test_shipped_config_parses():
    shipped = sorted((ROOT / "train" / "configs").glob("*.yaml"))
    for path in shipped:
        fed.parse_args(["--config", str(path)])
    if not shipped:
        pytest.skip("no train/configs/*.yaml")
