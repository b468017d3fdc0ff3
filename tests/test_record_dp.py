"""Record-level DP (DESIGN 2.6): DP-SGD inside each client with opacus, and the regulator as whitened DP-SGD.

Tiny random ViT on CPU; one driver run pair on real MedMNIST images for --resume.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import tiny_deer_model
from opacus.accountants import RDPAccountant
from torch.utils.data import TensorDataset

from peft_deer.federated import (
    ClientTask,
    ClientUpdate,
    DPRandomness,
    FederatedServer,
    LocalTraining,
    Phase,
    Whitener,
    adapter_layout,
    build_whiteners,
    factor_metric,
    get_adapter_state,
    load_adapter_state,
    metric_norm,
    train_client,
)
from peft_deer.federated.dp_sgd import WhitenedDPOptimizer, per_sample_gradients, whitened_norms
from peft_deer.federated.local_training import set_phase_trainability
from peft_deer.federated.record_dp import (
    RecordDP,
    RecordLevel,
    calibrate_record_sigmas,
    record_sample_rate,
    record_steps,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore:Full backward hook is firing", "ignore:.*is_gradient_checkpointing", "ignore:Optimal order"
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def setup(method: str = "deer", seed: int = 0):
    model = tiny_deer_model(method, seed)
    layout = adapter_layout(model)
    state = get_adapter_state(model, layout)
    g = torch.Generator().manual_seed(seed + 1)
    for f in layout.lora:  # B = 0 at init: give it a value so A's gradients and metric are non-trivial
        state[f.b_key] = 0.3 * torch.randn(state[f.b_key].shape, generator=g)
    load_adapter_state(model, state)
    model.train()  # opacus captures activations in training mode only; the tiny ViT has no dropout
    data = TensorDataset(torch.randn(40, 1, 28, 28, generator=g), torch.randint(0, 2, (40,), generator=g))
    return model, layout, state, data


def test_opacus_per_sample_gradients_of_lora_factors_match_a_per_example_loop():
    model, layout, state, data = setup("lora")
    set_phase_trainability(model, Phase(0, 0, ("A", "B")))
    x, y = data.tensors[0][:5], data.tensors[1][:5]
    keys = layout.trained_keys(("A", "B"))
    params = dict(model.named_parameters())
    loop = {k: [] for k in keys}
    for i in range(len(y)):
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(pixel_values=x[i : i + 1]).logits, y[i : i + 1]).backward()
        for k in keys:
            loop[k].append(params[k].grad.clone())
    model.zero_grad(set_to_none=True)
    with per_sample_gradients(model) as gsm:
        torch.nn.functional.cross_entropy(gsm(pixel_values=x).logits, y).backward()
        for k in keys:
            expected = torch.stack(loop[k])
            assert expected.abs().max() > 0, k
            torch.testing.assert_close(params[k].grad_sample, expected, rtol=1e-4, atol=1e-6)
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())  # cleaned up


def _grad_samples(model, layout, state, data, phase_factors, noise, n=8):
    phase = Phase(0, 1 if phase_factors == ("A",) else 0, phase_factors)
    model.base_model.set_deer_phase(phase.config_phase)
    keys = layout.trained_keys(phase_factors)
    params = dict(model.named_parameters())
    whiteners = build_whiteners(layout, state, keys, noise, 1e-6)
    x, y = data.tensors[0][:n], data.tensors[1][:n]
    with per_sample_gradients(model) as gsm:
        torch.nn.functional.cross_entropy(gsm(pixel_values=x).logits, y).backward()
        samples = {k: params[k].grad_sample.detach().clone() for k in keys}
    model.zero_grad(set_to_none=True)
    return keys, params, whiteners, samples


@pytest.mark.parametrize("factors", [("A",), ("B",)])
def test_whitened_clipping_bounds_every_per_sample_metric_norm(factors):
    model, layout, state, data = setup("deer")
    keys, params, whiteners, samples = _grad_samples(model, layout, state, data, factors, "regulated")
    n = len(samples[keys[0]])
    # The optimizer's per-sample norm is mechanism.metric_norm of each per-sample gradient.
    norms = whitened_norms([samples[k] for k in keys], [whiteners[k] for k in keys])
    for i in range(n):
        assert norms[i].item() == pytest.approx(metric_norm({k: samples[k][i] for k in keys}, whiteners), rel=1e-4)
    clip = float(norms.median())  # half the samples are clipped
    opt = WhitenedDPOptimizer(
        torch.optim.SGD([params[k] for k in keys], lr=0.1),
        whiteners=[whiteners[k] for k in keys],
        noise_multiplier=1.0,
        max_grad_norm=clip,
        expected_batch_size=n,
        stream=DPRandomness.from_seed(0).stream("test"),
    )
    for k in keys:
        params[k].grad_sample = samples[k].clone()
    opt.clip_and_accumulate()
    factor = (clip / (opt.last_per_sample_norms + 1e-6)).clamp(max=1.0)
    clipped = [factor.view(-1, *[1] * (samples[k].dim() - 1)) * samples[k] for k in keys]
    after = whitened_norms(clipped, [whiteners[k] for k in keys])
    assert (after <= clip * (1 + 1e-5)).all()
    assert (after >= clip * (1 - 1e-4)).sum() >= n // 2 - 1  # the clipped ones sit on the bound
    for k, c in zip(keys, clipped, strict=True):
        torch.testing.assert_close(params[k].summed_grad, c.sum(0), rtol=1e-5, atol=1e-7)
    if factors == ("B",):
        return  # (phase B: the head dominates the norm, plain and metric clipping nearly agree)
    # Phase A (M = s^2 B^T B, far from I): plain Frobenius clipping would not bound the metric norm.
    plain = (clip / (torch.stack([torch.cat([samples[k][i].flatten() for k in keys]).norm() for i in range(n)]))).clamp(
        max=1.0
    )
    plain_after = whitened_norms(
        [plain.view(-1, *[1] * (samples[k].dim() - 1)) * samples[k] for k in keys], [whiteners[k] for k in keys]
    )
    assert (plain_after > clip * 1.01).any()
    opt.zero_grad()
    for p in opt.params:
        for attr in ("grad_sample", "summed_grad"):
            if hasattr(p, attr):
                delattr(p, attr)


def _noise_draws(whitener: Whitener, shape, sigma, clip, draws, seed=0):
    p = torch.nn.Parameter(torch.zeros(shape))
    opt = WhitenedDPOptimizer(
        torch.optim.SGD([p], lr=1.0),
        whiteners=[whitener],
        noise_multiplier=sigma,
        max_grad_norm=clip,
        expected_batch_size=1,
        stream=DPRandomness.from_seed(seed).stream("test"),
    )
    out = []
    for _ in range(draws):
        p.summed_grad = torch.zeros(shape)
        opt.add_noise()
        out.append(p.grad.detach().clone())
    return torch.stack(out)


def _whitened_cov_error(noise: torch.Tensor, metric: torch.Tensor, side: str, std: float) -> float:
    """max |L^T Cov L / std^2 - I| for rows (right/B) or columns (left/A): 0 iff Cov = std^2 M^-1."""
    x = noise.double()
    vectors = x.reshape(-1, x.shape[-1]) if side == "right" else x.transpose(1, 2).reshape(-1, x.shape[1])
    cov = vectors.T @ vectors / len(vectors)
    chol = torch.linalg.cholesky(metric)
    return float((chol.T @ cov @ chol / std**2 - torch.eye(len(metric), dtype=torch.float64)).abs().max())


@pytest.mark.parametrize("side", ["right", "left"])
def test_record_noise_covariance_is_sigma2_c2_m_inverse(side):
    r, d, sigma, clip, draws = 4, 48, 1.3, 0.7, 200
    g = torch.Generator().manual_seed(3)
    frozen = (
        torch.randn((r, 32) if side == "right" else (32, r), generator=g)
        * torch.tensor([3.0, 1.0, 0.3, 0.1])[(slice(None), None) if side == "right" else (None, slice(None))]
    )
    metric = factor_metric(frozen, "A" if side == "right" else "B", 2.0, 1e-3)
    whitener = Whitener(torch.linalg.cholesky(metric).float(), side)
    shape = (d, r) if side == "right" else (r, d)
    noise = _noise_draws(whitener, shape, sigma, clip, draws)
    assert noise.mean().abs() < 0.05 * noise.std()
    err = _whitened_cov_error(noise, metric, side, sigma * clip)
    # ~9600 vectors of dim 4: the sample covariance's entries have sd about 0.015; 0.08 is > 5 sd.
    assert err < 0.08, err
    # The test can fail: isotropic opacus noise of the same std is far from sigma^2 C^2 M^-1 here.
    iso = _noise_draws(Whitener(None, side), shape, sigma, clip, draws)
    assert _whitened_cov_error(iso, metric, side, sigma * clip) > 0.5
    # ... and a 10% mis-scaled std fails it too.
    assert _whitened_cov_error(noise * 1.1, metric, side, sigma * clip) > 0.08


def test_epsilon_per_client_equals_a_fresh_opacus_rdp_accountant():
    sizes, batch, epochs = [40, 13, 100], 8, 2
    sigmas = (1.1, 0.9, 1.3)
    level = RecordLevel(RecordDP(noise_multipliers=sigmas, clip_norm=1.0, delta=1e-5), batch, epochs)
    phases = [[0, 1, 2], [0, 2], [1, 2]]  # client 1 skips a phase
    for ids in phases:
        level.account([ClientUpdate(c, {}, sizes[c]) for c in ids])
    ledger = level.ledger()
    for c in range(3):
        fresh = RDPAccountant()
        q = batch / sizes[c]
        assert record_sample_rate(sizes[c], batch) == q
        n_updates = sum(c in ids for ids in phases)
        for _ in range(n_updates * epochs * int(1 / q)):
            fresh.step(noise_multiplier=sigmas[c], sample_rate=q)
        expected = fresh.get_epsilon(delta=1e-5)
        assert ledger["epsilon_per_client"][str(c)] == pytest.approx(expected, rel=1e-9)
        assert ledger["steps"][str(c)] == n_updates * record_steps(sizes[c], batch, epochs)
    assert ledger["epsilon_max"] == max(ledger["epsilon_per_client"].values())
    # Per-client calibration: every client lands at (just under) the target after the planned updates.
    target = 3.0
    cal = calibrate_record_sigmas(target, 1e-5, [40, 13, 40], batch, epochs, updates_per_client=4)
    assert cal[0] == cal[2] != cal[1]  # per client (same size, same sigma)
    planned = RecordLevel(RecordDP(noise_multipliers=cal, clip_norm=1.0, delta=1e-5), batch, epochs)
    for _ in range(4):
        planned.account([ClientUpdate(c, {}, [40, 13, 40][c]) for c in range(2)])
    for eps in planned.ledger()["epsilon_per_client"].values():
        assert target - 0.1 < eps <= target + 1e-6


def test_server_state_round_trip_keeps_record_epsilon():
    model, layout, state, _ = setup("deer")
    make = lambda: FederatedServer(  # noqa: E731
        method="deer",
        layout=layout,
        global_state=state,
        num_clients=3,
        clients_per_phase=3,
        dp=None,
        randomness=DPRandomness.from_seed(0),
        record=RecordLevel(RecordDP(noise_multipliers=(1.0, 1.2, 0.8), clip_norm=1.0, delta=1e-5), 8, 1),
    )
    server = make()
    zero = {k: torch.zeros_like(state[k]) for k in layout.trained_keys(("B",))}
    server.finish_phase(Phase(0, 0, ("B",)), [ClientUpdate(c, dict(zero), 20 + c) for c in range(3)])
    saved = torch.load(_roundtrip(server.state_dict()), weights_only=False)
    again = make()
    again.load_state_dict(saved)
    assert again.record.accountants.history == server.record.accountants.history
    zero_a = {k: torch.zeros_like(state[k]) for k in layout.trained_keys(("A",))}
    for s in (server, again):
        s.finish_phase(Phase(0, 1, ("A",)), [ClientUpdate(c, dict(zero_a), 20 + c) for c in range(3)])
    ledger = again.ledger()
    assert ledger["level"] == "record" and ledger["epsilon"] == ledger["record"]["epsilon_max"] > 0
    assert ledger["record"] == server.ledger()["record"]


def _roundtrip(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_phase_switch_b_then_a_trains_under_opacus_and_cleans_up():
    model, layout, state, data = setup("deer")
    hooks = _hooks(model)
    record = RecordDP(noise_multipliers=(1.0,), clip_norm=1.0, delta=1e-5, noise="regulated")
    training = LocalTraining(local_epochs=1, batch_size=8, lr=0.05, record_dp=record)
    task = ClientTask(0, data, 7, dp_randomness=DPRandomness.from_seed(7))
    for phase in (Phase(0, 0, ("B",)), Phase(0, 1, ("A",)), Phase(1, 0, ("B",))):  # no IndexError: pop from empty
        update = train_client(model, layout, state, phase, task, training)
        assert set(update.delta) == set(layout.trained_keys(phase.factors))
        assert all(torch.isfinite(v).all() for v in update.delta.values())
        assert any(v.abs().max() > 0 for v in update.delta.values())
        assert _hooks(model) == hooks
        assert not any(hasattr(p, "grad_sample") or hasattr(p, "summed_grad") for p in model.parameters())
        frozen = "A" if phase.factors == ("B",) else "B"
        params = dict(model.named_parameters())
        for f in layout.lora:
            key = f.a_key if frozen == "A" else f.b_key
            assert torch.equal(params[key].detach(), state[key])  # the frozen factor is untouched
        state = {**state, **{k: state[k] + v for k, v in update.delta.items()}}
    again = train_client(model, layout, state, Phase(1, 1, ("A",)), task, training)
    twice = train_client(model, layout, state, Phase(1, 1, ("A",)), task, training)
    for k in again.delta:  # seeded Poisson sampling and noise: deterministic
        assert torch.equal(again.delta[k], twice.delta[k])


def test_empty_poisson_batches_are_noise_only_steps():
    from peft_deer.federated.dp_sgd import SecurePoissonSampler

    model, layout, state, data = setup("rolora")
    record = RecordDP(noise_multipliers=(1.0,), clip_norm=1.0, delta=1e-5, noise="plain")
    # q = 1/40, 40 steps: about a third of the Poisson draws are empty (the same draws as in training)
    sampler = SecurePoissonSampler(40, 1 / 40, 40, DPRandomness.from_seed(3).stream("poisson"))
    batches = list(sampler)
    assert any(len(b) == 0 for b in batches)
    training = LocalTraining(local_epochs=1, batch_size=1, lr=0.01, record_dp=record)
    task = ClientTask(0, data, 3, dp_randomness=DPRandomness.from_seed(3))
    update = train_client(model, layout, state, Phase(0, 0, ("B",)), task, training)
    assert update.images_seen == sum(len(b) for b in batches)
    assert all(torch.isfinite(v).all() for v in update.delta.values())


def test_batch_memory_manager_gives_the_same_update_and_bf16_runs():
    model, layout, state, data = setup("deer")
    phase, task = Phase(0, 1, ("A",)), ClientTask(1, data, 11, dp_randomness=DPRandomness.from_seed(11))

    def run(**kw):
        mp = kw.pop("mixed_precision", "no")
        record = RecordDP(noise_multipliers=(0.8, 0.8), clip_norm=1.0, delta=1e-5, noise="regulated", **kw)
        return train_client(
            model,
            layout,
            state,
            phase,
            task,
            LocalTraining(local_epochs=1, batch_size=16, lr=0.05, mixed_precision=mp, record_dp=record),
        )

    whole, split = run(), run(max_physical_batch_size=3)
    for k in whole.delta:
        torch.testing.assert_close(split.delta[k], whole.delta[k], rtol=1e-4, atol=1e-6)
    bf16 = run(mixed_precision="bf16", max_physical_batch_size=5)
    assert all(torch.isfinite(v).all() for v in bf16.delta.values())


# ------------------------------------------------------------------------------------------------
# The driver: --dp record and client,record, and --resume keeps record-level epsilon.


def _argv(data_dir, out, *extra):
    return [
        "--model", "tiny-vit", "--dataset", "medmnist:pneumoniamnist", "--data-dir", str(data_dir),
        "--train-subset", "120", "--num-clients", "3", "--rounds", "2", "--batch-size", "16", "--seed", "0",
        "--method", "deer", "--output-dir", str(out), *extra,
    ]  # fmt: skip


@pytest.mark.e2e  # a whole driver run, over 5 s
def test_driver_record_dp_resume_equals_uninterrupted(tmp_path, medmnist_dir):
    from safetensors.torch import load_file

    from train import fed

    # Two separate runs compared bit for bit: their DP draws must come from the public seed.
    flags = ["--dp", "record", "--record-noise-multiplier", "1.0", "--record-delta", "1e-4", "--reproducible-noise"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert fed.main(_argv(medmnist_dir, whole, *flags)) == 0
    assert fed.main(_argv(medmnist_dir, parts, *flags, "--max-phases", "1")) == 0
    assert fed.main(_argv(medmnist_dir, parts, *flags, "--resume")) == 0
    a, b = (json.loads((d / "privacy.json").read_text()) for d in (whole, parts))
    assert a["level"] == b["level"] == "record"
    assert a["neighbouring_relation"].startswith("add/remove one record") and "own records" in a["trust_model"]
    assert a["record"]["epsilon_per_client"] == b["record"]["epsilon_per_client"]
    assert a["epsilon"] == b["epsilon"] == a["record"]["epsilon_max"] > 0
    assert set(a["record"]["steps"]) == {"0", "1", "2"}
    ta, tb = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (whole, parts))
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k])
    rows = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["record_epsilon_max"] == pytest.approx(a["epsilon"])
    # --reproducible-noise: every output says there is no guarantee
    card = (whole / "adapter" / "README.md").read_text()
    assert "**none**" in card and "reproducible-noise" in card and "record-level (" not in card
    assert a["reproducible_noise"] is True and a["guarantee"].startswith("NONE")

    both = tmp_path / "both"
    flags2 = ["--dp", "client,record", "--noise-multiplier", "1.0", "--delta", "1e-3", "--record-epsilon", "8"]
    assert fed.main(_argv(medmnist_dir, both, *flags2, "--rounds", "1")) == 0
    c = json.loads((both / "privacy.json").read_text())
    assert c["level"] == "client+record" and c["noise_multiplier"] == 1.0 and c["epsilon"] > 0
    assert math.isclose(c["record_epsilon_max"], c["record"]["epsilon_max"])
    assert c["record"]["epsilon_max"] <= 8.0 + 1e-6 and c["record"]["epsilon_max"] > 7.0
    card = (both / "adapter" / "README.md").read_text()
    assert "client-level" in card and "record-level" in card


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--dp", "record"], "--dp record needs --record-epsilon or --record-noise-multiplier"),
        (["--record-epsilon", "3"], "--record-epsilon/--record-noise-multiplier need --dp record"),
        (
            ["--dp", "record", "--record-noise-multiplier", "0"],
            "--record-noise-multiplier 0.0 must be a finite",
        ),
        (["--dp", "client,record", "--record-epsilon", "3"], "--dp client needs --epsilon"),
    ],
)
def test_record_flags_are_validated(extra, message, capsys):
    from train import fed

    with pytest.raises(SystemExit):
        fed.parse_args(["--model", "tiny-vit", *extra])
    assert message in capsys.readouterr().err
