"""The batched engine trains a phase's clients in one pass and gives the sequential loop's deltas."""

from __future__ import annotations

import pytest
import torch
from helpers import random_client_tasks, tiny_deer_model, tiny_vit
from peft import get_peft_model
from safetensors.torch import load_file
from torch.utils.data import Subset, TensorDataset

from peft_deer import DeerLoraConfig
from peft_deer.federated import (
    BatchedEngine,
    ClientDP,
    ClientTask,
    DPRandomness,
    FederatedServer,
    LocalTraining,
    SequentialEngine,
    adapter_layout,
    get_adapter_state,
    iter_phases,
)
from peft_deer.federated.batched import batched_unsupported_reason, select_engine
from peft_deer.federated.batched_plan import _schedule, _StepData, client_order

pytestmark = pytest.mark.usefixtures("one_thread")


def make(method: str, sizes=(7, 12, 20), seed=0):
    model = tiny_deer_model(method, seed)
    tasks = random_client_tasks(sizes, torch.Generator().manual_seed(seed + 1))
    return model, adapter_layout(model), tasks


def run(method, engine_cls, training, dp=None, rounds=1):
    model, layout, tasks = make(method)
    state = get_adapter_state(model, layout)
    server = FederatedServer(
        method=method,
        layout=layout,
        global_state=state,
        num_clients=len(tasks),
        clients_per_phase=len(tasks),
        dp=dp,
        randomness=DPRandomness.from_seed(3),
    )
    engine = engine_cls(training)
    per_phase = []
    for phase in iter_phases(method, rounds):
        updates = engine.train_clients(model, layout, server.global_state, phase, tasks)
        per_phase.append(updates)
        server.finish_phase(phase, updates)
    return per_phase, server.global_state


def assert_close_updates(seq, bat):
    for phase_seq, phase_bat in zip(seq, bat, strict=True):
        for u, v in zip(phase_seq, phase_bat, strict=True):
            assert (u.client_id, u.num_examples, u.images_seen) == (v.client_id, v.num_examples, v.images_seen)
            assert u.delta.keys() == v.delta.keys()
            for key in u.delta:
                torch.testing.assert_close(v.delta[key], u.delta[key], rtol=1e-4, atol=1e-6, msg=key)
            assert v.mean_loss == pytest.approx(u.mean_loss, rel=1e-5)


SGD = LocalTraining(local_epochs=2, batch_size=4, lr=0.1, momentum=0.9, weight_decay=1e-2)


@pytest.mark.parametrize("method", ["deer", "rolora", "ffa", "lora"])
def test_batched_equals_sequential_with_unequal_clients(method):
    # deer/rolora: phase B then phase A (A's phase starts from a non-zero B); ffa: B; lora: both factors.
    seq, seq_state = run(method, SequentialEngine, SGD)
    bat, bat_state = run(method, BatchedEngine, SGD)
    assert_close_updates(seq, bat)
    for key in seq_state:
        torch.testing.assert_close(bat_state[key], seq_state[key], rtol=1e-4, atol=1e-6)
    # every client really trained (non-zero deltas on the trained factor)
    assert all(any(d.abs().max() > 0 for d in u.delta.values()) for u in bat[-1])


@pytest.mark.parametrize("method", ["deer", "lora"])
def test_batched_equals_sequential_with_client_dp(method):
    dp = ClientDP(noise_multiplier=1.0, clip_norm=0.05, regulator_ridge=1e-6, delta=1e-3)
    seq, seq_state = run(method, SequentialEngine, SGD, dp)
    bat, bat_state = run(method, BatchedEngine, SGD, dp)
    assert_close_updates(seq, bat)
    for key in seq_state:
        torch.testing.assert_close(bat_state[key], seq_state[key], rtol=1e-4, atol=1e-6)


def test_batched_adamw_equals_sequential():
    adamw = LocalTraining(local_epochs=2, batch_size=4, lr=1e-3, weight_decay=1e-2, optimizer="adamw")
    seq, _ = run("deer", SequentialEngine, adamw)
    bat, _ = run("deer", BatchedEngine, adamw)
    assert_close_updates(seq, bat)


def test_model_is_restored_and_left_with_class_forwards():
    model, layout, tasks = make("deer")
    state = get_adapter_state(model, layout)
    phase = next(iter_phases("deer", 1))
    BatchedEngine(SGD).train_clients(model, layout, state, phase, tasks)
    assert not any("forward" in vars(m) for m in model.modules())
    after = get_adapter_state(model, layout)
    assert all(torch.equal(after[k], state[k]) for k in state)
    assert batched_unsupported_reason(model, layout) is None


def test_thousand_clients_hold_thousand_adapters_not_models():
    model, layout, _ = make("deer")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1000, 1, 28, 28, generator=g), torch.randint(0, 2, (1000,), generator=g)
    tasks = [ClientTask(i, TensorDataset(x[i : i + 1], y[i : i + 1]), i) for i in range(1000)]
    phase = next(iter_phases("deer", 1))
    engine = BatchedEngine(LocalTraining(local_epochs=1, batch_size=4, lr=0.1))
    updates = engine.train_clients(model, layout, get_adapter_state(model, layout), phase, tasks)
    params = dict(model.named_parameters())
    adapter = sum(params[k].numel() for k in layout.trained_keys(phase.factors))
    model_numel = sum(p.numel() for p in model.parameters())
    assert len(updates) == 1000 and engine.stats["clients"] == 1000
    assert engine.stats["params_per_client"] == adapter  # one adapter row per client ...
    assert engine.stats["optimizer_per_client"] == adapter  # ... and its momentum
    assert adapter * 20 < model_numel  # not a model copy


