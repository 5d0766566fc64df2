"""The daemon: listeners from the config, one task per connection, graceful stop.

``Daemon.start()`` opens every listener (a large backlog, so a burst of connects all get a
greeting), ``Daemon.stop(grace)`` stops accepting, lets sessions finish for ``grace`` seconds,
then cancels the rest. ``run()`` wires the signals: SIGTERM/SIGINT stop.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import ssl
from collections.abc import Callable

from proxy import logs, metrics, store
from proxy.auth.service import TokenService
from proxy.config import Config, Listener, Upstream
from proxy.protocol.imap import ImapClientSide, ImapUpstreamSide
from proxy.protocol.pop import PopClientSide, PopUpstreamSide
from proxy.server import tls
from proxy.server.endpoint import Endpoint
from proxy.server.session import TLS_HANDSHAKE_TIMEOUT, Context, Session, Spec

log = logging.getLogger("proxy.daemon")
BACKLOG = 4096

SPECS = {
    "imap": Spec("imap", ImapClientSide, ImapUpstreamSide,
                 b"* BYE Idle too long before login; connection closed\r\n"),
    "pop": Spec("pop", PopClientSide, PopUpstreamSide,
                b"-ERR [SYS/TEMP] Idle too long before login; connection closed\r\n"),
}


class StartupError(Exception):
    """The daemon cannot start (one line, for the operator)."""


class ListenerRuntime:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.server: asyncio.AbstractServer | None = None
        self.sessions: set[asyncio.Task[None]] = set()

    @property
    def name(self) -> str:
        return self.ctx.listener.name

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def start(self, sock: socket.socket | None = None) -> None:
        li = self.ctx.listener
        loop = asyncio.get_running_loop()
        implicit = self.ctx.server_tls if li.tls == "implicit" else None
        kwargs: dict[str, object] = dict(backlog=BACKLOG, ssl=implicit,
                                         ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT if implicit else None)
        try:
            if sock is not None:
                self.server = await loop.create_server(self._factory, sock=sock, **kwargs)  # type: ignore[arg-type]
            else:
                self.server = await loop.create_server(self._factory, li.listen.host,
                                                       li.listen.port, reuse_address=True, **kwargs)  # type: ignore[arg-type]
        except OSError as exc:
            raise StartupError(f"listener {li.name}: cannot listen on {li.listen}: "
                               f"{exc.strerror or exc}") from None

    def _factory(self) -> Endpoint:
        return Endpoint(on_connect=self._spawn)

    def _spawn(self, endpoint: Endpoint) -> None:
        task = asyncio.get_running_loop().create_task(Session(self.ctx, endpoint).run(),
                                                      name=f"{self.name} session")
        self.sessions.add(task)
        task.add_done_callback(self.sessions.discard)

    def stop_accepting(self) -> None:
        if self.server is not None:
            self.server.close()


def _upstream_tls(up: Upstream) -> ssl.SSLContext:
    try:
        return tls.upstream_context(up.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(f"upstreams.{up.name}.ca_file: {exc}") from None


def _server_tls(li: Listener) -> ssl.SSLContext | None:
    if li.tls == "none":
        return None
    assert li.cert_file is not None and li.key_file is not None
    try:
        return tls.server_context(li.cert_file, li.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(f"listeners {li.name}: cannot load cert_file/key_file: {exc}") from None


class Daemon:
    def __init__(self, config: Config, *, token_store: store.TokenStore | None = None) -> None:
        self.config = config
        try:
            self.store = token_store or store.TokenStore(config.state_dir)
        except store.StoreError as exc:
            raise StartupError(str(exc)) from None
        except OSError as exc:
            raise StartupError(f"state directory {config.state_dir}: {exc.strerror}") from None
        self.tokens = TokenService(config, self.store)
        self.listeners: list[ListenerRuntime] = []
        self.extra_servers: list[Callable[[], object]] = []

    async def start(self, sockets: dict[str, socket.socket] | None = None) -> None:
        sockets = sockets or {}
        for li in self.config.listeners:
            up = self.config.upstreams[li.upstream]
            if li.protocol == "smtp":
                from proxy.server.smtp import SmtpListener  # aiosmtpd only when SMTP is used
                runtime: ListenerRuntime = SmtpListener(self.config, li, up, self.tokens,  # type: ignore[assignment]
                                                        _upstream_tls(up), _server_tls(li))
            else:
                runtime = ListenerRuntime(Context(SPECS[li.protocol], li, up, self.tokens,
                                                  _upstream_tls(up), _server_tls(li)))
            await runtime.start(sockets.get(li.name))
            self.listeners.append(runtime)
            logs.event(log, logging.INFO, "listening", listener=li.name, protocol=li.protocol,
                       address=f"{li.listen.host}:{runtime.port}", tls=li.tls,
                       upstream=f"{up.host}:{up.port}")
        metrics.LISTENERS_READY.set(1)

    def ports(self) -> dict[str, int]:
        return {runtime.name: runtime.port for runtime in self.listeners}

    async def stop(self, grace: float | None = None) -> None:
        metrics.LISTENERS_READY.set(0)
        grace = self.config.shutdown_grace if grace is None else grace
        for runtime in self.listeners:
            runtime.stop_accepting()
        sessions = [t for runtime in self.listeners for t in runtime.sessions]
        if sessions:
            logs.event(log, logging.INFO, "draining", sessions=len(sessions), grace=grace)
            _, pending = await asyncio.wait(sessions, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self.tokens.aclose()


async def run(config: Config, *, on_ready: Callable[[Daemon], None] | None = None) -> int:
    daemon = Daemon(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await daemon.start()
    if on_ready is not None:
        on_ready(daemon)
    logs.event(log, logging.INFO, "ready", listeners=len(daemon.listeners))
    await stop.wait()
    logs.event(log, logging.INFO, "stopping")
    await daemon.stop()
    return 0
