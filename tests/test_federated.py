"""The federated core on a tiny ViT: exact aggregation, bad updates, resume state, DP end to end."""

from __future__ import annotations

import pytest
import torch
from helpers import random_client_tasks, tiny_deer_model

from peft_deer.federated import (
    ClientDP,
    DPRandomness,
    FederatedServer,
    InvalidClientUpdate,
    LocalTraining,
    SequentialEngine,
    adapter_layout,
    derive_seed,
    get_adapter_state,
    iter_phases,
    metric_norm,
)
from peft_deer.federated.mechanism import build_whiteners


def setup(method: str, dp: ClientDP | None = None, sizes=(7, 12, 20), seed=0):
    model = tiny_deer_model(method, seed)
    layout = adapter_layout(model)
    state = get_adapter_state(model, layout)
    tasks = random_client_tasks(sizes, torch.Generator().manual_seed(seed + 1))
    server = FederatedServer(
        method=method,
        layout=layout,
        global_state=state,
        num_clients=len(sizes),
        clients_per_phase=len(sizes),
        dp=dp,
        randomness=DPRandomness.from_seed(seed),
    )
    engine = SequentialEngine(LocalTraining(local_epochs=1, batch_size=4, lr=0.5, momentum=0.9))
    return model, layout, server, engine, tasks


def products(layout, state):
    return {f.module: f.scaling * state[f.b_key] @ state[f.a_key] for f in layout.lora}


@pytest.mark.parametrize("method", ["deer", "rolora", "ffa", "lora"])
def test_aggregated_product_equals_the_weighted_mean_of_client_products(method):
    model, layout, server, engine, tasks = setup(method)
    deviations = []
    for phase in iter_phases(method, 2):
        before = server.global_state
        updates = engine.train_clients(model, layout, before, phase, tasks)
        weights = torch.tensor([u.num_examples for u in updates], dtype=torch.float64)
        weights /= weights.sum()
        client_products = []
        for u in updates:
            client = dict(before)
            client.update({k: before[k] + v for k, v in u.delta.items()})
            client_products.append(products(layout, client))
        server.finish_phase(phase, updates)
        after = products(layout, server.global_state)
        for module, product in after.items():
            mean = sum(w * cp[module].double() for w, cp in zip(weights, client_products, strict=True))
            deviations.append(float((product.double() - mean).abs().max() / mean.abs().max()))
    if method == "lora":
        assert max(deviations) > 1e-4  # averaging both factors is not the mean of the products
    else:
        assert max(deviations) < 1e-5


def test_non_finite_update_is_rejected_and_nothing_is_aggregated():
    dp = ClientDP(noise_multiplier=1.0, clip_norm=1.0, delta=1e-3)
    model, layout, server, engine, tasks = setup("deer", dp)
    phase = next(iter_phases("deer", 1))
    updates = engine.train_clients(model, layout, server.global_state, phase, tasks)
    key = sorted(updates[1].delta)[0]
    updates[1].delta[key].view(-1)[0] = float("nan")
    before = {k: v.clone() for k, v in server.global_state.items()}
    with pytest.raises(InvalidClientUpdate, match=r"client 1: .*non-finite"):
        server.finish_phase(phase, updates)
    assert all(torch.equal(before[k], server.global_state[k]) for k in before)
    assert server.accountant.releases == 0 and server.releases == []


def test_wrong_shaped_update_names_the_module():
    model, layout, server, engine, tasks = setup("deer")
    phase = next(iter_phases("deer", 1))
    updates = engine.train_clients(model, layout, server.global_state, phase, tasks)
    key = next(k for k in updates[0].delta if "layers.1.attention.v_proj.lora_B" in k)
    updates[0].delta[key] = torch.zeros(3, 3)
    with pytest.raises(InvalidClientUpdate, match=r"layers\.1\.attention\.v_proj\.lora_B.*shape \(3, 3\)"):
        server.finish_phase(phase, updates)


