"""Packaging: the PEFT method runs on the core dependencies alone, every command names the extra it misses in one
line, the extras in pyproject.toml match what the code checks, and the installed versions satisfy the pins."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions, version

import pytest
from helpers import ROOT
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from peft_deer.extras import EXTRA_INCLUDES, EXTRA_MODULES, PACKAGE, extra_modules

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
CORE = {"torch", "peft", "transformers", "safetensors", "numpy"}
# Modules of the extras that a core dependency itself requires (peft: accelerate, pyyaml, tqdm; transformers: pyyaml,
# tqdm), so they are there whenever the core is: the blocker leaves them importable.
PULLED_IN_BY_CORE = {"accelerate", "yaml", "tqdm"}
EVERY_EXTRA_MODULE = {m for extra in EXTRA_MODULES for m in extra_modules(extra)}


def _blocker(modules: set[str]) -> str:
    """Python source that makes `modules` look not installed: None in sys.modules is what the import system reports
    for a missing module (`import x` raises ModuleNotFoundError, `importlib.util.find_spec("x")` gives None, so
    transformers' availability probes say "not installed" instead of crashing)."""
    return f"import sys\nfor _name in {sorted(modules)!r}:\n    sys.modules[_name] = None\n"


def _python(code: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip


CORE_ONLY_SCRIPT = """
import json, sys, tempfile, warnings
import torch
from peft import PeftModel, get_peft_model
from transformers import ViTConfig, ViTForImageClassification
import peft_deer
from peft_deer import DeerLoraConfig, export_lora_adapter
from peft_deer.extras import missing_extra_message

def base():
    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, image_size=14, patch_size=7, num_channels=1, num_labels=2))

config = DeerLoraConfig(r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"], phase="B")
model = get_peft_model(base(), config)
with torch.no_grad():
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.normal_()  # a non-zero adapter, so that loading it changes the output
x = torch.randn(2, 1, 14, 14)
model.eval()
out = model(pixel_values=x).logits
out_dir = tempfile.mkdtemp()
model.save_pretrained(out_dir)
again = PeftModel.from_pretrained(base(), out_dir).eval()
export_lora_adapter(out_dir, out_dir + "-lora")
try:
    import gradio
    blocked = False
except ModuleNotFoundError:
    blocked = True
print(json.dumps({
    "max_diff": float((again(pixel_values=x).logits - out).abs().max()),
    "changed": float((base()(pixel_values=x).logits - out).abs().max()),
    "peft_type": str(again.peft_config["default"].peft_type),
    "gradio_blocked": blocked,
    "demo_message": missing_extra_message("demo"),
    "loaded": sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED and sys.modules[m] is not None),
}))
"""


@pytest.mark.e2e
def test_the_peft_method_runs_with_only_the_core_dependencies():
    """get_peft_model + save + load + export on a tiny model with gradio, opacus, datasets, onnx, flwr (and every
    other extra's module the core does not pull in itself) made uninstalled in a fresh interpreter."""
    blocked = EVERY_EXTRA_MODULE - PULLED_IN_BY_CORE
    assert {"gradio", "opacus", "datasets", "onnx", "flwr"} <= blocked
    code = _blocker(blocked) + f"BLOCKED = {sorted(blocked)!r}\n" + CORE_ONLY_SCRIPT
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["gradio_blocked"] and result["loaded"] == []
    assert result["peft_type"] == "DEER_LORA" and result["max_diff"] < 1e-5 and result["changed"] > 1e-4
    assert "gradio" in result["demo_message"] and f"pip install '{PACKAGE}[demo]'" in result["demo_message"]


def test_core_dependencies_are_the_peft_method_only():
    assert {canonicalize_name(Requirement(r).name) for r in PROJECT["dependencies"]} == CORE


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("command", "extra"),
    [
        ("from peft_deer.extras import deer_fed as main; main(['--help'])", "train"),
        ("from peft_deer.extras import deer_audit as main; main(['--help'])", "train"),
        ("from peft_deer.extras import deer_app as main; main(['--adapter', 'nowhere'])", "demo"),
        ("from peft_deer.extras import deer_build_dinov2 as main; main(['--help'])", "backbones"),
        ("import runpy; sys.argv = ['train/fed.py', '--help']; runpy.run_path('train/fed.py', run_name='__main__')",
         "train"),
        ("import runpy; sys.argv = ['app', '--adapter', 'x']; runpy.run_module('app', run_name='__main__')", "demo"),
    ],
)  # fmt: skip
def test_a_command_without_its_extra_says_which_extra_in_one_line(command, extra):
    """Each console script (and the repository's train/fed.py and python -m app) with one module of its extra made
    uninstalled: exit 1, one line on stderr naming the module and `pip install 'peft-deer[<extra>]'`."""
    missing = next(m for m in EXTRA_MODULES[extra] if m not in PULLED_IN_BY_CORE)
    proc = _python(_blocker({missing}) + command, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-2000:]
    assert missing in lines[0] and f"pip install '{PACKAGE}[{extra}]'" in lines[0]


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("module", "prog", "extra", "missing"),
    [
        ("peft_deer.audit", "deer-audit", "train", "opacus"),
        ("peft_deer.audit", "deer-audit", "train", "scipy"),
        ("peft_deer.flower.local", "deer-flower", "flower", "flwr"),
        ("peft_deer.flower.local", "deer-flower", "flower", "opacus"),
    ],
)
def test_python_m_entry_points_check_their_extra_in_one_line(module, prog, extra, missing):
    """Attack item 6b: `python -m peft_deer.audit --help` / `python -m peft_deer.flower.local --help` with a module
    of the extra blocked: one line naming it (as the console scripts), not a ModuleNotFoundError traceback."""
    command = f"import runpy; sys.argv = ['{module}', '--help']; runpy.run_module('{module}', run_name='__main__')"
    proc = _python(_blocker({missing}) + command, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0] == f"{prog}: error: {missing} not installed; pip install '{PACKAGE}[{extra}]'"


