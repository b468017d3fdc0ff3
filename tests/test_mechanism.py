"""Property tests of the client-level DP mechanism against theory (DESIGN 2.3 / 2.4)."""

from __future__ import annotations

import math

import pytest
import torch

from peft_deer.federated import build_whiteners, clip_update, factor_metric, metric_norm, sample_noise
from peft_deer.federated.adapter_state import AdapterLayout, LoraFactors
from peft_deer.federated.mechanism import Whitener, reference_effective_multiplier
from peft_deer.federated.randomness import DPRandomness

R, D_IN, D_OUT, S = 3, 6, 5, 2.0


def layout_and_state(scale_b: float = 1.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    layout = AdapterLayout((LoraFactors("m", "m.A", "m.B", S),), ("head.w",))
    state = {
        "m.A": torch.randn(R, D_IN, generator=g) / math.sqrt(D_IN),
        "m.B": torch.randn(D_OUT, R, generator=g) * scale_b,
        "head.w": torch.randn(2, 4, generator=g),
    }
    return layout, state


def empirical_cov(samples: torch.Tensor) -> torch.Tensor:
    """Covariance of rows of `samples` (n, r), mean known to be 0."""
    return samples.T.double() @ samples.double() / samples.shape[0]


@pytest.mark.parametrize("trained", ["B", "A"])
def test_regulated_noise_covariance_matches_sigma2_c2_minv(trained):
    layout, state = layout_and_state()
    key = f"m.{trained}"
    whiteners = build_whiteners(layout, state, [key], "regulated", ridge=1e-3)
    frozen = "A" if trained == "B" else "B"
    metric = factor_metric(state[f"m.{frozen}"], frozen, S, 1e-3)
    sigma, clip = 1.3, 0.7
    n = 200_000
    shape = torch.Size((n, R)) if trained == "B" else torch.Size((R, n))
    noise = sample_noise(whiteners, {key: shape}, sigma * clip, DPRandomness.from_seed(1).stream("t"))[key]
    rows = noise if trained == "B" else noise.T
    theory = sigma**2 * clip**2 * torch.linalg.inv(metric)
    cov = empirical_cov(rows)
    rel_err = float(torch.linalg.matrix_norm(cov - theory) / torch.linalg.matrix_norm(theory))
    assert rel_err < 0.02, rel_err
    # The test can fail: isotropic noise of the same total variance is far from the theory.
    iso = torch.eye(R, dtype=torch.float64) * torch.trace(theory) / R
    assert float(torch.linalg.matrix_norm(iso - theory) / torch.linalg.matrix_norm(theory)) > 0.1


def test_product_space_noise_does_not_grow_with_the_frozen_factor():
    """Phase A, lambda = 0: s B n_A has variance sigma^2 C^2 r d_in whatever the scale of B."""
    sigma, clip, draws = 1.0, 1.0, 400
    variances, plain_variances = [], []
    for scale in (0.1, 1.0, 30.0):
        layout, state = layout_and_state(scale_b=scale)
        regulated = build_whiteners(layout, state, ["m.A"], "regulated", ridge=0.0)
        plain = build_whiteners(layout, state, ["m.A"], "plain", ridge=0.0)
        g = DPRandomness.from_seed(2).stream("t")
        shapes = {"m.A": torch.Size((R, D_IN))}
        reg = torch.stack(
            [S * state["m.B"] @ sample_noise(regulated, shapes, sigma * clip, g)["m.A"] for _ in range(draws)]
        )
        pla = torch.stack(
            [S * state["m.B"] @ sample_noise(plain, shapes, sigma * clip, g)["m.A"] for _ in range(draws)]
        )
        variances.append(float(reg.double().square().sum(dim=(1, 2)).mean()))
        plain_variances.append(float(pla.double().square().sum(dim=(1, 2)).mean()))
    expected = sigma**2 * clip**2 * R * D_IN
    for v in variances:
        assert abs(v / expected - 1) < 0.05, (v, expected)
    assert plain_variances[-1] / plain_variances[0] > 1e4  # plain noise scales with ||B||^2


@pytest.mark.parametrize("trained", ["B", "A"])
def test_metric_norm_is_the_product_space_norm_at_zero_ridge(trained):
    layout, state = layout_and_state()
    key = f"m.{trained}"
    whiteners = build_whiteners(layout, state, [key], "regulated", ridge=0.0)
    delta = torch.randn_like(state[key])
    product = S * (delta @ state["m.A"] if trained == "B" else state["m.B"] @ delta)
    assert metric_norm({key: delta}, whiteners) == pytest.approx(float(product.norm()), rel=1e-5)


def test_clipping_bounds_every_update_by_c_in_the_metric():
    layout, state = layout_and_state(scale_b=5.0)
    keys = ["m.A", "head.w"]
    whiteners = build_whiteners(layout, state, keys, "regulated", ridge=1e-4)
    g = torch.Generator().manual_seed(3)
    clip = 0.5
    for scale in (1e-3, 1.0, 100.0):
        update = {k: torch.randn(state[k].shape, generator=g) * scale for k in keys}
        before = metric_norm(update, whiteners)
        clipped, norm = clip_update(update, whiteners, clip)
        after = metric_norm(clipped, whiteners)
        assert norm == pytest.approx(before)
        assert after <= clip * (1 + 1e-5)
        if before <= clip:
            assert all(torch.equal(clipped[k], update[k]) for k in keys)
        else:
            assert after == pytest.approx(clip, rel=1e-5)


def test_whitening_inverts_coloring():
    layout, state = layout_and_state()
    for key in ("m.A", "m.B"):
        w = build_whiteners(layout, state, [key], "regulated", ridge=0.1)[key]
        z = torch.randn(state[key].shape)
        torch.testing.assert_close(w.whiten(w.color(z)), z, rtol=1e-4, atol=1e-4)


def test_singular_metric_without_ridge_is_a_clear_error():
    layout, state = layout_and_state()
    state["m.B"] = torch.zeros(D_OUT, R)  # before the first B phase
    with pytest.raises(ValueError, match="ridge"):
        build_whiteners(layout, state, ["m.A"], "regulated", ridge=0.0)


def test_reference_effective_multiplier_composes_matrices():
    eye = Whitener(None, "right")
    assert reference_effective_multiplier(2.0, {str(i): eye for i in range(36)}) == pytest.approx(2.0 / 6.0)
    big = Whitener(torch.eye(R) * 3.0, "left")  # lambda_max(M) = 9
    assert reference_effective_multiplier(1.0, {"a": big}) == pytest.approx(1.0 / 3.0)


def test_client_noise_shares_sum_to_the_central_covariance_and_clipping_holds():
    """m clients each privatize a zero-signal update: the sum's noise is sigma^2 C^2 M^-1, as central."""
    from peft_deer.federated import ClientDP, privatize_update

    layout, state = layout_and_state(scale_b=3.0)
    whiteners = build_whiteners(layout, state, ["m.B"], "regulated", ridge=1e-3)
    metric = factor_metric(state["m.A"], "A", S, 1e-3)
    dp = ClientDP(noise_multiplier=1.1, clip_norm=0.6)
    m, draws = 4, 20_000
    big = {"m.B": torch.randn(D_OUT, R, generator=torch.Generator().manual_seed(3)) * 50}
    rows = []
    for i in range(draws // D_OUT):
        g = DPRandomness.from_seed(i).stream("t")
        zero_sum = sum(
            privatize_update({"m.B": torch.zeros(D_OUT, R)}, whiteners, "regulated", dp, m, g)[0]["m.B"]
            for _ in range(m)
        )
        rows.append(zero_sum)
    cov = empirical_cov(torch.cat(rows))
    theory = dp.noise_multiplier**2 * dp.clip_norm**2 * torch.linalg.inv(metric)
    assert float(torch.linalg.matrix_norm(cov - theory) / torch.linalg.matrix_norm(theory)) < 0.05
    # The clipping inside the client step: without noise (sigma -> tiny) the update has norm C.
    quiet = ClientDP(noise_multiplier=1e-9, clip_norm=0.6)
    clipped, before = privatize_update(big, whiteners, "regulated", quiet, m, DPRandomness.from_seed(0).stream("t"))
    assert before > 0.6 and metric_norm(clipped, whiteners) == pytest.approx(0.6, rel=1e-5)


def test_server_check_accepts_privatized_updates_and_rejects_unclipped_ones():
    from peft_deer.federated import (
        ClientDP,
        ClientUpdate,
        InvalidClientUpdate,
        check_privatized_update,
        privatize_update,
    )

    layout, state = layout_and_state()
    whiteners = build_whiteners(layout, state, ["m.A", "head.w"], "regulated", ridge=1e-3)
    dp = ClientDP(noise_multiplier=1.0, clip_norm=1.0)
    g = torch.Generator().manual_seed(0)
    raw = {"m.A": torch.randn(R, D_IN, generator=g) * 100, "head.w": torch.randn(2, 4, generator=g) * 100}
    for seed in range(200):
        private, _ = privatize_update(raw, whiteners, "regulated", dp, 3, DPRandomness.from_seed(seed).stream("t"))
        check_privatized_update(ClientUpdate(0, private, 10), whiteners, "regulated", dp, 3)  # never a false alarm
    with pytest.raises(InvalidClientUpdate, match="not clipped"):
        check_privatized_update(ClientUpdate(7, raw, 10), whiteners, "regulated", dp, 3)


def test_privatized_releases_keep_the_noise_floor_whatever_arrives():
    """Distributed placement with noise floor k: fewer than k privatized updates are refused (they would carry
    less than sigma), k or more are accounted at sigma, and their noise really is sigma*C*sqrt(r/k)."""
    from helpers import random_client_tasks, tiny_deer_model

    from peft_deer.federated import (
        ClientDP,
        FederatedServer,
        LocalTraining,
        SequentialEngine,
        adapter_layout,
        get_adapter_state,
        iter_phases,
        privatize_update,
    )

    model = tiny_deer_model("deer")
    layout = adapter_layout(model)
    dp = ClientDP(noise_multiplier=1.2, clip_norm=1.0, delta=1e-3, noise_placement="distributed")
    server = FederatedServer(
        method="deer",
        layout=layout,
        global_state=get_adapter_state(model, layout),
        num_clients=3,
        clients_per_phase=3,
        dp=dp,
    )
    phase = next(iter_phases("deer", 1))
    tasks = random_client_tasks((6, 6, 6), torch.Generator().manual_seed(0))
    updates = SequentialEngine(LocalTraining(batch_size=3)).train_clients(
        model, layout, server.global_state, phase, tasks
    )
    keys = server.trained_keys(phase)
    whiteners = build_whiteners(layout, server.global_state, keys, "regulated", dp.regulator_ridge)
    for u in updates:
        u.delta, _ = privatize_update(
            u.delta, whiteners, "regulated", dp, 3, DPRandomness.from_seed(u.client_id).stream("t")
        )
    with pytest.raises(ValueError, match="less noise than sigma"):
        server.finish_phase(phase, updates[:2], privatized_shares=3)
    assert server.releases == [] and server.accountant.history == []
    release = server.finish_phase(phase, updates, privatized_shares=3)
    assert release.effective_noise_multiplier == pytest.approx(1.2)
    assert server.ledger()["effective_noise_multipliers"] == [pytest.approx(1.2)]
    # Each update carried 1/2 of the variance (floor k = 2); 3 arrive: the noise is 1.5x the floor's variance.
    zero = {k: torch.zeros_like(v) for k, v in updates[0].delta.items()}
    draws = []
    for seed in range(300):
        shares = [
            privatize_update(zero, whiteners, "regulated", dp, 2, DPRandomness.from_seed(seed * 3 + i).stream("t"))[0]
            for i in range(3)
        ]
        total = {k: sum(s[k] for s in shares) for k in zero}
        draws.append(sum(float(whiteners[k].whiten(total[k]).square().sum()) for k in total))
    dim = sum(v.numel() for v in zero.values())
    per_coordinate = sum(draws) / len(draws) / dim
    assert per_coordinate == pytest.approx((1.2 * 1.0) ** 2 * 3 / 2, rel=0.05)
