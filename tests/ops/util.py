"""Helpers for the operations tests: an HTTP GET, a parsed scrape, the proxy as a child
process driven like systemd drives it (notify socket, signals, socket activation), and the
skip→fail rule for external tools (promtool, systemd-analyze)."""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import proxy
from proxy.paths import DISTRIBUTION, data_dir

PROJECT_ROOT = Path(proxy.__file__).resolve().parent.parent
# The example configs, Prometheus rules and systemd units as installed (share/xoauth2-proxy),
# or a source checkout's top folder when the tests run from one.
SHIPPED = data_dir() or PROJECT_ROOT
SERVICE_UNIT = SHIPPED / "systemd" / "xoauth2-proxy.service"
REQUIRE_ENV = "XOAUTH2_PROXY_REQUIRE_REAL_SERVERS"


def readme() -> str:
    """The README: a source checkout's, else the installed distribution's long description
    (setup.cfg: ``long_description = file: README.md``, the METADATA file's body)."""
    path = PROJECT_ROOT / "README.md"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    meta: Any = importlib.metadata.metadata(DISTRIBUTION)
    text = meta.get_payload() or meta.get("Description") or ""
    assert "# xoauth2-proxy" in text, "the installed metadata carries no README"
    return str(text)


def require_tool(name: str, package: str) -> str:
    """The tool's path; skip if it is missing (fail when CI demands the real tools)."""
    path = shutil.which(name)
    if path is not None:
        return path
    reason = f"{name} not installed (Debian package {package}; .ci/run installs it)"
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but {reason}", pytrace=False)
    pytest.skip(reason)


# --- HTTP and metrics ------------------------------------------------------------------------


async def http_get(port: int, path: str, method: str = "GET",
                   headers: str = "") -> tuple[int, dict[str, str], bytes]:
    """One request to 127.0.0.1:port; (status, headers, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}\r\n".encode())
        async with asyncio.timeout(10):
            data = await reader.read()
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    fields = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    return status, fields, body


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


async def scrape(port: int) -> Samples:
    status, _, body = await http_get(port, "/metrics")
    assert status == 200
    return parse(body.decode())


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


async def poll(check: Callable[[], Any], timeout: float = 15, every: float = 0.02) -> Any:
    """Call ``check`` (sync or async) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(every)


# --- a child process under a pretend service manager -------------------------------------------


class NotifySocket:
    """The service manager's end of ``$NOTIFY_SOCKET``: an abstract datagram socket."""

    def __init__(self) -> None:
        self.name = f"xoauth2-proxy-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name)
        self.messages: list[dict[str, str]] = []

    @property
    def env(self) -> str:
        return "@" + self.name

    def expect(self, key: str, value: str = "1", timeout: float = 30,
               proc: subprocess.Popen[bytes] | None = None) -> dict[str, str]:
        """Receive until a message sets ``key=value``; return that message."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {key}={value} within {timeout}s; got {self.messages}")
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"the proxy exited ({proc.returncode}); got {self.messages}")
            self.sock.settimeout(min(left, 0.5))
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            message = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
            self.messages.append(message)
            if message.get(key) == value:
                return message

    def close(self) -> None:
        self.sock.close()


# Runs as the child's first program: puts the passed sockets on fds 3, 4, … and sets LISTEN_PID
# to its own pid (which exec keeps), as systemd does, then becomes `python -m proxy ARGS`.
ACTIVATE = """
import fcntl, os, sys
fds, names = [int(fd) for fd in sys.argv[1].split(",")], sys.argv[2]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
for fd in fds:
    os.close(fd)
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)
    os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES=names)
os.execv(sys.executable, [sys.executable, "-m", "proxy", *sys.argv[3:]])
"""


class ProxyProcess:
    """``python -m proxy run`` as a child; stderr goes to a file the test can read. ``wrap``
    turns the command into another that ends by running it (e.g. ``Sandbox.command``)."""

    def __init__(self, config: Path, log: Path, *, notify: NotifySocket | None = None,
                 env: dict[str, str] | None = None, args: tuple[str, ...] = (),
                 activate: dict[str, socket.socket] | None = None,
                 wrap: Callable[[list[str]], list[str]] | None = None) -> None:
        self.log = log
        environ = {k: v for k, v in os.environ.items()
                   if not k.startswith(("LISTEN_", "WATCHDOG_", "NOTIFY_", "JOURNAL_"))}
        environ["PYTHONPATH"] = str(PROJECT_ROOT)
        if notify is not None:
            environ["NOTIFY_SOCKET"] = notify.env
        environ.update(env or {})
        run_args = ["run", "--config", str(config), *args]
        pass_fds: tuple[int, ...] = ()
        if activate:
            pass_fds = tuple(sock.fileno() for sock in activate.values())
            command = [sys.executable, "-c", ACTIVATE, ",".join(map(str, pass_fds)),
                       ":".join(activate), *run_args]
        else:
            command = [sys.executable, "-m", "proxy", *run_args]
        if wrap is not None:
            command = wrap(command)
        with open(log, "wb") as stderr:
            self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=stderr,
                                         env=environ, cwd=PROJECT_ROOT, pass_fds=pass_fds)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def port(self, event: str, match: str = "") -> int:
        """The port in ``address=`` of the first log line with ``event=EVENT`` and ``match``."""
        for line in self.text().splitlines():
            if f" event={event} " in line and match in line:
                match = re.search(r" address=\S+:(\d+)", line)
                assert match, line
                return int(match.group(1))
        raise AssertionError(f"no {event} line with {match!r} in:\n{self.text()}")

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
