"""The legacy messages of a SecAgg+ phase: the train instruction as `FitIns`, the privatized update as `FitRes`.

Flower's SecAgg+ (`SecAggPlusWorkflow` on the server, `secaggplus_mod` at the sites) drives a legacy
`Strategy` and masks the `FitRes` parameters, a nameless list of arrays. So:
- `FitIns`: parameters = the global adapter in sorted key order; config = the train message's own
  config (`protocol.train_message`: round, phase, client id, noise shares, run key, ...) plus the key
  order, so a site reads it back into the same `TrainInstruction` as a plain train message;
- `FitRes`: parameters = the privatized delta of the phase's trained keys, sorted, in float64 (quantized
  by the mod, never seen by the server alone); num_examples = 1, the uniform public weight (SecAgg+
  weights by it); metrics = the client id and, under record-level DP, its accountant report (JSON).
  No loss, image count or timing: nothing un-noised about a site reaches the server.
After unmasking every `FitRes` the strategy receives carries the mean over the n survivors; `summed_update`
turns it back into their sum.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import torch
from flwr.app import ConfigRecord, RecordDict
from flwr.common import Code, FitIns, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat

from ..federated import AdapterState, ClientUpdate, InvalidClientUpdate
from .protocol import (
    CONFIG,
    GLOBAL,
    RecordReport,
    TrainInstruction,
    read_train_content,
    record_report_from_config,
    state_to_record,
    train_message,
)

SKELLAM_SCALE = "skellam-scale"  # FitIns config (secagg-noise='skellam'): the scale s of the integer messages
KEY_ORDER = "secagg-keys"  # FitIns config: JSON list of the global adapter's keys, in parameter order
CLIENT_ID = "client-id"  # FitRes metrics
RECORD_JSON = "record-dp-json"  # FitRes metrics: the site's RecordReport (record-level DP)


def is_fit_ins(content: RecordDict) -> bool:
    """Whether a train message's content is a legacy `FitIns` (a SecAgg+ phase) rather than a plain one."""
    return "fitins.parameters" in content.array_records


def fit_ins(instruction: TrainInstruction) -> FitIns:
    """The `FitIns` that carries `instruction` (the global adapter and the plain train message's config)."""
    config = dict(train_message(0, instruction).content.config_records[CONFIG])
    keys = sorted(instruction.global_state)
    config[KEY_ORDER] = json.dumps(keys)
    if instruction.skellam_scale is not None:
        config[SKELLAM_SCALE] = float(instruction.skellam_scale)
    arrays = [instruction.global_state[k].detach().cpu().float().numpy() for k in keys]
    return FitIns(ndarrays_to_parameters(arrays), config)


def read_fit_ins(content: RecordDict) -> TrainInstruction:
    """The `TrainInstruction` in a SecAgg+ phase's `FitIns` content (as `read_train_content` for a plain one)."""
    ins = compat.recorddict_to_fitins(content, keep_input=True)
    config = dict(ins.config)
    keys = json.loads(str(config.pop(KEY_ORDER)))
    scale = config.pop(SKELLAM_SCALE, None)
    arrays = parameters_to_ndarrays(ins.parameters)
    if len(keys) != len(arrays):
        raise ValueError(f"FitIns carries {len(arrays)} arrays for {len(keys)} keys")
    state = {k: torch.from_numpy(np.array(a, dtype=np.float32)) for k, a in zip(keys, arrays, strict=True)}
    work = read_train_content(RecordDict({GLOBAL: state_to_record(state), CONFIG: ConfigRecord(config)}))
    return work if scale is None else dataclasses.replace(work, skellam_scale=float(scale))


def fit_res_content(update: ClientUpdate, record: RecordReport | None = None) -> RecordDict:
    """A site's reply to a SecAgg+ phase: its privatized delta (sorted keys, float64), weight 1, no statistics."""
    arrays = [update.delta[k].detach().cpu().double().numpy() for k in sorted(update.delta)]
    metrics: dict = {CLIENT_ID: update.client_id}
    if record is not None:
        metrics[RECORD_JSON] = json.dumps(dict(record.to_record()))
    res = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(arrays), 1, metrics)
    return compat.fitres_to_recorddict(res, keep_input=True)


def read_fit_res_client(res: FitRes) -> int:
    """The client id a SecAgg+ reply names (-1 if none)."""
    return int(res.metrics.get(CLIENT_ID, -1))


def read_fit_res_report(res: FitRes, client_id: int) -> RecordReport:
    """The record-level accountant in a SecAgg+ reply; `InvalidClientUpdate` if missing or malformed."""
    if RECORD_JSON not in res.metrics:
        return record_report_from_config(None, client_id)
    try:
        config = ConfigRecord(json.loads(str(res.metrics[RECORD_JSON])))
    except (TypeError, ValueError) as err:
        raise InvalidClientUpdate(client_id, f"malformed record-level accountant: {err}") from err
    return record_report_from_config(config, client_id)


def summed_update(
    parameters: Parameters, survivors: int, shapes: dict[str, torch.Size], integers: bool = False
) -> AdapterState:
    """The survivors' sum from SecAgg+'s unmasked mean (`parameters`, sorted keys); ValueError on a shape mismatch.
    `integers`: a sum of integer messages, rounded and kept in float64 (exact)."""
    arrays = parameters_to_ndarrays(parameters)
    keys = sorted(shapes)
    if len(arrays) != len(keys) or any(a.shape != tuple(shapes[k]) for k, a in zip(keys, arrays, strict=False)):
        raise ValueError(f"the unmasked sum has {len(arrays)} arrays that do not match the phase's {len(keys)} keys")
    pairs = zip(keys, arrays, strict=True)
    if integers:
        return {k: torch.from_numpy(np.round(np.asarray(a, dtype=np.float64) * survivors)) for k, a in pairs}
    return {k: torch.from_numpy(np.asarray(a, dtype=np.float64) * survivors).float() for k, a in pairs}


__all__ = [
    "fit_ins",
    "fit_res_content",
    "is_fit_ins",
    "read_fit_ins",
    "read_fit_res_client",
    "read_fit_res_report",
    "summed_update",
]
