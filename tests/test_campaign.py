"""The campaign, `peft_deer.campaign` (grid expansion and run ids, a tiny campaign end to end, the report, the
command line as `deer-campaign` and `bench/campaign.py`) and its linear probe, `peft_deer.campaign.probe`.

The end-to-end test runs two tiny-vit deer-fed subprocesses on 120 real PneumoniaMNIST images (one
failing, one ok) and a linear probe, then checks skipping and the rerun of one deleted line (one more
run): about 30 s on 2 cores, nearly all of it the subprocesses' start-up.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT

from peft_deer.campaign import cli, execute, report, store
from peft_deer.campaign import grid as campaign_grid
from peft_deer.campaign import probe as lp
from peft_deer.data import DatasetSplits, load_dataset_spec


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def runs_of(items) -> list:
    return [i for i in items if i.kind == "run"]


def cell(run) -> tuple:
    s = campaign_grid.resolved(run.settings)
    return s["method"], s["dp"], s["epsilon"], s["record_epsilon"], s["num_clients"]


# ----------------------------------------------------------------------------- the grid


def test_grid_expands_product_seeds_for_extra_and_mapping_values():
    grid = {
        "base": {"model": "tiny-vit", "num-clients": 3, "rounds": 2},
        "vary": {
            "method": ["deer", "ffa"],
            "privacy": [{"dp": "none"}, {"dp": "client", "epsilon": 8}, {"dp": "record", "record-epsilon": 1}],
        },
        "seeds": [0, 1, 2],
        "seeds_for": [{"dp": "none"}, {"epsilon": "8"}],  # "8" matches 8.0: compared as deer-fed parses it
        "extra": [
            {"method": "deer", "dp": "client", "epsilon": 8, "num_clients": 6},
            {"method": "ffa", "dp": "none", "partition": "dirichlet"},  # = a product cell (default partition)
            {"method": "lora", "seed": 7},  # an explicit seed pins one run
        ],
        "probe": [{"dataset": "medmnist:breastmnist", "image-size": 28}],
    }
    items = campaign_grid.expand_grid(grid)
    runs = runs_of(items)
    seeds: dict[tuple, list[int]] = {}
    for run in runs:
        seeds.setdefault(cell(run), []).append(run.seed)
    assert seeds == {
        ("deer", "none", None, None, 3): [0, 1, 2],
        ("deer", "client", 8.0, None, 3): [0, 1, 2],
        ("deer", "record", None, 1.0, 3): [0],
        ("ffa", "none", None, None, 3): [0, 1, 2],
        ("ffa", "client", 8.0, None, 3): [0, 1, 2],
        ("ffa", "record", None, 1.0, 3): [0],
        ("deer", "client", 8.0, None, 6): [0, 1, 2],
        ("lora", "none", None, None, 3): [7],
    }
    assert len(runs) == 18 and len({r.id for r in runs}) == 18
    record = next(r for r in runs if cell(r)[1] == "record" and r.method == "deer")
    # settings: what differs from deer-fed's defaults (method deer is the default), typed as deer-fed parses them
    assert record.settings == {
        "model": "tiny-vit",
        "num_clients": 3,
        "rounds": 2,
        "dp": "record",
        "record_epsilon": 1.0,
        "seed": 0,
    }
    assert "--dp=record" in record.argv() and "--record-epsilon=1.0" in record.argv()
    # probes come first; they inherit the base's model; ids are stable across expansions
    probe = items[0]
    assert probe.kind == "probe" and probe.settings["model"] == "tiny-vit" and probe.settings["image_size"] == 28
    assert [i.id for i in campaign_grid.expand_grid(grid)] == [i.id for i in items]
    # a grid without seeds_for runs every seed everywhere; without vary it is the base run
    assert len(runs_of(campaign_grid.expand_grid({**grid, "seeds_for": None, "extra": None}))) == 18
    assert len(runs_of(campaign_grid.expand_grid({"base": {"model": "tiny-vit"}, "seeds": [0, 1]}))) == 2


def test_run_ids_are_those_of_mains_campaign():
    """Regression pin: run ids name run dirs and key results.jsonl, and campaigns started on main's 984-line
    bench/campaign.py are resumed with this package. Each id below was computed ONCE with main's bench/campaign.py
    (commit 61aa96c) for the same grid; none may change. The last run is one of campaign-cpu-v5's sweep runs."""
    plan = campaign_grid.expand_grid(
        {
            "base": {"model": "dinov2-s", "dataset": "medmnist:pneumoniamnist", "rounds": 6, "num-clients": 12},
            "vary": {
                "privacy": [{"dp": "none"}, {"dp": "client", "epsilon": 8}, {"dp": "record", "record-epsilon": 1}]
            },
            "probe": [{"dataset": "medmnist:pneumoniamnist", "image-size": 56}],
            "extra": [
                {
                    "batch_size": 64, "data_dir": "../shared/data/medmnist", "dp": "record", "head_init": "zero",
                    "head_refit": "stats", "image_size": 56, "lora_layers": "last:2", "lr": 0.5,
                    "record_clip_norm": 0.1, "record_epsilon": 8.0, "rounds": 6, "optimizer": "sgd", "momentum": 0.9,
                    "refit_dims": 32, "refit_noise_multiplier": 2.0,
                }
            ],
        }
    )  # fmt: skip
    assert [item.id for item in plan] == [
        "lp-7b27ee3b9dba",  # the probe: dataset, model, image size, data dir, subset, seed
        "5b6bf272e28e",  # {rounds: 6, seed: 0} (dinov2-s, pneumoniamnist, 12 clients are deer-fed's defaults)
        "0a6c300eb726",  # + dp client, epsilon 8.0
        "64e5e02230bb",  # + dp record, record_epsilon 1.0
        "1b4b4dae5a57",  # runs/1b4b4dae5a57 of campaign-cpu-v5 (bench/grids/cpu-v5-sweep.yaml)
    ]
    assert plan[1].settings == {"rounds": 6, "seed": 0}


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        (
            {"base": {"learning-rate": 0.1}, "vary": {"metod": ["deer"]}, "extra": [{"epsilonn": 1}]},
            r"unknown settings base\.learning-rate, vary\.metod, extra\[0\]\.epsilonn",
        ),
        ({"base": {}, "runs": []}, r"unknown keys \['runs'\]"),
        ({"probe": [{"dataset": "medmnist:breastmnist", "size": 28}]}, r"unknown settings probe\[0\]\.size"),
        ({"base": {"output-dir": "x"}}, r"set by the campaign"),
        ({"base": {"seed": 3}}, r"seeds: \[\.\.\.\]"),
        ({"vary": {"privacy": [{"dp": "client"}]}}, r"--dp client needs --epsilon"),  # deer-fed's own check
        ({"vary": {"method": ["deer", "fedavg"]}}, r"invalid choice: 'fedavg'"),
        ({"vary": {"a": [{"epsilon": 1, "dp": "client"}], "b": [{"epsilon": 2}]}}, r"both set \['epsilon'\]"),
    ],
)
def test_bad_grids_are_refused_with_one_line(grid, message):
    with pytest.raises(campaign_grid.GridError, match=message) as info:
        campaign_grid.expand_grid(grid)
    assert "\n" not in str(info.value)


