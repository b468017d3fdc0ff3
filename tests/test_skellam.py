"""The distributed Skellam mechanism: exact integer sums, unbiased rounding, its RDP against the Gaussian limit."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from scipy import special

from peft_deer.federated.randomness import DPRandomness, SecureStream
from peft_deer.federated.skellam import (
    SKELLAM_ORDERS,
    range_failure_probability,
    rounded_sensitivity,
    skellam_epsilon,
    skellam_rdp,
    skellam_share,
    skellam_variance_for,
    stochastic_round,
)


def secure_stream(seed: int) -> SecureStream:
    """The real cryptographic stream a site draws from (a public-seed key: fine for a test)."""
    return DPRandomness.from_seed(seed).stream("skellam-test")


def test_sum_of_shares_is_exactly_skellam_of_the_summed_variance():
    variances, n = (0.7, 1.9, 3.4), 400_000
    stream = secure_stream(0)
    x = torch.zeros(n)  # integers round to themselves: each message is its noise share
    total = sum(skellam_share(x, v, stream) for v in variances)
    assert total.dtype == torch.int64
    mu = sum(variances)
    ks = np.arange(-6, 7)
    pmf = np.exp(-mu) * special.iv(np.abs(ks), mu)  # Skellam(mu/2, mu/2): e^-mu I_|k|(mu)
    counts = np.array([(total == k).sum().item() for k in ks]) / n
    assert np.allclose(counts, pmf, atol=4 * np.sqrt(pmf / n) + 1e-4)
    assert float(total.double().var()) == pytest.approx(mu, rel=0.02)


def test_stochastic_rounding_is_unbiased_and_within_one_and_the_norm_bound_holds():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, generator=g, dtype=torch.float64) * 3
    stream = secure_stream(1)
    draws = torch.stack([stochastic_round(x, stream.uniform((64,))) for _ in range(20_000)]).double()
    assert ((draws - x).abs() < 1).all()
    assert torch.allclose(draws.mean(0), x, atol=0.02)
    clip, d = 5.0, 64
    l2, l1 = rounded_sensitivity(clip, d)
    for _ in range(200):
        v = torch.randn(d, generator=g, dtype=torch.float64)
        r = stochastic_round(v / v.norm() * clip, stream.uniform((d,))).double()
        assert r.norm() <= l2 and r.abs().sum() <= l1


def test_skellam_rdp_tends_to_the_gaussian_and_is_never_below_it():
    l2, d = 100.0, 1000
    _, l1 = rounded_sensitivity(l2 - math.sqrt(d), d)
    ratios = []
    for mu in (1e4, 1e6, 1e8):
        gauss = 8 * l2 * l2 / (2 * mu)
        assert skellam_rdp(8, l2, l1, mu) >= gauss
        ratios.append(skellam_rdp(8, l2, l1, mu) / gauss)
    assert ratios[0] > ratios[1] > ratios[2] and ratios[2] < 1.001
    # (eps, delta): the Skellam epsilon approaches opacus's Gaussian RDP epsilon at sigma = sqrt(mu) / D2.
    mu = (30.0 * l2) ** 2  # sigma = sqrt(mu) / D2 = 30, over 400 releases
    acc = RDPAccountant()
    acc.history = [(math.sqrt(mu) / l2, 1.0, 400)]
    gaussian = acc.get_epsilon(1e-5)
    skellam = skellam_epsilon([(l2, l1, mu)] * 400, 1e-5)
    assert gaussian * 0.98 <= skellam <= gaussian * 1.05


def test_range_failures_are_bounded_and_come_out_of_delta():
    clip, v = 20.0, 400.0
    stream, trials = secure_stream(2), 20_000
    x = torch.full((trials,), clip)  # one entry at the clip (the worst case), many independent messages
    messages = skellam_share(x, v, stream).abs()
    for bound in (60.0, 75.0, 90.0):
        p = range_failure_probability(clip, 1, v, 1, bound)  # Chernoff for one entry of one site
        observed = float((messages > bound).double().mean())
        assert 0 < observed <= p + 3 * math.sqrt(p / trials) and p < 1
    d, sites, bound = 50, 3, 90.0
    p = range_failure_probability(clip, d, v, sites, bound)
    assert p == pytest.approx(min(1.0, d * sites * range_failure_probability(clip, 1, v, 1, bound)))
    assert range_failure_probability(clip, d, v, sites, 500.0) < 1e-12 < p
    with pytest.raises(ValueError, match="does not cover the range failures"):
        skellam_epsilon([(1.0, 1.0, 10.0)] * 10, 1e-5, range_failure=2e-6)
    assert skellam_epsilon([(1.0, 1.0, 10.0)], 1e-5, 1e-7) > skellam_epsilon([(1.0, 1.0, 10.0)], 1e-5)
    assert skellam_variance_for(0.8, 1000.0) == pytest.approx(640_000.0)


def test_the_gaussian_secagg_range_tail_bounds_clipping_of_any_update():
    from peft_deer.federated.quantization import range_clipping_probability, tail_quantile

    d, n, tail = 30, 4, 0.05
    t = tail_quantile(d, tail)
    z = torch.randn(20_000, n, d, generator=torch.Generator().manual_seed(3))
    observed = float((z.abs() > t).flatten(1).any(1).double().mean())
    assert 0 < observed <= range_clipping_probability(n, tail) == pytest.approx(n * tail)


def test_skellam_secagg_messages_pass_flowers_quantization_exactly_and_decode_to_the_clipped_sum():
    """The wiring of `secagg-noise = "skellam"`: sites clip in the metric, scale, round and add integer noise; with
    flwr's clipping range rho and Q = 2 rho the integers pass SecAgg+'s quantization exactly; the server's decoded
    sum is unbiased for the sum of clipped updates and carries noise covariance sigma^2 C^2 (k / d) M^-1."""
    from flwr.common.secure_aggregation.quantization import dequantize, quantize

    from peft_deer.federated.mechanism import Whitener, clip_update
    from peft_deer.federated.skellam import decode_skellam_sum, plan_skellam, skellam_message

    g = torch.Generator().manual_seed(5)
    chol = torch.linalg.cholesky(torch.tensor([[2.0, 0.3], [0.3, 0.5]]))
    whiteners = {"b": Whitener(chol, "right"), "h": Whitener(None, "right")}
    updates = [{"b": torch.randn(3, 2, generator=g), "h": torch.randn(2, generator=g) * 0.1} for _ in range(3)]
    sigma, clip, k, d = 0.7, 0.5, 3, 2
    plan = plan_skellam(sigma, clip, 8, d, k)
    assert plan.range_failure <= 1e-9 and plan.bound < 2**24 and plan.sensitivity[0] == pytest.approx(plan.scaled_clip)
    rho, levels = float(plan.bound), 2 * plan.bound
    messages = [skellam_message(u, whiteners, clip, plan, secure_stream(i)) for i, u in enumerate(updates)]
    exact = {key: sum(m[key] for m in messages) for key in ("b", "h")}
    # flwr's SecAgg+ arithmetic (secaggplus_mod quantize; workflow dequantize, offset, divide by n): the mean.
    quantized = [quantize([m[key].numpy() for key in ("b", "h")], rho, levels) for m in messages]
    summed = [sum(q[i].astype(np.int64) for q in quantized) for i in range(2)]
    mean = [(a - (k - 1) * rho) / k for a in dequantize(summed, rho, levels)]
    for i, key in enumerate(("b", "h")):
        assert torch.equal(torch.from_numpy(np.round(mean[i] * k)), exact[key])  # integers pass exactly
    # Unbiased for the sum of the clipped updates; the noise has the stated covariance (whitened: isotropic).
    clipped = [clip_update(u, whiteners, clip)[0] for u in updates]
    target = {key: sum(c[key] for c in clipped).double() for key in ("b", "h")}
    draws = []
    for seed in range(400):
        msgs = [
            skellam_message(u, whiteners, clip, plan, secure_stream(1000 * seed + i)) for i, u in enumerate(updates)
        ]
        decoded = decode_skellam_sum({key: sum(m[key] for m in msgs) for key in ("b", "h")}, whiteners, plan.scale)
        draws.append({key: decoded[key].double() - target[key] for key in ("b", "h")})
    noise = torch.cat(
        [torch.cat([whiteners[key].whiten(x[key].float()).double().flatten() for key in x]) for x in draws]
    )
    assert float(noise.mean()) == pytest.approx(0.0, abs=4 * sigma * clip * math.sqrt(k / d) / math.sqrt(noise.numel()))
    assert float(noise.var()) == pytest.approx((sigma * clip) ** 2 * k / d, rel=0.08)


def test_a_skellam_message_without_noise_has_l2_norm_at_most_the_scaled_clip():
    from peft_deer.federated.mechanism import Whitener
    from peft_deer.federated.skellam import SkellamPlan, plan_skellam, skellam_message

    whiteners = {"a": Whitener(torch.linalg.cholesky(torch.tensor([[1.5, 0.2], [0.2, 0.3]])), "left")}
    plan = plan_skellam(1.0, 2.0, 40, 1, 2)
    quiet = SkellamPlan(plan.scale, plan.scaled_clip, 1e-12, plan.bound, plan.range_failure, plan.dim)
    g = torch.Generator().manual_seed(0)
    for i in range(50):
        big = {"a": torch.randn(2, 20, generator=g) * 1e3}  # far above C: clipped
        rounded = skellam_message(big, whiteners, 2.0, quiet, secure_stream(i))["a"]
        assert torch.equal(rounded, rounded.round()) and float(rounded.norm()) <= plan.sensitivity[0]
        assert float(rounded.norm()) > 0.98 * plan.scaled_clip  # rounding costs at most ~1 %


def test_the_skellam_ledger_tends_to_the_gaussian_of_sigma_sqrt_k_over_d_and_refuses_exposed_colluders():
    from peft_deer.federated.skellam import plan_skellam, skellam_ledger

    sigma, k, d, releases = 0.8, 3, 2, 4
    plan = plan_skellam(sigma, 1.0, 10_000, d, k)
    logged = [dataclasses.asdict(plan)] * releases
    ledger = skellam_ledger(logged, 1e-3, [(k, d)] * releases, t=1)
    orders = list(SKELLAM_ORDERS)  # the corollary holds at integer orders: compare the Gaussian at the same ones
    for who, multiplier in (("outsiders", sigma * math.sqrt(k / d)), ("t_colluding_sites", sigma)):
        rdp = compute_rdp(q=1.0, noise_multiplier=multiplier, steps=releases, orders=orders)
        gaussian, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=1e-3 - releases * plan.range_failure)
        assert gaussian <= ledger[who] <= 1.01 * gaussian
    assert skellam_ledger(logged, 1e-3, [(k, d)] * releases, t=3)["t_colluding_sites"] == math.inf
