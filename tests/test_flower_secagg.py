"""SecAgg+ for DEeR: the quantization range, the summed-release entry point, the protocol, a loopback run.

- Unit tests (no Flower processes): the range `clipping_range` holds privatized updates and their
  entries reach it; `privatized_sum` releases exactly what the per-update path releases, and refuses
  sums below the noise floor or that no clipped updates can give.
- Protocol tests: Flower's real `SecAggPlusWorkflow` (server) and `secaggplus_mod` (sites) exchange
  real messages through an in-process grid; the sites privatize precomputed updates. They show what
  the server holds (only the unmasked sum), the result against the non-secure path, and dropouts.
- One loopback deployment (SuperLink + 2 SuperNodes): a secure run equals the non-secure distributed
  run after a release, up to the stated quantization error, resumes, and states that error next to epsilon.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import tempfile

import pytest
import torch
from helpers import MEDMNIST_DIR, random_client_tasks, tiny_deer_model

pytest.importorskip("flwr", reason="Flower is not installed (pip install 'peft_deer[flower]')")

from flwr.app import Context, Error, Message, RecordDict  # noqa: E402
from flwr.common import parameters_to_ndarrays  # noqa: E402
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key  # noqa: E402

from peft_deer.federated import (  # noqa: E402
    ClientDP,
    ClientUpdate,
    DPRandomness,
    FederatedServer,
    LocalTraining,
    SequentialEngine,
    adapter_layout,
    build_whiteners,
    get_adapter_state,
    iter_phases,
    metric_norm,
    privatize_update,
)
from peft_deer.federated.accountant import ReleaseAccountant  # noqa: E402
from peft_deer.federated.aggregate import privatized_sum  # noqa: E402
from peft_deer.federated.quantization import (  # noqa: E402
    check_quantization_range,
    clipping_range,
    inverse_cholesky_norm,
    sum_error_bound,
    tail_quantile,
)
from peft_deer.flower import DeerStrategy, TooFewClients  # noqa: E402
from peft_deer.flower.mask_hardening import keyed_masks  # noqa: E402
from peft_deer.flower.protocol import NoiseTerms  # noqa: E402
from peft_deer.flower.run_config import DeploymentOptions, parse_run_config  # noqa: E402
from peft_deer.flower.secagg import SecAggDeerStrategy  # noqa: E402
from peft_deer.flower.secagg_protocol import fit_res_content, read_fit_ins  # noqa: E402
from peft_deer.methods import NoiseKind  # noqa: E402
from peft_deer_clientapp import secagg_when_asked  # noqa: E402

DP = ClientDP(noise_multiplier=0.8, clip_norm=0.05, delta=1e-3, noise_placement="distributed")


def _stream(seed: int):
    """A public (test-only) noise stream."""
    return DPRandomness.from_seed(seed).stream("t")


def phase_b_setup(num_clients: int = 3):
    """A tiny deer model, its layout and state, phase B (round 1) and each client's raw (unclipped) update."""
    model = tiny_deer_model("deer")
    layout = adapter_layout(model)
    state = get_adapter_state(model, layout)
    phase = next(iter_phases("deer", 1))
    tasks = random_client_tasks((8,) * num_clients, torch.Generator().manual_seed(0))
    updates = SequentialEngine(LocalTraining(batch_size=4, lr=0.5)).train_clients(model, layout, state, phase, tasks)
    return layout, state, phase, updates


def privatized(layout, state, phase, updates, k: int, dp: ClientDP = DP) -> list[ClientUpdate]:
    keys = layout.trained_keys(phase.factors)
    whiteners = build_whiteners(layout, state, keys, "regulated", dp.regulator_ridge)
    return [
        dataclasses.replace(
            u,
            delta=privatize_update(u.delta, whiteners, "regulated", dp, k, _stream(100 + i))[0],
        )
        for i, u in enumerate(updates)
    ]


# --------------------------------------------------------------------------------- the quantization range


