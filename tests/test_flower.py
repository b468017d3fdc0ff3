"""DEeR on Flower: a real loopback deployment equals the simulation; bad client replies are dropped.

The deployment test starts a real SuperLink and two SuperNodes (subprocesses on 127.0.0.1), runs the
app with `flwr run`, compares its adapter with `deer-fed`'s for the same partitions and seeds, and
checks that no process it started is left. The dropping tests drive `DeerStrategy` in-process with
real Flower messages.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import tomllib

import psutil
import pytest
import torch
from helpers import MEDMNIST_DIR, ROOT, random_client_tasks, tiny_deer_model

pytest.importorskip("flwr", reason="Flower is not installed (pip install 'peft_deer[flower]')")

from flwr.app import ArrayRecord, ConfigRecord, Error, Message  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from peft_deer.federated import (  # noqa: E402
    ClientDP,
    ClientUpdate,
    DPRandomness,
    FederatedServer,
    LocalTraining,
    SequentialEngine,
    adapter_layout,
    build_whiteners,
    get_adapter_state,
    iter_phases,
    privatize_update,
)
from peft_deer.flower import DeerStrategy, TooFewClients  # noqa: E402
from peft_deer.flower.protocol import read_train_message, update_reply  # noqa: E402
from peft_deer.flower.run_config import OPTION_KEYS, DeploymentOptions, parse_run_config  # noqa: E402
from peft_deer.methods import NoiseKind  # noqa: E402
from peft_deer.run.run_dir import CHECKPOINT  # noqa: E402


def _stream(seed: int):
    """A public (test-only) noise stream."""
    return DPRandomness.from_seed(seed).stream("t")


def flower_config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


@pytest.mark.e2e
def test_the_app_config_in_pyproject_is_valid_and_names_real_components():
    args, options = parse_run_config(flower_config())
    assert (args.federation.method, args.data.num_clients, options.min_clients_per_phase) == ("deer", 2, 1)
    components = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["components"]

    assert components == {
        "serverapp": "peft_deer.flower.server_app:app",
        "clientapp": "peft_deer_clientapp:app",  # outside peft_deer: a ClientApp process imports no torch
    }
    import sys

    import peft_deer_clientapp
    from peft_deer.flower import server_app

    assert server_app.app is not None and peft_deer_clientapp.app is not None
    fab = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["fab-include"]
    assert "peft_deer_clientapp.py" in fab
    light = "import sys, peft_deer_clientapp; print(sorted(m for m in ('torch', 'peft_deer') if m in sys.modules))"
    import subprocess

    out = subprocess.run([sys.executable, "-c", light], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "override, message",
    [
        ({"rounds": "x"}, "--rounds"),
        ({"bogus": 1}, "'bogus' is not a setting"),
        ({"dp": "client"}, "needs --epsilon"),
        ({"min-clients-per-phase": 0}, "min-clients-per-phase"),
    ],
)
def test_bad_run_config_values_raise_one_clear_error(override, message):
    with pytest.raises(ValueError, match=message):
        parse_run_config({**flower_config(), **override})


def test_a_failed_server_app_is_reported_although_flwr_run_exits_0():
    from peft_deer.flower.local import server_app_error

    streamed = (
        'INFO :      Start `flwr-serverapp` process\n  File "settings.py", line 29, in error\n'
        "ValueError: --rounds 0 must be >= 1\nERROR :     Exit Code: 201\n"
        "An unhandled exception occurred in the ServerApp.\n"
    )
    assert server_app_error(streamed) == "ValueError: --rounds 0 must be >= 1"
    assert server_app_error("INFO :      done: deer test acc 0.7196 auc 0.9004 -> runs/x\n") is None


# --------------------------------------------------------------------------------- dropping bad replies


@pytest.fixture
def flower_task_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # what a ServerApp process has
    yield
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None


@pytest.fixture
def flwr_warnings(caplog):
    logger = logging.getLogger("flwr")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.WARNING, logger="flwr")
    yield caplog
    logger.removeHandler(caplog.handler)


def phase_setup(num_clients: int, dp: ClientDP | None = None, min_clients: int = 2, t: int = 1):
    """A deer server over `num_clients` clients (collusion threshold `t`), a strategy with one fake SuperNode each,
    phase B trained."""
    model = tiny_deer_model("deer")
    layout = adapter_layout(model)
    state = get_adapter_state(model, layout)
    server = FederatedServer(
        method="deer",
        layout=layout,
        global_state=state,
        num_clients=num_clients,
        clients_per_phase=num_clients,
        dp=dp,
        collusion_threshold=t,
    )
    reference = FederatedServer(
        method="deer",
        layout=layout,
        global_state=dict(state),
        num_clients=num_clients,
        clients_per_phase=num_clients,
        dp=dp,
        collusion_threshold=t,
    )
    strategy = DeerStrategy(server, {c: 1000 + c for c in range(num_clients)}, 1, DeploymentOptions(min_clients))
    phase = next(iter_phases("deer", 1))
    tasks = random_client_tasks((8,) * num_clients, torch.Generator().manual_seed(0))
    engine = SequentialEngine(LocalTraining(batch_size=4, lr=0.5))
    updates = engine.train_clients(model, layout, state, phase, tasks)
    messages = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), None))
    return server, reference, strategy, phase, updates, messages


def with_delta(update: ClientUpdate, delta: dict) -> ClientUpdate:
    return dataclasses.replace(update, delta=delta)


def test_malformed_updates_are_dropped_with_a_logged_reason_and_the_round_completes(
    flower_task_identity, flwr_warnings
):
    server, reference, strategy, phase, updates, messages = phase_setup(5)
    assert [m.metadata.dst_node_id for m in messages] == [1000, 1001, 1002, 1003, 1004]
    nan = {k: torch.full_like(v, math.nan) for k, v in updates[1].delta.items()}
    wrong_shape = {k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) for k, v in updates[2].delta.items()}
    replies = [
        update_reply(messages[0], updates[0]),
        update_reply(messages[1], with_delta(updates[1], nan)),
        update_reply(messages[2], with_delta(updates[2], wrong_shape)),
        Message(Error(code=0, reason="out of memory"), reply_to=messages[3]),
        update_reply(messages[4], updates[4]),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)

    reasons = {d["client"]: d["reason"] for d in strategy.dropped}
    assert set(reasons) == {1, 2, 3}
    assert "non-finite" in reasons[1] and "shape" in reasons[2] and "out of memory" in reasons[3]
    for client in (1, 2, 3):
        assert f"dropped client {client}" in flwr_warnings.text
    # The round completed with the two valid updates, exactly as the core releases them alone.
    reference.finish_phase(phase, [updates[0], updates[4]])
    assert all(torch.equal(server.global_state[k], reference.global_state[k]) for k in reference.global_state)
    assert metrics["participants"] == 2 and metrics["dropped"] == 3 and len(server.releases) == 1
    assert set(arrays.to_torch_state_dict()) == set(server.global_state)


def test_a_phase_with_too_few_valid_updates_releases_nothing(flower_task_identity, flwr_warnings):
    dp = ClientDP(noise_multiplier=1.0, clip_norm=1.0, delta=1e-3)
    server, _, strategy, _, updates, messages = phase_setup(3, dp, min_clients=2)
    before = {k: v.clone() for k, v in server.global_state.items()}
    nan = {k: torch.full_like(v, math.nan) for k, v in updates[1].delta.items()}
    replies = [update_reply(messages[0], updates[0]), update_reply(messages[1], with_delta(updates[1], nan))]
    with pytest.raises(TooFewClients, match="1 valid updates of 3 sampled"):
        strategy.aggregate_train(1, replies)  # client 2 never answered
    assert "no reply" in flwr_warnings.text
    assert server.releases == [] and server.accountant.history == []  # nothing applied, nothing accounted
    assert all(torch.equal(before[k], server.global_state[k]) for k in before)


def test_distributed_noise_drops_an_unclipped_update_and_keeps_the_noise_floor(flower_task_identity):
    """min-clients-per-phase = 2 of 3 sampled: each client is asked for 1/2 of the noise variance, so the two
    valid updates left after a drop still carry the full noise, and the release is accounted at sigma."""
    dp = ClientDP(noise_multiplier=1.0, clip_norm=0.01, delta=1e-3, noise_placement="distributed")
    server, _, strategy, phase, updates, messages = phase_setup(3, dp, min_clients=2, t=0)  # d = k = 2
    assert {read_train_message(m).num_shares for m in messages} == {2}
    keys = server.trained_keys(phase)
    whiteners = build_whiteners(server.layout, server.global_state, keys, "regulated", dp.regulator_ridge)
    private = [
        with_delta(u, privatize_update(u.delta, whiteners, "regulated", dp, 2, _stream(i))[0])
        for i, u in enumerate(updates)
    ]
    huge = with_delta(updates[2], {k: v * 1e4 for k, v in updates[2].delta.items()})  # skipped clipping
    replies = [update_reply(m, u) for m, u in zip(messages, [private[0], private[1], huge], strict=True)]
    _, metrics = strategy.aggregate_train(1, replies)
    assert [d["client"] for d in strategy.dropped] == [2] and "not clipped" in strategy.dropped[0]["reason"]
    assert metrics["effective-noise-multiplier"] == pytest.approx(1.0)
    assert server.ledger()["effective_noise_multipliers"] == [pytest.approx(1.0)]
    # Which client was dropped is server-private; the published ledger only counts the drops.
    public = strategy.deployment_ledger()
    assert public["dropped_updates_count"] == 1 and "dropped_updates" not in public
    assert "1/2 of the noise variance" in public["client_noise"] and "roster" in public["neighbouring_relation"]
    assert strategy.private_ledger()["dropped_updates"][0]["client"] == 2


def test_the_train_instruction_carries_the_mechanism_and_sites_check_it(flower_task_identity):
    """sigma, C, lambda and the noise kind travel with each train message (distributed noise only); a site
    refuses malformed terms, missing terms, terms it does not expect, and another method's noise kind."""
    import types

    from peft_deer.flower.protocol import NoiseTerms, read_train_content
    from peft_deer.flower.site import Site
    from peft_deer.settings import RunSettings

    dp = ClientDP(noise_multiplier=1.7, clip_norm=0.5, regulator_ridge=1e-4, delta=1e-3, noise_placement="distributed")
    *_, messages = phase_setup(2, dp)
    terms = {read_train_message(m).noise for m in messages}
    assert terms == {NoiseTerms(1.7, 0.5, 1e-4, NoiseKind.REGULATED)}
    assert {
        read_train_message(m).noise for m in phase_setup(2, dataclasses.replace(dp, noise_placement="central"))[-1]
    } == {None}
    assert {read_train_message(m).noise for m in phase_setup(2)[-1]} == {None}
    config = messages[0].content.config_records["config"]
    for key, bad in (("noise-multiplier", 0.0), ("clip-norm", math.inf), ("ridge", -1.0), ("noise-kind", "loud")):
        original = config[key]
        config[key] = bad
        with pytest.raises(ValueError, match="sigma > 0|noise kind"):
            read_train_content(messages[0].content)
        config[key] = original
    flat = {"dp": "client", "noise_multiplier": 1.7, "num_clients": 2, "delta": 1e-3}
    distributed = types.SimpleNamespace(settings=RunSettings.from_flat({**flat, "noise_placement": "distributed"}))
    central = types.SimpleNamespace(settings=RunSettings.from_flat(flat))
    received = read_train_content(messages[0].content).noise
    assert Site.expected_noise(distributed, received) == received
    with pytest.raises(ValueError, match="carries no noise terms"):
        Site.expected_noise(distributed, None)
    with pytest.raises(ValueError, match="not distributed"):
        Site.expected_noise(central, received)
    with pytest.raises(ValueError, match="asks for plain noise"):
        Site.expected_noise(distributed, dataclasses.replace(received, noise=NoiseKind.PLAIN))