def test_every_console_script_checks_an_extra_that_pyproject_defines():
    import peft_deer.extras as extras

    for name, target in PROJECT["scripts"].items():
        module, _, function = target.partition(":")
        assert module == "peft_deer.extras" and function == name.replace("-", "_")
        assert f"'{PACKAGE}[" in getattr(extras, function).__doc__
    assert set(EXTRA_MODULES) <= set(PROJECT["optional-dependencies"])


def test_the_extras_in_pyproject_provide_exactly_the_modules_the_commands_check():
    """pyproject's extras and `peft_deer.extras.EXTRA_MODULES` name the same distributions (via the installed
    module -> distribution table), and the same included extras."""
    dists_of = {m: {canonicalize_name(d) for d in ds} for m, ds in packages_distributions().items()}
    for extra, modules in EXTRA_MODULES.items():
        requirements = [Requirement(r) for r in PROJECT["optional-dependencies"][extra]]
        own = {canonicalize_name(r.name) for r in requirements if canonicalize_name(r.name) != PACKAGE}
        included = {x for r in requirements if canonicalize_name(r.name) == PACKAGE for x in r.extras}
        assert included == set(EXTRA_INCLUDES.get(extra, ())), extra
        assert {d for m in modules for d in dists_of.get(m, {m})} == own, extra


def test_installed_versions_satisfy_the_pins_ci_installs():
    """What .ci/install installs (core + dev, train, demo, flower) satisfies every pin, the caps included."""
    install = (ROOT / ".ci" / "install").read_text()
    extras = re.search(r'-e "\.\[([a-z,]+)\]"', install).group(1).split(",")
    assert {"train", "demo", "flower", "dev"} <= set(extras)
    requirements = [Requirement(r) for r in PROJECT["dependencies"]]
    requirements += [Requirement(r) for x in extras for r in PROJECT["optional-dependencies"][x]]
    for req in requirements:
        if canonicalize_name(req.name) != PACKAGE:
            assert req.specifier.contains(version(req.name), prereleases=True), f"{req} vs {version(req.name)}"


def test_flwr_is_capped_below_its_next_minor():
    """The Flower app patches SecAgg+ internals of one flwr minor: the pin must name that minor's upper bound."""
    (flwr,) = [Requirement(r) for r in PROJECT["optional-dependencies"]["flower"] if r.startswith("flwr")]
    upper = [s for s in flwr.specifier if s.operator == "<"]
    assert len(upper) == 1 and not flwr.specifier.contains("1.43.0") and flwr.specifier.contains(version("flwr"))


def test_help_lists_the_dp_choices_once():
    from peft_deer.settings import build_parser
    from peft_deer.settings.groups import DP_LEVELS

    text = build_parser().format_help()
    shown = re.findall(r"--dp \{([^}]*)\}", text)
    assert len(shown) == 2  # usage and the option's own line
    for choices in shown:
        assert choices.split("|") == list(DP_LEVELS)
    # argparse's own rendering joins the choices with "," and so lists "client" and "record" twice
    for group in re.findall(r"\{([^}]*)\}", text):
        parts = group.split("|") if "|" in group else group.split(",")
        assert len(parts) == len(set(parts)), group