def test_the_clipping_range_bounds_clipped_updates_and_their_noise_share():
    layout, state, phase, updates = phase_b_setup(1)
    keys = layout.trained_keys(phase.factors)
    whiteners = build_whiteners(layout, state, keys, "regulated", DP.regulator_ridge)
    shapes = {k: state[k].shape for k in keys}
    inv = max(inverse_cholesky_norm(whiteners[k]) for k in keys)
    assert inv > 1.0  # a real metric: the range is not C
    # An update aimed at the weakest direction of a metric reaches C ||L^-1|| in one entry: the bound is tight.
    key = next(k for k in keys if whiteners[k].chol is not None and inverse_cholesky_norm(whiteners[k]) == inv)
    chol = whiteners[key].chol.double()
    _, _, vh = torch.linalg.svd(chol)
    direction = vh[-1]  # right singular vector of L for its smallest singular value
    u = torch.zeros(state[key].shape, dtype=torch.float64)
    u[0] = direction  # whitened row of norm 1: delta row = u L^-1
    delta_row = torch.linalg.solve_triangular(chol, u, upper=False, left=False)
    assert float(delta_row.abs().max()) <= inv * (1 + 1e-9)
    assert float(delta_row.norm()) == pytest.approx(inv, rel=1e-6)
    rho = clipping_range(whiteners, shapes, "regulated", DP, num_shares=2)
    t = tail_quantile(sum(math.prod(s) for s in shapes.values()))
    assert rho == pytest.approx(DP.clip_norm * inv * (1 + t * DP.noise_multiplier / math.sqrt(2)))
    assert 6.0 < t < 8.0 and tail_quantile(10**6) > tail_quantile(10)  # more entries, a larger quantile
    # Privatized updates (clipped in the metric, noise share added) stay inside rho: 200 draws of each update.
    big = {k: v * 1e3 for k, v in updates[0].delta.items()}  # far above C: clipping is active
    largest = 0.0
    for seed in range(200):
        private, _ = privatize_update(big, whiteners, "regulated", DP, 2, DPRandomness.from_seed(seed).stream("t"))
        largest = max(largest, max(float(v.abs().max()) for v in private.values()))
    assert largest < rho
    # A plain (identity-metric) mechanism: rho = C (1 + t sigma / sqrt(k)).
    plain = build_whiteners(layout, state, keys, "plain", DP.regulator_ridge)
    assert clipping_range(plain, shapes, "plain", DP, 2) == pytest.approx(DP.clip_norm * (1 + t * 0.8 / math.sqrt(2)))


def test_the_error_bound_and_the_quantization_range_checks():
    assert sum_error_bound(rho=2.0, quantization_range=2**20, num_updates=3) == pytest.approx(3 * 4.0 / 2**20)
    check_quantization_range(2**24, 255)
    with pytest.raises(ValueError, match="would wrap; use quantization-range <= 16777215"):
        check_quantization_range(2**24, 256)
    with pytest.raises(ValueError, match=r"must be in \[2, 2\^31\)"):
        check_quantization_range(2**31, 1)


# --------------------------------------------------------------------------------- privatized_sum


def test_privatized_sum_releases_what_the_per_update_path_releases():
    layout, state, phase, updates = phase_b_setup(3)
    keys = layout.trained_keys(phase.factors)
    private = privatized(layout, state, phase, updates, k=2)
    per_update = FederatedServer(
        method="deer", layout=layout, global_state=dict(state), num_clients=3, clients_per_phase=3, dp=DP
    )
    expected = per_update.finish_phase(phase, private, privatized_shares=2)
    total = {k: sum(u.delta[k] for u in private) for k in keys}
    summed = FederatedServer(
        method="deer", layout=layout, global_state=dict(state), num_clients=3, clients_per_phase=3, dp=DP
    )
    release = summed.finish_summed_phase(phase, total, [2, 0, 1], 2, {"secure_aggregation": {"survivors": 3}})
    assert release.participants == [0, 1, 2] and release.effective_noise_multiplier == 0.8
    for k in keys:
        torch.testing.assert_close(release.delta[k], expected.delta[k], rtol=0, atol=1e-7)
        torch.testing.assert_close(summed.global_state[k], per_update.global_state[k], rtol=0, atol=1e-7)
    assert summed.accountant.history == per_update.accountant.history  # accounted alike: one release at sigma
    assert summed.releases[0]["secure_aggregation"] == {"survivors": 3}
    assert math.isnan(release.mean_update_norm)  # the norms before clipping stayed with the clients


def test_privatized_sum_refuses_below_the_noise_floor_or_an_impossible_sum():
    layout, state, phase, updates = phase_b_setup(3)
    keys = layout.trained_keys(phase.factors)
    private = privatized(layout, state, phase, updates, k=3)
    total = {k: sum(u.delta[k] for u in private) for k in keys}
    args = (layout, state, keys, "regulated", DP, 3.0)
    with pytest.raises(ValueError, match="carry less noise than sigma"):
        privatized_sum(total, [0, 1], *args, noise_shares=3)
    whiteners = build_whiteners(layout, state, keys, "regulated", DP.regulator_ridge)
    garbled = {k: v + 1e3 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1)) for k, v in total.items()}
    assert metric_norm(garbled, whiteners) > 100 * metric_norm(total, whiteners)
    with pytest.raises(ValueError, match="garbled unmasking or an unclipped update"):
        privatized_sum(garbled, [0, 1, 2], *args, noise_shares=3)
    with pytest.raises(ValueError, match="non-finite"):
        privatized_sum({k: v * math.nan for k, v in total.items()}, [0, 1, 2], *args, noise_shares=3)
    assert privatized_sum(total, [0, 1, 2], *args, noise_shares=3).participants == [0, 1, 2]
    server = FederatedServer(
        method="deer",
        layout=layout,
        global_state=dict(state),
        num_clients=3,
        clients_per_phase=3,
        dp=dataclasses.replace(DP, noise_placement="central"),
    )
    with pytest.raises(ValueError, match="distributed noise placement"):
        server.finish_summed_phase(phase, total, [0, 1, 2], 3)
    assert server.releases == [] and server.accountant.history == []


# --------------------------------------------------------------------------------- bad settings


