"""`--head-refit stats` with `secure-aggregation=true`: the hospitals' statistics reach the server only as their sum.

The statistics instruction of `refit.py` (the final adapter, the PUBLIC projection, the mechanism's terms) travels
as a SecAgg+ `FitIns`, with the scale s of the Skellam plan both sides derive from public terms (`plan_skellam` of
the refit's noise multiplier m, the bound C = sqrt 3 of a hospital's vector (`CLIENT_SENSITIVITY`), the vector's
length and d = k - t). Each site answers with its integer message as the `FitRes` that `secaggplus_mod` masks: its
statistics clipped to C - sqrt(len)/s, times s, stochastically rounded, plus its Skellam share of variance
(m sC)^2 / d (`refit.site_statistics_vector`, which checks m, s and d against the site's own run config); under
client,record DP its record-level noise comes first and its accountant report rides in the FitRes metrics, as in
a phase. The server unmasks only the sum of >= k survivors' messages (the threshold of the SecAgg+ run), divides
it by s, and `run.refit` fits the head and accounts the release as the sum of k Gaussian shares. The run's facts
go into the refit's ledger entry (checkpointed), from which the ledger's Skellam epsilon composes the release with
the training's (`SecAggDeerStrategy.deployment_ledger`); a release whose Skellam epsilon would pass the target is
not made (`SecAggDeerStrategy.refit_epsilon_after`). Integer shares only: Gaussian shares quantized after the noise
have no proof, so secagg-noise='gaussian' with the refit is refused (`run_config.py`).
"""
from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common import Code, FitIns, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.serverapp import Grid

from ..federated import AdapterState, InvalidClientUpdate
from ..federated.head_refit import CLIENT_SENSITIVITY, ClassStats
from ..federated.quantization import check_quantization_range
from ..federated.skellam import SkellamPlan, plan_skellam, skellam_ledger
from ..run.refit import RefitRequest
from .protocol import CONFIG, GLOBAL, state_to_record
from .refit import PROJECTION, SKELLAM_SCALE, STEP, site_statistics_vector, statistics_message
from .secagg import FitOnlyStrategy
from .secagg_protocol import CLIENT_ID, RECORD_JSON, read_fit_res_client, read_fit_res_report, summed_update
from .strategy import TooFewClients

ARRAY_NAMES = "statistics-arrays"  # FitIns config: JSON list naming its arrays ("global/<key>", "projection/<key>")
VECTOR = "statistics"  # the one array of a statistics FitRes
logger = logging.getLogger("flwr")


# -- the messages ---------------------------------------------------------------------------------------


def statistics_fit_ins(
    state: AdapterState, request: RefitRequest, client_id: int, run_key: str, scale: float
) -> FitIns:
    """The SecAgg+ form of `refit.statistics_message`: its arrays as the FitIns parameters (named in the config),
    its config plus the Skellam scale s."""
    content = statistics_message(0, state, request, client_id, run_key).content
    config = dict(content.config_records[CONFIG])
    config[SKELLAM_SCALE] = float(scale)
    names, arrays = [], []
    for record in (GLOBAL, PROJECTION):
        tensors = content.array_records[record].to_torch_state_dict()
        for key in sorted(tensors):
            names.append(f"{record}/{key}")
            arrays.append(tensors[key].detach().cpu().numpy())
    config[ARRAY_NAMES] = json.dumps(names)
    return FitIns(ndarrays_to_parameters(arrays), config)


def is_statistics_fit_ins(content: RecordDict) -> bool:
    """Whether a SecAgg+ `FitIns` content is a statistics instruction (rather than a phase's)."""
    config = content.config_records.get("fitins.config")
    return config is not None and config.get("step") == STEP