# ----------------------------------------------------------------------------- the patched flwr internals

PATCHED = "pseudo_rand_gen"  # flwr's SecAgg+ mask generator; flower/mask_hardening.harden_secaggplus_masks replaces it
DEFINED_IN = "flwr.common.secure_aggregation.secaggplus_utils"


def _flwr_references(name: str) -> dict[str, list[str]]:
    """Every module of the installed flwr that defines or refers to `name`: {module: ["line N: how", ...]}, by its
    AST (its definition, an import of it under any alias, a bare use of it or of an alias, an attribute `.name`)."""
    import ast
    import importlib.util

    root = __import__("pathlib").Path(importlib.util.find_spec("flwr").origin).parent
    found: dict[str, list[str]] = {}
    for path in sorted(root.rglob("*.py")):
        module = ".".join(("flwr", *path.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")
        tree = ast.parse(path.read_text(encoding="utf-8"))
        aliases = {name}
        hits = []
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if alias.name == name:
                        aliases.add(alias.asname or alias.name)
                        hits.append(f"line {node.lineno}: imported as {alias.asname or alias.name}")
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name == name:
                hits.append(f"line {node.lineno}: defined")
            elif isinstance(node, ast.Name) and node.id in aliases:
                hits.append(f"line {node.lineno}: uses {node.id}")
            elif isinstance(node, ast.Attribute) and node.attr == name:
                hits.append(f"line {node.lineno}: attribute .{name}")
        if hits:
            found[module] = hits
    return found


def test_the_mask_patch_covers_every_call_site_in_the_installed_flwr():
    """harden_secaggplus_masks rebinds the module-level `pseudo_rand_gen` of the modules that call it. A flwr that
    calls it from another module, through an alias or as an attribute would silently keep the 32-bit-seeded masks:
    this scan of flwr's own source fails then (so does a newer flwr that moves it), before any run does."""
    import importlib

    from peft_deer.flower.mask_hardening import harden_secaggplus_masks, keyed_masks

    harden_secaggplus_masks()  # what the ClientApp does at import and the SecAgg+ server before each phase
    references = _flwr_references(PATCHED)
    defined = any("defined" in h for h in references.get(DEFINED_IN, []))
    assert defined, f"{PATCHED} is no longer in {DEFINED_IN}: review the patch before raising the cap"
    callers = {m: hits for m, hits in references.items() if any("uses" in h for h in hits)}
    assert callers, "no call site found: the scan is broken"
    uncovered = {}
    for module, hits in references.items():
        if any("attribute" in h or ("imported as" in h and not h.endswith(f"as {PATCHED}")) for h in hits):
            uncovered[module] = hits  # an attribute or an alias: rebinding the module global does not reach it
        elif module in callers and importlib.import_module(module).__dict__.get(PATCHED) is not keyed_masks:
            uncovered[module] = hits  # a caller whose module-level name was not rebound
    assert uncovered == {}, f"flwr call sites of {PATCHED} the patch does not reach: {uncovered}"
    assert set(callers) == {
        "flwr.client.mod.secure_aggregation.secaggplus_mod",
        "flwr.server.workflow.secure_aggregation.secaggplus_workflow",
    }, callers  # the two the patch names; a new one means a new flwr to review


def test_the_call_site_scan_finds_an_alias_and_an_attribute(tmp_path, monkeypatch):
    """The scanner itself: a planted module calling the function through an alias and an attribute is reported."""
    import importlib.util

    fake = tmp_path / "flwr"
    (fake / "sub").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "sub" / "__init__.py").write_text("")
    (fake / "sub" / "a.py").write_text("from x import pseudo_rand_gen as prg\nprg(1)\n")
    (fake / "sub" / "b.py").write_text("import x\nx.pseudo_rand_gen(1)\n")
    (fake / "sub" / "c.py").write_text("def f():\n    return 1\n")
    real = importlib.util.find_spec

    def find_spec(name, *args):
        if name == "flwr":
            return importlib.util.spec_from_file_location("flwr", fake / "__init__.py")
        return real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    found = _flwr_references(PATCHED)
    assert set(found) == {"flwr.sub.a", "flwr.sub.b"}
    assert "line 1: imported as prg" in found["flwr.sub.a"] and "line 2: uses prg" in found["flwr.sub.a"]
    assert found["flwr.sub.b"] == ["line 2: attribute .pseudo_rand_gen"]
