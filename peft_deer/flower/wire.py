"""The ClientApp <-> site worker wire format: a JSON header, then the message content as Flower's protobuf bytes.

A request is {kind, run_config, node_config} and a `RecordDict`; a reply is {error} and a `RecordDict` (empty
bytes when the worker failed; `receive_reply` raises its one-line reason). flwr and the standard library only:
the ClientApp loads this by path, without torch.
"""

from __future__ import annotations

import json
from multiprocessing.connection import Connection

from flwr.app import RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict


def send_request(conn: Connection, kind: str, content: RecordDict, run_config: dict, node_config: dict) -> None:
    conn.send_bytes(json.dumps({"kind": kind, "run_config": run_config, "node_config": node_config}).encode())
    conn.send_bytes(recorddict_to_proto(content).SerializeToString())


def receive_request(conn: Connection) -> tuple[str, RecordDict, dict, dict]:
    header = json.loads(conn.recv_bytes())
    content = recorddict_from_proto(ProtoRecordDict.FromString(conn.recv_bytes()))
    return header["kind"], content, header["run_config"], header["node_config"]


def send_reply(conn: Connection, content: RecordDict | None, error: str | None = None) -> None:
    conn.send_bytes(json.dumps({"error": error}).encode())
    conn.send_bytes(b"" if content is None else recorddict_to_proto(content).SerializeToString())


def receive_reply(conn: Connection) -> RecordDict:
    """The worker's reply content; RuntimeError with the worker's one-line reason if it failed."""
    header = json.loads(conn.recv_bytes())
    body = conn.recv_bytes()
    if header["error"] is not None:
        raise RuntimeError(header["error"])
    return recorddict_from_proto(ProtoRecordDict.FromString(body))
