"""Load test of the demo on loopback: /predict, /explain and /batch, each with N concurrent calls of identical
uploads (the same bytes: one shared path in Gradio's cache) and of distinct ones, then M sequential /predict.

    python bench/app_load.py --adapter ../main/runs/pneumonia-deer/adapter [--concurrent 20 --sequential 50]

starts the real command (``python -m app``) in a subprocess, uploads the run's example images in
turn through ``gradio_client``, and prints one JSON object: errors, p50/p95 latency per phase (s,
client side, upload included) and the server's resident memory (RSS, MiB: before, after and the peak
sampled every 50 ms); it also
checks that no upload is left in the server's private cache afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def _percentiles(seconds: list[float]) -> dict[str, float]:
    return {"p50_s": round(float(np.percentile(seconds, 50)), 3), "p95_s": round(float(np.percentile(seconds, 95)), 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="RUN_DIR/adapter to serve")
    parser.add_argument("--concurrent", type=int, default=20, help="calls in flight at once (default: %(default)s)")
    parser.add_argument("--sequential", type=int, default=50, help="calls one after another (default: %(default)s)")
    args = parser.parse_args(argv)
    from gradio_client import Client, handle_file

    sys.path.insert(0, str(ROOT))
    from peft_deer.demo.run import check_adapter_dir, read_examples
    from peft_deer.demo.uploads import digest

    adapter = Path(args.adapter).resolve()
    check_adapter_dir(adapter)
    images = [str(e.path) for e in read_examples(adapter.parent)]
    if not images:
        print(f"app_load: error: {adapter.parent}/examples has no images to send", file=sys.stderr)
        return 1
    temp = Path(tempfile.mkdtemp(prefix="app-load-"))
    port = _free_port()
    env = {**os.environ, "GRADIO_TEMP_DIR": str(temp), "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen(
        [sys.executable, "-m", "app", "--adapter", str(adapter), "--port", str(port)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 300
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    print("app_load: error: the app did not start", file=sys.stderr)
                    return 1
                time.sleep(0.5)
        client = Client(url, verbose=False)
        client.predict(handle_file(images[0]), api_name="/predict")  # warm-up (first call compiles kernels)
        rss_before = _rss_mib(server.pid)
        errors: list[str] = []

        peak = [rss_before]
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.is_set():
                peak[0] = max(peak[0], _rss_mib(server.pid))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        distinct = []  # one fresh file per call: distinct bytes, distinct cache paths
        for i in range(args.concurrent):
            px = np.asarray(Image.open(images[i % len(images)]).convert("L"))
            distinct.append(temp.parent / f"{temp.name}-in-{i}.png")
            Image.fromarray(np.roll(px, i, axis=1)).save(distinct[-1])

        def call(endpoint: str, files: list[str], i: int) -> float:
            start = time.perf_counter()
            path = files[i % len(files)]
            try:
                if endpoint == "/batch":
                    table, _ = client.predict([handle_file(path)] * 2, api_name="/batch")
                    bad = [r for r in table["data"] if str(r[1]).startswith("error")]
                    if bad:
                        errors.append(f"{endpoint} call {i}: {bad[0]}")
                else:
                    result = client.predict(handle_file(path), api_name=endpoint)
                    if endpoint == "/predict" and (not isinstance(result, dict) or "label" not in result):
                        errors.append(f"{endpoint} call {i}: unexpected result {result!r:.100}")
            except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
                errors.append(f"{endpoint} call {i}: {exc.__class__.__name__}: {exc}")
            return time.perf_counter() - start

        phases = {}
        for endpoint in ("/predict", "/explain", "/batch"):
            for kind, files in (("identical", [images[0]]), ("distinct", [str(p) for p in distinct])):
                start = time.perf_counter()
                with ThreadPoolExecutor(max_workers=args.concurrent) as pool:
                    times = list(pool.map(lambda i, e=endpoint, f=files: call(e, f, i), range(args.concurrent)))
                phases[f"{endpoint} {kind}"] = {"wall_s": round(time.perf_counter() - start, 2), **_percentiles(times)}
        sequential = [call("/predict", images, i) for i in range(args.sequential)]
        sampling.set()
        sampler.join()
        rss_after = _rss_mib(server.pid)
        time.sleep(122.0)  # the upload TTL (120 s) and one sweep
        public = {digest(p) for p in [*images, adapter.parent / "curves.png"] if Path(p).is_file()}
        left = [str(p) for p in temp.rglob("*") if p.is_file() and p.stat().st_size and digest(p) not in public]
        report = {
            "adapter": str(adapter),
            "concurrent_calls": args.concurrent,
            "phases": phases,
            "sequential": {"calls": args.sequential, **_percentiles(sequential)},
            "errors": len(errors),
            "first_errors": errors[:3],
            "rss_mib_before": round(rss_before, 1),
            "rss_mib_after": round(rss_after, 1),
            "rss_mib_peak": round(peak[0], 1),
            "uploads_left_in_cache": left,
        }
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
    report["cache_removed_on_exit"] = not any(p.is_file() for p in temp.rglob("*"))
    shutil.rmtree(temp, ignore_errors=True)
    for path in temp.parent.glob(f"{temp.name}-in-*.png"):
        path.unlink()
    print(json.dumps(report, indent=1))
    return 0 if not errors and not left else 1


if __name__ == "__main__":
    raise SystemExit(main())
