"""The server optimizer (`--server-optimizer avg|momentum|adam`): the math against hand-computed values, per
factor over alternating phases, exact resume, and the privacy ledger it must leave unchanged."""

from __future__ import annotations

import io
import math

import pytest
import torch
from helpers import random_client_tasks, tiny_deer_model

from peft_deer.federated import (
    ClientDP,
    DPRandomness,
    FederatedServer,
    LocalTraining,
    SequentialEngine,
    ServerOptimizer,
    adapter_layout,
    get_adapter_state,
    iter_phases,
)
from peft_deer.federated.adapter_state import add_delta
from peft_deer.settings import parse_args

# Three phases of an alternating method: B and the head, then A and the head, then B and the head.
PHASE_KEYS = [["b", "head"], ["a", "head"], ["b", "head"]]
DELTAS = {  # per phase, the released delta of each of its keys (2 entries per key)
    0: {"b": [2.0, -0.5], "head": [1.0, 0.25]},
    1: {"a": [4.0, 0.0], "head": [-1.0, 0.25]},
    2: {"b": [-1.0, 0.5], "head": [2.0, 0.25]},
}


def start_state() -> dict[str, torch.Tensor]:
    return {"a": torch.tensor([0.5, -0.5]), "b": torch.zeros(2), "head": torch.tensor([0.0, 1.0])}


def run(opt: ServerOptimizer, phases=range(3), state=None) -> dict[str, torch.Tensor]:
    state = start_state() if state is None else state
    for p in phases:
        state = opt.step(state, {k: torch.tensor(v) for k, v in DELTAS[p].items()}, PHASE_KEYS[p])
    return state


def reference(kind: str, lr: float, beta: float = 0.9) -> dict[str, list[float]]:
    """The update rules entry by entry in float64, each key stepped only in the phases that release it."""
    x = {k: [float(v) for v in t] for k, t in start_state().items()}
    v = {k: [0.0, 0.0] for k in x}
    m, u, t = {k: [0.0, 0.0] for k in x}, {k: [0.0, 0.0] for k in x}, dict.fromkeys(x, 0)
    b1, b2, eps = 0.9, 0.99, 1e-8
    for p in range(3):
        for key, d in DELTAS[p].items():
            t[key] += 1
            for i, di in enumerate(d):
                if kind == "momentum":
                    v[key][i] = beta * v[key][i] + di
                    x[key][i] += lr * v[key][i]
                else:
                    m[key][i] = b1 * m[key][i] + (1 - b1) * di
                    u[key][i] = b2 * u[key][i] + (1 - b2) * di * di
                    m_hat, u_hat = m[key][i] / (1 - b1 ** t[key]), u[key][i] / (1 - b2 ** t[key])
                    x[key][i] += lr * m_hat / (math.sqrt(u_hat) + eps)
    return x


def test_avg_is_todays_update_exactly():
    state = start_state()
    delta = {k: torch.tensor(v) for k, v in DELTAS[0].items()}
    out = ServerOptimizer().step(state, delta, PHASE_KEYS[0])
    expected = add_delta(state, delta)
    assert all(torch.equal(out[k], expected[k]) for k in state)
    assert out["a"] is state["a"]  # keys not released are shared, not copied
    # And through the server: after every phase, global = previous global + the release.
    _, layout, server, engine, tasks, model = server_setup("deer", None)
    for phase in iter_phases("deer", 2):
        before = server.global_state
        release = server.finish_phase(phase, engine.train_clients(model, layout, before, phase, tasks))
        expected = add_delta(before, release.delta)
        assert all(torch.equal(server.global_state[k], expected[k]) for k in expected)


def test_momentum_matches_the_hand_computed_reference():
    out = run(ServerOptimizer("momentum", lr=0.5, momentum=0.9))
    # By hand, first entries: head v = 1, -0.1, 1.91 -> x = 0.5, 0.45, 1.405; b (phases 1, 3) v = 2, 0.8 ->
    # x = 1.0, 1.4; a (phase 2 only) v = 4 -> x = 0.5 + 2 = 2.5.
    assert [float(out[k][0]) for k in ("head", "b", "a")] == pytest.approx([1.405, 1.4, 2.5])
    ref = reference("momentum", 0.5)
    for key in out:
        assert out[key].tolist() == pytest.approx(ref[key], rel=1e-6), key


def test_adam_matches_the_hand_computed_reference():
    opt = ServerOptimizer("adam", lr=0.1)
    out = run(opt)
    # First step of each key is lr * sign(delta) (bias correction); a stepped once, b twice, head three times.
    assert opt.steps == {"a": 1, "b": 2, "head": 3}
    assert out["a"].tolist() == pytest.approx([0.5 + 0.1, -0.5])  # a delta of exactly 0 does not move it
    ref = reference("adam", 0.1)
    for key in out:
        assert out[key].tolist() == pytest.approx(ref[key], rel=1e-6), key
    assert all(v.dtype == torch.float32 for v in out.values())


