"""A site's long-lived worker: keeps the site's data, backbone and model loaded across Flower messages.

    python -m peft_deer.flower.site_worker --socket PATH --key-file PATH [--watch-pid PID] [--idle-s S]

Started by the ClientApp (`peft_deer_clientapp`, through `worker_link.py`) on a SuperNode's first message; it
answers one message at a time with `peft_deer.flower.site.handle`, which builds a `Site` once per run settings and node
config. Only a client that answers the HMAC challenge with the key in `--key-file` is served. It exits
when `--watch-pid` (the SuperNode's executor) is gone, after `--idle-s` seconds without a message, or
on SIGTERM / SIGINT. A failed message is answered with its one-line reason (the full traceback goes
to this worker's log), and the worker carries on.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import socket
import sys
import time
from multiprocessing.connection import AuthenticationError, Connection, answer_challenge, deliver_challenge
from pathlib import Path

from .site import handle
from .wire import receive_request, send_reply

logger = logging.getLogger("peft_deer.flower.site_worker")
POLL_S = 2.0


def _alive(pid: int | None) -> bool:
    if pid is None:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def serve(
    socket_path: Path, key: bytes, watch_pid: int | None = None, idle_s: float = 1800.0, key_file: Path | None = None
) -> str:
    """Answer messages on `socket_path` until the watched process is gone or `idle_s` pass; returns why it stopped.

    On the way out the socket and `key_file` are removed: the next message starts a new worker with a new key.
    """
    socket_path.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the socket file is created 0600
    try:
        server.bind(str(socket_path))
    finally:
        os.umask(old_umask)
    server.listen(4)
    logger.info("site worker %d listening on %s", os.getpid(), socket_path)
    last = time.monotonic()
    try:
        while True:
            if not _alive(watch_pid):
                return f"process {watch_pid} is gone"
            if time.monotonic() - last > idle_s:
                return f"idle for {idle_s:g} s"
            ready, _, _ = select.select([server], [], [], POLL_S)
            if not ready:
                continue
            sock, _ = server.accept()
            conn = Connection(sock.detach())
            try:
                deliver_challenge(conn, key)
                answer_challenge(conn, key)
                _answer_one(conn)
            except (AuthenticationError, EOFError, OSError) as err:
                logger.warning("dropped a connection: %s", err)
            finally:
                conn.close()
                last = time.monotonic()
    finally:
        server.close()
        socket_path.unlink(missing_ok=True)
        if key_file is not None:
            key_file.unlink(missing_ok=True)


def _answer_one(conn: Connection) -> None:
    kind, content, run_config, node_config = receive_request(conn)
    start = time.perf_counter()
    try:
        reply = handle(kind, content, run_config, node_config)
    except Exception as err:  # the reason travels to the server, which drops this site's update with it
        logger.exception("%s message failed", kind)
        send_reply(conn, None, f"{type(err).__name__}: {err}")
        return
    send_reply(conn, reply)
    logger.info("%s message answered in %.1f s", kind, time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m peft_deer.flower.site_worker", description=__doc__.splitlines()[0])
    p.add_argument("--socket", required=True, type=Path, help="Unix socket path to listen on")
    p.add_argument("--key-file", required=True, type=Path, help="file holding the connection key (mode 0600)")
    p.add_argument("--watch-pid", type=int, default=None, help="exit when this process is gone")
    p.add_argument("--idle-s", type=float, default=1800.0, help="exit after this many seconds without a message")
    args = p.parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    site_logs = logging.getLogger("peft_deer.flower")  # this worker's and the site's own lines
    site_logs.addHandler(handler)
    site_logs.setLevel(logging.INFO)
    site_logs.propagate = False
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # leave through serve's cleanup
    reason = serve(args.socket, args.key_file.read_bytes(), args.watch_pid, args.idle_s, args.key_file)
    logger.info("site worker %d stops: %s", os.getpid(), reason)
    return 0


if __name__ == "__main__":
    sys.exit(main())
