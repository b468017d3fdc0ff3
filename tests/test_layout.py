"""The package's shape: components as packages (no heap of modules at `peft_deer`'s top), no import cycle
inside `peft_deer`, no oversized module, no package module importing the repository-root ClientApp script, and
the light boundary (`peft_deer.light_import.LIGHT_MODULES` imports nothing heavy; tests/test_light_boundary.py
runs the entry points with torch blocked).

Rule for the future: a module that outgrows the size cap becomes a package (its concepts as modules, the
package's `__init__` saying what each holds), never a sibling module beside it at the same level.
Each check is a function of a package folder, shown to fail on a planted violation in a tiny fake tree."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
from helpers import ROOT

from peft_deer.light_import import LIGHT_MODULES, LIGHT_THIRD_PARTY

PACKAGE = ROOT / "peft_deer"
MAX_LINES = 420  # "about 400": a module past this holds more than one concept
TOP_LEVEL = {"__init__.py", "defaults.py", "methods.py", "extras.py", "light_import.py"}
ROOT_SCRIPT = "peft_deer_clientapp"  # the Flower ClientApp: the app bundle's root, not pip-installed


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The peft_deer modules `path` imports at module level (not inside functions), resolved to module names."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found.add(target if target in modules else base)
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(p) for p in paths}
    return {_module_name(p): _imports(p, modules) for p in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_inside_peft_deer():
    graph = import_graph()
    assert "peft_deer.run.lifecycle" in graph["peft_deer.run.simulation"]  # the scan resolves relative imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def oversized(package: Path) -> dict[str, int]:
    """Modules of `package` longer than MAX_LINES, with their lengths."""
    sizes = {str(p.relative_to(package.parent)): len(p.read_text().splitlines()) for p in package.rglob("*.py")}
    return {p: n for p, n in sizes.items() if n > MAX_LINES}


def top_level_heap(package: Path) -> set[str]:
    """Modules at `package`'s top beyond the few core ones: components belong in packages."""
    return {p.name for p in package.glob("*.py")} - TOP_LEVEL


def root_script_importers(package: Path) -> list[str]:
    """Modules of `package` that import the repository-root ClientApp script anywhere (also inside functions)."""
    found = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            elif isinstance(node, ast.Call) and any(isinstance(a, ast.Constant) for a in node.args):
                names = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
                names = names if getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module" else []
            if any(n.split(".")[0] == ROOT_SCRIPT for n in names):
                found.append(f"{path.relative_to(package.parent)}:{node.lineno}")
    return found


