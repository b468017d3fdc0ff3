"""The light boundary, run: every repository entry point with torch, transformers and PEFT blocked (a
`sys.meta_path` finder in a sitecustomize that raises ImportError naming the module and logs the attempt)
reports bad input with its usual one-line error, and never tries to import them.

The source side (each module of `peft_deer.light_import.LIGHT_MODULES` imports only the standard library,
`LIGHT_THIRD_PARTY` and other listed modules) is checked in tests/test_layout.py."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import ROOT

pytestmark = pytest.mark.e2e  # starts subprocesses (about 0.5 s each)

BLOCKED = ("torch", "transformers", "peft")
BLOCKER = textwrap.dedent(
    f"""
    import os, sys

    class _Blocked:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in {BLOCKED!r}:
                with open(os.environ["BLOCK_LOG"], "a") as log:
                    log.write(name + "\\n")
                raise ImportError(f"{{name}} is blocked by the light-boundary test")
            return None

    sys.meta_path.insert(0, _Blocked())
    """
)
# `deer-audit`'s console script, `peft_deer.extras.deer_audit`, with the package's `__init__` (the registration with
# PEFT, which the wrapper's `from peft_deer.extras import` runs and which needs torch) not run, so that only what
# the command itself imports counts.
AUDIT = textwrap.dedent(
    """
    import importlib.util, sys
    spec = importlib.util.spec_from_file_location("peft_deer", "peft_deer/__init__.py",
                                                  submodule_search_locations=["peft_deer"])
    sys.modules["peft_deer"] = importlib.util.module_from_spec(spec)  # the package, its __init__ not run
    from peft_deer.extras import deer_audit
    sys.exit(deer_audit(sys.argv[1:]))
    """
)


def run_blocked(tmp_path: Path, *args: str, blocker: str = BLOCKER) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run `python *args` in the repository with the blocker installed; the result and the blocked attempts."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(blocker)
    log = tmp_path / "blocked.log"
    log.write_text("")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(ROOT)]), BLOCK_LOG=str(log))
    env.update(HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    return out, log.read_text().split()


def test_the_blocker_blocks_and_logs(tmp_path):
    """Without this the tests below would pass with no block at all."""
    out, attempts = run_blocked(tmp_path, "-c", "import peft_deer")  # registers DEER_LORA with PEFT: peft, torch
    assert out.returncode == 1 and "ImportError: peft is blocked by the light-boundary test" in out.stderr
    assert attempts[0] == "peft"
    for name in BLOCKED:
        out, attempts = run_blocked(tmp_path, "-c", f"import {name}")
        assert (out.returncode, attempts) == (1, [name]), out.stderr[-300:]


@pytest.mark.parametrize(
    ("args", "returncode", "message"),
    [
        (["train/fed.py", "--num-clients", "0"], 2, "deer-fed: error: --num-clients 0 must be >= 1"),
        (["train/fed.py", "--no-such-flag"], 2, "deer-fed: error: unrecognized arguments: --no-such-flag"),
        (["-m", "app", "--adapter", "/missing"], 1, "deer-app: error: adapter directory not found: /missing"),
        (["-c", AUDIT, "--noise-multiplier", "x"], 2, "deer-audit: error: argument --noise-multiplier"),
        (["bench/campaign.py", "--grid", "/missing.yaml", "--out", "x"], 2, "campaign: error: grid /missing.yaml"),
    ],
    ids=["fed-bad-value", "fed-bad-flag", "app-missing-adapter", "audit-bad-value", "campaign-missing-grid"],
)
def test_bad_input_is_one_line_before_torch(tmp_path, args, returncode, message):
    out, attempts = run_blocked(tmp_path, *args)
    assert attempts == [], f"tried to import {attempts}: {out.stderr[-400:]}"
    assert out.returncode == returncode, out.stderr[-600:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), out.stderr[-600:]


@pytest.mark.parametrize(
    "args",
    [["train/fed.py", "--help"], ["-c", AUDIT, "--help"], ["bench/campaign.py", "--help"]],
    ids=["fed", "audit", "campaign"],
)
def test_help_without_torch(tmp_path, args):
    out, attempts = run_blocked(tmp_path, *args)
    assert (out.returncode, attempts) == (0, []), out.stderr[-600:]
    assert out.stdout.startswith("usage:")


def test_the_flower_clientapp_imports_without_torch(tmp_path):
    """Flower starts a ClientApp process per message: it must not pay for torch (its work is in the site worker)."""
    code = "import peft_deer_clientapp, sys; assert 'peft_deer' not in sys.modules; print(peft_deer_clientapp.app)"
    out, attempts = run_blocked(tmp_path, "-c", code)
    assert (out.returncode, attempts) == (0, []), out.stderr[-600:]
