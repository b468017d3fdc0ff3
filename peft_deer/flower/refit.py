"""`--head-refit stats` under Flower: the class statistics travel as a site reply, noised at the site.

After the last round (or, with rounds 0, instead of training) the server sends every site one statistics
instruction (a train message whose config says `step = statistics`): the final global adapter, the PUBLIC
projection (P, m, s: PCA of the server's validation features), the number of classes, the refit's noise
multiplier m and, with distributed client-level noise, the share divisor d (`FederatedServer.share_divisor` of the
noise floor k, exactly as the training updates' shares are sized). The site checks these against its own run
settings, computes its head-input features under that adapter, and answers with `run.refit.site_release`, the
simulation's own code: record level, its full N(0, (m sqrt 3)^2) and one Gaussian step in its record-level
accountant (reported as with every update); distributed client level, its share of variance (m sqrt 3)^2 / d.
Nothing un-noised leaves a site at a DP level (central client-level placement: the server adds the noise, as
it does for updates). The draws come from the site's 256-bit key and the instruction's digest (`site_noise`): an
identical re-send gets the identical reply (and no second accountant step), another instruction is refused.
The server sums the replies and `run.refit.refit_head` fits, merges and accounts as in the simulation.
With `secure-aggregation=true` the same instruction travels as a SecAgg+ `FitIns` and the server sees only the sum
of the sites' integer messages (`secagg_refit.py`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from ..federated import AdapterState, InvalidClientUpdate, load_adapter_state
from ..federated.collusion import share_divisor
from ..federated.head_refit import CLIENT_SENSITIVITY, ClassStats, Projection
from ..federated.randomness import DPRandomness
from ..federated.skellam import plan_skellam, skellam_encode
from ..run.privacy import refit_multiplier
from ..run.refit import RefitRequest, dataset_labels, head_features, head_linear, site_release
from .protocol import CONFIG, GLOBAL, RECORD, read_record_report, record_to_state, state_to_record
from .secagg_guard import check_threshold
from .site_accounting import SiteAccountant
from .site_noise import answered_randomness

STEP = "statistics"  # the train config's `step` of a statistics instruction
PROJECTION = "projection"  # ArrayRecord: matrix (k, D), center (D,), scale (1,)
STATISTICS = "statistics"  # ArrayRecord: the released vector (float64)
SKELLAM_SCALE = "skellam-scale"  # config of a SecAgg+ statistics instruction: the Skellam plan's scale s
logger = logging.getLogger("flwr")


def is_statistics(content: RecordDict) -> bool:
    config = content.config_records.get(CONFIG)
    return config is not None and config.get("step") == STEP


def statistics_message(
    node_id: int, state: AdapterState, request: RefitRequest, client_id: int, run_key: str
) -> Message:
    """The statistics instruction for `client_id`: the adapter, the public projection and the mechanism's terms."""
    p = request.projection
    arrays = {
        "matrix": torch.from_numpy(np.ascontiguousarray(p.matrix, np.float64)),
        "center": torch.from_numpy(np.ascontiguousarray(p.center, np.float64)),
        "scale": torch.tensor([float(p.scale)], dtype=torch.float64),
    }
    config = ConfigRecord(
        {
            "step": STEP,
            "client-id": client_id,
            "run-key": run_key,
            "num-classes": request.num_classes,
            "noise-multiplier": float(request.multiplier),
            "num-shares": 0 if request.share_divisor is None else int(request.share_divisor),
        }
    )
    content = RecordDict({GLOBAL: state_to_record(state), PROJECTION: ArrayRecord(arrays), CONFIG: config})
    return Message(content, dst_node_id=node_id, message_type=MessageType.TRAIN)


def read_statistics_content(content: RecordDict) -> tuple[AdapterState, Projection, dict]:
    """(adapter, projection, config) of a statistics instruction; ValueError (one line) if the projection is bad."""
    arrays = {
        k: v.to(torch.float64).numpy() for k, v in content.array_records[PROJECTION].to_torch_state_dict().items()
    }
    matrix, center, scale = arrays["matrix"], arrays["center"], float(arrays["scale"].reshape(-1)[0])
    if (
        matrix.ndim != 2
        or center.shape != (matrix.shape[1],)
        or not (np.isfinite(matrix).all() and np.isfinite(center).all() and scale > 0)
    ):
        raise ValueError(f"the statistics instruction's projection is malformed: P {matrix.shape}, m {center.shape}")
    config = dict(content.config_records[CONFIG])
    return record_to_state(content.array_records[GLOBAL]), Projection(matrix, center, scale), config