def test_client_training_is_deterministic_and_leaves_frozen_factor_untouched():
    model, layout, server, engine, tasks = setup("deer")
    phase_b, phase_a = list(iter_phases("deer", 1))
    first = engine.train_clients(model, layout, server.global_state, phase_a, tasks)
    second = engine.train_clients(model, layout, server.global_state, phase_a, tasks)
    for u, v in zip(first, second, strict=True):
        assert set(u.delta) == set(layout.trained_keys("A"))
        assert all(torch.equal(u.delta[k], v.delta[k]) for k in u.delta)
    assert any(float(u.delta[k].abs().max()) > 0 for u in first for k in u.delta)


@pytest.mark.e2e  # a whole federated run, over 5 s
def test_dp_run_end_to_end_clips_in_the_metric_and_ledger_counts_releases():
    dp = ClientDP(noise_multiplier=0.8, clip_norm=0.05, regulator_ridge=1e-6, delta=1e-3)
    model, layout, server, engine, tasks = setup("deer", dp)
    for phase in iter_phases("deer", 2):
        updates = engine.train_clients(model, layout, server.global_state, phase, tasks)
        whiteners = build_whiteners(layout, server.global_state, server.trained_keys(phase), "regulated", 1e-6)
        assert any(metric_norm(u.delta, whiteners) > dp.clip_norm for u in updates)  # clipping is active
        release = server.finish_phase(phase, updates)
        assert release.clipped_fraction > 0
    ledger = server.ledger()
    assert ledger["releases"] == 4 and ledger["epsilon"] > 0
    assert all(torch.isfinite(v).all() for v in server.global_state.values())


@pytest.mark.e2e  # a whole federated run, over 5 s
def test_server_state_dict_round_trip_continues_identically():
    dp = ClientDP(noise_multiplier=1.0, clip_norm=1.0, delta=1e-3)
    model, layout, server, engine, tasks = setup("rolora", dp)
    phases = list(iter_phases("rolora", 2))
    for phase in phases[:2]:
        server.finish_phase(phase, engine.train_clients(model, layout, server.global_state, phase, tasks))
    saved = server.state_dict()
    _, _, resumed, _, _ = setup("rolora", dp)
    resumed.load_state_dict(saved)
    for phase in phases[2:]:
        for s in (server, resumed):
            s.finish_phase(phase, engine.train_clients(model, layout, s.global_state, phase, tasks))
    assert all(torch.equal(server.global_state[k], resumed.global_state[k]) for k in server.global_state)
    assert server.ledger() == resumed.ledger()


def test_distributed_noise_has_the_same_total_variance_as_central():
    totals = {}
    for placement in ("central", "distributed"):
        dp = ClientDP(noise_multiplier=1.0, clip_norm=1.0, delta=1e-3, noise_placement=placement)
        model, layout, server, engine, tasks = setup("ffa", dp)
        server.collusion_threshold = 0  # shares of sigma^2 C^2 / k (the default t = 1 sizes them for a colluder)
        phase = next(iter_phases("ffa", 1))
        zero = [
            type(u)(u.client_id, {k: torch.zeros_like(v) for k, v in u.delta.items()}, u.num_examples)
            for u in engine.train_clients(model, layout, server.global_state, phase, tasks)
        ]
        variances = []
        for s in range(30):
            server.randomness = DPRandomness.from_seed(s)
            release = server.finish_phase(phase, zero)
            variances.append(sum(float(v.square().sum()) for v in release.delta.values()))
        totals[placement] = sum(variances) / len(variances)
    n_params = sum(server.global_state[k].numel() for k in server.trained_keys(phase))
    expected = n_params / 9  # (sigma C)^2 per coordinate, divided by the denominator 3 squared
    for total in totals.values():
        assert abs(total / expected - 1) < 0.1


def test_seeds_do_not_depend_on_anything_but_their_parts():
    assert derive_seed(0, 1, 2, 3) == derive_seed(0, 1, 2, 3)
    assert len({derive_seed(0, r, p, c) for r in range(3) for p in range(2) for c in range(5)}) == 30
