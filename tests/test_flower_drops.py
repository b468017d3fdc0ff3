"""Issue 27 item 6a: a site that stops answering. The drop reason states the wait that actually happened (Flower
returns early once a node is known to be gone), and the server-private ledger counts each site's missed phases."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("flwr")

from test_flower import flower_task_identity, phase_setup  # noqa: E402, F401  (the fixture is used by name)

from peft_deer.flower.protocol import update_reply  # noqa: E402


class EarlyGrid:
    """A Grid whose send_and_receive returns after `seconds` (well before the timeout) without client 2's reply."""

    def __init__(self, updates, seconds: float) -> None:
        self.updates, self.seconds, self.timeouts = updates, seconds, []

    def send_and_receive(self, messages, timeout):
        self.timeouts.append(timeout)
        time.sleep(self.seconds)
        return [update_reply(m, self.updates[i]) for i, m in enumerate(messages) if i != 2]


def test_a_missing_reply_is_dropped_with_the_actual_wait_and_counted_per_site(flower_task_identity):  # noqa: F811
    server, _, strategy, phase, updates, _ = phase_setup(3, min_clients=2)
    grid = EarlyGrid(updates, 0.3)
    release = strategy.release_phase(grid)
    release(phase, [0, 1, 2])
    (drop,) = strategy.dropped
    assert drop["client"] == 2 and grid.timeouts == [strategy.options.reply_timeout_s]
    waited = float(drop["reason"].split("after ")[1].split(" s")[0])
    assert 0.3 <= waited < 0.3 + 5 < strategy.options.reply_timeout_s, drop["reason"]
    assert f"reply-timeout-s {strategy.options.reply_timeout_s:g}" in drop["reason"]
    assert strategy.private_ledger()["missed_phases"] == {"2": 1}