@pytest.mark.parametrize(
    "override, message",
    [
        ({"dp": "record", "noise-multiplier": "", "record-epsilon": 8.0}, "needs dp with 'client'"),
        ({"dp": "none", "noise-multiplier": ""}, "needs dp with 'client'"),
        ({"noise-placement": "central"}, "central noise is added by the server to the clients' raw updates"),
        ({"min-clients-per-phase": 1}, "a sum of one update is that update"),
        ({"collusion-threshold": 2}, "collusion-threshold < min-clients-per-phase"),
        ({"quantization-range": 2**31}, "quantization-range"),
        ({"secure-aggregation": "maybe"}, "secure_aggregation must be true or false, got 'maybe'"),
    ],
)
def test_bad_secure_aggregation_settings_are_refused_with_the_reason(override, message):
    from test_flower import flower_config

    good = {
        **flower_config(),
        "dp": "client",
        "noise-multiplier": 1.0,
        "noise-placement": "distributed",
        "min-clients-per-phase": 2,
        "secure-aggregation": True,
    }
    _, options = parse_run_config(good)
    assert options.secure_aggregation and options.quantization_range == 2**24
    with pytest.raises(ValueError, match=message) as err:
        parse_run_config({**good, **override})
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------------- the masks


def test_masks_use_the_whole_key_where_flower_folds_it_to_32_bits():
    import importlib

    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen as flower_masks

    dims = [(3, 4), (5,)]
    key = bytes(range(32))
    # Another key with the same XOR fold of its 4-byte words: Flower's masks coincide, so 2^32 seeds cover them all.
    twin = bytes([key[0] ^ 0xFF, key[1], key[2], key[3], key[4] ^ 0xFF]) + key[5:]
    flower = zip(flower_masks(key, 2**32, dims), flower_masks(twin, 2**32, dims), strict=True)
    assert all((a == b).all() for a, b in flower)
    mine, again, other = keyed_masks(key, 2**32, dims), keyed_masks(key, 2**32, dims), keyed_masks(twin, 2**32, dims)
    assert [m.shape for m in mine] == dims and all(m.dtype.name == "int64" for m in mine)
    assert all((a == b).all() for a, b in zip(mine, again, strict=True))  # both sides derive the same masks
    assert not any((a == b).all() for a, b in zip(mine, other, strict=True))
    big = keyed_masks(key, 2**32, [(200_000,)])[0]
    assert 0 <= big.min() and big.max() < 2**32 and abs(big.mean() / 2**32 - 0.5) < 0.01
    for name in (
        "flwr.client.mod.secure_aggregation.secaggplus_mod",
        "flwr.server.workflow.secure_aggregation.secaggplus_workflow",
    ):
        assert importlib.import_module(name).pseudo_rand_gen is keyed_masks  # the protocol tests below use them


# --------------------------------------------------------------------------------- the protocol, in process


class LoopbackGrid:
    """Routes the server's messages to each site's real `secaggplus_mod` (via the ClientApp's
    `secagg_when_asked`) in this process. `sites[node]` answers the masked stage with its privatized update;
    `dead[node] = stage` makes that node stop answering from that SecAgg+ stage on (a dropout)."""

    def __init__(self, sites: dict[int, ClientUpdate], dead: dict[int, str] | None = None) -> None:
        self.sites = sites
        self.dead = dict(dead or {})
        state_dir = tempfile.mkdtemp(prefix="secagg-site-")  # the guard's unmask record (`secagg_guard`)
        self.contexts = {
            n: Context(run_id=1, node_id=n, node_config={"state-dir": state_dir}, state=RecordDict(), run_config={})
            for n in sites
        }
        self.received: list[Message] = []  # every reply the server got
        self.instructions: dict[int, object] = {}
        self._gone: set[int] = set()

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for sent in messages:
            msg = copy.deepcopy(sent)  # what travels is a copy: the mod edits its message in place
            node = msg.metadata.dst_node_id
            stage = msg.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]
            if self.dead.get(node) == stage:
                self._gone.add(node)
            if node in self._gone:
                continue  # no answer: the workflow waits out its timeout and counts the node as dropped

            def train(m: Message, ctxt: Context, node=node) -> Message:
                work = read_fit_ins(m.content)
                self.instructions[node] = work
                update = dataclasses.replace(self.sites[node], client_id=work.client_id)
                return Message(fit_res_content(update), reply_to=m)

            replies.append(secagg_when_asked(msg, self.contexts[node], train))
        self.received += replies
        return replies


def secagg_setup(
    num_clients: int, k: int, dead: dict[int, str] | None = None, quantization_range: int = 2**24, t: int = 0
):
    layout, state, phase, updates = phase_b_setup(num_clients)
    private = privatized(layout, state, phase, updates, k - t)  # each site's share: sigma^2 C^2 / (k - t)
    server = FederatedServer(
        method="deer",
        layout=layout,
        global_state=dict(state),
        num_clients=num_clients,
        clients_per_phase=num_clients,
        dp=DP,
        collusion_threshold=t,
    )
    nodes = {c: 500 + c for c in range(num_clients)}
    deer = DeerStrategy(
        server,
        nodes,
        1,
        DeploymentOptions(k, reply_timeout_s=5, quantization_range=quantization_range, secagg_noise="gaussian"),
    )  # these protocol tests send precomputed float (Gaussian-share) updates
    grid = LoopbackGrid(
        {nodes[c]: private[c] for c in range(num_clients)}, {nodes[c]: s for c, s in (dead or {}).items()}
    )
    secagg = SecAggDeerStrategy(deer, grid, run_id=1)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    release = secagg.release_phase(grid, context)
    return layout, state, phase, private, server, secagg, grid, release


