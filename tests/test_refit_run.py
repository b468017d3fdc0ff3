"""`deer-fed --head-refit stats` end to end on real MedMNIST images and the tiny random ViT (CPU): the head changes,
the ledger holds the refit's release and its epsilon, the summary its validation AUCs, and a resumed run never
releases the statistics twice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant
from safetensors.torch import load_file
from test_fed_driver import exit_code, run_argv

from peft_deer.federated.record_dp import record_sample_rate, record_steps
from peft_deer.run import lifecycle
from peft_deer.run.checkpoint import load_checkpoint
from peft_deer.run.run_dir import CHECKPOINT
from train import fed

REFIT = ["--head-refit", "stats", "--refit-dims", "8", "--rounds", "1"]
LEVELS = {
    "none": ["--dp", "none"],
    "record": ["--dp", "record", "--record-noise-multiplier", "1.0", "--record-delta", "1e-4"],
    "client": ["--dp", "client", "--noise-multiplier", "1.0", "--delta", "1e-3"],
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _rdp(history, delta) -> float:
    acc = RDPAccountant()
    acc.history = history
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("level", list(LEVELS))
def test_refit_changes_the_head_and_is_in_the_ledger(level, tmp_path, medmnist_dir):
    out = tmp_path / level
    assert fed.main(run_argv(medmnist_dir, out, "deer", *REFIT, *LEVELS[level])) == 0
    final, best = (load_file(out / d / "adapter_model.safetensors") for d in ("adapter", "adapter-best"))
    head = [k for k in final if "classifier" in k]
    assert head and all(not final[k].equal(best[k]) for k in head)  # one round: best = final before the refit
    assert all(final[k].equal(best[k]) for k in final if k not in head)  # the LoRA factors are untouched
    ledger, summary = _json(out / "privacy.json"), _json(out / "summary.json")
    refit = ledger["head_refit"]
    assert refit["applied"] and refit["dims"] == 8 and refit["level"] == level
    assert summary["head_refit"]["val_auc_after"] == refit["val_auc_after"]
    assert 0 <= summary["head_refit"]["val_auc_before"] <= 1
    if level == "client":  # 2 training releases (phases B, A at q = 1) and the refit at (2.0, q = 1)
        assert refit["client"]["noise_std_on_sum"] == pytest.approx(2.0 * 3**0.5)
        assert ledger["epsilon_rdp"] == pytest.approx(_rdp([(1.0, 1.0, 2), (2.0, 1.0, 1)], 1e-3))
        assert ledger["epsilon_rdp"] > _rdp([(1.0, 1.0, 2)], 1e-3)
    if level == "record":  # each hospital: its DP-SGD steps, then one Gaussian step (2.0, q = 1)
        rec = ledger["record"]
        for c, size in rec["public_sizes"].items():
            q, steps = record_sample_rate(size, 32), 2 * record_steps(size, 32, 1)
            assert rec["steps"][c] == steps + 1
            expected = _rdp([(1.0, q, steps), (2.0, 1.0, 1)], 1e-4)
            assert rec["epsilon_per_client_rdp"][c] == pytest.approx(expected)
            assert expected > _rdp([(1.0, q, steps)], 1e-4)
    if level == "none":
        assert refit["noise"].startswith("none")


def test_calibrated_sigma_leaves_room_for_the_refit(tmp_path, medmnist_dir):
    out = tmp_path / "eps"
    argv = run_argv(medmnist_dir, out, "deer", *REFIT, "--dp", "client", "--epsilon", "8", "--delta", "1e-3")
    assert fed.main(argv) == 0
    ledger = _json(out / "privacy.json")
    assert ledger["head_refit"]["applied"] and ledger["epsilon"] <= 8.0
    assert ledger["epsilon"] > 7.5  # the target is met, not wasted


def test_a_resumed_run_never_releases_twice(tmp_path, medmnist_dir, monkeypatch):
    out = tmp_path / "resume"
    argv = run_argv(medmnist_dir, out, "deer", *REFIT, *LEVELS["client"])
    real = lifecycle.finalize

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # killed after the refit's checkpoint, before the outputs

    monkeypatch.setattr(lifecycle, "finalize", crash)
    code, _ = exit_code(lambda: fed.main(argv))
    assert code != 0 and not (out / "summary.json").exists()
    saved = load_checkpoint(out / CHECKPOINT)["server"]["refit"]  # checkpointed with the refit: never redone
    assert saved is not None and saved["applied"]
    monkeypatch.setattr(lifecycle, "finalize", real)
    code, _ = exit_code(lambda: fed.main([*argv, "--resume"]))
    assert code == 0
    ledger = _json(out / "privacy.json")
    assert ledger["head_refit"] == saved
    assert ledger["epsilon_rdp"] == pytest.approx(_rdp([(1.0, 1.0, 2), (2.0, 1.0, 1)], 1e-3))  # one refit, not two


@pytest.mark.parametrize(
    ("level", "flags", "delta_key"),
    [
        ("client", ["--dp", "client", "--epsilon", "4", "--delta", "1e-3"], "delta"),
        ("record", ["--dp", "record", "--record-epsilon", "4", "--record-delta", "1e-4"], "record"),
    ],
)
def test_statistics_only_gives_the_refit_the_whole_budget(level, flags, delta_key, tmp_path, medmnist_dir):
    """--rounds 0: no training; the refit is the one release, its multiplier calibrated to meet the target alone."""
    out = tmp_path / level
    argv = run_argv(medmnist_dir, out, "deer", "--head-refit", "stats", "--refit-dims", "8", *flags, "--rounds", "0")
    assert fed.main(argv) == 0
    ledger, summary = _json(out / "privacy.json"), _json(out / "summary.json")
    refit = ledger["head_refit"]
    assert refit["applied"] and summary["rounds_completed"] == 0
    m = refit[level]["noise_multiplier"]
    assert m < 2.0  # the whole budget, not --refit-noise-multiplier's default 2.0
    if level == "client":
        assert ledger["epsilon_rdp"] == pytest.approx(_rdp([(m, 1.0, 1)], 1e-3))  # the one release, nothing else
        assert 3.9 < ledger["epsilon"] <= 4.0  # PRV: the target met, not wasted
    else:
        rec = ledger["record"]
        assert set(rec["steps"].values()) == {1}  # no DP-SGD step: the refit's Gaussian step only
        assert all(e == pytest.approx(_rdp([(m, 1.0, 1)], 1e-4)) for e in rec["epsilon_per_client_rdp"].values())
        assert 3.9 < max(rec["epsilon_per_client"].values()) <= 4.0
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert any("classifier" in k for k in adapter) and not (out / "adapter-best").exists()


def test_statistics_only_needs_the_refit(tmp_path, medmnist_dir, capsys):
    code, _ = exit_code(lambda: fed.main(run_argv(medmnist_dir, tmp_path / "r0", "deer", "--rounds", "0")))
    assert code == 2 and "--rounds 0" in capsys.readouterr().err and not (tmp_path / "r0").exists()
