"""Write a config document (nested dicts, lists of tables) as TOML text.

Only what our config holds: strings, whole numbers, booleans, lists of strings, tables and
arrays of tables. Strings are TOML basic strings with every character TOML requires escaped,
so any value (a path, a tenant, an account name) round-trips through ``tomllib``.
"""

from __future__ import annotations

import re
from typing import Any

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def string(value: str) -> str:
    out = []
    for ch in value:
        if ch == "\\":
            out.append("\\\\")
        elif ch == '"':
            out.append('\\"')
        elif ch in "\b\t\n\f\r":
            out.append({"\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def key(name: str) -> str:
    return name if _BARE_KEY.fullmatch(name) else string(name)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return string(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def dumps(document: dict[str, Any], comments: dict[str, str] | None = None) -> str:
    """TOML text for ``document``; ``comments`` maps a table path (``providers.contoso``) to a
    comment line written above that table."""
    lines: list[str] = []
    notes = comments or {}

    def table(path: str, data: dict[str, Any]) -> None:
        for name, value in data.items():
            if not isinstance(value, dict) and not _is_table_array(value):
                lines.append(f"{key(name)} = {_value(value)}")
        for name, value in data.items():
            sub = f"{path}.{key(name)}" if path else key(name)
            if isinstance(value, dict):
                scalars = [v for v in value.values()
                           if not isinstance(v, dict) and not _is_table_array(v)]
                if scalars or not value or sub in notes:  # else implied by its sub-tables
                    lines.append("")
                    if sub in notes:
                        lines.append(f"# {notes[sub]}")
                    lines.append(f"[{sub}]")
                table(sub, value)
            elif _is_table_array(value):
                for item in value:
                    lines.append("")
                    lines.append(f"[[{sub}]]")
                    table(sub, item)

    table("", document)
    return "\n".join(lines).lstrip("\n") + "\n"
