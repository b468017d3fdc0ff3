"""The DP randomness: every secret draw reads a 256-bit-keyed cryptographic stream, never a seeded generator.

Two kinds of check, each shown to catch a planted weak source:
- key coverage: flipping any single bit of the key (beyond the low 64 too) changes every kind of draw; a
  generator seeded from the key's low 32 bits (what `Generator.manual_seed` keeps) fails it;
- no seeding on the path: with torch's and numpy's seeding entry points replaced by spies, the secret draws
  of a run (central noise, noise shares, client sampling, DP-SGD noise and Poisson batches) call none of them;
  the previous design (an HMAC of the key fed to `Generator.manual_seed`) fails it.
Plus the samplers' distributions against theory.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import tiny_deer_model
from torch.utils.data import TensorDataset

from peft_deer.federated import (
    ClientDP,
    ClientTask,
    ClientUpdate,
    DPRandomness,
    LocalTraining,
    Phase,
    adapter_layout,
    get_adapter_state,
    load_adapter_state,
    train_client,
)
from peft_deer.federated.aggregate import aggregate_phase
from peft_deer.federated.randomness import SecureStream
from peft_deer.federated.record_dp import RecordDP

KEY = bytes(range(32))


def _draws(stream: SecureStream) -> list[torch.Tensor]:
    """One draw of each kind a run makes."""
    return [
        stream.normal(64),
        stream.uniform(64),
        stream.bernoulli(0.5, 64),
        stream.poisson(3.0, 64),
        stream.skellam(200.0, 64),
    ]


def _bits_not_covered(make_stream) -> list[int]:
    """Key bits whose flip leaves some draw unchanged (empty: every bit of the key reaches every draw)."""
    base = _draws(make_stream(KEY))
    missed = []
    for bit in range(0, 256, 7):  # 37 bits spread over all 32 bytes, low and high
        key = bytearray(KEY)
        key[bit // 8] ^= 1 << (bit % 8)
        flipped = _draws(make_stream(bytes(key)))
        if any(torch.equal(a, b) for a, b in zip(base, flipped, strict=True)):
            missed.append(bit)
    return missed


class _ThirtyTwoBitStream(SecureStream):
    """A planted weak source: torch's CPU generator seeded from the key (it keeps 32 bits of any seed)."""

    def __init__(self, key: bytes, label: str) -> None:
        super().__init__(key, label)
        self._gen = torch.Generator().manual_seed(int.from_bytes(key[:8], "little"))

    def _words(self, n: int) -> np.ndarray:
        words = torch.randint(-(2**63), 2**63 - 1, (n,), generator=self._gen, dtype=torch.int64)
        return words.numpy().view(np.uint64)


def test_every_key_bit_reaches_every_draw():
    assert _bits_not_covered(lambda key: DPRandomness(key).stream(0, 1, "noise")) == []
    assert _bits_not_covered(lambda key: DPRandomness(key).child(0, 1, 3, "record-dp").stream("poisson")) == []


def test_a_32_bit_seeded_generator_fails_the_key_coverage_check():
    missed = _bits_not_covered(lambda key: _ThirtyTwoBitStream(key, "noise"))
    assert missed and all(bit >= 32 for bit in missed)  # only the low 32 bits of the seed matter


def test_draws_are_named_and_reproducible_per_key():
    r = DPRandomness(KEY)
    assert torch.equal(r.stream(1, 0, "noise").normal(10), r.stream(1, 0, "noise").normal(10))  # resume: same
    assert not torch.equal(r.stream(1, 0, "noise").normal(10), r.stream(1, 1, "noise").normal(10))
    assert not torch.equal(r.stream(1, 0, "noise").normal(10), DPRandomness.secret().stream(1, 0, "noise").normal(10))
    s = r.stream("x")
    assert not torch.equal(s.normal(10), s.normal(10))  # successive calls read fresh blocks
    assert r.token_hex("a") != r.token_hex("b") and len(r.token_hex("a")) == 64
    assert r.child(1).key != r.child(2).key and r.child(1).reproducible == r.reproducible
    assert "key" not in repr(r) and KEY.hex() not in repr(r)


# ---------------------------------------------------------------------------------------------
# No seeded generator on the path of a secret draw