@pytest.mark.parametrize("kind", ["momentum", "adam"])
def test_state_dict_round_trip_mid_run_continues_identically(kind):
    straight = run(ServerOptimizer(kind, lr=0.1))
    first = ServerOptimizer(kind, lr=0.1)
    state = run(first, phases=[0])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)  # as in the checkpoint
    buffer.seek(0)
    resumed = ServerOptimizer(kind, lr=0.1)
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    run(first, phases=[1, 2], state=dict(state))  # the saved state is a copy: stepping on does not touch it
    continued = run(resumed, phases=[1, 2], state=state)
    assert all(torch.equal(continued[k], straight[k]) for k in straight)
    with pytest.raises(ValueError, match="server optimizer is 'momentum'"):
        ServerOptimizer("adam").load_state_dict(ServerOptimizer("momentum").state_dict())


def test_bad_settings_and_deltas_are_refused(capsys):
    for kwargs, message in (
        ({"kind": "sgd"}, "--server-optimizer 'sgd' must be one of avg, momentum, adam"),
        ({"lr": 0.0}, "--server-lr 0 must be"),
        ({"momentum": 1.0}, r"--server-momentum 1 must be in \[0, 1\)"),
    ):
        with pytest.raises(ValueError, match=message):
            ServerOptimizer(**kwargs)
    with pytest.raises(ValueError, match=r"keys \['a'\]"):
        ServerOptimizer().step(start_state(), {"a": torch.zeros(2), "b": torch.zeros(2)}, ["b"])
    for argv, message in (
        (["--server-lr", "0"], "--server-lr 0 must be > 0"),
        (["--server-momentum", "-0.1"], "--server-momentum -0.1 must be in [0, 1)"),
        (["--server-optimizer", "sgd"], "argument --server-optimizer: invalid choice: 'sgd'"),
    ):
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert message in capsys.readouterr().err
    args = parse_args(["--server-optimizer", "adam", "--server-lr", "1e-3"])
    fed = args.federation
    assert (fed.server_optimizer, fed.server_lr, fed.server_momentum) == ("adam", 1e-3, 0.9)


# ------------------------------------------------------------------------------------------------
# Through the federated server


def server_setup(method: str, dp: ClientDP | None, optimizer: ServerOptimizer | None = None, sizes=(7, 12, 20)):
    model = tiny_deer_model(method, 0)
    layout = adapter_layout(model)
    state = get_adapter_state(model, layout)
    tasks = random_client_tasks(sizes, torch.Generator().manual_seed(1))
    n, randomness = len(sizes), DPRandomness.from_seed(0)
    server = FederatedServer(
        method=method,
        layout=layout,
        global_state=state,
        num_clients=n,
        clients_per_phase=n,
        dp=dp,
        randomness=randomness,
        optimizer=optimizer or ServerOptimizer(),
    )
    engine = SequentialEngine(LocalTraining(local_epochs=1, batch_size=4, lr=0.5, momentum=0.9))
    return state, layout, server, engine, tasks, model


def test_each_phase_steps_only_its_factor_and_the_head(one_thread):
    state, layout, server, engine, tasks, model = server_setup("deer", None, ServerOptimizer("adam", lr=1e-3))
    a_keys = {f.a_key for f in layout.lora}
    for phase in list(iter_phases("deer", 2))[:3]:  # B, A, B
        before = server.global_state
        server.finish_phase(phase, engine.train_clients(model, layout, before, phase, tasks))
        moved = {k for k in before if not torch.equal(before[k], server.global_state[k])}
        assert moved <= set(server.trained_keys(phase)) and moved & set(layout.head_keys)
    steps = server.optimizer.steps
    assert {steps[k] for k in a_keys} == {1} and {steps[f.b_key] for f in layout.lora} == {2}
    assert {steps[k] for k in layout.head_keys} == {3}


def test_server_resume_is_bit_identical_and_the_ledger_ignores_the_optimizer(one_thread):
    """Client-level DP with reproducible noise: avg and adam release the same ledger (post-processing) but
    different adapters; a server restored mid-run from its state_dict ends exactly where the original does."""
    dp = ClientDP(noise_multiplier=1.0, clip_norm=1.0, delta=1e-3)
    phases = list(iter_phases("deer", 2))
    results = {}
    for kind in ("avg", "adam"):
        _, layout, server, engine, tasks, model = server_setup("deer", dp, ServerOptimizer(kind, lr=1e-2))
        for phase in phases[:2]:
            server.finish_phase(phase, engine.train_clients(model, layout, server.global_state, phase, tasks))
        buffer = io.BytesIO()
        torch.save(server.state_dict(), buffer)
        buffer.seek(0)
        _, _, resumed, _, _, _ = server_setup("deer", dp, ServerOptimizer(kind, lr=1e-2))
        resumed.load_state_dict(torch.load(buffer, weights_only=False))
        for phase in phases[2:]:
            for s in (server, resumed):
                s.finish_phase(phase, engine.train_clients(model, layout, s.global_state, phase, tasks))
        assert all(torch.equal(server.global_state[k], resumed.global_state[k]) for k in server.global_state)
        assert server.ledger() == resumed.ledger()
        results[kind] = server
    avg, adam = (results[k].ledger() for k in ("avg", "adam"))
    assert avg == adam
    assert avg["releases"] == 4 and avg["effective_noise_multipliers"] == [1.0] * 4 and avg["epsilon"] > 0
    states = [results[k].global_state for k in ("avg", "adam")]
    assert any(not torch.equal(states[0][k], states[1][k]) for k in states[0])
