"""The distributed Skellam mechanism: exact integer sums, unbiased rounding, its RDP against the Gaussian limit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from scipy import special

from peft_deer.federated.randomness import DPRandomness, SecureStream
from peft_deer.federated.skellam import (
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
