"""The shape rules of ``proxy/``: no module over 500 lines, no function over 60. A module that
outgrows them is split by what it holds; the test lists every offender at once."""

from __future__ import annotations

import ast
from pathlib import Path

import proxy

PACKAGE = Path(proxy.__file__).resolve().parent
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60


def offenders(package: Path = PACKAGE) -> list[str]:
    found = []
    for path in sorted(package.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        where = path.relative_to(package.parent)
        lines = len(source.splitlines())
        if lines > MAX_MODULE_LINES:
            found.append(f"{where}: {lines} lines (module)")
        for node in ast.walk(ast.parse(source, str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found.append(f"{where}:{node.lineno}: {node.name} is {length} lines")
    return found


def test_no_module_or_function_too_long() -> None:
    found = offenders()
    assert not found, (f"over {MAX_MODULE_LINES} lines per module or {MAX_FUNCTION_LINES} per "
                       "function:\n" + "\n".join(found))


def test_offenders_are_found(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (package / "long.py").write_text(f"def long():\n{body}\n" + "\n" * MAX_MODULE_LINES)
    (package / "short.py").write_text("def short():\n    return 1\n")
    assert offenders(package) == ["pkg/long.py: 561 lines (module)",
                                  "pkg/long.py:1: long is 61 lines"]
