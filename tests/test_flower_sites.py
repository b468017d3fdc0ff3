"""The sites of the DEeR Flower app: the long-lived site worker, record-level DP accounting at the sites, and
per-site evaluation counts. In-process or with a real worker subprocess; no SuperLink (see test_flower.py).
"""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
import time
from multiprocessing.connection import AuthenticationError, Client

import numpy as np
import pytest
import torch
from helpers import MEDMNIST_DIR, ROOT, random_client_tasks, tiny_deer_model

pytest.importorskip("flwr", reason="Flower is not installed (pip install 'peft_deer[flower]')")

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from peft_deer.evaluation.metrics import classification_metrics  # noqa: E402
from peft_deer.federated import (  # noqa: E402
    FederatedServer,
    LocalTraining,
    SequentialEngine,
    adapter_layout,
    get_adapter_state,
    iter_phases,
)
from peft_deer.federated.record_dp import RecordAccountants, RecordDP, RecordLevel  # noqa: E402
from peft_deer.flower import DeerStrategy  # noqa: E402
from peft_deer.flower.protocol import (  # noqa: E402
    RecordReport,
    SiteCounts,
    evaluate_message,
    read_evaluate_content,
    read_site_counts,
    update_reply,
)
from peft_deer.flower.run_config import DeploymentOptions  # noqa: E402
from peft_deer.flower.site_accounting import SiteAccountant, SiteRecordLevel  # noqa: E402
from peft_deer.flower.site_evaluation import histogram_auc, site_metrics, site_table  # noqa: E402

RUN_KEY = "0123456789abcdef"


def tiny_run_config(**overrides) -> dict:
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    return {
        **config,
        "model": "tiny-vit",
        "image-size": 28,
        "train-subset": 200,
        "data-dir": str(MEDMNIST_DIR),
        **overrides,
    }


# --------------------------------------------------------------------------------- record-level accounting


def record_level(sigma: float = 1.1, clients: int = 2) -> RecordLevel:
    return RecordLevel(RecordDP(noise_multipliers=(sigma,) * clients, delta=1e-5), batch_size=8, local_epochs=1)


def test_a_site_accountant_survives_a_restart_and_matches_the_simulation_accountant(tmp_path):
    record = record_level()
    first = SiteAccountant(tmp_path, RUN_KEY, 1)
    first.step(record, 40)
    first.step(record, 40)
    restarted = SiteAccountant(tmp_path, RUN_KEY, 1)  # a new worker process: the history comes from disk
    report = restarted.step(record, 40)
    assert report.history == ((1.1, 0.2, 15),) and (report.sigma, report.sample_rate, report.steps) == (1.1, 0.2, 5)
    # The same three updates accounted as deer-fed accounts them (RecordLevel.account on the server).
    reference = RecordAccountants()
    for _ in range(3):
        reference.step(1, 1.1, 0.2, 5)
    assert report.epsilon == pytest.approx(reference.epsilon(1, 1e-5)) and report.epsilon > 0
    assert SiteAccountant(tmp_path, "fedcba9876543210", 1).accountants.history == {}  # another run: fresh
    with pytest.raises(ValueError, match="run key"):
        SiteAccountant(tmp_path, "../../etc", 1)


def test_the_server_ledger_takes_each_sites_report_and_never_lowers_it(caplog):
    ledger = SiteRecordLevel(record_level())
    updates = [type("U", (), {"client_id": c})() for c in (0, 1)]
    ledger.expect(
        {
            0: RecordReport(1.1, 0.2, 5, ((1.1, 0.2, 10),), 1.0),  # a retry at the site: 10 steps, not 5
            1: RecordReport(0.9, 0.5, 2, ((0.9, 0.5, 2),), 1.0),
        }
    )
    ledger.account(updates)
    assert ledger.accountants.history == {0: [(1.1, 0.2, 10)], 1: [(0.9, 0.5, 2)]}
    # Site 0 lost its state directory: its report is shorter than the ledger; the ledger adds the update instead.
    ledger.expect(
        {0: RecordReport(1.1, 0.2, 5, ((1.1, 0.2, 5),), 0.5), 1: RecordReport(0.9, 0.5, 2, ((0.9, 0.5, 4),), 1.0)}
    )
    with caplog.at_level(logging.WARNING, logger="flwr"):
        logging.getLogger("flwr").addHandler(caplog.handler)
        ledger.account(updates)
        logging.getLogger("flwr").removeHandler(caplog.handler)
    assert ledger.accountants.history[0] == [(1.1, 0.2, 15)] and "shorter" in caplog.text
    public = ledger.ledger()
    assert public["noise_multipliers"] == {"0": 1.1, "1": 0.9} and public["steps"] == {"0": 15, "1": 4}
    restored = SiteRecordLevel(record_level())
    restored.load_state_dict(ledger.state_dict())  # a resumed ServerApp (the checkpoint)
    assert restored.ledger() == public
    assert SiteRecordLevel(restored).ledger() == public  # wrapping keeps what is held


