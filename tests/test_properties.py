"""Property-based checks (hypothesis) that bad input never escapes as a traceback or a half-written run.

- settings: random config files (known and unknown keys, values of every YAML type, non-finite numbers,
  raw bytes), random command lines and random Flower run configs either parse into finite, validated
  settings or fail with exactly one line (`deer-fed: error: ...`, exit 2; a one-line ValueError for Flower);
- dataset loader: random truncations and bit flips of a real MedMNIST .npz either load or fail with a
  one-line ValueError naming the file; a few go through `train.fed.main`, which then either finishes a tiny
  run or fails with one line and leaves no output dir (not even its hidden staging dir).

Bounded `max_examples`, everything in-process except one short subprocess check: well under a minute.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from helpers import MEDMNIST_DIR, ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peft_deer import settings as deer_settings
from peft_deer.data import DatasetSplits, load_dataset_spec
from peft_deer.run.run_dir import staging_dir
from train import fed

PARSER = deer_settings.build_parser()
DESTS = sorted(a.dest for a in PARSER._actions if a.option_strings and a.dest not in ("help", "config"))
FLOAT_DESTS = [a.dest for a in PARSER._actions if a.type is deer_settings.finite_float]
SOURCE_NPZ = MEDMNIST_DIR / "breastmnist.npz"
QUICK = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["nan", "inf", "-inf", "1e999", "", " ", "0", "-1", "deer", "client", "last:2", "tiny-vit"]),
    st.text(max_size=12),
)
values = st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(st.text(max_size=4), scalars, max_size=2))
keys = st.one_of(st.sampled_from(DESTS), st.sampled_from(DESTS).map(lambda k: k.replace("_", "-")), st.text(max_size=8))
mappings = st.dictionaries(keys, values, max_size=5)


def _parse(argv: list[str]) -> tuple[object, list[str]]:
    """(parsed args or the exit code, stderr lines) of `fed.parse_args(argv)`."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            result = fed.parse_args(argv)
        except SystemExit as exc:
            result = exc.code
    return result, [line for line in err.getvalue().splitlines() if line.strip()]


def _check_outcome(result: object, lines: list[str]) -> None:
    if isinstance(result, int):
        assert result == 2 and len(lines) == 1 and lines[0].startswith("deer-fed: error: "), (result, lines)
    else:
        assert lines == [], lines
        for dest in FLOAT_DESTS:
            value = result.flat()[dest]
            assert value is None or math.isfinite(value), (dest, value)


@QUICK
@given(mapping=mappings)
def test_config_files_parse_or_fail_in_one_line(mapping):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run.yaml"
        path.write_text(yaml.safe_dump(mapping, allow_unicode=True))
        _check_outcome(*_parse(["--config", str(path)]))


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=200))
def test_raw_config_bytes_parse_or_fail_in_one_line(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run.yaml"
        path.write_bytes(data)
        _check_outcome(*_parse(["--config", str(path)]))


@QUICK
@given(pairs=st.lists(st.tuples(st.sampled_from(DESTS), scalars), max_size=4))
def test_command_lines_parse_or_fail_in_one_line(pairs):
    argv = []
    for dest, value in pairs:
        flag = "--" + dest.replace("_", "-")
        argv += [flag] if isinstance(value, bool) else [f"{flag}={value}"]
    _check_outcome(*_parse(argv))


@QUICK
@given(mapping=mappings)
def test_flower_run_configs_parse_or_fail_in_one_line(mapping):
    try:
        args, _ = deer_settings.from_mapping(mapping)
    except ValueError as err:
        assert str(err).strip() and "\n" not in str(err).strip(), str(err)
    else:
        for dest in FLOAT_DESTS:
            value = args.flat()[dest]
            assert value is None or math.isfinite(value), (dest, value)


# ------------------------------------------------------------------------------------------------ damaged .npz files


def _mutate(data: bytes, draw) -> bytes:
    """A truncation or 1-6 bit flips, biased towards the zip headers at both ends of the file."""
    if draw(st.booleans()):
        return data[: draw(st.integers(0, len(data) - 1))]
    out = bytearray(data)
    region = draw(st.sampled_from(["start", "end", "anywhere"]))
    lo, hi = {"start": (0, 300), "end": (len(data) - 700, len(data)), "anywhere": (0, len(data))}[region]
    for _ in range(draw(st.integers(1, 6))):
        out[draw(st.integers(lo, hi - 1))] ^= 1 << draw(st.integers(0, 7))
    return bytes(out)


@functools.cache
def _source_bytes() -> bytes:
    return SOURCE_NPZ.read_bytes()


@pytest.fixture(scope="module")
def npz_bytes():
    """The real file's bytes, behind a function: hypothesis would print a fixture's value on failure (560 kB)."""
    if not SOURCE_NPZ.is_file():
        pytest.skip(f"real MedMNIST files not found at {MEDMNIST_DIR}")
    return _source_bytes


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_npz_loads_or_fails_in_one_line(npz_bytes, data):
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "breastmnist.npz").write_bytes(_mutate(npz_bytes(), data.draw))
        try:
            splits = load_dataset_spec("medmnist:breastmnist", data_dir=tmp)
        except ValueError as err:
            message = str(err)
            assert "\n" not in message.strip(), message
            assert "breastmnist.npz" in message or "label" in message or "images" in message, message
        else:
            assert isinstance(splits, DatasetSplits)


@settings(
    max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(data=st.data())
def test_driver_on_damaged_npz_runs_or_leaves_nothing(npz_bytes, data, one_thread):
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "breastmnist.npz").write_bytes(_mutate(npz_bytes(), data.draw))
        out = Path(tmp) / "out"
        argv = [
            "--model", "tiny-vit", "--dataset", "medmnist:breastmnist", "--data-dir", tmp, "--train-subset", "40",
            "--num-clients", "2", "--rounds", "1", "--batch-size", "20", "--output-dir", str(out),
        ]  # fmt: skip
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = fed.main(argv)
        lines = [line for line in err.getvalue().splitlines() if line.startswith("deer-fed")]
        if code == 0:
            assert (out / "summary.json").is_file()
        else:
            assert len(lines) == 1 and "Traceback" not in err.getvalue(), err.getvalue()[-2000:]
            assert not out.exists() and not staging_dir(out).exists()


@pytest.mark.e2e
def test_bad_configs_as_a_script_exit_2_with_one_line(tmp_path):
    """The same contract end to end, for a few inputs the strategies above draw (one subprocess each)."""
    cases = {
        "garbage.yaml": b"\xff\xfe\x00binary",
        "nested.yaml": yaml.safe_dump({"lr": {"a": 1}}).encode(),
        "nul.yaml": yaml.safe_dump({"output_dir": "a\x00b"}).encode(),
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        proc = subprocess.run(
            [sys.executable, str(ROOT / "train" / "fed.py"), "--config", str(tmp_path / name)],
            capture_output=True, text=True, cwd=ROOT, timeout=60,
            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
        )  # fmt: skip
        assert proc.returncode == 2, (name, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("deer-fed: error: "), lines
