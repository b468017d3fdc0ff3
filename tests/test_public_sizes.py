"""Record-level DP from declared public sizes: one record more in a hospital changes nothing the run publishes.

The rounding rule's properties, the accounting's independence from exact counts, the trust-model table, and
the published-files check: two tiny simulated record-level runs whose hospital 0 differs by one record.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from peft_deer.federated import ClientUpdate
from peft_deer.federated.record_dp import RecordDP, RecordLevel, public_size, record_sample_rate, record_steps
from peft_deer.federated.trust_model import ADVERSARIES, trust_model, trust_model_of

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing", "ignore:Optimal order")

# ----------------------------------------------------------------------------------------- the rounding rule


def test_public_size_floors_to_two_significant_figures_on_a_grid_at_least_ten_wide():
    sizes = np.arange(1, 30000)
    declared = np.array([public_size(int(n)) for n in sizes])
    assert (declared >= 1).all() and (declared <= sizes).all()  # floor: never above the count
    assert (np.diff(declared) >= 0).all()  # monotone
    for n, s in zip(sizes, declared, strict=True):
        step = 10 ** max(1, len(str(n)) - 2)
        assert s % step == 0 or n < 10, (n, s)
        assert n - s < step, (n, s)  # within one grid step below
        assert len(str(s).rstrip("0")) <= 2  # at most 2 significant figures
    # Every declaration of 10 or more hides the exact count among at least 10 counts.
    values, counts = np.unique(declared[sizes >= 10], return_counts=True)
    assert counts[values >= 10].min() >= 10
    assert [public_size(n) for n in (5, 57, 117, 1234, 9999)] == [1, 50, 110, 1200, 9900]
    with pytest.raises(ValueError, match="at least one example"):
        public_size(0)


def test_the_ledger_depends_on_declared_sizes_not_exact_counts():
    dp = RecordDP(noise_multipliers=(1.1, 0.9), clip_norm=1.0, delta=1e-5, public_sizes=(110, 40))
    ledgers = []
    for exact in ((117, 43), (118, 44), (110, 49)):  # one record more, another, ... all with the same declarations
        level = RecordLevel(dp, batch_size=16, local_epochs=2)
        for _ in range(3):
            level.account([ClientUpdate(c, {}, exact[c]) for c in range(2)])
        ledgers.append(level.ledger())
    assert ledgers[0] == ledgers[1] == ledgers[2]
    assert ledgers[0]["public_sizes"] == {"0": 110, "1": 40}
    assert level.accountants.history[0] == [(1.1, record_sample_rate(110, 16), 3 * record_steps(110, 16, 2))]
    # Without declared sizes the exact count is used as if public (tests and the audit): then it does move.
    exact = RecordLevel(RecordDP(noise_multipliers=(1.1,), clip_norm=1.0, delta=1e-5), 16, 1)
    exact.account([ClientUpdate(0, {}, 117)])
    assert exact.accountants.history[0][0][1] == 16 / 117
    with pytest.raises(ValueError, match="integers >= 1"):
        RecordDP(noise_multipliers=(1.0,), public_sizes=(0,))


# ----------------------------------------------------------------------------------------- the trust model


def test_trust_model_table_per_mode():
    rows = lambda table: table["against"]  # noqa: E731
    central = rows(trust_model("client", True, "central", client_epsilon=2.0))
    assert set(central) == set(ADVERSARIES)
    assert central["public"]["client_level_epsilon"] == 2.0 and central["server"]["client_level_epsilon"] is None
    assert "un-noised" in central["server"]["why"] and central["another site"]["client_level_epsilon"] == 2.0
    distributed = rows(trust_model("client", True, "distributed", client_epsilon=2.0, epsilon_vs_server=9.0))
    assert distributed["server"]["client_level_epsilon"] == 9.0
    assert distributed["t colluding sites"]["client_level_epsilon"] is None  # not computed: no claim
    assert "not computed" in distributed["t colluding sites"]["why"]
    secagg = rows(trust_model("client", True, "distributed", True, client_epsilon=2.0, epsilon_vs_colluding=5.0))
    assert secagg["server"]["client_level_epsilon"] == 2.0 and secagg["t colluding sites"]["client_level_epsilon"] == 5
    record = rows(trust_model("client+record", True, "central", client_epsilon=2.0, record_epsilon=3.0))
    assert all(record[a]["record_level_epsilon"] == 3.0 for a in ADVERSARIES)
    assert record["server"]["client_level_epsilon"] is None
    simulated = rows(trust_model("record", False, record_epsilon=3.0))
    assert simulated["public"]["record_level_epsilon"] == 3.0 and simulated["server"]["record_level_epsilon"] is None
    assert "client_level_epsilon" not in simulated["public"]
    none = rows(trust_model("none", True))
    assert all(set(none[a]) == {"why"} and "no guarantee" in none[a]["why"] for a in ADVERSARIES)
    seeded = rows(trust_model("record", True, record_epsilon=3.0, reproducible=True))
    assert seeded["public"]["record_level_epsilon"] is None and "public seed" in seeded["public"]["why"]
    with pytest.raises(ValueError, match="placement"):
        trust_model("client", True, None)
    ledger = {"level": "client", "trust_model": "distributed", "epsilon": 1.5, "transport": "flower"}
    assert trust_model_of({**ledger, "secure_aggregation": True})["against"]["server"]["client_level_epsilon"] == 1.5


# ----------------------------------------------------------------------------------------- the published files


def _argv(data_dir, out):
    return [
        "--model", "tiny-vit", "--dataset", "medmnist:pneumoniamnist", "--data-dir", str(data_dir),
        "--train-subset", "120", "--num-clients", "3", "--partition", "iid", "--rounds", "1", "--batch-size", "16",
        "--seed", "0", "--method", "deer", "--output-dir", str(out),
        "--dp", "record", "--record-epsilon", "8", "--record-delta", "1e-3",
    ]  # fmt: skip


MODEL_OUTPUTS = {"test", "calibration", "best_round"}  # summary.json: the model's outputs
TIMING = {"seconds", "total_seconds", "images_per_s"}  # depend on exact counts: server-private only


def _published(out) -> dict:
    def read(name: str) -> str:  # the run's own directory named alike in both runs
        return (out / name).read_text().replace(str(out), "OUT")

    rows = [json.loads(line) for line in read("metrics.jsonl").splitlines()]
    summary = json.loads(read("summary.json"))
    for published in (*rows, summary):
        assert not TIMING & set(published), TIMING & set(published)
    return {
        "privacy": json.loads(read("privacy.json")),
        "metrics": [{k: v for k, v in r.items() if not k.startswith("val_")} for r in rows],
        "summary": {k: v for k, v in summary.items() if k not in MODEL_OUTPUTS},
    }


@pytest.mark.e2e  # driver runs, over 5 s
def test_one_record_more_changes_nothing_published(tmp_path, medmnist_dir, monkeypatch):
    from peft_deer.run import experiment
    from train import fed

    load = experiment.load_run_data

    def one_more(settings, *args, **kwargs):  # hospital 0 holds one more patient's image
        data = load(settings, *args, **kwargs)
        extra = np.setdiff1d(np.arange(len(data.splits.train.labels)), data.train_idx)[0]
        data.train_idx = np.append(data.train_idx, extra)
        data.partitions[0] = np.append(data.partitions[0], len(data.train_idx) - 1)
        return data

    assert fed.main(_argv(medmnist_dir, tmp_path / "a")) == 0
    monkeypatch.setattr(experiment, "load_run_data", one_more)
    assert fed.main(_argv(medmnist_dir, tmp_path / "b")) == 0
    a, b = _published(tmp_path / "a"), _published(tmp_path / "b")
    assert a["privacy"]["record"]["public_sizes"] == {"0": 40, "1": 40, "2": 40}  # 40 and 41 both declare 40
    assert a == b
    assert a["privacy"]["epsilon"] > 0 and math.isfinite(a["privacy"]["epsilon"])
    assert "given the clients' declared public sizes" in a["privacy"]["neighbouring_relation"]
    table = a["privacy"]["trust_model_table"]
    assert table["deployment"] == "simulation" and table["against"]["public"]["record_level_epsilon"] > 0


def _change_hospital_0(load, change: int):
    def changed(settings, *args, **kwargs):  # hospital 0 holds `change` records more (or fewer)
        data = load(settings, *args, **kwargs)
        if change < 0:
            data.partitions[0] = data.partitions[0][:change]
        for _ in range(change):
            extra = np.setdiff1d(np.arange(len(data.splits.train.labels)), data.train_idx)[0]
            data.train_idx = np.append(data.train_idx, extra)
            data.partitions[0] = np.append(data.partitions[0], len(data.train_idx) - 1)
        return data

    return changed


@pytest.mark.e2e  # driver runs, over 5 s
def test_declared_sizes_make_39_40_and_41_records_publish_the_same(tmp_path, medmnist_dir, monkeypatch):
    """/tmp/attack24/published_diff.py: derived, 40 -> 39 records moves the declaration 40 -> 30 at the grid edge;
    declared in advance (--record-public-sizes), the three runs publish identical privacy.json and the rest."""
    from peft_deer.run import experiment
    from train import fed

    load = experiment.load_run_data
    published = {}
    for change in (0, -1, 1):
        monkeypatch.setattr(experiment, "load_run_data", _change_hospital_0(load, change))
        out = tmp_path / f"run{change}"
        assert fed.main([*_argv(medmnist_dir, out), "--record-public-sizes", "40,40,40"]) == 0
        published[change] = _published(out)
    assert published[0] == published[-1] == published[1]
    record = published[0]["privacy"]["record"]
    assert record["public_sizes"] == {"0": 40, "1": 40, "2": 40} and "declared explicitly" in record["public_size_rule"]
    # derived sizes at the edge: the declaration moves (the ledger says that it can)
    assert public_size(39) == 30 and "grid edge" in published[0]["privacy"]["neighbouring_relation"]


def test_record_public_sizes_are_checked(medmnist_dir, tmp_path):
    from peft_deer.run.privacy import record_level
    from peft_deer.settings import parse_args

    argv = _argv(medmnist_dir, tmp_path / "x")
    assert parse_args([*argv, "--record-public-sizes", "40,41,42"]).record.public_sizes == (40, 41, 42)
    for bad in ("0,40,40", "40,x,40", ""):
        with pytest.raises((ValueError, SystemExit)):
            parse_args([*argv, "--record-public-sizes", bad])
    with pytest.raises(ValueError, match="one integer >= 1 per client"):
        record_level(parse_args([*argv, "--record-public-sizes", "40,40"]), [40, 40, 40])
    above = record_level(parse_args([*argv, "--record-public-sizes", "50,40,40"]), [40, 40, 40])  # allowed
    assert above.dp.public_sizes == (50, 40, 40)


def test_trust_table_reads_the_per_adversary_epsilons_of_distributed_noise():
    """Under distributed noise a participating site knows its share: its row is the ledger's one-site epsilon,
    higher than the public's (outsiders), and t colluders get theirs; a table that gave every party the
    run's epsilon fails here."""
    against = {
        "outsiders": {"rdp": 6.5, "prv": 6.0},
        "one_participating_site": {"rdp": 10.2, "prv": 9.9},
        "t_colluding_sites": {"rdp": 10.2, "prv": 9.9, "t": 1},
    }
    ledger = {
        "level": "client", "trust_model": "distributed", "epsilon": 9.9, "accountant": "prv", "transport": "flower",
        "secure_aggregation": True, "epsilon_against": against,
    }  # fmt: skip
    rows = trust_model_of(ledger)["against"]
    assert rows["public"]["client_level_epsilon"] == 6.0 and rows["server"]["client_level_epsilon"] == 6.0
    assert rows["another site"]["client_level_epsilon"] == 9.9 and "own noise share" in rows["another site"]["why"]
    assert rows["t colluding sites"]["client_level_epsilon"] == 9.9
    assert trust_model_of(ledger)["colluding_sites"] == 1
    no_table = trust_model_of({k: v for k, v in ledger.items() if k != "epsilon_against"})["against"]
    assert no_table["another site"]["client_level_epsilon"] is None
    assert no_table["public"]["client_level_epsilon"] == 9.9