def test_clients_per_pass_gives_the_same_updates():
    model, layout, tasks = make("rolora")
    state = get_adapter_state(model, layout)
    phase = next(iter_phases("rolora", 1))
    one = BatchedEngine(SGD).train_clients(model, layout, state, phase, tasks)
    two = BatchedEngine(SGD, clients_per_pass=2).train_clients(model, layout, state, phase, tasks)
    assert_close_updates([one], [two])


def test_select_engine_falls_back_with_a_reason():
    model, layout, _ = make("deer")
    sequential = SequentialEngine(SGD)
    assert isinstance(select_engine("batched", sequential, model, layout), BatchedEngine)
    assert select_engine("sequential", sequential, model, layout) is sequential
    conv = get_peft_model(
        tiny_vit(0), DeerLoraConfig(r=2, target_modules=["projection", "q_proj"], modules_to_save=["classifier"])
    )
    logged = []
    assert select_engine("batched", sequential, conv, adapter_layout(conv), logged.append) is sequential
    assert "not a LoRA Linear" in logged[0]
    with pytest.raises(ValueError, match="not a LoRA Linear"):
        BatchedEngine(SGD).train_clients(conv, adapter_layout(conv), {}, next(iter_phases("deer", 1)), [])


def test_driver_engines_agree(tmp_path, medmnist_dir, capsys):
    from test_fed_driver import run_argv

    from train import fed

    threads = torch.get_num_threads()
    adapters = {}
    for engine in ("sequential", "batched"):
        out = tmp_path / engine
        argv = run_argv(medmnist_dir, out, "deer", "--rounds", "1", "--train-subset", "100", "--engine", engine)
        assert fed.main(argv) == 0
        adapters[engine] = load_file(out / "adapter" / "adapter_model.safetensors")
    torch.set_num_threads(threads)
    assert "does not apply" not in capsys.readouterr().out  # the batched run really was batched
    for key, value in adapters["sequential"].items():
        torch.testing.assert_close(adapters["batched"][key], value, rtol=1e-4, atol=1e-5)


def test_batched_bf16_is_close_to_sequential_bf16():
    bf16 = LocalTraining(local_epochs=2, batch_size=4, lr=0.1, momentum=0.9, weight_decay=1e-2, mixed_precision="bf16")
    seq, _ = run("deer", SequentialEngine, bf16)
    bat, _ = run("deer", BatchedEngine, bf16)
    for u, v in zip(seq[-1], bat[-1], strict=True):
        for key in u.delta:  # bf16 rounding differs with the batch shape: about 1% of the update
            torch.testing.assert_close(v.delta[key], u.delta[key], rtol=0.05, atol=1e-2)


def test_model_is_restored_after_an_error():
    model, layout, _ = make("deer")
    bad = [ClientTask(0, TensorDataset(torch.randn(4, 3, 28, 28), torch.zeros(4, dtype=torch.long)), 0)]
    with pytest.raises(ValueError):  # 3 channels into a 1-channel ViT
        BatchedEngine(SGD).train_clients(
            model, layout, get_adapter_state(model, layout), next(iter_phases("deer", 1)), bad
        )
    assert not any("forward" in vars(m) for m in model.modules())


def test_staged_batches_equal_host_gathered_batches():
    # the device-staged gather (used on GPUs) gives each step exactly the host path's batch
    _, _, tasks = make("deer")
    steps = _schedule([client_order(t, SGD) for t in tasks], torch.device("cpu"))
    host, staged = _StepData(tasks, steps, torch.device("cpu")), _StepData(tasks, steps, torch.device("cpu"))
    staged._stage()
    assert host.staged is None and staged.staged is not None
    # 7, 12 and 20 samples, 2 epochs at batch 4: client 0 has batches of 4 and 3, and is done after step 3
    assert [len(s.groups) for s in steps] == [1, 2, 1, 2, 1, 1, 1, 1, 1, 1]
    assert [None if s.active is None else s.active.tolist() for s in steps[3:7]] == [
        None,
        [False, True, True],
        [False, True, True],
        [False, False, True],
    ]
    for s in range(len(steps)):
        for a, b in zip(host(s), staged(s), strict=True):
            assert torch.equal(a, b)


def test_non_tensor_datasets_are_read_sample_by_sample():
    model, layout, tasks = make("deer")
    wrapped = [ClientTask(t.client_id, Subset(t.dataset, range(len(t.dataset))), t.seed) for t in tasks]
    state, phase = get_adapter_state(model, layout), next(iter_phases("deer", 1))
    seq = SequentialEngine(SGD).train_clients(model, layout, state, phase, tasks)
    bat = BatchedEngine(SGD).train_clients(model, layout, state, phase, wrapped)
    assert_close_updates([seq], [bat])