def test_the_server_holds_only_the_unmasked_sum_which_matches_the_non_secure_release(flower_task_identity):
    layout, state, phase, private, server, secagg, grid, release = secagg_setup(3, k=2)
    _, out = release(phase, server.participants(phase))
    assert {w.num_shares for w in grid.instructions.values()} == {2}  # each site adds 1/k of the variance
    # The FitIns carries the server's noise terms, as a plain train instruction does: no site recalibrates.
    assert {w.noise for w in grid.instructions.values()} == {NoiseTerms.of(DP, NoiseKind.REGULATED)}
    assert all(torch.equal(w.global_state[k], state[k]) for w in grid.instructions.values() for k in state)
    # What reached the server: no reply carries an update's arrays; aggregate_fit got one parameter set, the sum.
    assert len(grid.received) == 4 * 3  # 4 SecAgg+ stages x 3 sites
    for reply in grid.received:
        assert all(len(record) == 0 for record in reply.content.array_records.values())
    survivors, parameters = secagg.last_summed
    assert survivors == [0, 1, 2] and len(parameters) == 3 and all(p is parameters[0] for p in parameters)
    mean = dict(zip(sorted(layout.trained_keys(phase.factors)), parameters_to_ndarrays(parameters[0]), strict=True))
    rho = server.releases[0]["secure_aggregation"]["clipping_range"]
    bound = sum_error_bound(rho, 2**24, 3)
    assert server.releases[0]["secure_aggregation"]["sum_error_bound"] == pytest.approx(bound)
    for key, value in mean.items():
        exact = sum(u.delta[key] for u in private).double()
        error = float((torch.from_numpy(value) * 3 - exact).abs().max())
        assert error <= bound
        for u in private:  # the sum is not any one update
            assert float((torch.from_numpy(value) * 3 - u.delta[key].double()).abs().max()) > 100 * bound
    # The release equals the non-secure distributed path's (same privatized updates) up to that error.
    reference = FederatedServer(
        method="deer", layout=layout, global_state=dict(state), num_clients=3, clients_per_phase=3, dp=DP
    )
    expected = reference.finish_phase(phase, private, privatized_shares=2)
    for key in expected.delta:
        diff = float((out.delta[key] - expected.delta[key]).abs().max())
        assert diff <= bound / 3 + 1e-7, key
    assert server.accountant.history == reference.accountant.history
    ledger = secagg.deployment_ledger()
    assert ledger["secure_aggregation"] is True and "only the sum" in ledger["note_distributed"]
    details = ledger["secure_aggregation_protocol"]
    assert details["sum_error_bound_per_entry_max"] == pytest.approx(bound)  # num-clients = 3 sites survived
    assert details["adapter_error_bound_per_entry_max"] == pytest.approx(bound / 3)


def test_a_coarse_quantization_shows_in_the_error_and_stays_within_its_bound(flower_task_identity):
    """With Q = 2^10 the quantization error is visible, and still within n * 2 rho / Q: the bound is not vacuous."""
    layout, state, phase, private, server, secagg, grid, release = secagg_setup(3, k=3, quantization_range=2**10)
    _, out = release(phase, server.participants(phase))
    reference = FederatedServer(
        method="deer", layout=layout, global_state=dict(state), num_clients=3, clients_per_phase=3, dp=DP
    )
    expected = reference.finish_phase(phase, private, privatized_shares=3)
    bound = server.releases[0]["secure_aggregation"]["sum_error_bound"] / 3
    worst = max(float((out.delta[k] - expected.delta[k]).abs().max()) for k in expected.delta)
    assert bound / 50 < worst <= bound + 1e-7


def test_a_site_dropping_out_mid_protocol_leaves_a_correctly_accounted_release(flower_task_identity):
    """Site 1 stops answering after sharing its keys: the sum of the other two (k = 2) is released and
    accounted at sigma; the dropout is logged server-side."""
    layout, state, phase, private, server, secagg, grid, release = secagg_setup(
        3, k=2, dead={1: "collect_masked_vectors"}
    )
    _, out = release(phase, server.participants(phase))
    survivors, _ = secagg.last_summed
    assert survivors == [0, 2] and out.participants == [0, 2]
    reference = FederatedServer(
        method="deer", layout=layout, global_state=dict(state), num_clients=3, clients_per_phase=3, dp=DP
    )
    expected = reference.finish_phase(phase, [private[0], private[2]], privatized_shares=2)
    bound = server.releases[0]["secure_aggregation"]["sum_error_bound"]
    for key in expected.delta:
        assert float((out.delta[key] - expected.delta[key]).abs().max()) <= bound / 3 + 1e-7
    assert server.accountant.history == reference.accountant.history == [(0.8, 1.0, 1)]
    assert [d["client"] for d in secagg.deer.dropped] == [1] and "SecAgg+" in secagg.deer.dropped[0]["reason"]


