"""The README and the docs quickstart match the code: their snippets run, and every shell command in them parses
(`train/fed.py` / `deer-fed` flags through the real settings parser; every other program exists and answers
`--help`)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import numpy as np
import pytest
from helpers import MEDMNIST_DIR, ROOT

COMMAND_PAGES = ("README.md", "docs/quickstart.md")  # every shell command in these must parse
SHELL_BUILTINS = {"export", "cd", "source", ".", "set", "unset", "echo", "printf", "mkdir", "pip", "git"}
FED_ENTRY_POINTS = ("train/fed.py", "deer-fed")


def which(program: str) -> str | None:
    """`program` on PATH or beside this interpreter (a venv's console scripts, also when it is not activated)."""
    return shutil.which(program, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))


def _blocks(language: str, page: str = "README.md") -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", (ROOT / page).read_text(), flags=re.S)


def shell_commands(markdown: str) -> list[list[str]]:
    """The simple commands of a Markdown text's ```bash blocks, as argv lists: continuation lines joined,
    comments dropped, `$PWD` expanded to the repository root, split at `&&`, `;`, `|`; a redirection and its
    target dropped, leading `NAME=value` assignments skipped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            lexer = shlex.shlex(line.replace("$PWD", str(ROOT)), posix=True, punctuation_chars=";&|>")
            lexer.whitespace_split, lexer.commenters = True, "#"
            current: list[str] = []
            tokens = list(lexer)
            skip_next = False
            for token in [*tokens, ";"]:
                if skip_next:
                    skip_next = False
                elif token in (";", "&&", "|", "||", "&"):
                    while current and re.fullmatch(r"[A-Z_]+=.*", current[0]):
                        current.pop(0)
                    commands += [current] if current else []
                    current = []
                elif token in (">", ">>"):
                    skip_next = True
                else:
                    current.append(token)
    return commands


def fed_arguments(argv: list[str]) -> list[str] | None:
    """The driver's arguments if `argv` runs `train/fed.py` / `deer-fed` (directly, with python, or through
    `accelerate launch` / `torchrun`), else None."""
    for i, token in enumerate(argv):
        if token in FED_ENTRY_POINTS or token.endswith("/fed.py"):
            return argv[i + 1 :]
        if i == 0 and token not in ("python", "accelerate", "torchrun"):
            return None
    return None


def command_problem(argv: list[str]) -> str | None:
    """Why `argv` would not run as documented (a flag the settings parser refuses, a missing program, module or
    script), or None."""
    from peft_deer.settings import parse_args

    args = fed_arguments(argv)
    if args is not None:
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # `--help` prints the flags and exits 0
                parse_args(args)
        except SystemExit as stop:
            if stop.code not in (0, None):
                return f"{shlex.join(argv)}: the settings parser refuses it (exit {stop.code})"
        return None
    program = argv[0]
    if program == "bash":
        script = ROOT / argv[1]
        if not script.is_file() or subprocess.run(["bash", "-n", str(script)]).returncode != 0:
            return f"{shlex.join(argv)}: {argv[1]} is not a bash script here"
        return None
    if program == "python":
        if argv[1] == "-m":
            if importlib.util.find_spec(argv[2]) is None:
                return f"{shlex.join(argv)}: no module {argv[2]}"
        elif not (ROOT / argv[1]).is_file():
            return f"{shlex.join(argv)}: no script {argv[1]}"
        return None
    if program in SHELL_BUILTINS:
        return None
    if which(program) is None:
        return f"{shlex.join(argv)}: program {program} not found"
    return None


def help_command(argv: list[str]) -> list[str] | None:
    """The `--help` call that shows `argv`'s program exists and answers (None: a builtin, a script or a fed run,
    checked by `command_problem`)."""
    if fed_arguments(argv) is not None or argv[0] in SHELL_BUILTINS or argv[0] == "bash":
        return None
    if argv[0] == "python":
        return [sys.executable, *argv[1:3], "--help"] if argv[1] == "-m" else [sys.executable, argv[1], "--help"]
    if argv[0] == "flwr":  # a command group: its subcommand answers --help
        return [which("flwr") or "flwr", argv[1], "--help"]
    return [which(argv[0]) or argv[0], "--help"]


def _documented_commands() -> list[list[str]]:
    return [c for page in COMMAND_PAGES for c in shell_commands((ROOT / page).read_text())]


@pytest.mark.e2e
def test_every_documented_command_parses(monkeypatch):
    """Each shell command of the README and the quickstart: driver flags go through the real settings parser (no
    run), every other program, module or script exists."""
    monkeypatch.chdir(ROOT)  # --config paths are relative to the repository root
    commands = _documented_commands()
    assert sum(fed_arguments(c) is not None for c in commands) >= 3, commands  # the main job, the smoke test, ...
    problems = [p for p in map(command_problem, commands) if p]
    assert problems == []


@pytest.mark.e2e
def test_a_planted_bad_flag_or_program_fails_the_check(monkeypatch):
    monkeypatch.chdir(ROOT)
    fake = (
        "```bash\npython train/fed.py --model tiny-vit --num-clients 2 \\\n    --no-such-flag 3  # planted\n"
        "accelerate launch --cpu train/fed.py --rounds -1\nno-such-program-xyz --run\npython -m no_such_module_xyz\n"
        "deer-fed --dp client --delta 1e-5 --epsilon 8\n```\n"
    )
    commands = shell_commands(fake)
    assert len(commands) == 5, commands
    problems = [command_problem(c) for c in commands]
    assert [p is not None for p in problems] == [True, True, True, True, False], problems


@pytest.mark.e2e
def test_every_documented_program_answers_help():
    """Every program of the README and the quickstart (but the driver runs, whose flags are parsed above) answers
    `--help` with exit code 0."""
    calls = {tuple(h) for h in map(help_command, _documented_commands()) if h}
    assert calls, "no program to check"
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    for call in sorted(calls):
        done = subprocess.run(list(call), cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "usage" in (done.stdout + done.stderr).lower(), (call, done.stderr[-500:])


def test_readme_library_snippet_runs(tmp_path, monkeypatch):
    """The README's PEFT example runs as written: after `set_deer_phase("A")` only lora_A and the head train."""
    snippet = next(b for b in _blocks("python") if "DeerLoraConfig" in b)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    trainable = {n for n, p in namespace["model"].named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "modules_to_save" in n for n in trainable)
    assert any("lora_A" in n for n in trainable)
    assert (tmp_path / "adapter-lora" / "adapter_config.json").is_file()