def _light_path(package: Path, name: str) -> Path:
    path = package.parent.joinpath(*name.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _module_level(tree: ast.Module):
    """The statements that run when the module is imported: not function bodies, not `if TYPE_CHECKING:`."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            todo.extend(node.orelse)
            continue
        yield node
        todo.extend(ast.iter_child_nodes(node))


def light_violations(package: Path, light: tuple[str, ...], third_party: tuple[str, ...]) -> dict[str, list[str]]:
    """For each module in `light`: what it imports at module level beyond the standard library, `third_party` and
    other `light` modules (a relative `from .. import x` imports the package `..` itself: it must be light too)."""
    top = package.name
    allowed = set(sys.stdlib_module_names) | set(third_party)
    bad: dict[str, list[str]] = {}
    for name in light:
        path = _light_path(package, name)
        if not path.is_file():
            bad[name] = ["(no such module)"]
            continue
        parent = name.rpartition(".")[0]
        if parent != top and parent not in light:
            bad.setdefault(name, []).append(f"{parent} (its package, loaded first)")
        pkg = name if path.name == "__init__.py" else parent
        for node in _module_level(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = pkg.rsplit(".", node.level - 1)[0] if node.level > 1 else pkg
                    base = f"{anchor}.{base}" if base else anchor
                targets = [base] + [f"{base}.{a.name}" for a in node.names if _light_path(package, f"{base}.{a.name}")
                                    .is_file() and base.split(".")[0] == top]  # fmt: skip
            for target in targets:
                ok = target in light if target.split(".")[0] == top else target.split(".")[0] in allowed
                if not ok:
                    bad.setdefault(name, []).append(target)
    return bad


def _fake_tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path / "pkg"


def test_no_module_is_oversized():
    assert len(list(PACKAGE.rglob("*.py"))) > 50
    assert oversized(PACKAGE) == {}


def test_the_size_check_finds_a_planted_long_module(tmp_path):
    package = _fake_tree(tmp_path, {"pkg/__init__.py": "", "pkg/sub/long.py": "x = 1\n" * (MAX_LINES + 1)})
    assert oversized(package) == {"pkg/sub/long.py": MAX_LINES + 1}


def test_no_heap_of_modules_at_the_top():
    assert top_level_heap(PACKAGE) == set()
    assert TOP_LEVEL <= {p.name for p in PACKAGE.glob("*.py")}  # the whitelist names real files


def test_the_heap_check_finds_a_planted_top_level_module(tmp_path):
    package = _fake_tree(tmp_path, {f"pkg/{n}": "" for n in TOP_LEVEL} | {"pkg/backbone_layout.py": ""})
    assert top_level_heap(package) == {"backbone_layout.py"}


def test_no_package_module_imports_the_root_script():
    assert (ROOT / f"{ROOT_SCRIPT}.py").is_file()
    assert root_script_importers(PACKAGE) == []


@pytest.mark.parametrize(
    "line",
    [f"import {ROOT_SCRIPT}", f"from {ROOT_SCRIPT} import keyed_masks",
     f"def f():\n    from {ROOT_SCRIPT} import app", f"import importlib\nimportlib.import_module('{ROOT_SCRIPT}')"],
)  # fmt: skip
def test_the_root_script_check_finds_a_planted_import(tmp_path, line):
    package = _fake_tree(tmp_path, {"pkg/__init__.py": "", "pkg/flower/site.py": f"{line}\n"})
    assert root_script_importers(package) == [f"pkg/flower/site.py:{line.count(chr(10)) + 1}"]


def test_the_light_modules_import_nothing_heavy():
    assert light_violations(PACKAGE, LIGHT_MODULES, LIGHT_THIRD_PARTY) == {}
    assert {"peft_deer.commands.fed", "peft_deer.demo.__main__", "peft_deer.flower.wire"} <= set(LIGHT_MODULES)


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"pkg/light.py": "import torch\n"}, {"pkg.light": ["torch"]}),
        ({"pkg/light.py": "from .heavy import x\n", "pkg/heavy.py": ""}, {"pkg.light": ["pkg.heavy"]}),
        ({"pkg/light.py": "from . import heavy\n", "pkg/heavy.py": ""}, {"pkg.light": ["pkg", "pkg.heavy"]}),
        ({"pkg/light.py": "import pkg.heavy\n", "pkg/heavy.py": ""}, {"pkg.light": ["pkg.heavy"]}),
        ({"pkg/light.py": "class A:\n    from peft import LoraConfig\n"}, {"pkg.light": ["peft"]}),
        ({"pkg/sub/light.py": "", "pkg/sub/__init__.py": ""},
         {"pkg.sub.light": ["pkg.sub (its package, loaded first)"]}),
        ({"pkg/light.py": "import numpy, json\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\n"
          "def f():\n    import torch\n"}, {}),
    ],
    ids=["third-party", "relative", "parent-package", "absolute", "class-body", "unlisted-package", "allowed"],
)  # fmt: skip
def test_the_light_check_finds_a_planted_heavy_import(tmp_path, files, expected):
    package = _fake_tree(tmp_path, {"pkg/__init__.py": "import torch\n", **files})
    light = tuple(_module_name(tmp_path / p, tmp_path) for p in files if p.endswith("light.py"))
    assert light_violations(package, light, ("numpy",)) == expected


def test_the_site_side_imports_no_server_builder():
    """A Flower site needs the task and the DP settings, not the server's experiment, loop or outputs."""
    graph = import_graph()
    server_side = {"peft_deer.run.experiment", "peft_deer.run.phases", "peft_deer.run.outputs", "peft_deer.run"}
    site = {"peft_deer.flower.site", "peft_deer.flower.site_worker", "peft_deer.flower.site_accounting"}
    reached, todo = set(), list(site)
    while todo:
        for nxt in graph[todo.pop()] - reached:
            reached.add(nxt)
            todo.append(nxt)
    assert reached & server_side == set()


def test_what_pip_installs_lives_under_peft_deer():
    """No generic top-level `train` or `app` in site-packages; every console script resolves inside peft_deer;
    the repository's `train/` and `app/` stay thin entry points."""
    import importlib
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["tool"]["setuptools"]["packages"]["find"]["include"] == ["peft_deer*"]
    scripts = project["project"]["scripts"]
    assert set(scripts) == {"deer-fed", "deer-app", "deer-build-dinov2", "deer-audit", "deer-campaign"}
    for target in scripts.values():
        module, _, function = target.partition(":")
        assert module.split(".")[0] == "peft_deer" and callable(getattr(importlib.import_module(module), function))
    for entry in ("train/fed.py", "app/__main__.py", "app/__init__.py"):
        assert len((ROOT / entry).read_text().splitlines()) <= 40, entry