@pytest.mark.parametrize("stage", ["share_keys", "collect_masked_vectors"])
def test_fewer_survivors_than_k_release_nothing_and_say_why(flower_task_identity, stage):
    layout, state, phase, private, server, secagg, grid, release = secagg_setup(3, k=3, dead={2: stage})
    expected = r"fewer than the threshold 3 \(noise floor k=3\) of 3 sites completed the protocol.*less noise than"
    with pytest.raises(TooFewClients, match=expected):
        release(phase, server.participants(phase))
    assert server.releases == [] and server.accountant.history == []  # nothing applied, nothing accounted
    assert all(torch.equal(server.global_state[k], state[k]) for k in state)


def test_a_sampled_site_without_a_supernode_below_the_floor_releases_nothing(flower_task_identity):
    layout, state, phase, updates = phase_b_setup(2)
    server = FederatedServer(
        method="deer", layout=layout, global_state=dict(state), num_clients=2, clients_per_phase=2, dp=DP
    )
    deer = DeerStrategy(server, {0: 500}, 1, DeploymentOptions(2))  # client 1 has no SuperNode
    secagg = SecAggDeerStrategy(deer, LoopbackGrid({}), run_id=1)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(TooFewClients, match="1 reachable sites of 2 sampled"):
        secagg.release_phase(LoopbackGrid({}), context)(phase, [0, 1])
    assert server.releases == []


def test_a_sites_record_level_report_travels_in_its_fit_res_and_reaches_the_ledger(flower_task_identity):
    """dp='client,record' with SecAgg+: the accountant report rides in the FitRes metrics (JSON), the server's
    ledger takes it for every survivor of the sum; a reply without one is refused (it cannot leave the sum)."""
    from flwr.compat.common import recorddict_compat as compat
    from test_flower_sites import record_level

    from peft_deer.flower.protocol import RecordReport
    from peft_deer.flower.secagg_protocol import read_fit_res_report
    from peft_deer.flower.site_accounting import SiteRecordLevel

    report = RecordReport(1.1, 0.25, 8, ((1.1, 0.25, 8), (1.1, 0.25, 8)), 2.5)
    update = ClientUpdate(1, {"w": torch.zeros(2)}, 40)
    res = compat.recorddict_to_fitres(fit_res_content(update, report), keep_input=True)
    assert res.num_examples == 1 and set(res.metrics) == {"client-id", "record-dp-json"}  # no loss, no counts
    assert read_fit_res_report(res, 1) == report
    ledger = SiteRecordLevel(record_level())
    ledger.expect({1: report})
    ledger.account_clients([1])
    assert ledger.accountants.history[1] == [(1.1, 0.25, 8), (1.1, 0.25, 8)] and ledger.sigmas[1] == 1.1
    bare = compat.recorddict_to_fitres(fit_res_content(update), keep_input=True)
    with pytest.raises(Exception, match="carries no accountant"):
        read_fit_res_report(bare, 1)


def test_a_non_secure_train_message_passes_the_secagg_mod_untouched(flower_task_identity):
    from flwr.app import ConfigRecord, MessageType

    msg = Message(RecordDict({"config": ConfigRecord({"round": 0})}), dst_node_id=7, message_type=MessageType.TRAIN)
    seen = []
    ctx = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    reply = secagg_when_asked(msg, ctx, lambda m, c: seen.append(m) or Message(Error(code=0, reason="x"), reply_to=m))
    assert seen == [msg] and reply.has_error() and len(ctx.state.config_records) == 0


# --------------------------------------------------------------------------------- a real deployment


