"""One client connection's bookkeeping, the same for every listener: who the peer is, whether
the listener takes it (``allow_from``, the pre-login connection slots), the connection
metrics, the client's TLS handshake, whether a password may be sent in the clear, and the
``session_end`` line."""

from __future__ import annotations

import logging
import ssl
import time

from proxy import logs, metrics
from proxy.config import Listener
from proxy.server.limits import PreauthLimiter, is_loopback
from proxy.server.tls import handshake_done
from proxy.text import host_port

log = logging.getLogger("proxy.session")


def source_refused(listener: Listener, host: str) -> bytes:
    """The reply sentence (and a log line) for a source the listener's allow_from excludes."""
    logs.event(log, logging.WARNING, "connection_refused", protocol=listener.protocol,
               listener=listener.name, peer=host, reason="source not in the listener's allow_from")
    return (f"Connections from {host} are not accepted on this port; ask the administrator "
            "to add the address to the listener's allow_from").encode("ascii", "replace")


class Connection:
    """What the proxy records of one client connection, from accept to close."""

    __slots__ = ("listener", "preauth", "protocol", "peer", "peer_host", "account",
                 "tls_version", "started", "_slot", "_active")

    def __init__(self, listener: Listener, preauth: PreauthLimiter, peername: object) -> None:
        self.listener, self.preauth = listener, preauth
        self.protocol = listener.protocol
        self.peer, self.peer_host = "?", ""
        self.identify(peername)
        self.account: str | None = None  # set once logged in upstream
        self.tls_version: str | None = None  # the client's, once TLS is up
        self.started = time.monotonic()
        self._slot = False  # holds one of the pre-login connection slots
        self._active = False

    def identify(self, peername: object) -> None:
        """Name the peer by its transport's ``peername`` (an address tuple, or a path)."""
        if isinstance(peername, tuple):
            self.peer_host = str(peername[0])
            self.peer = host_port(self.peer_host, int(peername[1]))
        else:
            self.peer_host, self.peer = "", str(peername or "?")

    def admit(self, refused_prefix: bytes, busy_reply: bytes) -> bytes | None:
        """None if the client may go on (it then holds a pre-login slot); else the reply line
        that refuses it."""
        if not self.listener.admits(self.peer_host):
            return refused_prefix + b" " + source_refused(self.listener, self.peer_host) + b"\r\n"
        if not self.preauth.admit(self.peer_host):
            logs.event(log, logging.WARNING, "connection_refused", protocol=self.protocol,
                       peer=self.peer, reason="too many connections before login")
            return busy_reply
        self._slot = True
        return None

    def opened(self) -> None:
        """Count the connection (once)."""
        if not self._active:
            self._active = True
            labels = (self.protocol, self.listener.name)
            metrics.CONNECTIONS.labels(*labels).inc()
            metrics.CONNECTIONS_ACTIVE.labels(*labels).inc()

    def logged_in(self, account: str) -> None:
        self.account = account
        self.release_preauth()

    def release_preauth(self) -> None:
        if self._slot:
            self._slot = False
            self.preauth.release(self.peer_host)

    def handshake_done(self, ssl_object: ssl.SSLObject | None) -> None:
        """The client's TLS handshake completed (implicit TLS or STARTTLS): count it."""
        self.tls_version = handshake_done(self.listener, ssl_object, self.peer, self.peer_host)

    def may_send_password(self, tls_active: bool) -> bool:
        """A password may come in the clear only from loopback (or where the listener allows
        it); over TLS always."""
        return (tls_active or self.listener.tls == "implicit"
                or self.listener.allow_insecure_non_loopback or is_loopback(self.peer_host))

    def closed(self, **fields: object) -> None:
        """The connection is over: its slot back, the gauge down, ``session_end`` logged if it
        logged in."""
        self.release_preauth()
        if self._active:
            self._active = False
            metrics.CONNECTIONS_ACTIVE.labels(self.protocol, self.listener.name).dec()
        if self.account is not None:
            logs.event(log, logging.INFO, "session_end", protocol=self.protocol,
                       account=self.account, peer=self.peer, **fields,
                       duration=time.monotonic() - self.started)


__all__ = ["Connection", "source_refused"]
