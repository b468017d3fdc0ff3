"""What a Flower site's messages carry: under DP only the DP output and public values; its training statistics,
exact count and evaluation counts stay in its own state directory. Unit level: no SuperLink, no real training.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("flwr", reason="Flower is not installed (pip install 'peft_deer[flower]')")

from flwr.app import Message, RecordDict  # noqa: E402

from peft_deer.federated import ClientUpdate  # noqa: E402
from peft_deer.flower.protocol import (  # noqa: E402
    COUNTS,
    METRICS,
    RECORD,
    SiteCounts,
    SiteEvaluated,
    TrainInstruction,
    evaluate_message,
    read_hello_reply,
    read_site_counts,
    train_message,
)
from peft_deer.flower.run_config import parse_run_config  # noqa: E402
from peft_deer.flower.site import Site, _declared_size  # noqa: E402
from peft_deer.flower.site_accounting import site_record_level  # noqa: E402
from peft_deer.flower.site_evaluation import split_reports  # noqa: E402

RUN_KEY = "0123456789abcdef"


@pytest.fixture(autouse=True)
def _task_identity():  # Flower messages need a run id outside a running app
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None

EXACT = 117  # the site's exact image count: must never reach the server under DP
STATE = {"w": torch.zeros(2, 2)}


def _site(tmp_path, dp: str, public: int | None = None) -> Site:
    extra = {"dp": dp}
    if "record" in dp:
        extra.update({"record-noise-multiplier": 1.0, "record-delta": 1e-4})
    if "client" in dp:
        extra.update({"noise-multiplier": 1.0})
    settings, _ = parse_run_config({"num-clients": 3, "batch-size": 16, **extra})
    record = site_record_level(settings, EXACT, public)
    site = Site(settings, 1, 3, None, None, None, list(range(EXACT)), record, tmp_path)

    def train_update(work):  # what training would return: an un-noised loss, images seen, time, exact count
        update = ClientUpdate(1, {"w": torch.ones(2, 2)}, EXACT, 0.6931, 2 * EXACT, 3.25)
        report = None
        if site.record is not None:
            from peft_deer.flower.site_accounting import SiteAccountant

            report = SiteAccountant(site.state_dir, work.run_key, 1).step(site.record, update.num_examples)
        return update, report

    site.train_update = train_update
    counts = SiteCounts(1, ((30, 3), (5, 79)))
    site.evaluate_counts = lambda content: counts
    return site


def _reply(site: Site) -> RecordDict:
    work = TrainInstruction(STATE, 0, 0, 1, 1, RUN_KEY)
    return site.train(train_message(7, work).content)


def _hello(site: Site):
    return read_hello_reply(Message(site.hello(), reply_to=Message(RecordDict(), dst_node_id=7, message_type="query")))


def _values(content: RecordDict) -> list:
    """Every scalar or list value in a reply's metric and config records."""
    out = []
    for records in (content.metric_records, content.config_records):
        for record in records.values():
            for v in record.values():
                out.extend(v if isinstance(v, list) else [v])
    return out


def test_a_record_level_site_sends_only_its_update_and_public_values(tmp_path):
    site = _site(tmp_path, "record")
    content = _reply(site)
    metrics = content.metric_records[METRICS]
    assert dict(metrics) == {"num-examples": 110}  # the declared public size, floor(117) to 2 significant figures
    report = content.config_records[RECORD]
    assert report["public-size"] == 110 and report["sample-rate"] == pytest.approx(16 / 110)
    assert report["steps"] == 110 // 16
    assert EXACT not in _values(content) and 2 * EXACT not in _values(content)
    assert _hello(site) == (1, 110)
    # The statistics stayed at the site, in its own log.
    (log,) = tmp_path.glob(f"diagnostics-{RUN_KEY}-client1.jsonl")
    row = json.loads(log.read_text())
    assert row["train_loss"] == 0.6931 and row["images_seen"] == 2 * EXACT and row["num_examples"] == EXACT


def test_an_explicit_public_size_fixes_the_mechanism(tmp_path):
    site = _site(tmp_path, "record", public=100)
    report = _reply(site).config_records[RECORD]
    assert report["public-size"] == 100 and report["sample-rate"] == pytest.approx(0.16)
    for bad in ("0", "-3", "1.5", "ten", True):
        with pytest.raises(ValueError, match="public-size"):
            _declared_size(bad)
    assert _declared_size("250") == 250 and _declared_size(None) is None


def test_a_client_level_site_sends_a_uniform_weight_and_no_statistics(tmp_path):
    site = _site(tmp_path, "client")
    content = _reply(site)
    assert dict(content.metric_records[METRICS]) == {"num-examples": 1} and RECORD not in content.config_records
    assert _hello(site) == (1, None)


def test_evaluation_counts_stay_at_the_site_under_dp_and_flow_without(tmp_path):
    message = evaluate_message(7, STATE, 0.5)
    private = _site(tmp_path / "dp", "record")
    content = private.evaluate(message.content)
    assert COUNTS not in content.metric_records
    reply = read_site_counts(Message(content, reply_to=message))
    assert reply == SiteEvaluated(1) and split_reports([reply]) == ([], [1])
    (kept,) = (tmp_path / "dp").glob("site-evaluation-client1-*.json")
    assert json.loads(kept.read_text())["confusion"] == [[30, 3], [5, 79]]
    public = _site(tmp_path / "none", "none")
    counts = read_site_counts(Message(public.evaluate(message.content), reply_to=message))
    assert counts == SiteCounts(1, ((30, 3), (5, 79))) and split_reports([counts, reply]) == ([counts], [1])