@pytest.mark.e2e
def test_loopback_secure_run_equals_the_distributed_run_up_to_the_stated_error(tmp_path, one_thread):
    """SuperLink + 2 SuperNodes: one round of deer with client-level DP (distributed noise, reproducible) through
    SecAgg+ and without it. Phase A leaves B alone, so each run's final B factors are those of release 1: they agree
    within that release's stated error, and are not bit-identical (quantized). privacy.json states SecAgg+ and the
    error next to an unchanged epsilon."""
    if not (MEDMNIST_DIR / "pneumoniamnist.npz").is_file():
        pytest.skip(f"real MedMNIST files not found at {MEDMNIST_DIR}")
    from safetensors.torch import load_file

    from peft_deer.flower.local import LocalDeployment, server_app_error

    settings = {
        "model": "tiny-vit",
        "image-size": 28,
        "train-subset": 120,
        "rounds": 1,
        "dp": "client",
        "noise-multiplier": 0.8,
        "clip-norm": 0.5,
        "noise-placement": "distributed",
        "delta": 1e-3,
        "min-clients-per-phase": 2,
    }
    base = " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in settings.items())
    base += f' data-dir="{MEDMNIST_DIR}" reproducible-noise=true'
    plain_out, secure_out = tmp_path / "plain", tmp_path / "secure"
    node_config = {"data-dir": f'"{MEDMNIST_DIR}"', "state-dir": f'"{tmp_path / "state"}"'}
    with LocalDeployment(2, tmp_path / "logs", node_config, {"OMP_NUM_THREADS": "1"}) as d:
        runs = [
            d.run(f'{base} output-dir="{plain_out}"', timeout_s=600),
            d.run(f'{base} output-dir="{secure_out}" secure-aggregation=true secagg-noise="gaussian"', timeout_s=600),
        ]
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((tmp_path / "logs").glob("*.log")))
    for r in runs:
        assert server_app_error(r.stdout + r.stderr) is None, logs
    assert (plain_out / "summary.json").is_file() and (secure_out / "summary.json").is_file(), logs

    ledger = json.loads((secure_out / "privacy.json").read_text())
    details = ledger["secure_aggregation_protocol"]
    assert ledger["secure_aggregation"] is True and ledger["releases"] == 2 and details["quantization_range"] == 2**24
    bound = details["sum_error_bound_per_entry"][0] / 2  # release 1 (phase B), over the denominator of 2 sites
    plain = load_file(plain_out / "adapter" / "adapter_model.safetensors")
    secure = load_file(secure_out / "adapter" / "adapter_model.safetensors")
    b_keys = [k for k in plain if "lora_B" in k]
    assert b_keys and plain.keys() == secure.keys()
    diffs = {k: float((secure[k].float() - plain[k].float()).abs().max()) for k in b_keys}
    assert 0 < max(diffs.values()) <= bound + 1e-6, (diffs, bound)  # quantized, within the stated error
    plain_ledger = json.loads((plain_out / "privacy.json").read_text())
    assert plain_ledger["secure_aggregation"] is False
    accountant = ReleaseAccountant()
    for _ in range(2):
        accountant.step(0.8, 1.0)
    assert ledger["epsilon"] == pytest.approx(accountant.epsilon(1e-3, "prv")) == plain_ledger["epsilon"]  # default
    assert ledger["epsilon_rdp"] == pytest.approx(accountant.epsilon(1e-3, "rdp"))
    assert ledger["epsilon_rdp"] > ledger["epsilon"]
    assert "testing only" in ledger["client_noise"]
    assert details["analysis_gap"].startswith("NO proof: quantization after noise")  # the opt-in says so


@pytest.mark.e2e
def test_loopback_skellam_run_releases_the_decoded_integer_sum_and_states_its_skellam_epsilon(tmp_path, one_thread):
    """SuperLink + 2 SuperNodes, one lora release through SecAgg+ with the default Skellam shares: the final B
    factors (zero before it) times the denominator 2 and the scale s are integers (the released sum is the decoded
    exact integer sum, no quantization error), and privacy.json's epsilon is the Skellam epsilon of the plan that
    follows from public terms."""
    if not (MEDMNIST_DIR / "pneumoniamnist.npz").is_file():
        pytest.skip(f"real MedMNIST files not found at {MEDMNIST_DIR}")
    from safetensors.torch import load_file

    from peft_deer.federated.skellam import plan_skellam, skellam_ledger
    from peft_deer.flower.local import LocalDeployment, server_app_error

    out = tmp_path / "skellam"
    run = 'model="tiny-vit" image-size=28 train-subset=60 rounds=1 method="lora" dp="client" noise-multiplier=0.8 '
    run += 'clip-norm=0.5 noise-placement="distributed" delta=1e-3 min-clients-per-phase=2 collusion-threshold=1 '
    run += f'secure-aggregation=true data-dir="{MEDMNIST_DIR}" output-dir="{out}"'
    node_config = {"data-dir": f'"{MEDMNIST_DIR}"', "state-dir": f'"{tmp_path / "state"}"'}
    with LocalDeployment(2, tmp_path / "logs", node_config, {"OMP_NUM_THREADS": "1"}) as d:
        result = d.run(run, timeout_s=600)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((tmp_path / "logs").glob("*.log")))
    assert server_app_error(result.stdout + result.stderr) is None and (out / "summary.json").is_file(), logs
    ledger = json.loads((out / "privacy.json").read_text())
    (plan,) = ledger["secure_aggregation_protocol"]["skellam_plans"]
    assert plan == dataclasses.asdict(plan_skellam(0.8, 0.5, plan["dim"], 1, 2))  # d = k - t = 1, 2 sites
    expected = skellam_ledger([plan], 1e-3, [(2, 1)], 1)
    assert ledger["epsilon"] == pytest.approx(expected["t_colluding_sites"])
    assert ledger["epsilon"] > ledger["epsilon_gaussian_limit"] and "analysis_gap" not in ledger
    assert ledger["epsilon_skellam"]["outsiders"] == pytest.approx(expected["outsiders"])
    assert ledger["epsilon_skellam"]["outsiders"] < ledger["epsilon"]
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    units = torch.cat([v.double().flatten() * 2 * plan["scale"] for k, v in adapter.items() if "lora_B" in k])
    assert units.abs().max() > 100 and (units - units.round()).abs().max() < 0.05  # integers: the exact sum


