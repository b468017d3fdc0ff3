"""The test suite's own rules: the `e2e` marker is registered, every test that starts a process or a Flower
deployment carries it (so `pytest -m "not e2e"` is the fast tier), and helpers come from helpers.py, not conftest.

The scan reads each test module's AST: a test starts processes when its body, a module-level function it calls,
or a module-level fixture it takes uses `subprocess`, `Popen`, `os.fork`/`os.system`, `multiprocessing.Process`
or a Flower deployment helper (`LocalDeployment`, `run_simulation`), unless it monkeypatches `subprocess`.
Each rule is shown to fail on a planted case.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

from helpers import ROOT

TESTS = ROOT / "tests"
PROCESS_NAMES = {"Popen", "LocalDeployment", "run_simulation"}
SUBPROCESS_CALLS = {"run", "Popen", "call", "check_call", "check_output", "getoutput", "getstatusoutput"}
OS_PROCESS_CALLS = {"system", "fork", "forkpty", "posix_spawn", "posix_spawnp", "spawnv", "spawnl", "execv", "popen"}


def _is_e2e_mark(node: ast.AST) -> bool:
    """`pytest.mark.e2e` (or `mark.e2e`) anywhere in `node`: a decorator, a `pytestmark` value or list."""
    return any(isinstance(n, ast.Attribute) and n.attr == "e2e" for n in ast.walk(node))


def _module_marked(tree: ast.Module) -> bool:
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else []
        targets = [node.target] if isinstance(node, ast.AnnAssign) else targets
        if any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in targets) and _is_e2e_mark(node.value):
            return True
    return False


def _starts_directly(node: ast.AST, imported: set[str]) -> bool:
    for n in ast.walk(node):
        if isinstance(n, ast.Name) and (n.id in PROCESS_NAMES or n.id in imported):
            return True
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name):
            module, attr = n.value.id, n.attr
            if (module == "subprocess" and attr in SUBPROCESS_CALLS) or attr in PROCESS_NAMES:
                return True
            if (module == "os" and attr in OS_PROCESS_CALLS) or (module == "multiprocessing" and attr == "Process"):
                return True
        if isinstance(n, ast.Attribute) and n.attr in PROCESS_NAMES:
            return True
    return False


def _replaces_subprocess(fn: ast.AST) -> bool:
    """`monkeypatch.setattr(subprocess, ...)` in `fn`: its helpers' process calls are replaced, none starts."""
    return any(
        isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "setattr"
        and n.args and isinstance(n.args[0], ast.Name) and n.args[0].id == "subprocess"
        for n in ast.walk(fn)
    )  # fmt: skip


def unmarked_process_tests(source: str) -> list[str]:
    """Names of the tests in `source` that start processes (directly, through a module-level function or fixture)
    but are not marked e2e (by decorator, their class, or the module's `pytestmark`)."""
    tree = ast.parse(source)
    if _module_marked(tree):
        return []
    imported = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module in ("subprocess", "multiprocessing")
        for alias in node.names
    }
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
    starts: dict[str, bool] = {}

    def starts_processes(fn: ast.FunctionDef | ast.AsyncFunctionDef, seen: frozenset[str] = frozenset()) -> bool:
        if _replaces_subprocess(fn):
            return False
        if fn.name not in starts:
            used = {n.id for n in ast.walk(fn) if isinstance(n, ast.Name)} | {a.arg for a in fn.args.args}
            callees = [functions[name] for name in sorted(used - seen - {fn.name}) if name in functions]
            starts[fn.name] = _starts_directly(fn, imported) or any(
                starts_processes(callee, seen | {fn.name}) for callee in callees
            )
        return starts[fn.name]

    found = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test"):
            if any("fixture" in ast.unparse(d) for d in node.decorator_list):
                continue  # a fixture named test_*: its users are the tests
            if starts_processes(node) and not any(_is_e2e_mark(d) for d in node.decorator_list):
                found.append(node.name)
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            class_marked = any(map(_is_e2e_mark, node.decorator_list)) or _module_marked(ast.Module(node.body, []))
            for method in node.body:
                if isinstance(method, ast.FunctionDef) and method.name.startswith("test") and not class_marked:
                    if starts_processes(method) and not any(_is_e2e_mark(d) for d in method.decorator_list):
                        found.append(f"{node.name}.{method.name}")
    return found


def conftest_imports(source: str) -> list[int]:
    """Line numbers of `from conftest import ...` / `import conftest` in `source`."""
    return [
        node.lineno
        for node in ast.walk(ast.parse(source))
        if (isinstance(node, ast.ImportFrom) and node.module == "conftest")
        or (isinstance(node, ast.Import) and any(a.name == "conftest" for a in node.names))
    ]


def _test_files() -> list[Path]:
    files = sorted(TESTS.rglob("test_*.py"))
    assert len(files) >= 40, files
    return files


def test_the_e2e_marker_is_registered(pytestconfig):
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]
    assert any(m.startswith("e2e:") for m in declared), declared
    assert any(m.startswith("e2e:") for m in pytestconfig.getini("markers"))


def test_every_test_that_starts_processes_is_marked_e2e():
    found = {f.relative_to(ROOT).as_posix(): unmarked_process_tests(f.read_text()) for f in _test_files()}
    assert {k: v for k, v in found.items() if v} == {}, "mark these @pytest.mark.e2e (they start processes)"


def test_the_scan_finds_unmarked_process_tests():
    planted = '''
import subprocess
import pytest
from subprocess import run as sh
from peft_deer.flower.local import LocalDeployment

def _launch(cmd):
    return subprocess.run(cmd)

def _indirect():
    return _launch(["true"])

@pytest.fixture
def server():
    yield subprocess.Popen(["sleep", "1"])

def test_direct():
    subprocess.run(["true"])

def test_through_helpers():
    _indirect()

def test_through_a_fixture(server):
    pass

def test_imported_name():
    sh(["true"])

def test_deployment(tmp_path):
    with LocalDeployment(2, tmp_path):
        pass

def test_pure_python():
    assert sum([1, 1]) == 2

def test_a_replaced_subprocess(monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess([], 0))
    _indirect()

@pytest.mark.e2e
def test_marked():
    subprocess.run(["true"])

@pytest.mark.e2e
class TestMarked:
    def test_in_class(self):
        subprocess.run(["true"])

class TestUnmarked:
    def test_in_class(self):
        subprocess.Popen(["true"])
'''
    assert unmarked_process_tests(planted) == [
        "test_direct", "test_through_helpers", "test_through_a_fixture", "test_imported_name", "test_deployment",
        "TestUnmarked.test_in_class",
    ]  # fmt: skip
    assert unmarked_process_tests("import pytest\npytestmark = [pytest.mark.e2e]\n" + planted) == []


def test_helpers_come_from_helpers_not_conftest():
    found = {
        f.relative_to(ROOT).as_posix(): conftest_imports(f.read_text())
        for f in sorted(TESTS.rglob("*.py"))
        if f.name != "conftest.py"
    }
    assert {k: v for k, v in found.items() if v} == {}, "import these from helpers.py (fixtures need no import)"
    planted = "import os\nfrom conftest import ROOT\n\ndef f():\n    import conftest\n"
    assert conftest_imports(planted) == [2, 5]