def test_without_dp_the_statistics_still_flow(tmp_path):
    site = _site(tmp_path, "none")
    metrics = _reply(site).metric_records[METRICS]
    assert metrics["num-examples"] == EXACT and metrics["train-loss"] == pytest.approx(0.6931)
    assert metrics["images-seen"] == 2 * EXACT and _hello(site) == (1, EXACT)
    assert not list(tmp_path.glob("diagnostics-*"))


def _noised_site(tmp_path, monkeypatch) -> Site:
    """A client-level distributed-noise site whose training returns a fixed update (no model)."""
    from peft_deer.federated.adapter_state import AdapterLayout, LoraFactors
    from peft_deer.flower import site as site_module

    settings, options = parse_run_config(
        {"num-clients": 3, "method": "lora", "dp": "client", "noise-multiplier": 1.0, "noise-placement": "distributed",
         "min-clients-per-phase": 3, "collusion-threshold": 0}  # d = k - t up to 3 shares
    )  # fmt: skip
    layout = AdapterLayout((LoraFactors("m", "m.A", "m.B", 1.0),), ("h",))
    monkeypatch.setattr(
        site_module,
        "train_client",
        lambda model, layout, state, phase, task, training: ClientUpdate(
            1, {k: torch.full_like(state[k], 0.01) for k in layout.trained_keys(phase.factors)}, EXACT
        ),
    )
    return Site(settings, 1, 3, None, None, layout, list(range(EXACT)), None, tmp_path, options=options)


def test_a_resent_instruction_gets_the_same_noise_share_and_a_changed_one_is_refused(tmp_path, monkeypatch):
    """Averaging two answers to the same (round, phase) must not halve the site's noise: an identical re-send gets
    the identical message, a different instruction for an answered (round, phase) is refused (one line)."""
    import os
    import stat

    from peft_deer.flower.protocol import NoiseTerms
    from peft_deer.methods import NoiseKind

    site = _noised_site(tmp_path, monkeypatch)
    state = {"m.A": torch.randn(2, 5), "m.B": torch.zeros(4, 2), "h": torch.zeros(3)}
    terms = NoiseTerms(1.0, 1.0, 0.0, NoiseKind.PLAIN)
    work = TrainInstruction(state, 0, 0, 1, 2, RUN_KEY, terms)
    first, again = site.train_update(work)[0].delta, site.train_update(work)[0].delta
    assert all(torch.equal(first[k], again[k]) for k in first)  # the same share: nothing new to average
    noise = torch.cat([(first[k] - 0.01).flatten() for k in first])
    assert 0.3 < float(noise.std()) < 1.2  # it is noised: share std sigma C / sqrt(2) ~ 0.71
    other = {k: v.clone() for k, v in state.items()}
    other["m.A"][0, 0] += 1.0  # another adapter for the same (round, phase)
    with pytest.raises(ValueError, match="round 0 phase 0 was already answered for another instruction"):
        site.train_update(TrainInstruction(other, 0, 0, 1, 2, RUN_KEY, terms))
    with pytest.raises(ValueError, match="already answered"):  # another share count, too
        site.train_update(TrainInstruction(state, 0, 0, 1, 3, RUN_KEY, terms))
    nxt = site.train_update(TrainInstruction(other, 1, 0, 1, 2, RUN_KEY, terms))[0].delta  # the next round: fine
    assert not all(torch.equal(nxt[k], first[k]) for k in first)  # with a fresh share
    for path in tmp_path.iterdir():  # the key and the answered digests: owner-only
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    key = next(tmp_path.glob("noise-key-client1.hex"))
    assert len(key.read_text()) == 64  # 256 bits
    restarted = _noised_site(tmp_path, monkeypatch)  # a restarted site keeps its key and its answers
    assert all(torch.equal(restarted.train_update(work)[0].delta[k], first[k]) for k in first)
    os.chmod(key, 0o644)
    with pytest.raises(ValueError, match="readable by others"):
        restarted.train_update(work)


def test_a_phase_asking_for_more_noise_shares_than_the_sites_config_gives_is_refused(tmp_path, monkeypatch):
    """Attack F4 (issue 25's pass): d sizes a share's variance sigma^2 C^2 / d; a server asking for d above k - t of
    the site's own run config (here 3) would get less noise. Refused before training; d <= 3 is answered."""
    from peft_deer.flower.protocol import NoiseTerms
    from peft_deer.methods import NoiseKind

    site = _noised_site(tmp_path, monkeypatch)
    state = {"m.A": torch.randn(2, 5), "m.B": torch.zeros(4, 2), "h": torch.zeros(3)}
    terms = NoiseTerms(1.0, 1.0, 0.0, NoiseKind.PLAIN)
    with pytest.raises(ValueError, match=r"num-shares 4 is outside \[1, d = k - t = 3\]"):
        site.train_update(TrainInstruction(state, 0, 0, 1, 4, RUN_KEY, terms))
    site.train_update(TrainInstruction(state, 0, 0, 1, 3, RUN_KEY, terms))