# --------------------------------------------------------------------------------- a real deployment


@pytest.mark.e2e
def test_loopback_deployment_equals_the_simulation_and_stops_its_processes(tmp_path, one_thread):
    """SuperLink + 2 SuperNodes on 127.0.0.1, 2 rounds of deer with client-level DP (distributed noise) and
    record-level DP-SGD at the sites, all seeded as in the simulation: the adapter equals deer-fed's bit for
    bit and the ledgers agree (client epsilon, and each site's record-level sigma, steps and epsilon); the run
    interrupted after 2 phases, its sites' workers restarted, and resumed, ends with the same adapter and
    ledger, the sites' accountants read back from their state directory; each site evaluates the final
    adapter on its own held-out images (server-private table, the model card says so)."""
    if not (MEDMNIST_DIR / "pneumoniamnist.npz").is_file():
        pytest.skip(f"real MedMNIST files not found at {MEDMNIST_DIR}")
    from peft_deer.flower.local import LocalDeployment, server_app_error
    from train import fed

    settings = {
        "model": "tiny-vit",
        "image-size": 28,
        "train-subset": 200,
        "rounds": 2,
        "dp": "client,record",
        "noise-multiplier": 0.8,
        "clip-norm": 0.5,
        "noise-placement": "distributed",
        "delta": 1e-3,
        "record-epsilon": 8.0,
        "record-delta": 1e-3,
    }
    flower_out, sim_out, resumed_out = tmp_path / "flower", tmp_path / "sim", tmp_path / "resumed"
    state_dir = tmp_path / "site-state"
    run_config = " ".join(
        [f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in settings.items()]
        + [f'data-dir="{MEDMNIST_DIR}"', f'output-dir="{flower_out}"']
        + ["reproducible-noise=true", "min-clients-per-phase=2"]
    )
    node_config = {"data-dir": f'"{MEDMNIST_DIR}"', "state-dir": f'"{state_dir}"'}
    # One thread everywhere: float sums then run in the same order in both runs.
    with LocalDeployment(2, tmp_path / "logs", node_config, {"OMP_NUM_THREADS": "1"}) as d:
        result = d.run(run_config, timeout_s=900)
        # The same run interrupted after 2 of its 4 phases, then resumed from its checkpoint.
        resumed_config = run_config.replace(f'output-dir="{flower_out}"', f'output-dir="{resumed_out}"')
        interrupted = d.run(resumed_config + " max-phases=2", timeout_s=900)
        assert (resumed_out / CHECKPOINT).is_file() and not (resumed_out / "summary.json").exists()
        workers = [p for p in map(_process, d.pids()) if "site_worker" in _cmdline(p)]
        assert len(workers) == 2, "one long-lived worker per SuperNode"
        for w in workers:  # the sites restart: their accountants must come back from the state directory
            w.terminate()
        psutil.wait_procs(workers, timeout=30)
        resumed = d.run(resumed_config + " resume=true", timeout_s=900)
        started = d.pids()
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((tmp_path / "logs").glob("*.log")))
    assert (flower_out / "summary.json").is_file(), f"flwr run rc={result.returncode}\n{logs}"
    for r in (result, interrupted, resumed):
        assert server_app_error(r.stdout + r.stderr) is None
    assert len(started) >= 3
    psutil.wait_procs([p for p in map(_process, started) if p is not None], timeout=10)
    left = [p for p in started if _alive(p)]
    assert not left, f"processes left running: {left}"

    defaults = flower_config()
    argv = [f"--{k}={v}" for k, v in {**defaults, **settings}.items() if v != "" and not isinstance(v, bool)]
    deployment_only = tuple(f"--{key}=" for key in OPTION_KEYS) + ("--reproducible",)
    argv = [a for a in argv if not a.startswith(deployment_only)]
    argv += [f"--data-dir={MEDMNIST_DIR}", f"--output-dir={sim_out}", "--engine=sequential", "--reproducible-noise"]
    assert fed.main(argv) == 0

    flower_adapter = load_file(flower_out / "adapter" / "adapter_model.safetensors")
    sim_adapter = load_file(sim_out / "adapter" / "adapter_model.safetensors")
    assert flower_adapter.keys() == sim_adapter.keys()
    diffs = {k: float((flower_adapter[k] - sim_adapter[k]).abs().max()) for k in sim_adapter}
    assert max(diffs.values()) == 0.0, diffs
    resumed_adapter = load_file(resumed_out / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(resumed_adapter[k], flower_adapter[k]) for k in flower_adapter)
    flower_ledger = json.loads((flower_out / "privacy.json").read_text())
    assert json.loads((resumed_out / "privacy.json").read_text()) == flower_ledger
    sim_ledger = json.loads((sim_out / "privacy.json").read_text())
    assert flower_ledger["epsilon"] == pytest.approx(sim_ledger["epsilon"]) and flower_ledger["releases"] == 4
    assert flower_ledger["level"] == sim_ledger["level"] == "client+record"
    # Record level: every site's sigma (calibrated by the site on its own images), steps and epsilon.
    for key in ("noise_multipliers", "steps", "epsilon_per_client", "epsilon_max", "delta"):
        assert flower_ledger["record"][key] == pytest.approx(sim_ledger["record"][key]), key
    assert set(flower_ledger["record"]["epsilon_per_client"]) == {"0", "1"}
    assert 0 < flower_ledger["record_epsilon_max"] <= 8.0 + 1e-6
    # Each site's own accountant, on disk under each run's key: the resumed run's survived the worker restart.
    files = sorted(state_dir.glob("record-dp-*-client*.json"))
    assert len(files) == 4, files  # 2 runs x 2 sites
    for f in files:
        history = json.loads(f.read_text())["history"]
        (client,) = history
        assert sum(n for _, _, n in history[client]) == flower_ledger["record"]["steps"][client], f.name
    assert flower_ledger["transport"] == "flower" and flower_ledger["dropped_updates_count"] == 0
    assert json.loads((flower_out / "server-private" / "deployment.json").read_text())["dropped_updates"] == []
    assert "testing only" in flower_ledger["client_noise"]
    _check_site_evaluation(flower_out, sim_out, run_config_dict(settings), state_dir)
    # Same output layout: the Gradio app's loader serves the Flower-trained adapter.
    from peft_deer.demo.predict import load_classifier

    clf = load_classifier(flower_out / "adapter")
    assert clf.privacy["transport"] == "flower" and len(clf.examples) > 0
    probs = clf.predict(clf.examples[0].path)
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)


