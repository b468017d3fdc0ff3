"""The ClientApp component of the DEeR Flower app (`[tool.flwr.app.components] clientapp`).

Flower starts a fresh `flwr-clientapp` process for every message a SuperNode receives. Importing
`peft_deer` loads torch and transformers (seconds), and a site's data, backbone and model took about
30 s more to load per message. So this module lives outside the `peft_deer` package and imports no
torch: it hands the message content to the site's long-lived worker (`python -m
peft_deer.flower.site_worker`, one per SuperNode, started by the first message), which keeps the site
loaded across messages (`peft_deer.flower.site`), and wraps the worker's reply.

The worker listens on a Unix socket in a directory only this user can open and accepts a connection
only after an HMAC challenge with a 256-bit key kept in a 0600 file beside it. It exits when the
process that started it (the SuperNode's executor) is gone or after `site-worker-idle-s` (node
config, default 1800) without a message; the next message starts a new one. Node config
`site-worker=false` does the work in the ClientApp process itself (everything reloaded per message).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import json
import math
import os
import secrets
import stat
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import AuthenticationError, Client, Connection
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

APP_DIR = Path(__file__).resolve().parent  # the installed app bundle: the worker runs this copy of peft_deer
WORKER_START_S = 900.0  # a worker's first answer includes imports and loading the site (minutes on a busy host)
DEFAULT_IDLE_S = 1800.0

app = ClientApp()


@app.query()
def hello(msg: Message, context: Context) -> Message:
    """Which client this site holds, and how many training images."""
    return _answer("hello", msg, context)


def keyed_masks(seed: bytes, num_range: int, dimensions_list: list[tuple[int, ...]]) -> list[np.ndarray]:
    """SecAgg+ masks drawn from the whole key: uniform int64 in [0, num_range), SHAKE-256(key) as the keystream.

    Replaces flwr 1.42's `pseudo_rand_gen`, which folds the 32-byte key into a 32-bit seed of numpy's
    `RandomState`: a server that has unmasked the sum (and so learnt each survivor's private mask) could
    then try all 2^32 seeds of a pairwise mask and read a site's update when only two sites take part.
    Server and sites must both use this one (`harden_secaggplus_masks`); a mismatch unmasks to noise that the
    server's norm check refuses. Values: 8 keystream bytes each, reduced mod num_range (exact for 2^n).
    """
    counts = [math.prod(d) for d in dimensions_list]
    stream = np.frombuffer(hashlib.shake_256(b"peft-deer-secagg-mask" + seed).digest(8 * sum(counts)), dtype="<u8")
    values = (stream % np.uint64(num_range)).astype(np.int64)
    out, start = [], 0
    for dims, count in zip(dimensions_list, counts, strict=True):
        out.append(values[start : start + count].reshape(dims))
        start += count
    return out


def harden_secaggplus_masks() -> None:
    """Make Flower's SecAgg+ (the sites' mod and the server's workflow) draw its masks with `keyed_masks`."""
    for name in (
        "flwr.client.mod.secure_aggregation.secaggplus_mod",
        "flwr.server.workflow.secure_aggregation.secaggplus_workflow",
    ):
        module = importlib.import_module(name)  # the module (the package re-exports a function of the same name)
        if not hasattr(module, "pseudo_rand_gen"):
            raise ImportError(f"{module.__name__} has no pseudo_rand_gen: this flwr is not the 1.42 line we patch")
        module.pseudo_rand_gen = keyed_masks


harden_secaggplus_masks()


def secagg_when_asked(msg: Message, context: Context, call_next) -> Message:
    """Flower's `secaggplus_mod` for the train messages of a SecAgg+ phase (they carry its config record; the
    mod masks the update the site returns), the plain train path for the others."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


@app.train(mods=[secagg_when_asked])
def train(msg: Message, context: Context) -> Message:
    """One phase of local training; the reply carries only the trained factor's delta (privatized under
    distributed noise; masked by SecAgg+ when the server runs the phase through it)."""
    return _answer("train", msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Counts of the final adapter's decisions on this site's held-out images."""
    return _answer("evaluate", msg, context)


def _answer(kind: str, msg: Message, context: Context) -> Message:
    run_config, node_config = dict(context.run_config), dict(context.node_config)
    if str(node_config.get("site-worker", True)).lower() in ("false", "0", "no"):
        from peft_deer.flower.site import handle  # in this process: torch, data and model load per message

        content = handle(kind, msg.content, run_config, node_config)
    else:
        content = ask_worker(kind, msg.content, run_config, node_config)
    return Message(content, reply_to=msg)


# ----------------------------------------------------------------------------- the wire format


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


# ----------------------------------------------------------------------------- finding or starting the worker


def worker_paths(node_config: dict[str, Any]) -> dict[str, Path]:
    """The socket, key, lock and log files of this SuperNode's worker (one per node config and app bundle)."""
    base = Path(tempfile.gettempdir()) / f"peft-deer-sites-{os.getuid()}"
    base.mkdir(mode=0o700, exist_ok=True)
    info = base.stat()
    if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
        raise PermissionError(f"{base} must be owned by this user and closed to others (chmod 700)")
    ident = hashlib.sha256(json.dumps([node_config, str(APP_DIR)], sort_keys=True, default=str).encode())
    name = ident.hexdigest()[:16]
    return {part: base / f"{name}.{part}" for part in ("sock", "key", "lock", "log")}


def ask_worker(kind: str, content: RecordDict, run_config: dict, node_config: dict) -> RecordDict:
    """Send one message's content to this SuperNode's worker (starting it if none answers); its reply content."""
    paths = worker_paths(node_config)
    conn = _connect(paths) or _start_worker(paths, node_config)
    with conn:
        send_request(conn, kind, content, run_config, node_config)
        try:
            return receive_reply(conn)
        except EOFError:
            raise RuntimeError(f"the site worker exited while answering a {kind} message; see {paths['log']}") from None


def _connect(paths: dict[str, Path]) -> Connection | None:
    try:
        return Client(str(paths["sock"]), family="AF_UNIX", authkey=paths["key"].read_bytes())
    except (OSError, EOFError, AuthenticationError):  # no worker, a stale socket, or a key of an older worker
        return None


def _start_worker(paths: dict[str, Path], node_config: dict) -> Connection:
    with open(paths["lock"], "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one start at a time for this node
        conn = _connect(paths)
        if conn is not None:
            return conn
        fd = os.open(paths["key"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(APP_DIR), env.get("PYTHONPATH", "")) if p)
        idle_s = float(node_config.get("site-worker-idle-s", DEFAULT_IDLE_S))
        cmd = [sys.executable, "-m", "peft_deer.flower.site_worker", "--socket", str(paths["sock"])]
        cmd += ["--key-file", str(paths["key"]), "--watch-pid", str(os.getppid()), "--idle-s", str(idle_s)]
        with open(paths["log"], "ab") as log:
            proc = subprocess.Popen(cmd, cwd=APP_DIR, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + WORKER_START_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = paths["log"].read_text(errors="replace").strip().splitlines()[-1:] or ["(empty log)"]
                raise RuntimeError(f"the site worker exited at start ({tail[0]}); see {paths['log']}")
            conn = _connect(paths)
            if conn is not None:
                return conn
            time.sleep(0.2)
        proc.kill()
        raise TimeoutError(f"the site worker did not listen within {WORKER_START_S:g} s; see {paths['log']}")