def test_library_guide_example_runs(tmp_path, monkeypatch):
    """The library guide's full example runs as written, without a single UserWarning (PEFT's "multiple
    adapters" warning came from loading the saved adapter onto the base model that already held it)."""
    snippet = next(b for b in _blocks("python", "docs/guides/library.md") if "DeerLoraConfig" in b)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(snippet, "docs/guides/library.md", "exec"), namespace)
    user_warnings = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert user_warnings == []
    again = namespace["again"]
    trainable = {n for n, p in again.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "modules_to_save" in n for n in trainable)
    assert (tmp_path / "adapter-lora" / "adapter_config.json").is_file()


def test_main_job_config_parses_and_states_an_honest_guarantee():
    """The README's main job: its config passes deer-fed's own checks and keeps a real DP guarantee
    (epsilon <= 8, delta <= 1e-5, noise from the OS secret, not the seed)."""
    from peft_deer.settings import parse_args

    args = parse_args(["--config", str(ROOT / "train" / "configs" / "pneumonia_deer.yaml")])
    assert args.privacy.dp == "record" and args.record.record_epsilon <= 8 and args.record.record_delta <= 1e-5
    assert not args.privacy.reproducible_noise and args.federation.method == "deer" and args.data.train_subset is None
    assert "train/configs/pneumonia_deer.yaml" in (ROOT / "README.md").read_text()


@pytest.mark.e2e
def test_the_flower_config_step_can_be_pasted_twice(tmp_path):
    """The README's Flower config step writes a private FLWR_HOME's config.toml (overwrites it): pasting it twice
    still leaves valid TOML (appending to ~/.flwr/config.toml twice gave a duplicate table), and `flwr run` is
    pointed at that FLWR_HOME."""
    block = next(b for b in _blocks("bash") if "config.toml" in b)
    step = next(line for line in block.splitlines() if "config.toml" in line and not line.startswith("#"))
    run = next(line for line in block.splitlines() if "flwr run" in line)
    home = re.search(r"FLWR_HOME=\$PWD/(\S+)", run)
    assert home is not None, run
    for _ in range(2):
        subprocess.run(["bash", "-c", step], cwd=tmp_path, env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
                       check=True)  # fmt: skip
    config = tomllib.loads((tmp_path / home.group(1) / "config.toml").read_text())
    connection = run.split("flwr run . ")[1].split()[0]
    assert config["superlink"][connection] == {"address": "127.0.0.1:9093", "insecure": True}


def test_readme_counts_the_training_images_the_data_has():
    path = MEDMNIST_DIR / "pneumoniamnist.npz"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    n = len(np.load(path)["train_labels"])
    text = (ROOT / "README.md").read_text()
    assert f"({n:,} images)" in text


def test_readme_install_commands_name_every_extra_a_command_needs():
    """Each extra a command checks (peft_deer.extras) has its own `pip install -e ".[extra]"` line in the README,
    and every extra the README installs exists in pyproject.toml."""
    from peft_deer.extras import EXTRA_MODULES

    text = (ROOT / "README.md").read_text()
    installed = {x for group in re.findall(r'pip install -e "\.\[([a-z,]+)\]"', text) for x in group.split(",")}
    defined = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    assert set(EXTRA_MODULES) <= installed <= defined, (installed, defined)
