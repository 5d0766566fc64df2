"""The small part of systemd's service protocol the daemon speaks, with no dependency.

- ``Notifier``: ``sd_notify(3)`` datagrams to ``$NOTIFY_SOCKET`` (a path, or ``@name`` for an
  abstract socket): ``READY=1``, ``RELOADING=1`` with ``MONOTONIC_USEC=`` (what systemd 253+
  asks for), ``STOPPING=1``, ``STATUS=…`` and ``WATCHDOG=1``. Without ``$NOTIFY_SOCKET`` every
  call is a no-op, so the daemon runs the same in a terminal, in a container or under systemd.
- ``watchdog_interval()``: half of ``$WATCHDOG_USEC`` when the watchdog is meant for this
  process (``$WATCHDOG_PID`` absent or ours).
- ``listen_fds()``: socket activation, ``sd_listen_fds_with_names(3)``: the sockets systemd
  passed as fds 3… when ``$LISTEN_PID`` is ours, keyed by ``$LISTEN_FDNAMES``.
- ``missing_credential()``: what to tell the operator when a secret the config expects from
  ``LoadCredential=`` (a file in ``$CREDENTIALS_DIRECTORY``) is not there.

Sending never raises: a notification that cannot be delivered is logged at debug level (the
service manager has gone away, or a test closed its socket), and the daemon carries on.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterable, Mapping, MutableMapping
from pathlib import Path

log = logging.getLogger("proxy.systemd")

LISTEN_FDS_START = 3


class ActivationError(Exception):
    """The sockets systemd passed cannot be used (one line, for the operator)."""


class Notifier:
    """Sends state changes to the service manager (no-op when there is none)."""

    def __init__(self, address: str | None) -> None:
        self.address: str | bytes | None = None
        if address:
            # "@name" names a socket in the abstract namespace: a leading NUL byte on Linux.
            self.address = "\0" + address[1:] if address.startswith("@") else address
        self._sock: socket.socket | None = None

    @classmethod
    def from_env(cls, environ: MutableMapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        return cls(env.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """Send ``KEY=VALUE`` lines as one datagram; True if it was delivered."""
        if self.address is None:
            return False
        message = "\n".join(f.replace("\n", " ") if f.startswith("STATUS=") else f
                            for f in fields).encode("utf-8")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(message, self.address)
        except OSError as exc:
            log.debug("sd_notify_failed", extra={"fields": {"reason": exc.strerror or str(exc)}})
            return False
        if fields != ("WATCHDOG=1",):  # not every few seconds
            log.debug("sd_notify", extra={"fields": {"state": " ".join(fields)}})
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *_status(status))

    def reloading(self, status: str | None = None) -> bool:
        # systemd 253+ (Type=notify-reload) wants the CLOCK_MONOTONIC time of the reload start.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", *_status(status))

    def stopping(self, status: str | None = None) -> bool:
        return self.send("STOPPING=1", *_status(status))

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _status(text: str | None) -> tuple[str, ...]:
    return (f"STATUS={text}",) if text else ()


def watchdog_interval(environ: MutableMapping[str, str] | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half the timeout), or None when not wanted."""
    env = os.environ if environ is None else environ
    usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None  # meant for another process (e.g. a parent that exec'd a wrapper)
    return int(usec) / 2 / 1_000_000


def listen_fds(environ: MutableMapping[str, str] | None = None, *,
               unset: bool = True) -> dict[str, list[socket.socket]]:
    """Sockets passed by socket activation, by name (``LISTEN_FDNAMES``; "unknown" if unnamed).

    Empty unless ``$LISTEN_PID`` is this process. The variables are removed (``unset``) so that
    a child process does not take the sockets for its own. Each fd is made close-on-exec.
    """
    env = os.environ if environ is None else environ
    pid, count = env.get("LISTEN_PID", ""), env.get("LISTEN_FDS", "")
    names_text = env.get("LISTEN_FDNAMES")
    if unset:
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(name, None)
    if not pid.isdigit() or int(pid) != os.getpid() or not count.isdigit():
        return {}
    n = int(count)
    names = names_text.split(":") if names_text else []
    if names and len(names) != n:
        raise ActivationError(f"LISTEN_FDNAMES names {len(names)} sockets but LISTEN_FDS is {n}")
    found: dict[str, list[socket.socket]] = {}
    for i in range(n):
        fd = LISTEN_FDS_START + i
        try:
            os.set_inheritable(fd, False)
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise ActivationError(f"passed fd {fd} is not a socket: {exc.strerror}") from None
        found.setdefault(names[i] if names else "unknown", []).append(sock)
    return found


def check_listening(sock: socket.socket, what: str) -> None:
    """Refuse a passed socket that is not a listening stream socket (e.g. ``Accept=yes``)."""
    try:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError:
        listening = 0
    if sock.type != socket.SOCK_STREAM or not listening:
        raise ActivationError(f"{what}: the passed socket is not a listening stream socket "
                              "(use ListenStream= with Accept=no)")


# Where systemd (251+) looks for a credential the unit names without a path (LoadCredential=ID);
# it skips one it does not find, so the service starts without it (systemd.exec(5)).
CREDENTIAL_STORES = ("/etc/credstore/", "/run/credstore/", "/usr/lib/credstore/")
CREDENTIALS_ROOT = Path("/run/credentials")  # $CREDENTIALS_DIRECTORY is /run/credentials/UNIT


def missing_credential(path: Path, environ: Mapping[str, str] | None = None) -> str | None:
    """For a file that does not exist: if it is a systemd credential (in
    ``$CREDENTIALS_DIRECTORY`` or ``/run/credentials/UNIT/``), which credential, where systemd
    looks for it and what to do; None for any other file."""
    env = os.environ if environ is None else environ
    path = Path(path)
    directory = env.get("CREDENTIALS_DIRECTORY")
    if path.parent.parent != CREDENTIALS_ROOT and not (directory and
                                                        path.parent == Path(directory)):
        return None
    name, unit = path.name, path.parent.name
    return (f"systemd did not pass the credential {name!r}: it does when the unit names it "
            f"(LoadCredential={name}) and it finds a file {name} in "
            f"{', '.join(CREDENTIAL_STORES[:-1])} or {CREDENTIAL_STORES[-1]}; create "
            f"/etc/credstore/{name} (mode 0600) and run: systemctl restart {unit}")


def missing_credentials(files: Iterable[tuple[str, Path]],
                        environ: Mapping[str, str] | None = None) -> list[tuple[str, Path, str]]:
    """``(setting, path)`` pairs whose file is a systemd credential that is not there, with
    ``missing_credential``'s advice."""
    found = []
    for setting, path in files:
        if not path.exists():
            advice = missing_credential(path, environ)
            if advice is not None:
                found.append((setting, path, advice))
    return found


__all__ = ["Notifier", "ActivationError", "watchdog_interval", "listen_fds", "check_listening",
           "missing_credential", "missing_credentials", "CREDENTIAL_STORES"]