def run_config_dict(settings: dict) -> dict:
    return {**flower_config(), **settings, "data-dir": str(MEDMNIST_DIR), "reproducible-noise": True}


def _check_site_evaluation(flower_out, sim_out, run_config: dict, state_dir) -> None:
    """Under DP each site keeps its evaluation: the server-private table only lists who evaluated, and each site's
    own file (in its state dir) equals metrics computed here from the (identical) simulated adapter on its
    held-out images; nothing of it is in the published files; the model card says the figures stayed at the sites."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from peft_deer.evaluation.metrics import classification_metrics, predict_proba
    from peft_deer.flower.site import site_for

    table = json.loads((flower_out / "server-private" / "site_evaluation.json").read_text())
    assert table["covered_by_dp"] is False and table["sites_failed"] == []
    assert table["rows"] == [] and table["sites_kept_counts"] == [0, 1]  # no per-site counts reached the server
    threshold, temperature = table["decision_threshold"], table["temperature"]
    summary = json.loads((flower_out / "summary.json").read_text())
    assert threshold == summary["test"]["final"]["threshold"]
    assert temperature == summary["calibration"]["final"]["temperature"]  # the sites score calibrated probabilities
    from peft import set_peft_model_state_dict

    sim_adapter = load_file(sim_out / "adapter" / "adapter_model.safetensors")
    images = 0
    for client in (0, 1):
        site = site_for(
            run_config, {"partition-id": client, "data-dir": str(MEDMNIST_DIR), "state-dir": str(state_dir)}
        )
        set_peft_model_state_dict(site.model, sim_adapter)
        probs = predict_proba(site.model, site.held_out, temperature=temperature)
        labels = site.held_out.tensors[1].numpy()
        direct = classification_metrics(labels, probs, threshold)
        kept = sorted(state_dir.glob(f"site-evaluation-client{client}-*.json"))
        assert kept, f"site {client} kept no evaluation"
        got = json.loads(kept[-1].read_text())
        images += got["images"]
        assert got["images"] == len(labels)
        for key in ("balanced_accuracy", "sensitivity", "specificity"):
            assert got[key] == pytest.approx(direct[key]), (client, key)
        assert got["accuracy"] == pytest.approx(float(np.mean((probs[:, 1] >= threshold) == labels)))
        if direct["auc"] is not None:
            assert got["auc"] == pytest.approx(roc_auc_score(labels, probs[:, 1]), abs=2e-3)
    assert images == 624  # the sites' held-out shares cover the test split
    private_names = {"site_evaluation.json", "site_evaluation.md"}
    published = [p for p in flower_out.rglob("*") if p.name in private_names and "server-private" not in p.parts]
    assert published == []
    card = (flower_out / "adapter" / "README.md").read_text()
    assert "kept the figures in its own state" in card and "server-private/site_evaluation" not in card


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def _cmdline(p: psutil.Process | None) -> str:
    try:
        return " ".join(p.cmdline()) if p is not None else ""
    except psutil.Error:  # exited, or a zombie Flower has not reaped yet
        return ""


def _alive(pid: int) -> bool:
    p = _process(pid)
    return p is not None and p.status() != psutil.STATUS_ZOMBIE
