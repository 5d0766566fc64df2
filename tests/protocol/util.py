"""Transcript helpers for the sans-I/O machine tests.

A transcript is a list of steps ``(input, expected commands)``: the input is bytes for
``machine.receive`` or a callable that drives the machine (a verdict, ``tls_started``…).
``run_transcript`` plays it three ways, as h11's tests do: each bytes step fed whole, one
byte at a time, and whole with trailing bytes (an incomplete next line) appended to the last
bytes step. Like a real driver, it stops feeding a machine once it reports
``UpstreamLoggedIn`` and hands the unfed bytes over as ``server_bytes``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from proxy.protocol.events import StartRelay, UpstreamLoggedIn
from proxy.secret import Secret

Step = tuple[bytes | Callable[[Any], list[Any]], list[Any]]

MODES = ("whole", "bytewise", "trailing")


def feed(machine: Any, chunks: Sequence[bytes]) -> list[Any]:
    """Feed ``chunks`` to ``machine.receive`` as a driver would; return all commands."""
    out: list[Any] = []
    for k, chunk in enumerate(chunks):
        for command in machine.receive(chunk):
            if isinstance(command, UpstreamLoggedIn):
                rest = b"".join(chunks[k + 1 :])
                out.append(dataclasses.replace(command, server_bytes=command.server_bytes + rest))
                return out
            out.append(command)
    return out


def _with_trail(command: Any, trail: bytes) -> Any:
    if isinstance(command, StartRelay):
        return dataclasses.replace(command, client_bytes=command.client_bytes + trail)
    if isinstance(command, UpstreamLoggedIn):
        return dataclasses.replace(command, server_bytes=command.server_bytes + trail)
    return command


def _field(value: Any) -> Any:
    return f"Secret({value.reveal()!r})" if isinstance(value, Secret) else value


def show(commands: Sequence[Any]) -> list[str]:
    """Commands rendered with every field (reprs hide SendToServer data and passwords)."""
    return [
        f"{type(c).__name__}{tuple(_field(getattr(c, f.name)) for f in dataclasses.fields(c))!r}"
        for c in commands
    ]


def run_transcript(
    make: Callable[[], Any], steps: Sequence[Step], *, trail: bytes | None = b"t9 NOO"
) -> None:
    """Play ``steps`` on fresh machines whole, byte by byte and with trailing bytes."""
    byte_steps = [i for i, (inp, _) in enumerate(steps) if isinstance(inp, bytes)]
    last = byte_steps[-1] if byte_steps else -1
    for mode in MODES:
        if mode == "trailing" and (trail is None or last < 0):
            continue
        machine = make()
        for i, (inp, expected) in enumerate(steps):
            if isinstance(inp, bytes):
                data = inp + trail if mode == "trailing" and i == last and trail else inp
                if mode == "bytewise" and data:
                    chunks = [data[j : j + 1] for j in range(len(data))]
                else:
                    chunks = [data]
                got = feed(machine, chunks)
            else:
                got = inp(machine)
            if mode == "trailing" and i >= last and trail:
                expected = [_with_trail(c, trail) for c in expected]
            assert show(got) == show(expected), f"mode {mode}, step {i}: got {show(got)}"


def well_formed_lines(data: bytes) -> bool:
    """``data`` is one or more CRLF-terminated lines with no bare CR or LF."""
    if not data.endswith(b"\r\n"):
        return False
    return all(b"\r" not in line and b"\n" not in line for line in data.split(b"\r\n")[:-1])