def statistics_digest(content: RecordDict) -> str:
    """SHA-256 over everything a statistics instruction asks (config, adapter, projection)."""
    h = hashlib.sha256(repr(sorted(dict(content.config_records[CONFIG]).items())).encode())
    for name in (GLOBAL, PROJECTION):
        record = content.array_records[name].to_torch_state_dict()
        for key in sorted(record):
            tensor = record[key].detach().cpu().contiguous()
            h.update(f"{name}/{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            h.update(tensor.numpy().tobytes())
    return h.hexdigest()


def site_statistics(site, content: RecordDict) -> RecordDict:
    """A site's answer to a plain statistics instruction (module docstring): its released vector, its client id
    and, under record-level DP, its accountant. `site` is a `peft_deer.flower.site.Site`."""
    vector, record = site_statistics_vector(site, content)
    reply = RecordDict(
        {
            STATISTICS: ArrayRecord({"vector": torch.from_numpy(np.ascontiguousarray(vector))}),
            CONFIG: ConfigRecord({"client-id": site.client_id}),
        }
    )
    if record is not None:
        reply[RECORD] = record
    return reply


def site_share_divisor(site) -> int:
    """d = k - t as this site's own run config gives it (`FederatedServer.share_divisor` of the noise floor k =
    min(min-clients-per-phase, num-clients), t = collusion-threshold; 1 when k <= t): the most shares a release
    may be split into. A phase may use fewer (fewer sampled sites: a smaller k), never more."""
    k = max(1, min(site.options.min_clients_per_phase if site.options else 1, site.settings.data.num_clients))
    t = site.settings.privacy.collusion_threshold
    return 1 if k <= t else share_divisor(k, t)


def site_statistics_vector(site, content: RecordDict) -> tuple[np.ndarray, ConfigRecord | None]:
    """(the vector that leaves the site, its record-level accountant report or None) for a statistics instruction
    in plain form. With a Skellam scale in its config (SecAgg+, `secagg_refit.py`) the vector is the integer message
    `skellam_encode` makes of the site's statistics (no Gaussian share: the Skellam share replaces it)."""
    settings, client_id = site.settings, site.client_id
    state, projection, config = read_statistics_content(content)
    if settings.refit.head_refit != "stats":
        raise ValueError("a statistics instruction, but this run's settings have --head-refit none: refused")
    if int(config["client-id"]) != client_id:
        raise ValueError(f"asked for the statistics of client {config['client-id']}, but this site holds {client_id}")
    privacy = settings.privacy
    distributed = privacy.client_level and privacy.noise_placement == "distributed"
    scale = config.get(SKELLAM_SCALE)
    options = getattr(site, "options", None)
    integer = options is not None and options.secure_aggregation and options.secagg_noise == "skellam"
    if (scale is not None) != integer:
        raise ValueError(
            "the statistics instruction "
            + ("asks for integer (Skellam) shares, but this site's run config has no SecAgg+ with secagg-noise="
               "'skellam'" if scale is not None else "is not a SecAgg+ one, but this site's run config asks for "
               "SecAgg+ with Skellam shares")
            + ": refused"
        )  # fmt: skip
    m, expected = float(config["noise-multiplier"]), refit_multiplier(settings, integer_noise=integer)
    if not math.isclose(m, expected, rel_tol=1e-9):
        raise ValueError(f"the statistics instruction asks for noise multiplier {m}; this run's refit uses {expected}")
    shares = int(config["num-shares"])
    if distributed != (shares >= 1):
        raise ValueError(f"the statistics instruction's num-shares {shares} does not fit this run's client-level noise")
    if distributed and shares != site_share_divisor(site):  # d sizes the share: a larger d is less noise
        raise ValueError(f"the statistics instruction's num-shares {shares} is not this run's d = k - t = "
                         f"{site_share_divisor(site)}: refused")  # fmt: skip
    module, _, _ = head_linear(site.model, site.layout)
    if int(config["num-classes"]) != module.out_features:
        raise ValueError(f"num-classes {config['num-classes']} is not this model's {module.out_features}")
    load_adapter_state(site.model, state)
    features = head_features(site.model, site.layout, site.train_data, settings.output.eval_batch_size)
    if features.shape[1] != projection.center.shape[0]:
        raise ValueError(f"the projection is for {projection.center.shape[0]}-dim features, not {features.shape[1]}")
    request = RefitRequest(
        projection, module.out_features, m, privacy.client_level, privacy.record_level, shares if distributed else None
    )
    plan = None
    if scale is not None:  # the plan follows from public terms; the scale the server sent must be its scale
        plan = plan_skellam(m, CLIENT_SENSITIVITY, request.size, shares, 1)
        if plan.scale != float(scale):
            raise ValueError(f"skellam scale {scale} is not this site's {plan.scale}")
        request = dataclasses.replace(request, share_divisor=None)  # no Gaussian share: the Skellam one instead
        _, threshold = json.loads(str(config.get("secagg-view", "[[], 0]")))
        check_threshold(threshold, shares, privacy.collusion_threshold)
    noised = privacy.record_level or distributed
    run_key, first = str(config["run-key"]), True
    if privacy.reproducible_noise or not noised:  # the simulation's draws (testing only), or none at all
        randomness = DPRandomness.from_seed(settings.federation.seed)

        def stream(purpose: str):
            return randomness.stream("refit", purpose, client_id)
    else:  # the site's own key and the instruction's digest: a re-send gets the same draws
        digest = statistics_digest(content)
        keyed, first = answered_randomness(site.state_dir, client_id, run_key, "head-refit", digest)

        def stream(purpose: str):
            return keyed.stream(run_key, "head-refit", digest, client_id, purpose)

    labels = dataset_labels(site.train_data)
    public = site.public_count() if privacy.record_level else None
    vector = site_release(features, labels, request, public, stream).vector()
    if plan is not None:
        vector = skellam_encode({"v": torch.from_numpy(vector)}, CLIENT_SENSITIVITY, plan, stream("share"))["v"].numpy()
    record = None
    if site.record is not None:
        accountant = SiteAccountant(site.state_dir, run_key, client_id)
        record = accountant.gaussian_release(site.record, m, len(site.train_data), step=first).to_record()
    return vector, record


def read_statistics_reply(reply: Message, client_id: int, size: int) -> np.ndarray:
    """The released vector in `reply` from `client_id`; `InvalidClientUpdate` if it is an error or malformed."""
    if reply.has_error():
        raise InvalidClientUpdate(client_id, f"site failed: {reply.error.reason}")
    content = reply.content
    if STATISTICS not in content.array_records or CONFIG not in content.config_records:
        raise InvalidClientUpdate(client_id, "the statistics reply lacks its records")
    claimed = int(content.config_records[CONFIG].get("client-id", -1))
    if claimed != client_id:
        raise InvalidClientUpdate(client_id, f"statistics reply claims to come from client {claimed}")
    vector = content.array_records[STATISTICS].to_torch_state_dict()["vector"].to(torch.float64).numpy().reshape(-1)
    if vector.shape != (size,) or not np.isfinite(vector).all():
        raise InvalidClientUpdate(client_id, f"statistics of shape {vector.shape} (wanted ({size},)) or non-finite")
    return vector


def gather_statistics(deer, grid, request: RefitRequest, timeout_s: float) -> ClassStats:
    """The server's side: one statistics instruction per site, the valid replies summed (the sites' record-level
    reports go to the ledger). `deer` is the run's `DeerStrategy`. TooFewClients below the noise floor."""
    from .strategy import TooFewClients

    server = deer.server
    messages = [
        statistics_message(deer.nodes[c], server.global_state, request, c, deer.run_key) for c in sorted(deer.nodes)
    ]
    client_of_node = {n: c for c, n in deer.nodes.items()}
    vectors, reports = {}, {}
    for reply in grid.send_and_receive(messages, timeout=timeout_s) if messages else []:
        client = client_of_node.get(reply.metadata.src_node_id)
        if client is None:
            continue
        try:
            vectors[client] = read_statistics_reply(reply, client, request.size)
            if server.record is not None:
                reports[client] = read_record_report(reply, client)
        except InvalidClientUpdate as err:
            vectors.pop(client, None)
            logger.warning("head refit: dropped client %d: %s", client, err)
            deer.dropped.append({"round": "head-refit", "phase": None, "client": client, "reason": str(err)})
    needed = deer.noise_shares(server.num_clients) if request.share_divisor is not None else 1
    if len(vectors) < needed:
        raise TooFewClients(
            f"head refit: {len(vectors)} valid statistics replies of {len(messages)} sites (< {needed}); nothing "
            "released. Resume with resume=true once the SuperNodes are back."
        )
    if server.record is not None:
        server.record.expect(reports)
        server.record.account_clients(sorted(vectors))
    total = None
    for c in sorted(vectors):  # in client order, as the simulation sums
        total = vectors[c] if total is None else total + vectors[c]
    return ClassStats.from_vector(total, request.num_classes, request.projection.dims)


__all__ = [
    "gather_statistics",
    "is_statistics",
    "read_statistics_reply",
    "site_statistics",
    "statistics_digest",
    "statistics_message",
]