def test_a_record_level_reply_without_its_accountant_is_dropped(flower_task_identity):
    model = tiny_deer_model("deer")
    layout = adapter_layout(model)
    state = get_adapter_state(model, layout)
    server = FederatedServer(
        method="deer",
        layout=layout,
        global_state=state,
        num_clients=2,
        clients_per_phase=2,
        dp=None,
        record=record_level(),
    )
    strategy = DeerStrategy(server, {0: 1000, 1: 1001}, 1, DeploymentOptions(1), RUN_KEY)
    assert isinstance(server.record, SiteRecordLevel)
    phase = next(iter_phases("deer", 1))
    tasks = random_client_tasks((8, 8), torch.Generator().manual_seed(0))
    updates = SequentialEngine(LocalTraining(batch_size=4, lr=0.5)).train_clients(model, layout, state, phase, tasks)
    messages = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), None))
    assert {m.content.config_records["config"]["run-key"] for m in messages} == {RUN_KEY}
    good = RecordReport(1.1, 0.5, 2, ((1.1, 0.5, 2),), 0.7)
    strategy.aggregate_train(1, [update_reply(messages[0], updates[0], good), update_reply(messages[1], updates[1])])
    assert [(d["client"], "no accountant" in d["reason"]) for d in strategy.dropped] == [(1, True)]
    assert server.record.ledger()["epsilon_per_client"] == {"0": pytest.approx(_rdp_epsilon(1.1, 0.5, 2))}


def _rdp_epsilon(sigma: float, q: float, steps: int) -> float:
    acc = RecordAccountants()
    acc.step(0, sigma, q, steps)
    return acc.epsilon(0, 1e-5)


@pytest.fixture
def flower_task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None


# --------------------------------------------------------------------------------- per-site evaluation counts


def test_site_metrics_from_counts_match_the_direct_metrics():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 500)
    p1 = np.clip(0.25 + 0.4 * labels + rng.normal(0, 0.2, 500), 0, 1)
    probs = np.stack([1 - p1, p1], 1)
    threshold = 0.55
    decisions = (p1 >= threshold).astype(int)
    confusion = np.zeros((2, 2), dtype=int)
    np.add.at(confusion, (labels, decisions), 1)
    hists = np.stack([np.histogram(p1[labels == c], bins=1000, range=(0, 1))[0] for c in (0, 1)])
    got = site_metrics(confusion, hists)
    direct = classification_metrics(labels, probs, threshold)
    for key in ("balanced_accuracy", "sensitivity", "specificity"):
        assert got[key] == pytest.approx(direct[key])
    assert got["accuracy"] == pytest.approx(np.mean(decisions == labels))
    assert got["auc"] == pytest.approx(roc_auc_score(labels, p1), abs=2e-3) and got["auc"] != 0.5
    assert histogram_auc(np.array([3, 0]), np.array([0, 0])) is None  # one class only: no AUC
    rows = site_table([SiteCounts(1, ((5, 1), (2, 4))), SiteCounts(0, ((1, 0), (0, 0)))])
    assert [r["client"] for r in rows] == [0, 1, None] and rows[2]["images"] == 13 and rows[0]["sensitivity"] is None


def test_site_counts_round_trip_and_malformed_counts_are_refused(flower_task_identity):
    counts = SiteCounts(3, ((5, 1), (2, 4)), ((1,) * 6 + (0,) * 994, (0,) * 994 + (1,) * 6))
    message = evaluate_message(7, {"w": torch.zeros(2)}, 0.5)
    assert read_site_counts(Message(counts.to_content(), reply_to=message)) == counts
    bad = SiteCounts(3, ((5, 1), (2, 4)), ((1,) * 6 + (0,) * 994, (0,) * 1000))  # histogram sum != class count
    with pytest.raises(ValueError, match="do not match"):
        read_site_counts(Message(bad.to_content(), reply_to=message))


def test_the_evaluate_instruction_carries_the_temperature(flower_task_identity):
    state = {"w": torch.ones(2)}
    got_state, threshold, temperature = read_evaluate_content(evaluate_message(7, state, 0.73, 2.5).content)
    assert (threshold, temperature) == (0.73, 2.5) and torch.equal(got_state["w"], state["w"])
    assert read_evaluate_content(evaluate_message(7, state, None).content)[1:] == (None, 1.0)  # argmax, T = 1
    older = evaluate_message(7, state, 0.5)
    del older.content.config_records["config"]["temperature"]  # a server from before calibration
    assert read_evaluate_content(older.content)[1:] == (0.5, 1.0)
    with pytest.raises(ValueError, match="temperature -1.0 is not a positive finite number"):
        read_evaluate_content(evaluate_message(7, state, 0.5, -1.0).content)


