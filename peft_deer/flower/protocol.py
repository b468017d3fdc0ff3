"""What the DEeR ServerApp and ClientApp say to each other, and the checks on every reply.

Two message kinds:
- query "hello" (once per run): the node answers with the client id it holds and its example count;
- train (once per phase and participant): the server sends the global adapter and the phase; the
  client answers with the delta of the phase's trained parameters only and its example count.

A reply that is an error, lacks a record, names another client or carries a delta of the wrong
keys, shapes or non-finite values raises `InvalidClientUpdate`, whose message is the logged reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from ..federated import AdapterState, ClientUpdate, InvalidClientUpdate, validate_updates

GLOBAL = "global"  # ArrayRecord: the global adapter state (all LoRA factors and the head)
UPDATE = "update"  # ArrayRecord: the client's delta of the phase's trained parameters
CONFIG = "config"  # ConfigRecord: phase and identity fields
METRICS = "metrics"  # MetricRecord: num-examples and training statistics


def state_to_record(state: AdapterState) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in state.items()})


def record_to_state(record: ArrayRecord) -> AdapterState:
    return {k: v.to(torch.float32) for k, v in record.to_torch_state_dict().items()}


@dataclass(frozen=True)
class TrainInstruction:
    """One client's work order: the global adapter, the phase (round, index), and the noise share count m."""

    global_state: AdapterState
    round: int
    phase: int
    client_id: int
    num_shares: int


def hello_message(node_id: int) -> Message:
    return Message(
        RecordDict({CONFIG: ConfigRecord({"step": "hello"})}), dst_node_id=node_id, message_type=MessageType.QUERY
    )


def hello_reply(msg: Message, client_id: int, num_examples: int) -> Message:
    return Message(
        RecordDict({CONFIG: ConfigRecord({"client-id": client_id, "num-examples": num_examples})}), reply_to=msg
    )


def read_hello_reply(reply: Message) -> tuple[int, int]:
    """(client id, example count) a node announced; ValueError with the node's reason if it failed."""
    if reply.has_error():
        raise ValueError(f"node {reply.metadata.src_node_id} failed to start: {reply.error.reason}")
    config = reply.content.config_records.get(CONFIG)
    if config is None or "client-id" not in config:
        raise ValueError(f"node {reply.metadata.src_node_id} sent no client id")
    return int(config["client-id"]), int(config["num-examples"])


def train_message(node_id: int, instruction: TrainInstruction) -> Message:
    config = ConfigRecord(
        {
            "round": instruction.round,
            "phase": instruction.phase,
            "client-id": instruction.client_id,
            "num-shares": instruction.num_shares,
        }
    )
    content = RecordDict({GLOBAL: state_to_record(instruction.global_state), CONFIG: config})
    return Message(content, dst_node_id=node_id, message_type=MessageType.TRAIN)


def read_train_message(msg: Message) -> TrainInstruction:
    config = msg.content.config_records[CONFIG]
    return TrainInstruction(
        record_to_state(msg.content.array_records[GLOBAL]),
        int(config["round"]),
        int(config["phase"]),
        int(config["client-id"]),
        int(config["num-shares"]),
    )


def update_reply(msg: Message, update: ClientUpdate) -> Message:
    metrics = MetricRecord(
        {
            "num-examples": update.num_examples,
            "train-loss": float(update.mean_loss),
            "images-seen": update.images_seen,
            "seconds": float(update.seconds),
        }
    )
    content = RecordDict(
        {
            UPDATE: state_to_record(update.delta),
            METRICS: metrics,
            CONFIG: ConfigRecord({"client-id": update.client_id}),
        }
    )
    return Message(content, reply_to=msg)


def read_update_reply(reply: Message, client_id: int, shapes: dict[str, torch.Size]) -> ClientUpdate:
    """The `ClientUpdate` in `reply` from `client_id`, checked against the phase's trained `shapes`."""
    if reply.has_error():
        raise InvalidClientUpdate(client_id, f"client failed: {reply.error.reason}")
    content = reply.content
    missing = [
        name
        for name, records in (
            (UPDATE, content.array_records),
            (METRICS, content.metric_records),
            (CONFIG, content.config_records),
        )
        if name not in records
    ]
    if missing:
        raise InvalidClientUpdate(client_id, f"reply lacks the records {missing}")
    claimed = int(content.config_records[CONFIG].get("client-id", -1))
    if claimed != client_id:
        raise InvalidClientUpdate(client_id, f"reply claims to come from client {claimed}")
    metrics = content.metric_records[METRICS]
    try:
        delta = record_to_state(content.array_records[UPDATE])
    except Exception as err:  # undecodable arrays: the reason is the decoder's
        raise InvalidClientUpdate(client_id, f"update arrays do not decode: {err}") from err
    update = ClientUpdate(
        client_id,
        delta,
        int(metrics.get("num-examples", 0)),
        float(metrics.get("train-loss", float("nan"))),
        int(metrics.get("images-seen", 0)),
        float(metrics.get("seconds", 0.0)),
    )
    validate_updates([update], shapes)
    return update
