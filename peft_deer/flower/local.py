"""A real Flower deployment on this machine: one SuperLink and N SuperNodes on 127.0.0.1, then `flwr run`.

    python -m peft_deer.flower.local --data-dir ../shared/data/medmnist --run-config "rounds=1"

Every process is real (the same executables a multi-host deployment starts); only the addresses are
loopback, and TLS is off unless `LocalDeployment` gets a `Tls` (then SuperNode authentication can be on
too: each node's key registered with `register_node`). Each SuperNode i gets `partition-id=i`. Everything
started, including the processes Flower spawns itself, is stopped on exit, on error, on Ctrl-C and on SIGTERM
(one line, exit 130 / 143; the run dir keeps its last checkpoint: `resume=true` continues it). Flower's
telemetry is off in every process started (`FLWR_TELEMETRY_ENABLED=0`). Used by the tests, too.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__":  # `python -m peft_deer.flower.local`: a missing extra is one line, not a traceback
    from peft_deer.extras import require_extra

    require_extra("deer-flower", "flower")
    try:
        importlib.import_module("psutil")
    except ImportError:
        raise SystemExit("deer-flower: error: psutil not installed; pip install psutil") from None

import psutil  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _executable(name: str) -> str:
    found = shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if found is None:
        raise FileNotFoundError(f"{name} not found: install the Flower extra (pip install 'peft_deer[flower]')")
    return found


@dataclass(frozen=True)
class Tls:
    """PEM files for a SuperLink with TLS: the CA that signed its certificate (given to every SuperNode and to
    `flwr`), its certificate (valid for 127.0.0.1) and private key. `supernode_auth` turns on
    `--enable-supernode-auth`: only SuperNodes whose public key was registered may connect."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    supernode_auth: bool = False


