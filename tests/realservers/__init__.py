"""Real Dovecot and Postfix instances for integration tests, plus what they share.

Each server instance is started by the tests with its own configuration in its own
folder and stopped afterwards; nothing system-wide is touched. This module holds the
pieces both helpers need: free loopback ports, readiness polling with a deadline, a
throwaway certificate authority, instance folders that Postfix accepts, log tails
for error messages, and ``ServerInstance`` (start with retries, log reading).
``dovecot.py`` and ``postfix.py`` hold the servers themselves.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Self, TypeVar

from proxy.demo.certs import CertPaths
from proxy.demo.certs import generate as generate_certs

HOST = "127.0.0.1"

# Instance folders live here rather than under pytest's tmp_path: Postfix insists on
# root-owned parents that its unprivileged user can traverse, and
# /tmp/pytest-of-root is 0700.
INSTANCE_PARENT = Path(tempfile.gettempdir())

REQUIRED_BINARIES = {
    "dovecot": "/usr/sbin/dovecot",
    "postfix": "/usr/sbin/postfix",
}


class ServerStartError(RuntimeError):
    """A server did not come up; the message carries the tail of its log."""


def missing_binaries(names: Iterable[str] = ("dovecot", "postfix")) -> list[str]:
    """Names of the server programs that are not installed."""
    missing = []
    for name in names:
        if shutil.which(name) is None and not os.access(REQUIRED_BINARIES[name], os.X_OK):
            missing.append(name)
    return missing


def free_ports(count: int, host: str = HOST) -> list[int]:
    """``count`` distinct ports that were free a moment ago.

    Dovecot and Postfix cannot bind port 0 and report the choice, so we ask the kernel
    for ports and close them again; a race with another process stays possible, which
    is why the starters retry on a bind collision.
    """
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def port_accepts(port: int, host: str = HOST, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def read_greeting(port: int, host: str = HOST, timeout: float = 2.0) -> bytes:
    """First line a plain-text server sends on connect (b"" if none)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(1024)
                if not chunk:
                    break
                data += chunk
            return data
    except OSError:
        return b""


def wait_until(
    ready: Callable[[], bool],
    *,
    timeout: float,
    alive: Callable[[], bool] = lambda: True,
    interval: float = 0.05,
) -> bool:
    """Poll ``ready`` until it holds (True), the deadline passes or ``alive`` fails (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if ready():
            return True
        if not alive() or time.monotonic() >= deadline:
            return ready()
        time.sleep(interval)


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log at {path}: {exc})"
    return "\n".join(text.splitlines()[-lines:]) or f"(log {path} is empty)"


OWNER_FILE = "owner.pid"  # pid of the Python process that started the instance
GROUP_FILE = "server.pgid"  # process group of the running server


def make_instance_dir(prefix: str) -> Path:
    """A fresh root-owned 0755 folder under /tmp for one server instance.

    Instances left behind by a test process that died without cleaning up (SIGKILL,
    a CI timeout) are reaped first, see ``reap_orphans``.
    """
    reap_orphans(prefix)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=INSTANCE_PARENT))
    path.chmod(0o755)
    (path / OWNER_FILE).write_text(f"{os.getpid()}\n")
    return path


@contextlib.contextmanager
def instance_dir(prefix: str) -> Iterator[Path]:
    """``make_instance_dir(prefix)``, removed again if starting the server fails."""
    root = make_instance_dir(prefix)
    try:
        yield root
    except BaseException:
        remove_tree(root)
        raise


class ServerInstance:
    """What the Dovecot and Postfix instances share: retried start, ``with``, log reading.

    Subclasses are dataclasses with ``log_path``, ``ports`` and ``startup_seconds`` fields
    and implement ``_launch`` and ``stop``.
    """

    log_path: Path
    ports: dict[str, int]
    startup_seconds: float

    def _launch(self, timeout: float) -> str | None:
        """Start the server; None when it serves, else an error text with its log tail."""
        raise NotImplementedError

    def stop(self, *, keep_files: bool = False) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)


_Instance = TypeVar("_Instance", bound=ServerInstance)


def launch_with_retries(
    make: Callable[[], _Instance], *, attempts: int, timeout: float, began: float
) -> _Instance:
    """Launch a fresh ``make()`` (new ports) per attempt; only a port collision is retried.

    Raises ``ServerStartError`` with the last error text when no attempt comes up.
    """
    last_error = ""
    for attempt in range(1, attempts + 1):
        instance = make()
        with instance.log_path.open("a") as log:
            log.write(f"--- test harness: start attempt {attempt}, ports {instance.ports}\n")
        error = instance._launch(timeout)
        if error is None:
            instance.startup_seconds = time.monotonic() - began
            return instance
        last_error = error
        if "Address already in use" not in error:
            break
    raise ServerStartError(last_error)


def record_process_group(root: Path, pgid: int) -> None:
    (root / GROUP_FILE).write_text(f"{pgid}\n")


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _belongs_to(pid: int, root: Path) -> bool:
    """Is ``pid`` a server of the instance in ``root`` (not a recycled pid)?"""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return False
    return str(root).encode() in cmdline or cwd == str(root) or cwd.startswith(f"{root}/")


def reap_orphans(prefix: str) -> None:
    """Kill and remove instances whose owning process no longer exists.

    Only folders named ``prefix*`` under /tmp whose owner pid is dead are touched, and a
    process group is killed only if its leader still points into that folder, so
    instances of concurrently running test processes are left alone.
    """
    for root in INSTANCE_PARENT.glob(f"{prefix}*"):
        owner = _read_int(root / OWNER_FILE)
        if owner is None or pid_alive(owner):
            continue
        pgid = _read_int(root / GROUP_FILE)
        if pgid is not None and pid_alive(pgid) and _belongs_to(pgid, root):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        remove_tree(root)


def process_group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group ``pgid``."""
    members = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        # fields: state, ppid, pgrp, ...
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            members.append(int(stat_file.parent.name))
    return members


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not yet reaped by init) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


TlsFiles = CertPaths  # a test CA and a server certificate for 127.0.0.1, ::1 and localhost


def make_tls_files(directory: Path) -> TlsFiles:
    """Create a throwaway CA and a leaf certificate for 127.0.0.1, ::1 and localhost."""
    return generate_certs(directory)