def read_statistics_fit_ins(content: RecordDict) -> RecordDict:
    """The plain statistics instruction (`refit.read_statistics_content`'s form) in a statistics FitIns;
    ValueError (one line) if its arrays are not the named ones."""
    ins = compat.recorddict_to_fitins(content, keep_input=True)
    config = dict(ins.config)
    names = json.loads(str(config.pop(ARRAY_NAMES, "[]")))
    arrays = parameters_to_ndarrays(ins.parameters)
    if not isinstance(names, list) or len(names) != len(arrays):
        raise ValueError(f"the statistics FitIns carries {len(arrays)} arrays for {len(names)} names")
    records: dict[str, dict[str, torch.Tensor]] = {GLOBAL: {}, PROJECTION: {}}
    for name, array in zip(names, arrays, strict=True):
        record, _, key = str(name).partition("/")
        if record not in records or not key or key in records[record]:
            raise ValueError(f"the statistics FitIns names an unexpected array {name!r}")
        records[record][key] = torch.from_numpy(np.array(array))
    return RecordDict(
        {
            GLOBAL: state_to_record(records[GLOBAL]),
            PROJECTION: ArrayRecord(records[PROJECTION]),
            CONFIG: ConfigRecord(config),
        }
    )


def site_statistics_fit_res(site, content: RecordDict, view: tuple[list[int], int] | None) -> RecordDict:
    """A site's answer to a statistics FitIns: its integer message (one float64 array holding integers; the mod
    masks it), weight 1, its client id and, under record-level DP, its accountant report. `view` (the SecAgg+ run's
    participants and threshold, `secagg_guard`) joins the instruction's digest: another participant set is another
    instruction, refused once this one was answered."""
    if view is None:
        raise ValueError("a SecAgg+ statistics instruction that did not come through SecAgg+: refused")
    plain = read_statistics_fit_ins(content)
    plain.config_records[CONFIG]["secagg-view"] = json.dumps([sorted(view[0]), view[1]])
    vector, record = site_statistics_vector(site, plain)
    metrics: dict = {CLIENT_ID: site.client_id}
    if record is not None:
        metrics[RECORD_JSON] = json.dumps(dict(record))
    res = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters([np.asarray(vector, np.float64)]), 1, metrics)
    return compat.fitres_to_recorddict(res, keep_input=True)


# -- the server's side --------------------------------------------------------------------------------------


def refit_plan(request: RefitRequest, sites: int) -> SkellamPlan:
    """The Skellam plan of the refit's release: m, C = sqrt 3, the vector's length, d; the range sized for `sites`."""
    return plan_skellam(request.multiplier, CLIENT_SENSITIVITY, request.size, request.share_divisor, sites)


class SecAggStatistics(FitOnlyStrategy):
    """The legacy `Strategy` one SecAgg+ run of the head refit drives (`secagg` is the run's `SecAggDeerStrategy`:
    its proxies, nodes, drop log and ledger). After the run, `total` is the decoded sum and `survivors` who sent it."""

    def __init__(self, secagg, request: RefitRequest, plan: SkellamPlan, sent: list[int], k: int) -> None:
        self.secagg, self.request, self.plan, self.sent, self.k = secagg, request, plan, sent, k
        self.total: np.ndarray | None = None
        self.survivors: list[int] = []

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        deer = self.secagg.deer
        state, run_key, scale = deer.server.global_state, deer.run_key, self.plan.scale
        return [(self.secagg.proxies[c], statistics_fit_ins(state, self.request, c, run_key, scale)) for c in self.sent]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict]:
        """The survivors' decoded sum (float64, the vector's length): round(unmasked sum) / s."""
        deer = self.secagg.deer
        client_of_node = {proxy.node_id: c for c, proxy in self.secagg.proxies.items()}
        survivors = sorted(client_of_node[proxy.node_id] for proxy, _ in results)
        for c in self.sent:
            if c not in survivors:
                reason = "no masked statistics in the SecAgg+ run (failed or timed out)"
                deer.dropped.append({"round": "head-refit", "phase": None, "client": c, "reason": reason})
        if len(survivors) < self.k:
            raise TooFewClients(
                f"head refit: {len(survivors)} SecAgg+ survivors of {len(self.sent)} (< the noise floor k={self.k}): "
                "the sum would carry less noise than sigma; nothing released. Resume with resume=true."
            )
        claimed = sorted(read_fit_res_client(res) for _, res in results)
        if claimed != survivors:
            raise ValueError(f"head refit: SecAgg+ replies name clients {claimed}, sent by {survivors}")
        server = deer.server
        if server.record is not None:  # a missing report cannot be dropped from the sum: refuse the release
            server.record.expect(
                {c: read_fit_res_report(res, c) for c, res in ((client_of_node[p.node_id], r) for p, r in results)}
            )
            server.record.account_clients(survivors)
        shapes = {VECTOR: torch.Size([self.request.size])}
        try:
            summed = summed_update(results[0][1].parameters, len(survivors), shapes, integers=True)[VECTOR]
        except ValueError as err:
            raise InvalidClientUpdate(-1, f"head refit: {err}") from None
        self.total = summed.double().numpy() / self.plan.scale
        self.survivors = survivors
        return None, {}


