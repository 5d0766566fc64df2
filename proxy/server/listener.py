"""What every listener has in common, whatever its protocol: opening the socket (or taking a
socket-activated one), its name and port, its session tasks, closing for new connections, and
the one shape of the settings a reload pushes into its context."""

from __future__ import annotations

import asyncio
import socket
import ssl
from dataclasses import dataclass
from typing import Any, Protocol

from proxy.config import Limits, Listener, RelayRule, Upstream
from proxy.graph.route import GraphRoute

BACKLOG = 4096  # a burst of hundreds of simultaneous connects must all get a greeting
TLS_HANDSHAKE_TIMEOUT = 15.0  # an implicit-TLS client's handshake, on every listener


class StartupError(Exception):
    """The daemon cannot start (one line, for the operator)."""


@dataclass(frozen=True)
class ListenerSettings:
    """Everything a listener's sessions read from the configuration: given when the listener
    starts, and pushed into its context again by each reload."""

    listener: Listener
    upstream: Upstream
    upstream_tls: ssl.SSLContext
    server_tls: ssl.SSLContext | None
    limits: Limits
    relay_rules: tuple[RelayRule, ...] = ()
    graph: GraphRoute | None = None  # SMTP through Microsoft Graph, directly or as fallback


class ListenerContext(Protocol):
    """What every session of one listener shares, whatever the protocol."""

    @property
    def listener(self) -> Listener: ...

    @property
    def server_tls(self) -> ssl.SSLContext | None: ...

    def reconfigure(self, settings: ListenerSettings) -> None:
        """A reload: new sessions (and new logins) use ``settings``."""


class ListenerBase:
    """Subclasses set ``ctx`` and provide ``_factory`` (the asyncio protocol factory)."""

    ctx: ListenerContext

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.sessions: set[asyncio.Task[None]] = set()

    def _factory(self) -> asyncio.BaseProtocol:
        raise NotImplementedError

    @property
    def name(self) -> str:
        return self.ctx.listener.name

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def start(self, sock: socket.socket | None = None) -> None:
        """Listen on the configured address, or on ``sock`` (socket activation)."""
        li = self.ctx.listener
        loop = asyncio.get_running_loop()
        implicit = self.ctx.server_tls if li.tls == "implicit" else None
        kwargs: dict[str, Any] = dict(backlog=BACKLOG, ssl=implicit,
                                      ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT if implicit else None)
        try:
            if sock is not None:
                self.server = await loop.create_server(self._factory, sock=sock, **kwargs)
            else:
                self.server = await loop.create_server(self._factory, li.listen.host,
                                                       li.listen.port, reuse_address=True, **kwargs)
        except OSError as exc:
            raise StartupError(f"listener {li.name}: cannot listen on {li.listen}: "
                               f"{exc.strerror or exc}") from None

    def stop_accepting(self) -> None:
        if self.server is not None:
            self.server.close()
