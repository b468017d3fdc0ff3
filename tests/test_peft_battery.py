"""PEFT's own generic custom-model battery, run against DEER_LORA (and plain LoRA as the control).

The battery is not copied into this repository: the installed peft version's sdist is fetched from
the package index once (`pip download --no-deps --no-binary :all: peft==<version>`), cached in
`.cache/peft-sdist/` (git-ignored), and its `tests/test_custom_models.py` runs in a subprocess with
our plugin `tests/peft_battery/deer_cases.py`, which injects the DEER_LORA cases and marks the
differences DEER_LORA has by design. If the sdist cannot be fetched or its layout is not the one the
plugin expects, this test skips with the reason (shown by `pytest -ra`).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_DIR = ROOT / "tests" / "peft_battery"
SDIST_CACHE = ROOT / ".cache" / "peft-sdist"
BATTERY = "tests/test_custom_models.py"
FETCH_TIMEOUT_S = 300
RUN_TIMEOUT_S = 900
MIN_PASSED_PER_DEER_CASE = 40  # each case runs about 55 generic tests; far fewer means the injection broke

sys.path.insert(0, str(PLUGIN_DIR))
from deer_cases import CONTROL_CASES, DEER_MARK, deer_cases  # noqa: E402

sys.path.remove(str(PLUGIN_DIR))


def fetch_sdist(version: str) -> Path:
    """The cached sdist archive of peft `version`, downloaded on first use (skips with the reason if it cannot be)."""
    archive = SDIST_CACHE / f"peft-{version}.tar.gz"
    if archive.is_file():
        return archive
    SDIST_CACHE.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", f"peft=={version}"]
    with tempfile.TemporaryDirectory(dir=SDIST_CACHE) as tmp:
        try:
            done = subprocess.run([*command, "-d", tmp], capture_output=True, text=True, timeout=FETCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.skip(f"PEFT battery not run: `{' '.join(command)}` took over {FETCH_TIMEOUT_S} s")
        fetched = Path(tmp) / archive.name
        if done.returncode != 0 or not fetched.is_file():
            lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
            pytest.skip(f"PEFT battery not run: `{' '.join(command)}` failed: {lines[-1]}")
        fetched.replace(archive)  # atomic: a half-downloaded archive is never cached
    return archive


def unpack_tests(archive: Path, version: str) -> Path:
    """Unpack the sdist's `tests/` next to the archive; returns the folder that holds `tests/`."""
    root = SDIST_CACHE / f"peft-{version}"
    if (root / BATTERY).is_file():
        return root
    prefix = f"peft-{version}/tests/"
    with tempfile.TemporaryDirectory(dir=SDIST_CACHE) as tmp, tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        if not members:
            pytest.skip(f"PEFT battery not run: {archive.name} has no {prefix} folder (sdist layout changed)")
        tar.extractall(tmp, members=members, filter="data")
        tests = Path(tmp) / prefix
        (tests / "__init__.py").touch()  # the battery imports its helpers relatively; the sdist omits this file
        (Path(tmp) / f"peft-{version}" / "pytest.ini").write_text("[pytest]\n")  # not our pyproject's settings
        shutil.rmtree(root, ignore_errors=True)
        (Path(tmp) / f"peft-{version}").replace(root)
    return root


def check_layout(root: Path) -> None:
    """Skip with the reason if the battery is not shaped as the plugin expects."""
    battery = root / BATTERY
    text = battery.read_text()
    missing = [
        s for s in ("TEST_CASES = [", "class TestPeftCustomModel", "def test_only_params_are_updated") if s not in text
    ]
    if missing or not (root / "tests" / "testing_common.py").is_file():
        pytest.skip(f"PEFT battery not run: {battery} lacks {missing or 'testing_common.py'} (layout changed)")
    if importlib.util.find_spec("diffusers") is None:
        pytest.skip("PEFT battery not run: its helpers import diffusers; pip install -e '.[dev]'")


def run_battery(root: Path, report: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, DEER_BATTERY_REPORT=str(report), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), str(PLUGIN_DIR), env.get("PYTHONPATH")) if p)
    command = [sys.executable, "-m", "pytest", BATTERY, "-p", "deer_cases", "-p", "no:cacheprovider", "-q"]
    return subprocess.run(
        [*command, "--disable-warnings", "--no-header"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )


@pytest.mark.e2e
def test_peft_custom_model_battery_passes_on_deer_lora_except_marked_differences(tmp_path, capsys):
    version = importlib.metadata.version("peft")
    root = unpack_tests(fetch_sdist(version), version)
    check_layout(root)
    report = tmp_path / "battery.json"
    done = run_battery(root, report)
    assert report.is_file(), f"the battery wrote no report (exit {done.returncode}):\n{done.stdout[-3000:]}"
    results = json.loads(report.read_text())["tests"]

    kind = {n: "DEER_LORA" if r["case"].startswith(DEER_MARK) else "LoRA control" for n, r in results.items()}
    counts = Counter((kind[n], r["outcome"]) for n, r in results.items())
    by_design = Counter(r["reason"] for r in results.values() if r["outcome"] == "xfailed")
    lines = [f"PEFT {version} custom-model battery ({len(results)} tests):"]
    lines += [
        f"  {k}: " + ", ".join(f"{o} {n}" for (k2, o), n in sorted(counts.items()) if k2 == k)
        for k in ("DEER_LORA", "LoRA control")
    ]
    lines += [f"  {n} x {reason}" for reason, n in by_design.items()]
    with capsys.disabled():
        print("\n" + "\n".join(lines))

    unexpected = {n: r for n, r in results.items() if r["outcome"] in ("failed", "error", "xpassed")}
    assert not unexpected, "unexpected results:\n" + "\n".join(
        f"{n}: {r['reason'][-400:]}" for n, r in unexpected.items()
    )
    assert done.returncode == 0, done.stdout[-3000:]
    passed = Counter(r["case"] for r in results.values() if r["outcome"] == "passed")
    for name, *_ in deer_cases():
        assert passed[name] >= MIN_PASSED_PER_DEER_CASE, f"{name}: only {passed[name]} battery tests passed"
    assert all(passed[name] >= MIN_PASSED_PER_DEER_CASE for name in CONTROL_CASES)
    assert all(reason.startswith("expected by design") for reason in by_design), by_design


def test_a_failed_fetch_skips_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "SDIST_CACHE", tmp_path)
    error = "ERROR: No matching distribution found for peft==9.9.9"
    failed = subprocess.CompletedProcess([], 1, stdout="", stderr=f"Looking in indexes: ...\n{error}\n")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(pytest.skip.Exception, match=f"pip download.*peft==9.9.9.*failed: {error}"):
        fetch_sdist("9.9.9")
    assert list(tmp_path.iterdir()) == []  # nothing half-written is cached


def test_an_unexpected_battery_layout_skips_with_the_reason(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "testing_common.py").write_text("")
    (tmp_path / BATTERY).write_text("class TestPeftCustomModel:\n    pass\n")
    with pytest.raises(pytest.skip.Exception, match="lacks.*TEST_CASES = \\[.*layout changed"):
        check_layout(tmp_path)