def secagg_statistics(secagg, grid: Grid, context: Context, request: RefitRequest) -> tuple[ClassStats, dict]:
    """The head refit's release through one SecAgg+ run (module docstring): every reachable site, threshold k (the
    noise floor over every site), range rho = the plan's bound with 2 rho levels (exact on integers). Returns the
    decoded sum and the run's facts (the refit's ledger entry keeps them, checkpoint included; the Skellam ledger
    reads them there). The facts are public (`privacy.json`), so they hold no count of who answered: that changes
    when a site is added or removed (who dropped out goes to the server-private drop log, as for phases).
    TooFewClients below the floor."""
    deer = secagg.deer
    if request.share_divisor is None or request.shares is None:
        raise ValueError("the head refit through SecAgg+ needs distributed client-level noise")
    k = request.shares
    sent = sorted(deer.nodes)
    if len(sent) < max(k, 2):
        raise TooFewClients(
            f"head refit: {len(sent)} reachable sites, fewer than SecAgg+ and the noise floor k={max(k, 2)} need; "
            "nothing released. Resume with resume=true once the SuperNodes are back."
        )
    plan = refit_plan(request, deer.server.num_clients)
    check_quantization_range(2 * plan.bound, deer.server.num_clients)
    strategy = SecAggStatistics(secagg, request, plan, sent, k)
    threshold = secagg.run_workflow(
        strategy, grid, context, len(deer.phases) + 1, k, float(plan.bound), 2 * plan.bound, len(sent)
    )
    if strategy.total is None:
        raise TooFewClients(
            f"head refit: SecAgg+ stopped before unmasking: fewer than the threshold {threshold} (noise floor k={k}) "
            f"of {len(sent)} sites completed the "
            "protocol (failed or timed out); nothing released. Resume with resume=true once the SuperNodes are back."
        )
    server = deer.server
    alone = skellam_ledger([dataclasses.asdict(plan)], server.dp.delta, [(k, request.share_divisor)],
                           server.collusion_threshold)  # fmt: skip
    facts = {
        "protocol": "SecAgg+ (one run), integer (Skellam) shares",
        "epsilon_of_this_release_skellam": alone["t_colluding_sites"],
        "skellam": dataclasses.asdict(plan),
        "noise_shares": k,
        "share_divisor": request.share_divisor,
        "clipping_range": float(plan.bound),
        "quantization_range": 2 * plan.bound,
        "sum_error_bound": 0.0,
    }
    logger.info("head refit: released the SecAgg+ sum of %d sites' statistics", len(strategy.survivors))
    return ClassStats.from_vector(strategy.total, request.num_classes, request.projection.dims), facts


__all__ = [
    "SecAggStatistics",
    "is_statistics_fit_ins",
    "read_statistics_fit_ins",
    "refit_plan",
    "secagg_statistics",
    "site_statistics_fit_res",
    "statistics_fit_ins",
]
