"""What every machine shares: its rules refuse a call out of turn with ``ProtocolMisuse``, under
``python -O`` too (no state is guarded by ``assert``), and nothing under ``proxy/protocol``
brings in asyncio or sockets."""

from __future__ import annotations

import ast
import enum
import os
import subprocess
import sys
from pathlib import Path

import pytest

import proxy.protocol
from proxy.protocol.events import ProtocolMisuse
from proxy.protocol.machine import Rules

PROTOCOL = Path(proxy.protocol.__file__).resolve().parent


class S(enum.Enum):
    A = "a"
    B = "b"
    C = "c"


def test_rules_allow_only_their_moves_and_calls() -> None:
    rules: Rules[S] = Rules(moves={S.A: {S.B}, S.B: {S.C}}, calls={"receive": {S.A, S.B}})
    assert rules.move(S.A, S.B) is S.B
    with pytest.raises(ProtocolMisuse, match="a -> c is not allowed"):
        rules.move(S.A, S.C)
    with pytest.raises(ProtocolMisuse):
        rules.move(S.C, S.A)  # a state with no moves
    rules.call("receive", S.B)
    with pytest.raises(ProtocolMisuse, match=r"receive\(\) is not allowed in state c"):
        rules.call("receive", S.C)


def test_no_assert_guards_a_machine() -> None:
    found = [f"{path.name}:{node.lineno}" for path in sorted(PROTOCOL.glob("*.py"))
             for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
             if isinstance(node, ast.Assert)]
    assert not found, f"assert in proxy/protocol (gone under python -O): {found}"


MISUSE_UNDER_O = r"""
from proxy.protocol.events import ProtocolMisuse
from proxy.protocol.imap import ImapClientSide, ImapUpstreamSide
from proxy.protocol.pop import PopClientSide, PopUpstreamSide
from proxy.secret import Secret

calls = [
    lambda: ImapClientSide(starttls=False, tls_active=False, login_disabled=False).tls_started(),
    lambda: PopClientSide(starttls=False, tls_active=False, login_disabled=False).receive(b"x"),
    lambda: ImapUpstreamSide(user="a@b", token=Secret("t"), starttls=False).tls_started(),
    lambda: PopUpstreamSide(user="a@b", token=Secret("t"), starttls=False).tls_started(),
]
for call in calls:
    try:
        call()
    except ProtocolMisuse:
        continue
    raise SystemExit("no ProtocolMisuse")
print("ok")
"""


def run_python(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """A fresh interpreter that imports the proxy under test, away from any source tree."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(PROTOCOL.parent.parent), *filter(None, [os.environ.get("PYTHONPATH")])]))
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120, check=False)


def test_misuse_is_refused_under_python_O(tmp_path: Path) -> None:
    result = run_python(tmp_path, "-O", "-c", MISUSE_UNDER_O)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_machines_import_no_io(tmp_path: Path) -> None:
    modules = sorted(f"proxy.protocol.{p.stem}" for p in PROTOCOL.glob("*.py") if p.stem != "__init__")
    code = ("import importlib, sys\n"
            f"for name in {modules!r}: importlib.import_module(name)\n"
            "print(' '.join(m for m in ('asyncio', 'socket', 'ssl', 'selectors') if m in sys.modules))")
    result = run_python(tmp_path, "-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"proxy/protocol imports {result.stdout.strip()}"