# --------------------------------------------------------------------------------- the long-lived site worker


@pytest.mark.e2e
def test_the_site_worker_keeps_the_site_loaded_refuses_a_wrong_key_and_follows_its_supernode(tmp_path):
    """One worker process answers hello, train and train again: the site is loaded once; the socket and key are
    the user's only; a client with another key is refused and the worker carries on; a failed message comes
    back as its one-line reason; when the process it watches (the SuperNode's executor) is gone, it stops
    within seconds and removes its socket and key."""
    if not (MEDMNIST_DIR / "pneumoniamnist.npz").is_file():
        pytest.skip(f"real MedMNIST files not found at {MEDMNIST_DIR}")
    from flwr.app import RecordDict

    from peft_deer.flower.protocol import TrainInstruction
    from peft_deer.flower.worker_link import ask_worker, worker_paths

    node_config = {"partition-id": 1, "data-dir": str(MEDMNIST_DIR), "state-dir": str(tmp_path / "state")}
    run_config = tiny_run_config(rounds=1)
    paths = worker_paths(node_config)
    paths["key"].write_bytes(os.urandom(32))
    os.chmod(paths["key"], 0o600)
    watched = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    cmd = [sys.executable, "-m", "peft_deer.flower.site_worker", "--socket", str(paths["sock"])]
    cmd += ["--key-file", str(paths["key"]), "--watch-pid", str(watched.pid)]
    with open(paths["log"], "w") as log:
        worker = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=log)
    try:
        deadline = time.monotonic() + 300
        while not paths["sock"].exists() and time.monotonic() < deadline and worker.poll() is None:
            time.sleep(0.2)
        hello = ask_worker("hello", RecordDict(), run_config, node_config)
        assert hello.config_records["config"]["client-id"] == 1
        assert stat.S_IMODE(paths["sock"].stat().st_mode) == 0o600
        assert stat.S_IMODE(paths["sock"].parent.stat().st_mode) == 0o700
        with pytest.raises((AuthenticationError, EOFError, ConnectionError)):
            Client(str(paths["sock"]), family="AF_UNIX", authkey=b"x" * 32).send_bytes(b"{}")
        state = _tiny_global_state(run_config)
        for _ in range(2):  # another output-dir is another run of the same site: still the loaded site
            content = _train_content(TrainInstruction(state, 0, 0, 1, 1, RUN_KEY))
            reply = ask_worker("train", content, {**run_config, "output-dir": "elsewhere"}, node_config)
            assert reply.metric_records["metrics"]["num-examples"] > 0
        with pytest.raises(RuntimeError, match="asked to train client 0"):
            ask_worker("train", _train_content(TrainInstruction(state, 0, 0, 0, 1, RUN_KEY)), run_config, node_config)
        watched.kill()
        watched.wait()
        assert worker.wait(timeout=60) == 0
        log_text = paths["log"].read_text()
        assert log_text.count("loaded the site of client 1") == 1 and log_text.count("train message answered") == 2
        assert "dropped a connection" in log_text and f"process {watched.pid} is gone" in log_text
        assert not paths["sock"].exists() and not paths["key"].exists()
    finally:
        for p in (watched, worker):
            if p.poll() is None:
                p.kill()
                p.wait()


def _train_content(work) -> RecordDict:
    from peft_deer.flower.protocol import state_to_record

    config = {"round": work.round, "phase": work.phase, "client-id": work.client_id, "num-shares": 1}
    return RecordDict(
        {"global": state_to_record(work.global_state), "config": ConfigRecord({**config, "run-key": work.run_key})}
    )


def _tiny_global_state(run_config: dict) -> dict:
    from peft_deer.flower.run_config import parse_run_config
    from peft_deer.run.task import build_model, load_run_backbone, load_run_data

    args, _ = parse_run_config(run_config)
    backbone = load_run_backbone(args, load_run_data(args).splits)
    model, layout = build_model(args, backbone, 0.0, torch.device("cpu"))
    return get_adapter_state(model, layout)


def test_the_flower_app_takes_record_level_dp_settings():
    from peft_deer.flower.run_config import parse_run_config

    args, _ = parse_run_config(tiny_run_config(dp="client,record", epsilon=8.0, **{"record-epsilon": 4.0}))
    assert (args.privacy.dp, args.privacy.epsilon, args.record.record_epsilon) == ("client,record", 8.0, 4.0)
    with pytest.raises(ValueError, match="record-epsilon or --record-noise-multiplier"):
        parse_run_config(tiny_run_config(dp="record"))
