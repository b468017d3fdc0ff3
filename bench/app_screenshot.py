"""Open the demo in a real headless Chromium, classify an example, and save a screenshot.

    python bench/app_screenshot.py --adapter ../main/runs/pneumonia-deer/adapter --out docs/app.png

serves the adapter on loopback, drives Debian's ``chromium`` through the Chrome DevTools Protocol
(a websocket; no extra driver), clicks an example the way a user does (mouse events at its
position), waits for the decision and the heatmap, and writes a full-page PNG. The README's
``docs/app.png`` comes from this script; ``tests/test_app.py`` runs the same steps on a tiny model.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome binary on PATH, or None."""
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


class Chromium:
    """A headless Chromium process and one page, driven over the DevTools websocket."""

    def __init__(self, binary: str, width: int = 1280, height: int = 900, timeout_s: float = 60.0) -> None:
        self.profile = tempfile.mkdtemp(prefix="deer-chromium-")
        flags = ["--headless=new", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
                 "--disable-extensions", "--disable-background-networking", "--disable-dev-shm-usage",
                 "--hide-scrollbars", "--remote-debugging-port=0", f"--user-data-dir={self.profile}",
                 f"--window-size={width},{height}"]  # fmt: skip
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            flags.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        self.proc = subprocess.Popen([binary, *flags, "about:blank"], **quiet)
        self._ids = itertools.count(1)
        self.width, self.height = width, height
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.time() + timeout_s
        while not (port_file.is_file() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.time() > deadline:
                self.close()
                raise RuntimeError(f"{binary} did not start (exit code {self.proc.returncode})")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        pages = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
        page = next(p for p in pages if p.get("type") == "page")
        from websockets.sync.client import connect

        self.ws = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=timeout_s).__enter__()
        self.call("Page.enable")
        self.call("Emulation.setDeviceMetricsOverride",
                  width=width, height=height, deviceScaleFactor=1, mobile=False)  # fmt: skip

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one DevTools command and return its result (events in between are skipped)."""
        msg_id = next(self._ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self.ws.recv(timeout=120))
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def js(self, expression: str) -> Any:
        """Evaluate JavaScript in the page; the value (JSON-serialisable)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"JavaScript error: {result['exceptionDetails'].get('text')}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout_s: float, what: str) -> Any:
        """Poll a JavaScript expression until it is truthy; its value. On timeout the error quotes the page's
        error toasts, if any."""
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.25)
        toasts = self.js(
            "[...document.querySelectorAll('[data-testid=\"toast-body\"], .toast-body')]"
            ".map(t => t.innerText.replace(/\\s+/g, ' ')).join(' | ')"
        )
        page = self.js("document.body.innerText.replace(/\\s+/g, ' ').slice(0, 400)")
        raise TimeoutError(
            f"timed out after {timeout_s:.0f} s waiting for {what}; page errors: {toasts or 'none'}; page: {page}"
        )

    def click_text(self, text: str, timeout_s: float = 30.0) -> None:
        """Click (mouse press and release at its centre) the innermost visible element whose text is `text`."""
        find = (
            "(() => { const hits = [...document.querySelectorAll('button, td, div, span')]"
            f".filter(e => e.innerText && e.innerText.trim() === {json.dumps(text)} && e.offsetParent !== null);"
            " if (!hits.length) return null; const e = hits[hits.length - 1];"
            " e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect();"
            " return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        x, y = self.wait_for(find, timeout_s, f"an element with text {text!r}")
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def screenshot(self, out: Path) -> tuple[int, int]:
        """Full-page PNG at `out`; (width, height) in px."""
        self.js("window.scrollTo(0, 0)")
        size = self.call("Page.getLayoutMetrics")["cssContentSize"]
        height = int(min(max(size["height"], self.height), 6000))
        self.call("Emulation.setDeviceMetricsOverride",
                  width=self.width, height=height, deviceScaleFactor=1, mobile=False)  # fmt: skip
        time.sleep(0.5)  # let the page re-layout at the new height
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(base64.b64decode(data))
        return self.width, height

    def close(self) -> None:
        ws = getattr(self, "ws", None)
        if ws is not None:
            ws.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def classify_example_in_browser(
    url: str, example_label: str, out: Path, binary: str | None = None, timeout_s: float = 180.0
) -> dict[str, Any]:
    """Load the demo at `url`, click the example named `example_label`, wait for the result, screenshot to `out`.

    Returns what the page showed: the decision text, the top label, whether the heatmap image loaded,
    and the screenshot's size.
    """
    binary = binary or find_chromium()
    if binary is None:
        raise FileNotFoundError(f"no Chromium found on PATH (looked for {', '.join(BROWSERS)})")
    with Chromium(binary) as browser:
        browser.call("Page.navigate", url=url)
        browser.wait_for(
            "document.readyState === 'complete' && !!document.querySelector('#classify')",
            timeout_s,
            "the demo page to render",
        )
        find_decision = (
            "(() => { const e = [...document.querySelectorAll('.decision')]"
            ".find(d => d.innerText.includes('Decision')); return e ? e.innerText : null; })()"
        )
        deadline = time.time() + timeout_s
        while True:  # a click that lands before the page's scripts are wired is lost: click again
            browser.click_text(example_label)
            try:
                decision = browser.wait_for(find_decision, min(30.0, max(deadline - time.time(), 1.0)), "the decision")
                break
            except TimeoutError:
                if time.time() > deadline:
                    raise
        heatmap = browser.wait_for(
            "(() => { const imgs = [...document.querySelectorAll('img')].filter(i => i.complete && "
            "i.naturalWidth >= 320); return imgs.length; })()",  # 320 px overlay (+ its colour scale)
            timeout_s,
            "the heatmap image",
        )
        top = browser.js(
            "(() => { const e = document.querySelector('[data-testid=\"label-output-value\"]');"
            " return e ? e.innerText : null; })()"
        )
        size = browser.screenshot(out)
    return {"decision": decision, "label": top, "heatmaps": heatmap, "size": size}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="RUN_DIR/adapter to serve")
    parser.add_argument("--out", default="docs/app.png", help="screenshot path (default: %(default)s)")
    parser.add_argument("--example", type=int, default=-1, help="index of the run's example to click (default: last)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from peft_deer.demo.predict import load_classifier
    from peft_deer.demo.ui import build_demo, close, launch

    clf = load_classifier(args.adapter)
    if not clf.examples:
        print(f"app_screenshot: error: {args.adapter} has no examples/ to click", file=sys.stderr)
        return 1
    example = clf.examples[args.example]
    demo = build_demo([clf])
    launch(demo, port=None, prevent_thread_lock=True)
    try:
        label = f"true label: {example.class_name} ({example.path.name})"
        shown = classify_example_in_browser(demo.local_url, label, Path(args.out))
    finally:
        close(demo)
    print(json.dumps({"example": example.path.name, "true_class": example.class_name, **shown}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
