"""Record-level delta: the same weak-delta warning as the client level, against its bound 1/(10 n_k)."""

from __future__ import annotations

import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peft_deer.federated.accountant import WeakDeltaWarning
from peft_deer.federated.record_dp import public_size
from peft_deer.run.privacy import record_level
from peft_deer.settings import parse_args


def _settings(delta: float):
    return parse_args(["--dp", "record", "--record-noise-multiplier", "1.0", "--record-delta", f"{delta!r}"])


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 5000), min_size=1, max_size=5), fraction=st.floats(0.001, 0.999))
def test_record_delta_warns_exactly_above_one_tenth_of_one_over_the_largest_client(sizes, fraction):
    """delta in (0, 1/n_max) is accepted; with (epsilon, delta)-DP one of a client's n records may be exposed
    outright with probability up to n delta, so above 1/(10 n_max) (n delta > 0.1 for the largest client) it warns.
    n is the clients' declared public size (the checks read no exact count); the default declaration floors it."""
    sizes = [public_size(n) for n in sizes]  # declared sizes: their own declarations
    n = max(sizes)
    delta = fraction / n
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        record = record_level(_settings(delta), sizes)
    weak = [w for w in caught if issubclass(w.category, WeakDeltaWarning)]
    assert record is not None and record.dp.delta == delta
    assert bool(weak) == (delta > 0.1 / n)
    if weak:
        assert f"{n} records" in str(weak[0].message) and "--record-delta" in str(weak[0].message)


def test_record_delta_of_one_over_n_or_more_is_refused():
    with pytest.raises(ValueError, match="--record-delta"):
        record_level(_settings(0.01), [100, 20])