class LocalDeployment(AbstractContextManager):
    """SuperLink + `num_nodes` SuperNodes on loopback, in a private FLWR_HOME; `run()` submits the app.

    `node_config(i)` gives SuperNode i's extra node config (partition-id=i is always set). Logs go to
    `log_dir`. With `tls` every connection to the SuperLink is TLS; `node_keys[i]` (OpenSSH EC private key)
    authenticates SuperNode i, and `start_nodes=False` leaves starting them to `start_node` (after
    `register_node`). Leaving the context kills every process started, and their descendants.
    """

    def __init__(
        self,
        num_nodes: int,
        log_dir: str | Path,
        node_config: dict[str, str] | None = None,
        env: dict[str, str] | None = None,
        tls: Tls | None = None,
        node_keys: list[Path] | None = None,
        start_nodes: bool = True,
    ) -> None:
        self.num_nodes = num_nodes
        self.tls = tls
        self.node_keys = node_keys or []
        self.start_nodes = start_nodes
        self.log_dir = Path(log_dir).resolve()
        self.node_config = node_config or {}
        self.home = Path(tempfile.mkdtemp(prefix="flwr-home-"))
        self.port = free_port()
        bin_dir = str(Path(sys.executable).parent)
        # no usage reports to Flower's telemetry server from a hospital's SuperLink, SuperNodes or `flwr`
        self.env = {**os.environ, **(env or {}), "FLWR_HOME": str(self.home), "FLWR_TELEMETRY_ENABLED": "0"}
        self.env["PATH"] = os.pathsep.join([bin_dir, self.env.get("PATH", "")])
        self.procs: list[subprocess.Popen] = []
        self._groups: set[int] = set()  # process groups seen in this deployment (swept again on exit)
        self._logs: list = []

    def _start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "w")  # noqa: SIM115 (closed in __exit__)
        self._logs.append(log)
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=REPO, start_new_session=True
        )
        self.procs.append(proc)
        return proc

    def __enter__(self) -> LocalDeployment:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        security = "insecure = true" if self.tls is None else f'root-certificates = "{self.tls.ca_cert}"'
        connection = f'[superlink.loopback]\naddress = "127.0.0.1:{self.port}"\n{security}\n'
        (self.home / "config.toml").write_text('[superlink]\ndefault = "loopback"\n\n' + connection)
        if self.tls is None:
            security_flags = ["--insecure"]
        else:
            security_flags = [f"--ssl-ca-certfile={self.tls.ca_cert}", f"--ssl-certfile={self.tls.server_cert}"]
            security_flags += [f"--ssl-keyfile={self.tls.server_key}"]
            security_flags += ["--enable-supernode-auth"] if self.tls.supernode_auth else []
        try:
            self._start(
                "superlink",
                [
                    _executable("flower-superlink"),
                    *security_flags,
                    "--host=127.0.0.1",
                    f"--port={self.port}",
                    "--disable-runtime-dependency-installation",
                ],
            )
            self._wait_for_port(self.port, 60)
            if self.start_nodes:
                for i in range(self.num_nodes):
                    self.start_node(i)
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def start_node(self, i: int, max_retries: int | None = None) -> subprocess.Popen:
        """Start SuperNode i (TLS and its key if the deployment has them; `max_retries` connection attempts)."""
        config = " ".join(f"{k}={v}" for k, v in {"partition-id": i, **self.node_config}.items())
        security = ["--insecure"] if self.tls is None else [f"--root-certificates={self.tls.ca_cert}"]
        if i < len(self.node_keys):
            security.append(f"--auth-supernode-private-key={self.node_keys[i]}")
        retries = [] if max_retries is None else [f"--max-retries={max_retries}"]
        return self._start(
            f"supernode-{i}",
            [
                _executable("flower-supernode"),
                *security,
                *retries,
                f"--superlink=127.0.0.1:{self.port}",
                "--host=127.0.0.1",
                f"--port={free_port()}",
                f"--node-config={config}",
            ],
        )

    def register_node(self, public_key: Path) -> subprocess.CompletedProcess:
        """`flwr supernode register PUBLIC_KEY` (OpenSSH EC public key) at this deployment's SuperLink."""
        cmd = [_executable("flwr"), "supernode", "register", str(public_key), "loopback"]
        return subprocess.run(cmd, capture_output=True, text=True, env=self.env, cwd=REPO, timeout=120)

    def _wait_for_port(self, port: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"a Flower process exited early; see the logs in {self.log_dir}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.3)
        raise TimeoutError(f"the SuperLink did not listen on 127.0.0.1:{port} within {timeout_s:g} s")

    def run(self, run_config: str = "", timeout_s: float = 1800) -> subprocess.CompletedProcess:
        """`flwr run . loopback --stream` from the repository root; its output is also in run.log."""
        cmd = [_executable("flwr"), "run", str(REPO), "loopback", "--stream"]
        if run_config:
            cmd += ["--run-config", run_config]
        result = subprocess.run(cmd, capture_output=True, text=True, env=self.env, cwd=REPO, timeout=timeout_s)
        (self.log_dir / "run.log").write_text(result.stdout + result.stderr)
        return result

    def _family(self) -> list[psutil.Process]:
        """Every live process started here, spawned by Flower, or left in their process groups (a site worker
        outlives the ClientApp process that started it, in its SuperNode's group; a SuperExec starts its own
        group, where the ServerApp lives)."""
        groups = self._groups
        groups.update(proc.pid for proc in self.procs)
        family: dict[int, psutil.Process] = {}
        for proc in self.procs:
            try:
                p = psutil.Process(proc.pid)
                family.update((c.pid, c) for c in [p, *p.children(recursive=True)])
            except psutil.NoSuchProcess:
                pass
        for p in list(family.values()):
            try:
                groups.add(os.getpgid(p.pid))
            except ProcessLookupError:
                pass
        for p in psutil.process_iter():
            try:
                if os.getpgid(p.pid) in groups:
                    family.setdefault(p.pid, p)
            except (ProcessLookupError, psutil.NoSuchProcess):
                pass
        return list(family.values())

    def __exit__(self, *exc) -> None:
        started = {proc.pid for proc in self.procs}
        family = [p for p in self._family() if p.pid not in started]
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in family:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(family, timeout=10)
        for p in alive:
            p.kill()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        rest = [p for p in self._family() if p.pid not in started]  # spawned during the teardown
        for p in rest:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(rest, timeout=10)
        for log in self._logs:
            log.close()
        shutil.rmtree(self.home, ignore_errors=True)

    def pids(self) -> list[int]:
        """Every live process of this deployment (started here, spawned by Flower, or a site worker)."""
        return [p.pid for p in self._family()]


def server_app_error(output: str) -> str | None:
    """The ServerApp's failure in `flwr run --stream` output (whose exit code is 0 even then), or None."""
    if "Exit Code:" not in output or "ServerApp" not in output:
        return None
    errors = [
        line.strip() for line in output.splitlines() if re.match(r"^\w*(Error|Exception|Exceeded|Clients)\b.*: ", line)
    ]
    return errors[-1] if errors else "the ServerApp failed (see the log above)"


class _Terminated(Exception):
    """SIGTERM arrived: unwinds through `LocalDeployment.__exit__`, which stops every process."""


def _on_sigterm(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
    raise _Terminated()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m peft_deer.flower.local",
        description="Run the DEeR Flower app on a real local deployment: a SuperLink and N SuperNodes on "
        "127.0.0.1 (insecure, loopback only), then stop them all.",
    )
    p.add_argument("--nodes", type=int, default=2, help="SuperNodes to start; node i holds partition-id=i")
    p.add_argument("--data-dir", default=None, help="MedMNIST folder every SuperNode reads its partition from")
    p.add_argument("--run-config", default="", help="overrides, e.g. \"rounds=1 output-dir='/tmp/run'\"")
    p.add_argument("--log-dir", default="runs/flower-logs", help="where the processes' logs go")
    args = p.parse_args(argv)
    if args.nodes < 1:
        p.error(f"--nodes {args.nodes} must be >= 1")
    node_config = {"data-dir": f"'{Path(args.data_dir).resolve()}'"} if args.data_dir else {}
    run_config = args.run_config
    if args.data_dir and "data-dir" not in run_config:
        run_config = f"data-dir='{Path(args.data_dir).resolve()}' {run_config}".strip()
    if "num-clients" not in run_config:
        run_config = f"num-clients={args.nodes} {run_config}".strip()
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        with LocalDeployment(args.nodes, args.log_dir, node_config) as deployment:
            result = deployment.run(run_config)
    except (KeyboardInterrupt, _Terminated) as stop:
        name, code = ("SIGTERM", 143) if isinstance(stop, _Terminated) else ("SIGINT", 130)
        print(f"deer-flower: interrupted ({name}); every Flower process is stopped; resume with the same "
              "--run-config plus resume=true", file=sys.stderr)  # fmt: skip
        return code
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(result.stdout[-4000:], end="")
    if result.returncode != 0:
        print(result.stderr[-4000:], file=sys.stderr)
        return result.returncode
    error = server_app_error(result.stdout + result.stderr)
    if error is not None:
        print(f"deer-flower: error: {error} (logs in {Path(args.log_dir).resolve()})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
