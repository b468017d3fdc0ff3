"""The output dir: a file or an unwritable path is one line, settings are checked before it is touched, and
every state it can be in (staged, unfinished, finished, legacy, foreign) gets the same hint from every command.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import assert_nothing_written, assert_one_line_error, run_fed_main, tiny_fed_argv

from peft_deer.run.run_dir import CHECKPOINT, staging_dir
from train import fed

pytestmark = pytest.mark.usefixtures("one_thread")


def test_output_dir_that_is_a_file_or_cannot_be_created(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, fragments in (
        (afile, ("is a file, not a directory",)),
        (afile / "sub", ("cannot be created", "is a file")),
        (Path("/proc/no-such-dir/run"), ("cannot be created in /proc", "choose a writable directory")),
    ):
        code, lines = run_fed_main(tiny_fed_argv(out), capsys)
        assert code == 2
        assert_one_line_error(code, lines, *fragments)
    assert afile.read_text() == "x"


def test_invalid_settings_are_found_before_the_output_dir(tmp_path, medmnist_dir, capsys):
    out = tmp_path / "run"
    code, lines = run_fed_main(tiny_fed_argv(out, "--image-size", "5"), capsys)
    assert_one_line_error(code, lines, "--image-size 5 is smaller than tiny-vit's patch size 7 px; use at least 7")
    assert_nothing_written(out)
    # nothing to resume and nothing to overwrite: a plain rerun with good settings just runs
    assert run_fed_main(tiny_fed_argv(out, "--image-size", "14"), capsys)[0] == 0
    assert (out / "summary.json").is_file() and not staging_dir(out).exists()


def test_hints_agree_on_every_state_of_the_output_dir(tmp_path, medmnist_dir, capsys, monkeypatch):
    out = tmp_path / "run"
    # 1. a run that dies in its first phase (before any checkpoint) leaves no output dir, only its staging
    import peft_deer.run.simulation as simulation

    def die(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(simulation, "simulated_release", lambda *a, **k: die)
    assert fed.main(tiny_fed_argv(out, "--rounds", "2")) == 130  # Ctrl-C: one line, exit 130, no traceback
    assert "interrupted" in capsys.readouterr().err
    monkeypatch.undo()
    assert not out.exists() and staging_dir(out).is_dir()
    # ... so --resume starts it from the beginning, and so would a plain rerun
    code, _ = run_fed_main(tiny_fed_argv(out, "--rounds", "2", "--resume", "--max-phases", "1"), capsys)
    assert code == 0 and (out / CHECKPOINT).is_file() and not staging_dir(out).exists()
    # 2. unfinished: a rerun says --resume or --overwrite, and --resume works
    code, lines = run_fed_main(tiny_fed_argv(out, "--rounds", "2"), capsys)
    assert_one_line_error(code, lines, "holds an unfinished run; pass --resume to continue it or --overwrite")
    assert run_fed_main(tiny_fed_argv(out, "--rounds", "2", "--resume"), capsys)[0] == 0
    # 3. finished: both say --overwrite
    for extra in ([], ["--resume"]):
        code, lines = run_fed_main(tiny_fed_argv(out, "--rounds", "2", *extra), capsys)
        assert_one_line_error(code, lines, "holds a finished run", "pass --overwrite to replace it")
    # 4. a directory from an older version that stopped before its first checkpoint: both say --overwrite
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "metrics.jsonl").write_text("")
    for extra in ([], ["--resume"]):
        code, lines = run_fed_main(tiny_fed_argv(legacy, *extra), capsys)
        assert_one_line_error(code, lines, "stopped before its first checkpoint", "pass --overwrite to start it again")
    # 5. someone else's directory is never offered for deletion
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    for extra in ([], ["--resume"], ["--overwrite"]):
        code, lines = run_fed_main(tiny_fed_argv(foreign, *extra), capsys)
        assert_one_line_error(code, lines, "is not empty and holds no peft_deer run; choose another --output-dir")
    assert (foreign / "notes.txt").read_text() == "keep me"