class _SeedSpy:
    """Records every call of torch's and numpy's seeding entry points while installed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        spy = self

        class SpyGenerator(torch.Generator):
            def manual_seed(self, seed):  # noqa: D102
                spy.calls.append(f"Generator.manual_seed({seed})")
                return super().manual_seed(seed)

        real_manual_seed, real_default_rng = torch.manual_seed, np.random.default_rng
        monkeypatch.setattr(torch, "Generator", SpyGenerator)

        def manual_seed(seed):
            spy.calls.append(f"torch.manual_seed({seed})")
            return real_manual_seed(seed)

        def default_rng(*args):
            spy.calls.append(f"default_rng{args}")
            return real_default_rng(*args)

        monkeypatch.setattr(torch, "manual_seed", manual_seed)
        monkeypatch.setattr(np.random, "default_rng", default_rng)


def _secret_draws_of_a_run(public_seed: int, install_spy) -> _SeedSpy:
    """Central noise, noise shares, DP-SGD noise and Poisson batches, each from a run's randomness, with the
    spy installed once the (publicly seeded) model exists."""
    randomness = DPRandomness(KEY)
    model = tiny_deer_model("deer", 0)
    layout = adapter_layout(model)
    state = get_adapter_state(model, layout)
    keys = layout.trained_keys(("B",))
    updates = [ClientUpdate(c, {k: torch.ones_like(state[k]) for k in keys}, 10) for c in range(3)]
    spy = install_spy()
    for placement in ("central", "distributed"):
        dp = ClientDP(noise_multiplier=1.0, clip_norm=1.0, noise_placement=placement)
        aggregate_phase(updates, layout, state, keys, "regulated", dp, 3.0, randomness, (0, 0))
    load_adapter_state(model, state)
    data = TensorDataset(torch.zeros(8, 1, 28, 28), torch.tensor([0, 1] * 4))
    training = LocalTraining(
        local_epochs=1,
        batch_size=4,
        lr=0.05,
        record_dp=RecordDP(noise_multipliers=(1.0,), clip_norm=1.0, delta=1e-5, noise="regulated"),
    )
    task = ClientTask(0, data, public_seed, dp_randomness=randomness.child(0, 0, 0, "record-dp"))
    train_client(model, layout, state, Phase(0, 0, ("B",)), task, training)
    return spy


def _unexpected(calls: list[str], public_seed: int) -> list[str]:
    return [c for c in calls if c != f"torch.manual_seed({public_seed})"]  # dropout's public seed is allowed


def test_no_secret_draw_passes_through_generator_seeding(monkeypatch):
    spy = _secret_draws_of_a_run(5, lambda: _SeedSpy(monkeypatch))
    assert _unexpected(spy.calls, 5) == []


def test_the_seeding_check_catches_an_hmac_fed_to_manual_seed(monkeypatch):
    """The previous design: a 63-bit HMAC of the key handed to `Generator.manual_seed` (32 bits kept)."""

    class HmacSeeded(SecureStream):
        def _words(self, n: int) -> np.ndarray:
            g = torch.Generator().manual_seed(int.from_bytes(self._prefix[-8:], "little") >> 1)
            return torch.randint(-(2**63), 2**63 - 1, (n,), generator=g, dtype=torch.int64).numpy().view(np.uint64)

    monkeypatch.setattr(DPRandomness, "stream", lambda self, *parts: HmacSeeded(self.key, ":".join(map(str, parts))))
    spy = _secret_draws_of_a_run(5, lambda: _SeedSpy(monkeypatch))
    assert any("Generator.manual_seed" in c for c in _unexpected(spy.calls, 5))


# ---------------------------------------------------------------------------------------------
# The samplers against theory


def test_normal_moments_and_no_float_grid():
    z = DPRandomness(KEY).stream("n").normal(400_000, std=2.0, dtype=torch.float64)
    n = len(z)
    assert abs(float(z.mean())) < 5 * 2.0 / math.sqrt(n)
    assert float(z.var()) == pytest.approx(4.0, rel=5 * math.sqrt(2 / n))
    kurtosis = float(((z / 2.0) ** 4).mean())
    assert kurtosis == pytest.approx(3.0, abs=0.05)
    assert len(torch.unique(z)) == n  # 53-bit uniforms, summed normals: no repeated values


@pytest.mark.parametrize("lam", [0.3, 4.0, 9.99, 10.0, 37.5, 5000.0])
def test_poisson_mean_variance_and_pmf(lam):
    k = DPRandomness(KEY).stream("p", lam).poisson(lam, 200_000).double()
    n = len(k)
    assert float(k.mean()) == pytest.approx(lam, abs=5 * math.sqrt(lam / n))
    assert float(k.var()) == pytest.approx(lam, rel=6 * math.sqrt(2 / n) + 5 / math.sqrt(n * lam))
    for value in (math.floor(lam), math.floor(lam) + 1):  # the two central probabilities
        p = math.exp(-lam + value * math.log(lam) - math.lgamma(value + 1))
        freq = float((k == value).double().mean())
        assert freq == pytest.approx(p, abs=5 * math.sqrt(p * (1 - p) / n))


def test_skellam_is_integer_symmetric_with_variance_2mu_and_shares_sum_exactly():
    mu = 50.0
    s = DPRandomness(KEY).stream("s").skellam(mu, 200_000)
    assert s.dtype == torch.int64
    assert abs(float(s.double().mean())) < 5 * math.sqrt(2 * mu / len(s))
    assert float(s.double().var()) == pytest.approx(2 * mu, rel=0.02)
    shares = sum(DPRandomness(KEY).stream("share", i).skellam(mu / 4, 200_000) for i in range(4))
    assert float(shares.double().var()) == pytest.approx(2 * mu, rel=0.02)  # Skellam(mu/4) x 4 = Skellam(mu)


def test_bernoulli_and_uniform():
    stream = DPRandomness(KEY).stream("b")
    u = stream.uniform(100_000)
    assert u.dtype == torch.float64 and float(u.min()) >= 0 and float(u.max()) < 1
    b = stream.bernoulli(0.1, 100_000)
    assert float(b.double().mean()) == pytest.approx(0.1, abs=5 * math.sqrt(0.09 / 100_000))
    with pytest.raises(ValueError, match="probability"):
        stream.bernoulli(1.5, 3)
    with pytest.raises(ValueError, match="std"):
        stream.normal(3, std=float("nan"))
