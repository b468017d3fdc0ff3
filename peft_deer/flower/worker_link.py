"""Finding or starting a SuperNode's site worker (`python -m peft_deer.flower.site_worker`) and asking it.

The worker listens on a Unix socket in a directory only this user can open and accepts a connection only after
an HMAC challenge with a 256-bit key kept in a 0600 file beside it. It exits when the process that started it
(the SuperNode's executor) is gone or after `site-worker-idle-s` (node config, default 1800) without a message;
the next message starts a new one. Standard library and `wire` only: the ClientApp loads this by path, no torch.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
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

from flwr.app import RecordDict

from .wire import receive_reply, send_request

APP_DIR = Path(__file__).resolve().parents[2]  # the app bundle (or checkout) holding this copy of peft_deer
WORKER_START_S = 900.0  # a worker's first answer includes imports and loading the site (minutes on a busy host)
DEFAULT_IDLE_S = 1800.0


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
