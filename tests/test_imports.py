"""No circular imports in ``proxy/``: every module imports alone in a fresh interpreter, and the
graph of module-level imports has no cycle (a cycle that happens to import in today's order
breaks the day someone imports the other module first)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import proxy

PACKAGE = Path(proxy.__file__).resolve().parent
SKIP = {"proxy.__main__"}  # runs the command line when imported

# One interpreter that has imported none of proxy forks a child per module; the child imports
# that module alone and reports. A fork is a fresh proxy (nothing of it in sys.modules) without
# the cost of starting Python a hundred times.
FORK_EACH = r"""
import importlib, os, sys, traceback
assert not any(m == "proxy" or m.startswith("proxy.") for m in sys.modules)
failed = []
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except BaseException:
            sys.stderr.write(f"--- import {name} alone:\n{traceback.format_exc()}")
            sys.stderr.flush()
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        failed.append(name)
print(" ".join(failed))
"""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_imports_alone(tmp_path: Path) -> None:
    names = [n for n in modules() if n not in SKIP]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(PACKAGE.parent), *filter(None, [os.environ.get("PYTHONPATH")])]))
    result = subprocess.run([sys.executable, "-c", FORK_EACH, *names], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    failed = result.stdout.split()
    assert not failed, f"modules that fail to import alone: {failed}\n{result.stderr}"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_level_imports(body: list[ast.stmt]) -> list[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported: not in functions, not under
    ``if TYPE_CHECKING:``; class bodies, ``if``, ``try`` and ``with`` blocks do run."""
    found: list[ast.Import | ast.ImportFrom] = []
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif isinstance(node, ast.If):
            found += _module_level_imports(node.orelse)
            if not _is_type_checking(node.test):
                found += _module_level_imports(node.body)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                found += _module_level_imports(block)
        elif isinstance(node, ast.With | ast.ClassDef):
            found += _module_level_imports(node.body)
    return found


def _targets(name: str, path: Path, node: ast.Import | ast.ImportFrom, known: set[str]) -> set[str]:
    """The proxy modules an import statement runs (a submodule runs its packages first)."""
    if isinstance(node, ast.Import):
        wanted = {alias.name for alias in node.names}
    else:
        base = node.module or ""
        if node.level:
            package = name if path.name == "__init__.py" else name.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{base}".rstrip(".") if base else package
        wanted = {base} | {f"{base}.{alias.name}" for alias in node.names}
    targets: set[str] = set()
    for module in wanted:
        parts = module.split(".")
        targets |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    own_packages = {name.rsplit(".", i)[0] for i in range(1, name.count(".") + 1)}
    return (targets & known) - own_packages - {name}


def import_graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    graph: dict[str, set[str]] = {}
    for name, path in found.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        graph[name] = set()
        for node in _module_level_imports(tree.body):
            graph[name] |= _targets(name, path, node, known)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_import_graph_has_no_cycle() -> None:
    graph = import_graph()
    assert "proxy.config.model" in graph["proxy.config"]  # the graph sees package imports
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_cycle_finder_finds_one() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