def test_shares_sized_for_a_colluding_site_travel_to_the_sites_and_the_release_is_accounted_against_both(
    flower_task_identity,
):
    """collusion-threshold t = 1, k = 2: each site is told d = k - t = 1 (the full sigma^2 C^2), the range rho is
    sized for that share, and the ledger states sigma against one site and sigma sqrt(2) against outsiders."""
    layout, state, phase, private, server, secagg, grid, release = secagg_setup(3, k=2, t=1)
    _, out = release(phase, server.participants(phase))
    assert {w.num_shares for w in grid.instructions.values()} == {1}
    keys = server.trained_keys(phase)
    whiteners = build_whiteners(layout, state, keys, "regulated", DP.regulator_ridge)
    shapes = {key: state[key].shape for key in keys}
    rho = server.releases[0]["secure_aggregation"]["clipping_range"]
    assert rho == pytest.approx(clipping_range(whiteners, shapes, "regulated", DP, num_shares=1))
    assert server.releases[0]["noise_shares"] == 2 and server.releases[0]["share_divisor"] == 1
    against = server.adversary_epsilons()
    single = ReleaseAccountant()
    single.step(DP.noise_multiplier, 1.0)
    outsiders = ReleaseAccountant()
    outsiders.step(DP.noise_multiplier * math.sqrt(2), 1.0)
    assert against["t_colluding_sites"]["rdp"] == pytest.approx(single.epsilon(1e-3, "rdp"))
    assert against["outsiders"]["rdp"] == pytest.approx(outsiders.epsilon(1e-3, "rdp"))
    assert "1/1 of the noise variance" in secagg.deployment_ledger()["note_distributed"]


def test_skellam_shares_pass_secagg_exactly_and_the_ledger_states_their_skellam_epsilon(flower_task_identity):
    """secagg-noise='skellam': sites send integer messages (`skellam_message`), the real secaggplus_mod quantizes
    and masks them with rho and Q = 2 rho, and the server's release is the decoded exact integer sum."""
    from peft_deer.federated.skellam import decode_skellam_sum, plan_skellam, skellam_ledger, skellam_message

    layout, state, phase, updates = phase_b_setup(3)
    keys = layout.trained_keys(phase.factors)
    plan = plan_skellam(DP.noise_multiplier, DP.clip_norm, sum(state[k].numel() for k in keys), 2, 3)
    whiteners = build_whiteners(layout, state, keys, "regulated", DP.regulator_ridge)
    messages = [
        dataclasses.replace(u, delta=skellam_message(u.delta, whiteners, DP.clip_norm, plan, _stream(300 + i)))
        for i, u in enumerate(updates)
    ]
    server = FederatedServer(
        method="deer",
        layout=layout,
        global_state=dict(state),
        num_clients=3,
        clients_per_phase=3,
        dp=DP,
        collusion_threshold=0,
    )  # d = k = 2
    nodes = {c: 500 + c for c in range(3)}
    deer = DeerStrategy(server, nodes, 1, DeploymentOptions(2, reply_timeout_s=5, secagg_noise="skellam"))
    grid = LoopbackGrid({nodes[c]: messages[c] for c in range(3)})
    secagg = SecAggDeerStrategy(deer, grid, run_id=1)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    _, out = secagg.release_phase(grid, context)(phase, server.participants(phase))
    assert {w.skellam_scale for w in grid.instructions.values()} == {plan.scale}
    facts = server.releases[0]["secure_aggregation"]
    assert facts["skellam"] == dataclasses.asdict(plan) and facts["quantization_range"] == 2 * plan.bound
    exact = decode_skellam_sum({k: sum(m.delta[k] for m in messages) for k in keys}, whiteners, plan.scale)
    for key in keys:
        assert torch.allclose(out.delta[key], exact[key] / 3, rtol=1e-6, atol=1e-9)  # no quantization error
    ledger = secagg.deployment_ledger()
    expected = skellam_ledger([dataclasses.asdict(plan)], 1e-3, [(2, 2)], 0)
    assert ledger["epsilon"] == pytest.approx(expected["t_colluding_sites"]) and ledger["epsilon"] > 0
    assert ledger["epsilon"] >= ledger["epsilon_gaussian_limit"] * 0.99
    assert "analysis_gap" not in ledger["secure_aggregation_protocol"]
    with pytest.raises(ValueError, match="not deer-reference"):
        from test_flower import flower_config

        parse_run_config(
            {
                **flower_config(),
                "dp": "client",
                "noise-multiplier": 1.0,
                "noise-placement": "distributed",
                "min-clients-per-phase": 2,
                "secure-aggregation": True,
                "secagg-noise": "skellam",
                "method": "deer-reference",
            }
        )


