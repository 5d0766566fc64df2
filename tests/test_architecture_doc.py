"""docs/architecture.md's module table names every module of the installed ``proxy`` package
(with its one-line role): a module added without a row fails here. ``make test`` copies docs/
beside the tests."""
from __future__ import annotations

from pathlib import Path

import proxy

PACKAGE = Path(proxy.__file__).resolve().parent
DOC = Path(__file__).resolve().parent.parent / "docs" / "architecture.md"


def _modules() -> list[str]:
    return sorted("proxy/" + str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                  if p.name != "__init__.py")


def test_every_module_has_a_row() -> None:
    text = DOC.read_text(encoding="utf-8")
    table = text[text.index("## Modules"):text.index("## Decisions")]
    rows = [line for line in table.splitlines() if line.startswith("| `proxy/")]
    missing = []
    for module in _modules():
        directory, name = module.rsplit("/", 1)
        if not any(f"`{module}`" in row or (f"`{directory}/" in row and f"`{name}`" in row)
                   for row in rows):
            missing.append(module)
    assert not missing, f"modules without a row in docs/architecture.md: {missing}"
