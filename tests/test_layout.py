"""The package's shape: no import cycle inside `peft_deer`, no oversized module, and the run settings
generated once (flags, --config and the Flower run config agree)."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "peft_deer"
MAX_LINES = 420  # "about 400": a module past this holds more than one concept


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
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


def test_no_module_is_oversized():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert len(sizes) > 50
    assert {p: n for p, n in sizes.items() if n > MAX_LINES} == {}


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