def test_cli_refuses_unknown_settings_before_running(tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text("base: {model: tiny-vit, lr-rate: 0.1}\n")
    assert cli.main(["--grid", str(grid), "--out", str(tmp_path / "out"), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "base.lr-rate" in err
    assert not (tmp_path / "out").exists()


def test_launch_flags_resume_restart_or_new(tmp_path):
    run_dir = tmp_path / "run"
    assert store.launch_flags(run_dir) == []
    run_dir.mkdir()
    assert store.launch_flags(run_dir) == []
    (run_dir / "metrics.jsonl").write_text("")
    assert store.launch_flags(run_dir) == ["--overwrite"]  # started, no checkpoint yet
    (run_dir / "checkpoint.pt").write_bytes(b"")  # an older version's checkpoint: not resumable (63-bit key)
    assert store.launch_flags(run_dir) == ["--overwrite"]
    (run_dir / "server-private").mkdir()
    (run_dir / "server-private" / "checkpoint.pt").write_bytes(b"")
    assert store.launch_flags(run_dir) == ["--resume"]  # interrupted after a phase
    (run_dir / "summary.json").write_text("{}")
    assert store.launch_flags(run_dir) == ["--overwrite"]  # finished: its line was deleted, run it again


# ----------------------------------------------------------------------------- a campaign end to end


def results(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.mark.e2e  # deer-fed subprocesses, through the campaign's executor
def test_campaign_runs_skips_reruns_and_reports(tmp_path, medmnist_dir, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    grid, out = tmp_path / "grid.yaml", tmp_path / "campaign"
    grid.write_text(
        json.dumps(
            {
                "base": {
                    "dataset": "medmnist:pneumoniamnist",
                    "data-dir": str(medmnist_dir),
                    "model": "tiny-vit",
                    "train-subset": 120,
                    "num-clients": 3,
                    "rounds": 2,
                    "dp": "client",
                    "epsilon": 8,
                },
                # last:5 passes the parser but fails in deer-fed (tiny-vit has 2 blocks); last:1 uses the
                # frozen-prefix cache
                "vary": {"lora-layers": ["last:5", "last:1"]},
                "probe": [{"dataset": "medmnist:pneumoniamnist"}],
            }
        )
    )
    argv = ["--grid", str(grid), "--out", str(out)]
    assert cli.main(argv) == 1  # one run failed, the one after it ran
    rows = results(out)
    assert [r["status"] for r in rows] == ["ok", "failed", "ok"]
    probe, failed, run = rows
    assert probe["method"] == "linear-probe" and probe["probe"]["C"] in lp.C_GRID and probe["epsilon"] is None
    assert "last:5" in failed["error"] and "exit code 1" in failed["error"] and failed["test_final"] is None
    assert run["privacy_level"] == "client" and 0 < run["epsilon"] <= 8.0 + 1e-6 and run["record_epsilon"] is None
    assert 0 <= run["test_final"]["auc"] <= 1 and run["test_best"] is not None and run["seconds"] > 0
    assert run["settings"]["lora_layers"] == "last:1" and run["seed"] == 0
    assert (out / "runs" / run["id"] / "summary.json").is_file()
    assert any((out / "prefix-cache").glob("*.pt"))  # deer-fed's prefix cache and the probe's features
    report = (out / "RESULTS.md").read_text()
    assert "## medmnist:pneumoniamnist" in report and "| linear-probe (tiny-vit, 28 px, centralized; C=" in report
    assert "| deer | client ε=8 |" in report and " ± – |" in report
    assert "## Failed runs" in report and failed["id"] in report
    assert (out / "auc_vs_epsilon.png").read_bytes()[:4] == b"\x89PNG"

    # Again: the ok runs are skipped; the failed one is retried unless --no-retry-failed.
    capsys.readouterr()
    assert cli.main([*argv, "--dry-run"]) == 0
    assert "3 runs planned (2 done, 1 failed); 1 to run" in capsys.readouterr().out
    assert cli.main([*argv, "--no-retry-failed"]) == 0
    assert len(results(out)) == 3
    assert "3 runs planned (2 done, 1 failed); 0 to run" in capsys.readouterr().out

    # Deleting a line reruns exactly that run (its finished dir is overwritten).
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("\n".join(lines[:2]) + "\n")
    assert cli.main([*argv, "--no-retry-failed"]) == 0
    rows = results(out)
    assert len(rows) == 3 and rows[-1]["id"] == run["id"] and rows[-1]["status"] == "ok"
    assert rows[-1]["attempt"] == "overwrite"

    # The report comes back from results.jsonl alone.
    (out / "RESULTS.md").unlink()
    (out / "auc_vs_epsilon.png").unlink()
    assert cli.main(["--out", str(out), "--report-only"]) == 0
    assert "| deer | client ε=8 |" in (out / "RESULTS.md").read_text()
    assert (out / "auc_vs_epsilon.png").is_file()


@pytest.mark.parametrize(
    ("level", "privacy", "epsilon", "record_epsilon"),
    [
        ("none", {"level": "none", "epsilon": None}, None, None),
        ("client", {"level": "client", "epsilon": 7.9}, 7.9, None),
        # a record-only ledger states the record-level epsilon at the top: not a client-level epsilon
        ("record", {"level": "record", "epsilon": 3.0, "record": {"epsilon_max": 3.0}}, None, 3.0),
        ("client+record", {"level": "client+record", "epsilon": 7.9, "record": {"epsilon_max": 3.0}}, 7.9, 3.0),
    ],
)
def test_run_outcome_reads_both_levels_of_epsilon(tmp_path, level, privacy, epsilon, record_epsilon):
    metrics = {"accuracy": 0.8, "auc": 0.9}
    summary = {"privacy_level": level, "test": {"final": metrics, "best": metrics}, "total_seconds": 3.0}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    (tmp_path / "privacy.json").write_text(json.dumps(privacy))
    outcome = execute._run_outcome(tmp_path)
    assert (outcome["epsilon"], outcome["record_epsilon"]) == (epsilon, record_epsilon)
    assert outcome["privacy_level"] == level and outcome["test_final"] == metrics


def test_report_groups_seeds_and_shows_what_varies(tmp_path):
    def row(run_id, seed, auc, dp="client", achieved=8.0, clients=12, status="ok", **settings):
        privacy = {"dp": dp, **({"epsilon": 8.0} if dp == "client" else {})}
        return {
            "id": run_id,
            "kind": "run",
            "method": "deer",
            "dataset": "medmnist:dermamnist",
            "seed": seed,
            "settings": {"dataset": "medmnist:dermamnist", "num_clients": clients, **privacy, "seed": seed, **settings},
            "status": status,
            "test_final": None if status != "ok" else {"auc": auc, "recall_macro": auc - 0.1},
            "epsilon": achieved if dp == "client" and status == "ok" else None,
            "record_epsilon": None,
            "privacy_level": dp,
            "seconds": 10.0 * (seed + 1),
            "error": None if status == "ok" else "exit code 1\nValueError: boom",
        }

    rows = [
        row("a", 0, 0.70, achieved=7.9),
        row("b", 1, 0.80, achieved=7.9),
        row("c", 0, 0.60, clients=48),
        row("d", 0, 0.90, dp="none"),
        row("e", 0, 0.5, status="failed", clients=192),
    ]
    md = report.render_markdown(rows, planned=6)
    assert "4 ok, 1 failed, of 6 planned" in md
    assert "| method | privacy | num_clients | test AUC | balanced acc. | ε achieved | runs | mean s |" in md
    assert "| deer | none | 12 | 0.900 ± – | 0.800 ± – | – | 1 | 10 |" in md
    assert "| deer | client ε=8 | 12 | 0.750 ± 0.071 | 0.650 ± 0.071 | client 7.90 | 2 | 15 |" in md
    assert "| deer | client ε=8 | 48 | 0.600 ± – |" in md
    assert "`e` medmnist:dermamnist, deer, client ε=8, seed 0:" in md and "ValueError: boom" in md
    png = report.plot_auc_vs_epsilon(rows, tmp_path / "plot.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------- the linear probe


def test_linear_probe_picks_c_on_validation_only(medmnist_dir, monkeypatch, tmp_path):
    val_labels = load_dataset_spec("medmnist:pneumoniamnist", data_dir=medmnist_dir).val.labels
    scored: list[np.ndarray] = []
    real_score = lp.selection_score

    def spy(labels, probs):
        scored.append(np.asarray(labels))
        return real_score(labels, probs)

    monkeypatch.setattr(lp, "selection_score", spy)
    kwargs = {"model": "tiny-vit", "data_dir": medmnist_dir, "train_subset": 600, "say": print}
    result = lp.linear_probe("medmnist:pneumoniamnist", cache_dir=tmp_path / "cache", **kwargs)
    assert result["C"] in lp.C_GRID and result["selection_metric"] == "validation auc"
    assert len(scored) == len(lp.C_GRID) and all(np.array_equal(s, val_labels) for s in scored)
    assert result["train_size"] == 600 and result["feature_dim"] == 64  # CLS + mean patch of hidden 32
    assert 0.6 < result["test"]["auc"] <= 1 and "balanced_accuracy" in result["test"]
    assert len(list((tmp_path / "cache").glob("probe-*.pt"))) == 3  # train, val, test features

    # Scrambling the test split changes the test metrics but neither C nor the validation scores.
    real_load = lp.load_dataset_spec

    def scrambled(*args, **kw) -> DatasetSplits:
        splits = real_load(*args, **kw)
        rng = np.random.default_rng(0)
        test = dataclasses.replace(
            splits.test,
            images=rng.integers(0, 256, splits.test.images.shape, dtype=np.uint8),
            labels=rng.permutation(splits.test.labels),
        )
        return DatasetSplits(splits.train, splits.val, test, splits.name)

    monkeypatch.setattr(lp, "load_dataset_spec", scrambled)
    again = lp.linear_probe("medmnist:pneumoniamnist", cache_dir=tmp_path / "cache", **kwargs)
    assert again["C"] == result["C"] and again["val_scores"] == result["val_scores"]
    assert again["test"]["auc"] != result["test"]["auc"]


def test_linear_probe_on_an_rgb_multiclass_medmnist_file(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 140), ("val", 70), ("test", 70)):
        labels = np.arange(n) % 7  # dermamnist: 7 classes, RGB
        brightness = (labels * 25).astype(np.uint8)[:, None, None, None]
        images = rng.integers(0, 80, (n, 28, 28, 3), dtype=np.uint8) + brightness
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels[:, None]
    np.savez(tmp_path / "dermamnist.npz", **arrays)
    result = lp.linear_probe("medmnist:dermamnist", model="tiny-vit", data_dir=tmp_path, c_grid=(0.1, 1.0))
    assert result["C"] in (0.1, 1.0) and set(result["val_scores"]) == {"0.1", "1.0"}
    assert result["test"]["auc"] > 0.9  # macro one-vs-rest over 7 classes; the classes differ in brightness


def test_validation_auc_is_read_from_the_run_and_shown_beside_test_auc(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    metrics = {"auc": 0.8, "balanced_accuracy": 0.7}
    (run / "summary.json").write_text(
        json.dumps({"privacy_level": "none", "test": {"final": metrics, "best": metrics}, "total_seconds": 1.0})
    )
    (run / "privacy.json").write_text(json.dumps({"level": "none"}))
    lines = [{"round": 0, "val_auc": 0.61}, {"round": 1, "val_auc": 0.93}, {"round": 2, "val_auc": 0.88}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + '\n{"round": 3, "val_au')
    outcome = execute._run_outcome(run)
    assert (outcome["val_auc_final"], outcome["val_auc_best"]) == (0.88, 0.93)

    row = {
        "id": "a", "kind": "run", "method": "deer", "dataset": "d", "seed": 0,
        "settings": {"dataset": "d", "dp": "none", "seed": 0}, "status": "ok", "seconds": 2.0, **outcome,
    }  # fmt: skip
    probe = {
        "id": "p", "kind": "probe", "method": "linear-probe", "dataset": "d", "seed": 0, "status": "ok",
        "settings": {"dataset": "d", "model": "m", "image_size": 56}, "seconds": 1.0,
        "test_final": {"auc": 0.9}, "probe": {"C": 0.1, "val_scores": {"0.1": 0.95, "1.0": 0.97}},
    }  # fmt: skip
    md = report.render_markdown([probe, row])
    assert "| method | privacy | val AUC | test AUC | balanced acc. |" in md
    assert "| deer | none | 0.880 ± – | 0.800 ± – | 0.700 ± – |" in md
    assert "centralized; C=0.1) | none | 0.950 ± – | 0.900 ± – |" in md


def test_common_settings_name_every_shared_non_default_setting():
    """A dataset whose runs all changed a setting outside the usual list (here lora_alpha, which turns
    LoRA off: a federated linear probe) says so above its table, so no row reads as plain `deer`."""
    row = {
        "id": "a", "kind": "run", "method": "deer", "dataset": "d", "seed": 0, "status": "ok", "seconds": 2.0,
        "settings": {"dataset": "d", "dp": "none", "seed": 0, "lora_alpha": 1e-6, "head_init": "zero"},
        "test_final": {"auc": 0.8},
    }  # fmt: skip
    md = report.render_markdown([row])
    common = next(line for line in md.splitlines() if line.startswith("Common settings:"))
    assert "lora_alpha=1e-06" in common and "head_init=zero" in common
    assert "seed=" not in common and "output_dir" not in common and "dp=" not in common
    # a setting left at deer-fed's default is not listed
    assert "engine=" not in common


# ----------------------------------------------------------------------------- the command line


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120
    )


HEAVY = "print(sorted(m for m in ('torch', 'transformers', 'peft', 'sklearn', 'matplotlib') if m in sys.modules))"


@pytest.mark.e2e
def test_help_is_light_from_bench_and_from_the_console_script():
    """`--help` loads no torch: `bench/campaign.py` loads the command line through peft_deer.light_import; the
    console script's own path (extras.deer_campaign -> peft_deer.campaign.cli) is checked with the package's
    __init__ (the PEFT registration, which the console-script wrapper's `from peft_deer.extras import` runs)
    bypassed, so that only what the command itself imports counts."""
    bench = _python(
        "import runpy, sys\nsys.argv = ['bench/campaign.py', '--help']\n"
        "try:\n    runpy.run_path('bench/campaign.py', run_name='__main__')\n"
        f"except SystemExit as e:\n    print(e.code)\n{HEAVY}"
    )
    script = _python(
        "import importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location('peft_deer', 'peft_deer/__init__.py',"
        " submodule_search_locations=['peft_deer'])\n"
        "sys.modules['peft_deer'] = importlib.util.module_from_spec(spec)  # the package, its __init__ not run\n"
        "from peft_deer.extras import deer_campaign\n"
        f"try:\n    deer_campaign(['--help'])\nexcept SystemExit as e:\n    print(e.code)\n{HEAVY}"
    )
    for proc, prog in ((bench, "bench/campaign.py"), (script, "deer-campaign")):
        lines = proc.stdout.strip().splitlines()
        assert proc.returncode == 0 and lines[-2:] == ["0", "[]"], (proc.stdout[-500:], proc.stderr[-2000:])
        assert proc.stdout.startswith(f"usage: {prog} [-h] [--grid GRID] --out OUT")
        assert "A grid (YAML) holds:" in proc.stdout and "--report-only" in proc.stdout
    assert bench.stdout.partition("\n\n")[2] == script.stdout.partition("\n\n")[2]  # all but the usage lines


@pytest.mark.e2e
def test_bench_script_and_console_script_list_the_same_dry_run(tmp_path, medmnist_dir):
    grid, out = tmp_path / "grid.yaml", tmp_path / "out"
    spec = {
        "base": {"model": "tiny-vit", "data-dir": str(medmnist_dir), "rounds": 2, "num-clients": 3},
        "vary": {"method": ["deer", "ffa"], "privacy": [{"dp": "none"}, {"dp": "client", "epsilon": 8}]},
        "seeds": [0, 1],
        "seeds_for": [{"dp": "none"}],
        "extra": [{"method": "lora", "seed": 7}],
        "probe": [{"dataset": "medmnist:pneumoniamnist"}],
    }
    grid.write_text(json.dumps(spec))
    plan = campaign_grid.expand_grid(spec)
    out.mkdir()  # one finished run and one failed run, so the listing shows states
    (out / "results.jsonl").write_text(
        json.dumps({"id": plan[1].id, "status": "ok"})
        + "\n"
        + json.dumps({"id": plan[2].id, "status": "failed"})
        + "\n"
    )
    argv = ["--grid", str(grid), "--out", str(out), "--dry-run"]
    bench = subprocess.run(
        [sys.executable, "bench/campaign.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    script = _python(
        "import sys\nfrom peft_deer.extras import deer_campaign\nsys.exit(deer_campaign(sys.argv[1:]))", *argv
    )
    assert bench.returncode == script.returncode == 0, (bench.stderr[-2000:], script.stderr[-2000:])
    listing = bench.stdout.splitlines()
    assert listing[0] == "8 runs planned (1 done, 1 failed, 6 new); 7 to run" and len(listing) == 1 + len(plan)
    assert [line.split()[1] for line in listing[1:]] == [item.id for item in plan]
    assert script.stdout == bench.stdout
    assert sorted(p.name for p in out.iterdir()) == ["results.jsonl"]  # a dry run writes nothing
