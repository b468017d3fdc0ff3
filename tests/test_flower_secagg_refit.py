"""`--head-refit stats` through SecAgg+ (`flower/secagg_refit.py`): the server sees only the sum of the statistics.

The ServerApp's whole run (`run_experiment` with a `FlowerTransport`, `secure-aggregation=true`) goes in process over
a grid that hands every message to the sites' real `handle` behind Flower's real `secaggplus_mod` (tiny random ViT,
real MedMNIST, CPU). What the server received is masked; the released sum is exactly the sites' integer messages
summed and divided by s; each message is s times the site's statistics plus Skellam noise of the planned variance;
the ledger states the Skellam epsilon of the refit's release, within the target it was calibrated for.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
from helpers import MEDMNIST_DIR

pytest.importorskip("flwr", reason="Flower is not installed (pip install 'peft_deer[flower]')")

from flwr.app import Context, Message, MessageType, RecordDict  # noqa: E402
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS  # noqa: E402
from flwr.compat.common import recorddict_compat as compat  # noqa: E402
from test_flower_sites import tiny_run_config  # noqa: E402

from peft_deer.federated.head_refit import hospital_contribution  # noqa: E402
from peft_deer.federated.skellam import skellam_ledger  # noqa: E402
from peft_deer.flower import server_app  # noqa: E402
from peft_deer.flower.run_config import parse_run_config  # noqa: E402
from peft_deer.flower.secagg_refit import read_statistics_fit_ins, refit_plan  # noqa: E402
from peft_deer.flower.server_app import FlowerTransport  # noqa: E402
from peft_deer.flower.site import handle, site_for  # noqa: E402
from peft_deer.run import Host, run_experiment  # noqa: E402
from peft_deer.run.privacy import refit_multiplier  # noqa: E402
from peft_deer.run.refit import dataset_labels, head_features  # noqa: E402
from peft_deer_clientapp import secagg_when_asked  # noqa: E402

KINDS = {MessageType.QUERY: "hello", MessageType.TRAIN: "train", MessageType.EVALUATE: "evaluate"}
EPSILON = 8.0


pytestmark = pytest.mark.usefixtures("one_thread", "flower_task_identity")  # (conftest.py)


class SecAggSiteGrid:
    """Node 100 + c holds client c; a train message of a SecAgg+ run goes through the site's real `secaggplus_mod`
    (the ClientApp's `secagg_when_asked`) to its `handle`, any other message straight to `handle`. `received` keeps
    what the server got; `messages[c]` the statistics FitRes each site handed to the mod (before masking)."""

    def __init__(self, run_config: dict, state_dir, clients: int = 3) -> None:
        self.run_config = run_config
        self.nodes = {
            100 + c: {"partition-id": c, "data-dir": str(MEDMNIST_DIR), "state-dir": str(state_dir)}
            for c in range(clients)
        }
        self.contexts = {
            n: Context(run_id=1, node_id=n, node_config=dict(self.nodes[n]), state=RecordDict(), run_config={})
            for n in self.nodes
        }
        self.received: list[tuple[str, Message]] = []
        self.messages: dict[int, np.ndarray] = {}
        self.instructions: dict[int, RecordDict] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages, timeout=None) -> list[Message]:
        out = []
        for sent in messages:
            msg = copy.deepcopy(sent)  # what travels is a copy: the mod edits its message in place
            node, kind = msg.metadata.dst_node_id, KINDS[msg.metadata.message_type]
            config = self.nodes[node]

            def call_next(m: Message, _ctx: Context, node=node, config=config, kind=kind) -> Message:
                content = handle(kind, m.content, self.run_config, config)
                if "fitres.parameters" in content.array_records:  # a statistics FitRes, before the mod masks it
                    self.messages[node - 100] = _fit_res_vector(content)
                    self.instructions[node - 100] = read_statistics_fit_ins(m.content)
                return Message(content, reply_to=m)

            if kind == "train" and RECORD_KEY_CONFIGS in msg.content.config_records:
                reply = secagg_when_asked(msg, self.contexts[node], call_next)
            else:
                reply = call_next(msg, self.contexts[node])
            out.append(reply)
            self.received.append((kind, reply))
        return out


def _fit_res_vector(content: RecordDict) -> np.ndarray:
    from flwr.common import parameters_to_ndarrays

    res = compat.recorddict_to_fitres(content, keep_input=True)
    (vector,) = parameters_to_ndarrays(res.parameters)
    return np.asarray(vector, dtype=np.float64)


def secagg_config(out, **overrides) -> dict:
    return tiny_run_config(
        **{
            "dp": "client",
            "epsilon": EPSILON,
            "delta": 1e-3,
            "noise-placement": "distributed",
            "secure-aggregation": True,
            "secagg-noise": "skellam",
            "min-clients-per-phase": 2,
            "num-clients": 3,
            "rounds": 0,
            "head-refit": "stats",
            "refit-dims": 8,
            "output-dir": str(out),
            **overrides,
        }
    )


def test_the_refit_through_secagg_releases_only_the_decoded_sum_of_skellam_messages(tmp_path, monkeypatch):
    config = secagg_config(tmp_path / "out")
    settings, options = parse_run_config(config)
    grid = SecAggSiteGrid(config, tmp_path / "site-state")
    released = []

    def spy(*args):
        stats, facts = real(*args)
        released.append(stats.vector())
        return stats, facts

    real = server_app.secagg_statistics
    monkeypatch.setattr(server_app, "secagg_statistics", spy)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    outcome = run_experiment(settings, FlowerTransport(grid, options, context), Host(say=lambda _: None))
    assert outcome.summary is not None and len(released) == 1 and set(grid.messages) == {0, 1, 2}

    # every statistics reply the server received was masked: no array of any train reply carries the vectors
    for kind, reply in grid.received:
        if kind == "train":
            assert all(len(record) == 0 for record in reply.content.array_records.values())
    # the release is exactly the sites' integer messages summed, divided by s (no quantization error)
    m = refit_multiplier(settings, integer_noise=True)
    assert m > refit_multiplier(settings)  # calibrated for the Skellam ledger: a little more noise
    instruction = next(iter(grid.instructions.values()))
    scale = float(instruction.config_records["config"]["skellam-scale"])
    messages = [grid.messages[c] for c in range(3)]
    assert all(np.array_equal(v, np.round(v)) for v in messages)  # integers
    assert np.allclose(released[0], sum(messages) / scale, rtol=0, atol=1e-9)

    ledger = json.loads((outcome.out / "privacy.json").read_text())
    refit = ledger["head_refit"]
    assert refit["applied"] and refit["client"]["noise_multiplier"] == pytest.approx(m)
    assert ledger["noise_multiplier"] == pytest.approx(m)  # statistics only: the run's one release is the refit
    facts = ledger["secure_aggregation_protocol"]["head_refit"]
    assert facts["sum_error_bound"] == 0.0 and facts["noise_shares"] == 2
    # nothing published counts who answered (it would change when a site is added or removed)
    assert "survivors" not in facts and "survivors" not in refit.get("secure_aggregation", {})
    t = settings.privacy.collusion_threshold  # d = k - t: t colluding sites still face the full noise
    assert facts["share_divisor"] == 2 - t
    expected = skellam_ledger([facts["skellam"]], 1e-3, [(2, 2 - t)], t)["t_colluding_sites"]
    assert ledger["epsilon"] == pytest.approx(expected) and 0.97 * EPSILON < ledger["epsilon"] <= EPSILON


def test_a_sites_skellam_message_is_its_scaled_statistics_plus_the_planned_noise(tmp_path):
    """One site answering a statistics FitIns: message - s x (its exact statistics) has mean ~ 0 and the variance
    of its Skellam share (m sC)^2 / d plus rounding (<= 1/4); the plan follows from public terms."""
    config = secagg_config(tmp_path / "out", **{"refit-dims": 16})
    settings, options = parse_run_config(config)
    grid = SecAggSiteGrid(config, tmp_path / "site-state")
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    run_experiment(settings, FlowerTransport(grid, options, context), Host(say=lambda _: None))
    node = grid.nodes[101]
    site = site_for(config, node)
    from peft_deer.flower.refit import read_statistics_content

    state, projection, cfg = read_statistics_content(grid.instructions[1])
    from peft_deer.federated import load_adapter_state

    load_adapter_state(site.model, state)
    features = head_features(site.model, site.layout, site.train_data, 64)
    labels = dataset_labels(site.train_data)
    exact = hospital_contribution(projection.clipped(features), labels, 2, 1.0 / len(labels)).vector()
    m, d = float(cfg["noise-multiplier"]), int(cfg["num-shares"])
    request = dataclasses.make_dataclass("R", ["multiplier", "size", "share_divisor"])(m, len(exact), d)
    plan = refit_plan(request, 3)
    assert plan.scale == float(cfg["skellam-scale"]) and len(exact) == 2 * (1 + 16 + 256)
    noise = grid.messages[1] - plan.scale * exact  # exact's norm is below C - sqrt(len)/s: no clipping
    assert np.linalg.norm(exact) < 3**0.5 - np.sqrt(len(exact)) / plan.scale
    sd = np.sqrt(plan.share_variance)
    assert abs(float(noise.mean())) < 0.3 * sd
    assert 0.8 * plan.share_variance < float(noise.var()) < 1.25 * plan.share_variance + 0.25


def test_the_refit_with_gaussian_secagg_shares_is_refused_with_the_reason(tmp_path):
    with pytest.raises(ValueError, match="needs secagg-noise='skellam'"):
        parse_run_config(secagg_config(tmp_path / "out", **{"secagg-noise": "gaussian"}))


def test_a_site_refuses_a_skellam_statistics_instruction_its_run_config_does_not_ask_for(tmp_path):
    """A server asking a site without SecAgg+ for integer shares (or with another scale) is refused by the site."""
    config = secagg_config(tmp_path / "out")
    settings, options = parse_run_config(config)
    grid = SecAggSiteGrid(config, tmp_path / "site-state")
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    run_experiment(settings, FlowerTransport(grid, options, context), Host(say=lambda _: None))
    plain = {**config, "secure-aggregation": False, "output-dir": str(tmp_path / "other")}
    instruction = grid.instructions[0]
    with pytest.raises(ValueError, match="no SecAgg\\+ with secagg-noise='skellam'"):
        handle("train", copy.deepcopy(instruction), plain, grid.nodes[100])
    bad = copy.deepcopy(instruction)
    bad.config_records["config"]["skellam-scale"] = float(bad.config_records["config"]["skellam-scale"]) * 2
    site = site_for(config, grid.nodes[100])
    from peft_deer.flower.refit import site_statistics_vector

    with pytest.raises(ValueError, match="skellam scale .* is not this site's"):
        site_statistics_vector(site, bad)


# ------------------------------------------------------------------------------ what a server may not ask


def _run(tmp_path, clients: int = 3, **overrides):
    config = secagg_config(tmp_path / "out", **{"num-clients": clients, **overrides})
    settings, options = parse_run_config(config)
    grid = SecAggSiteGrid(config, tmp_path / "site-state", clients=clients)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    transport = FlowerTransport(grid, options, context)
    return config, grid, run_experiment(settings, transport, Host(say=lambda _: None))


def test_a_second_secagg_run_over_another_participant_set_is_refused_and_a_resend_is_identical(tmp_path, monkeypatch):
    """Attack F2: two SecAgg+ runs of one statistics instruction, the second without site 0, would give site 0's
    message as the difference of the sums. The sites fold the run's participants into the instruction's digest: the
    second run is another instruction, refused; the same set again gets the identical messages."""
    real = server_app.secagg_statistics
    seen = {}

    def malicious(secagg, grid, context, request):
        first = real(secagg, grid, context, request)
        seen["first"] = dict(grid.messages)
        real(secagg, grid, context, request)  # the same participants: identical messages, no new noise
        seen["again"] = dict(grid.messages)
        nodes = dict(secagg.deer.nodes)
        secagg.deer.nodes = {c: n for c, n in nodes.items() if c != 0}
        try:
            real(secagg, grid, context, request)
        finally:
            secagg.deer.nodes = nodes
        return first

    monkeypatch.setattr(server_app, "secagg_statistics", malicious)
    with pytest.raises(ValueError, match="already answered for another instruction"):
        _run(tmp_path, clients=4, **{"min-clients-per-phase": 3})
    assert all(np.array_equal(seen["first"][c], seen["again"][c]) for c in range(4))


def test_a_secagg_site_refuses_a_train_message_that_skipped_the_mod_even_with_a_forged_view(tmp_path):
    """Attack F1: without the mod's config record a message skips the mod, and its reply would leave unmasked."""
    from peft_deer.flower.secagg_guard import SECAGG_VIEW, guarded_secaggplus

    config, grid, _ = _run(tmp_path)
    fit_ins = grid.instructions[0]  # its plain form; re-wrap as the FitIns the server sent
    from peft_deer.flower.refit import read_statistics_content
    from peft_deer.flower.secagg_refit import statistics_fit_ins
    from peft_deer.run.refit import RefitRequest

    state, projection, cfg = read_statistics_content(fit_ins)
    request = RefitRequest(projection, 2, float(cfg["noise-multiplier"]), True, False, int(cfg["num-shares"]))
    ins = statistics_fit_ins(state, request, 0, str(cfg["run-key"]), float(cfg["skellam-scale"]))
    content = compat.fitins_to_recorddict(ins, keep_input=True)
    with pytest.raises(ValueError, match="did not come through SecAgg\\+"):
        handle("train", copy.deepcopy(content), config, grid.nodes[100])
    forged = copy.deepcopy(content)
    from flwr.app import ConfigRecord

    forged.config_records[SECAGG_VIEW] = ConfigRecord({"participants": "[100, 101, 102]", "threshold": 2})
    msg = Message(forged, dst_node_id=100, message_type=MessageType.TRAIN)
    ctxt = Context(run_id=1, node_id=100, node_config={}, state=RecordDict(), run_config={})

    def call_next(m: Message, _c: Context) -> Message:
        return Message(handle("train", m.content, config, grid.nodes[100]), reply_to=m)

    with pytest.raises(ValueError, match="did not come through SecAgg\\+"):
        guarded_secaggplus(msg, ctxt, call_next)  # the forged view is dropped before the site sees the message


@pytest.mark.parametrize(
    "active, dead, threshold, message",
    [
        ([1, 2, 3], [3], 2, "both active and dead"),
        ([1, 2, 2], [], 2, "repeats a node id"),
        ([1, 2], [9], 2, "outside this run's key sharing"),
        ([1, 2], [3], 1, "not above half"),  # attack B3: two halves told different lists could each unmask one site
    ],
)
def test_the_unmask_stage_may_not_list_a_site_as_both_active_and_dead(active, dead, threshold, message):
    """Attack F3: flwr's mod would return a site's mask seed share and its private key share for a node named in both
    lists, revealing that node's message; the guard refuses it (and repeats, strangers, and a threshold that two
    disjoint halves of the participants could each reach)."""
    from flwr.app import ConfigRecord
    from flwr.common.secure_aggregation.secaggplus_constants import Key

    from peft_deer.flower.secagg_guard import check_unmask

    configs = ConfigRecord({Key.ACTIVE_NODE_ID_LIST: active, Key.DEAD_NODE_ID_LIST: dead})
    with pytest.raises(ValueError, match=message):
        check_unmask(configs, [1, 2, 3], threshold)
    check_unmask(ConfigRecord({Key.ACTIVE_NODE_ID_LIST: [1, 2], Key.DEAD_NODE_ID_LIST: [3]}), [1, 2, 3], 2)  # honest


def test_a_replayed_secagg_run_with_a_site_dropped_cannot_unmask_the_others_again(tmp_path, monkeypatch):
    """Attack B2: the same instruction in a second SecAgg+ run over the same participants, the victim's masked
    message withheld: the others' messages are identical re-sends, so the two sums would differ by the victim's
    message. Each site unmasks a given masked message with one active set only: the second unmasking is refused."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS as CONFIGS

    real = server_app.secagg_statistics

    def malicious(secagg, grid, context, request):
        first = real(secagg, grid, context, request)
        send = grid.send_and_receive

        def lossy(messages, timeout=None):  # the victim (node 100) "drops out" at the masked-vector stage
            def withheld(m):
                record = m.content.config_records.get(CONFIGS)
                stage = None if record is None else record.get("stage")
                return m.metadata.dst_node_id == 100 and stage == "collect_masked_vectors"

            return send([m for m in messages if not withheld(m)], timeout)

        grid.send_and_receive = lossy
        try:
            real(secagg, grid, context, request)
        finally:
            grid.send_and_receive = send
        return first

    monkeypatch.setattr(server_app, "secagg_statistics", malicious)
    with pytest.raises(ValueError, match="already unmasked with other active nodes"):
        _run(tmp_path, clients=4, **{"min-clients-per-phase": 3})


def test_a_train_message_of_another_action_skips_the_mod_and_is_refused(tmp_path):
    """Attack B1: flwr's mod acts on message type "train" only and passes "train.<action>" straight on; such a
    message gets no view (even carrying the mod's config record after a real run), so a SecAgg+ site refuses it."""
    from flwr.app import ConfigRecord
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS as CONFIGS

    from peft_deer.flower.refit import read_statistics_content
    from peft_deer.flower.secagg_guard import guarded_secaggplus
    from peft_deer.flower.secagg_refit import statistics_fit_ins
    from peft_deer.run.refit import RefitRequest

    config, grid, _ = _run(tmp_path)
    state, projection, cfg = read_statistics_content(grid.instructions[0])
    request = RefitRequest(projection, 2, float(cfg["noise-multiplier"]), True, False, int(cfg["num-shares"]))
    ins = statistics_fit_ins(state, request, 0, str(cfg["run-key"]), float(cfg["skellam-scale"]))
    content = compat.fitins_to_recorddict(ins, keep_input=True)
    content.config_records[CONFIGS] = ConfigRecord({"stage": "collect_masked_vectors"})
    msg = Message(content, dst_node_id=100, message_type="train.default")

    def call_next(m: Message, _c: Context) -> Message:
        return Message(handle("train", m.content, config, grid.nodes[100]), reply_to=m)

    with pytest.raises(ValueError, match="did not come through SecAgg\\+"):
        guarded_secaggplus(msg, grid.contexts[100], call_next)  # the node's context still holds the last run's state


def test_a_site_refuses_more_noise_shares_than_its_own_run_config_gives(tmp_path):
    """Attack F4: d sizes each share's variance (m sC)^2 / d; a server asking for a larger d gets less noise. The
    site computes d = k - t from its own run config and refuses any other."""
    config, grid, _ = _run(tmp_path)
    plain = copy.deepcopy(grid.instructions[0])
    plain.config_records["config"]["num-shares"] = 10**6
    plain.config_records["config"]["secagg-view"] = json.dumps([[100, 101, 102], 2])
    from peft_deer.flower.refit import site_statistics_vector

    with pytest.raises(ValueError, match="num-shares 1000000 is not this run's d = k - t = 1"):
        site_statistics_vector(site_for(config, grid.nodes[100]), plain)


def test_a_resumed_run_keeps_the_refits_skellam_release_in_its_epsilon(tmp_path, monkeypatch):
    """Attack F5: a crash after the refit's checkpoint and before the ledger is written; the resumed run's epsilon
    still composes the refit's Skellam release (its facts are in the checkpointed ledger entry)."""
    import peft_deer.run.lifecycle as lifecycle

    _, _, clean = _run(tmp_path / "clean")
    expected = json.loads((clean.out / "privacy.json").read_text())

    def crash(*args, **kwargs):
        raise RuntimeError("power cut after the refit's checkpoint")

    real = lifecycle.finalize
    monkeypatch.setattr(lifecycle, "finalize", crash)
    with pytest.raises(RuntimeError, match="power cut"):
        _run(tmp_path / "crash")
    monkeypatch.setattr(lifecycle, "finalize", real)
    _, _, resumed = _run(tmp_path / "crash", resume=True)
    ledger = json.loads((resumed.out / "privacy.json").read_text())
    assert "head_refit" in ledger["secure_aggregation_protocol"]
    assert ledger["epsilon"] == pytest.approx(expected["epsilon"]) and ledger["epsilon"] > 7


def test_the_skellam_calibration_meets_the_target_for_every_length_and_federation():
    """Attack F6: the multiplier a statistics-only SecAgg+ run uses keeps the actual release's Skellam epsilon (the
    ledger's, against t colluders) within the target, for any vector length, k and t."""
    from peft_deer.federated.skellam import plan_skellam
    from peft_deer.run.privacy import skellam_multiplier

    for epsilon in (1.0, 4.0, 8.0, 16.0):
        for delta in (1e-3, 1e-4, 1e-6, 1e-7):  # attack B4: down to where the range failure matters
            m = skellam_multiplier(epsilon, delta)
            for size in (2 * (1 + 4 + 16), 10 * (1 + 64 + 64**2)):
                for k, t in ((2, 1), (12, 1), (48, 5)):
                    plan = plan_skellam(m, 3**0.5, size, k - t, 200)
                    eps = skellam_ledger([dataclasses.asdict(plan)], delta, [(k, k - t)], t)["t_colluding_sites"]
                    assert 0.99 * epsilon < eps <= epsilon, (epsilon, delta, size, k, t, eps)
    with pytest.raises(ValueError, match="too small for integer"):
        skellam_multiplier(8.0, 1e-9)


def test_a_statistics_only_run_whose_release_would_pass_the_target_fails_before_releasing(tmp_path, monkeypatch):
    """Attack F6: were the calibrated multiplier short of the target, the refit (the run's one release) would be
    skipped and the run would end with an untrained head. It fails with one line instead; nothing is sent."""
    import peft_deer.run.privacy as privacy

    monkeypatch.setattr(privacy, "SKELLAM_CALIBRATION_MARGIN", 1.02)  # both sides: a multiplier 2 % short
    with pytest.raises(ValueError, match="statistics only .* would reach client-level epsilon"):
        _run(tmp_path)


def test_a_threshold_below_d_plus_t_is_refused():
    """Fewer than d + t survivors (shares of variance 1/d each) leave t colluders facing less than sigma; a sum of one
    message is that message. Both the phase and the statistics path call this check."""
    from peft_deer.flower.secagg_guard import check_threshold

    with pytest.raises(ValueError, match=r"threshold 2 is below d \+ t = 3"):
        check_threshold(2, 2, 1)
    with pytest.raises(ValueError, match=r"threshold 1 is below d \+ t = 1"):
        check_threshold(1, 1, 0)
    check_threshold(3, 2, 1)