def test_a_site_sends_its_skellam_message_from_public_terms_and_refuses_another_scale(tmp_path):
    """The site's Skellam branch (`Site.train_update` with a skellam scale): the plan from sigma, C, the update's
    size and d, the message `skellam_message` of its own update with its noise stream (reproducible here), integers;
    a scale that is not the plan's is refused."""
    if not (MEDMNIST_DIR / "pneumoniamnist.npz").is_file():
        pytest.skip(f"real MedMNIST files not found at {MEDMNIST_DIR}")
    from test_flower_sites import tiny_run_config

    from peft_deer.federated import ClientTask, derive_seed, train_client
    from peft_deer.federated.skellam import plan_skellam, skellam_message
    from peft_deer.flower.protocol import TrainInstruction
    from peft_deer.flower.site import Site
    from peft_deer.run.privacy import local_training

    config = tiny_run_config(method="lora", dp="client", **{"noise-multiplier": 0.8, "clip-norm": 0.5})
    config.update({"noise-placement": "distributed", "reproducible-noise": True, "train-subset": 40, "rounds": 1})
    config.update({"collusion-threshold": 0, "min-clients-per-phase": 2})  # d = k - t = 2 shares
    site = Site.build(config, {"partition-id": 1, "state-dir": str(tmp_path)})
    state = get_adapter_state(site.model, site.layout)
    phase = next(iter_phases("lora", 1))
    dp = dataclasses.replace(DP, noise_multiplier=0.8, clip_norm=0.5)
    dim = sum(state[k].numel() for k in site.layout.trained_keys(phase.factors))
    plan = plan_skellam(0.8, 0.5, dim, 2, 1)
    work = TrainInstruction(state, 0, 0, 1, 2, "k", NoiseTerms.of(dp, NoiseKind.PLAIN), plan.scale)
    update, _ = site.train_update(work)
    seed = site.settings.federation.seed
    task = ClientTask(1, site.train_data, derive_seed(seed, *phase.step, 1, "train"))
    raw = train_client(site.model, site.layout, state, phase, task, local_training(site.settings))
    whiteners = build_whiteners(site.layout, state, list(raw.delta), NoiseKind.PLAIN, dp.regulator_ridge)
    stream = DPRandomness.from_seed(seed).stream(*phase.step, 1, "noise")
    expected = skellam_message(raw.delta, whiteners, 0.5, plan, stream)
    assert update.delta.keys() == expected.keys()
    for key, value in update.delta.items():
        assert torch.equal(value, expected[key]) and torch.equal(value, value.round())
    with pytest.raises(ValueError, match="is not this site's"):
        site.train_update(dataclasses.replace(work, skellam_scale=plan.scale * 2))


def test_skellam_is_the_default_gaussian_shares_warn_and_a_resume_with_another_secagg_noise_is_refused():
    from types import SimpleNamespace

    from test_flower import flower_config

    from peft_deer.flower.server_app import FlowerTransport
    from peft_deer.run.checkpoint import SettingsMismatch, check_resume
    from peft_deer.run.experiment import Experiment

    good = {**flower_config(), "dp": "client", "noise-multiplier": 1.0, "noise-placement": "distributed"}
    good.update({"min-clients-per-phase": 2, "secure-aggregation": True})
    settings, options = parse_run_config(good)
    assert options.secagg_noise == "skellam"
    with pytest.warns(UserWarning, match="NO proof: quantization after noise"):
        _, gaussian = parse_run_config({**good, "secagg-noise": "gaussian"})
    fingerprints = []
    for opts in (options, gaussian):
        exp = SimpleNamespace(settings=settings, server=SimpleNamespace(record=None), deployment_fingerprint={})
        FlowerTransport(None, opts, context=object()).before_start(exp, None)
        fingerprints.append(Experiment.fingerprint(exp))
    assert fingerprints[0]["secagg-noise"] == "skellam" and fingerprints[1]["secagg-noise"] == "gaussian"
    check_resume(None, {"fingerprint": fingerprints[0]}, fingerprints[0], {})
    with pytest.raises(SettingsMismatch, match="secagg-noise: 'skellam' -> 'gaussian'"):
        check_resume(None, {"fingerprint": fingerprints[0]}, fingerprints[1], {})


def test_the_budget_stop_of_a_skellam_run_uses_the_skellam_epsilon(flower_task_identity):
    """With Skellam shares the budget stop asks the Skellam accountant (what the ledger states), not the Gaussian
    limit: a target between the two stops a release the Gaussian accountant would have allowed."""
    from peft_deer.federated import PrivacyBudgetExceeded
    from peft_deer.federated.skellam import plan_skellam, skellam_ledger

    layout, state, phase, _ = phase_b_setup(2)
    dim = sum(state[k].numel() for k in layout.trained_keys(phase.factors))
    plan = dataclasses.asdict(plan_skellam(DP.noise_multiplier, DP.clip_norm, dim, 1, 2))  # k = 2, t = 1: d = 1
    skellam = skellam_ledger([plan], DP.delta, [(2, 1)], 1)["t_colluding_sites"]
    gaussian = ReleaseAccountant()
    gaussian.step(DP.noise_multiplier, 1.0)
    target = (skellam + gaussian.epsilon(DP.delta, "prv")) / 2
    assert gaussian.epsilon(DP.delta, "prv") < target < skellam
    server = FederatedServer(
        method="deer",
        layout=layout,
        global_state=dict(state),
        num_clients=2,
        clients_per_phase=2,
        dp=dataclasses.replace(DP, target_epsilon=target),
    )
    deer = DeerStrategy(server, {0: 500, 1: 501}, 1, DeploymentOptions(2))
    SecAggDeerStrategy(deer, LoopbackGrid({}), run_id=1)
    assert server.budget_probe(phase) == (pytest.approx(skellam), "Skellam")
    with pytest.raises(PrivacyBudgetExceeded, match=r"\(Skellam\)"):
        server.check_budget(phase)
    server.budget_probe = None  # the Gaussian accountant alone would have released it
    server.check_budget(phase)
