"""The daemon: listeners from the config, one task per connection, reload, graceful stop.

``Daemon.start()`` opens the metrics endpoint (if configured) and then every listener (a large
backlog, so a burst of connects all get a greeting); it is *ready* once all of them accept.
``Daemon.reload(config)`` swaps in a new config without dropping a session, and
``Daemon.stop(grace)`` stops accepting, lets sessions finish for ``grace`` seconds, then
cancels the rest. ``state`` goes starting → ready (⇄ reloading) → draining → stopped, and the
``/readyz`` probe answers 200 in ready and reloading only.

``run()`` is the process around it, as systemd sees it (``proxy.systemd``): sockets passed by
socket activation are used instead of binding; ``READY=1`` once every listener accepts;
SIGHUP reloads between ``RELOADING=1`` and ``READY=1``; SIGTERM/SIGINT send ``STOPPING=1``
and drain; ``WATCHDOG=1`` goes out from the event loop itself, so a stuck loop is restarted.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import ssl
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal

from proxy import config as config_mod
from proxy import logs, metrics, store, systemd
from proxy.auth.service import TokenService
from proxy.config import Config, Listener
from proxy.graph.route import GraphRoutes, upstream_of
from proxy.operator import OperatorServices
from proxy.protocol.imap import ImapClientSide, ImapUpstreamSide
from proxy.protocol.pop import PopClientSide, PopUpstreamSide
from proxy.server import tls, tlsmemory
from proxy.server.capabilities import CapabilityCache
from proxy.server.endpoint import Endpoint
from proxy.server.http import MetricsServer, log_listening
from proxy.server.limits import PreauthLimiter, Throttle
from proxy.server.listener import ListenerBase, ListenerSettings, StartupError
from proxy.server.session import Context, Session, Spec
from proxy.text import host_port

log = logging.getLogger("proxy.daemon")
SPECS = {
    "imap": Spec("imap", ImapClientSide, ImapUpstreamSide,
                 b"* BYE Idle too long before login; connection closed\r\n",
                 b"* BYE [UNAVAILABLE] Too many connections; try again later\r\n", b"* BYE",
                 mirrors_capabilities=True),
    "pop": Spec("pop", PopClientSide, PopUpstreamSide,
                b"-ERR [SYS/TEMP] Idle too long before login; connection closed\r\n",
                b"-ERR [SYS/TEMP] Too many connections; try again later\r\n", b"-ERR"),
}


METRICS_SOCKET_NAME = "metrics"  # FileDescriptorName= of a socket-activated metrics endpoint

State = Literal["starting", "ready", "reloading", "draining", "stopped"]


class ReloadError(Exception):
    """A reloaded config cannot be used; the daemon keeps the one it has (one line)."""


class ListenerRuntime(ListenerBase):
    """An IMAP or POP3 listener: one ``Session`` task per connection."""

    def __init__(self, ctx: Context) -> None:
        super().__init__()
        self.ctx: Context = ctx
        self._task_name = f"{ctx.listener.name} session"  # one string for every session task

    def _factory(self) -> Endpoint:
        return Endpoint(on_connect=self._spawn)

    def stop_accepting(self) -> None:
        super().stop_accepting()
        self.ctx.warm.close()

    def _spawn(self, endpoint: Endpoint) -> None:
        if log.isEnabledFor(logging.DEBUG):
            peer = endpoint.extra("peername")  # noqa: S610 (not Django)
            logs.event(log, logging.DEBUG, "connection", protocol=self.ctx.listener.protocol,
                       listener=self.name,
                       peer=f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer))
        task = asyncio.get_running_loop().create_task(Session(self.ctx, endpoint).run(),
                                                      name=self._task_name)
        self.sessions.add(task)
        task.add_done_callback(self.sessions.discard)


def _upstream_tls(config: Config, listeners: Iterable[Listener]) -> dict[str, ssl.SSLContext]:
    """A verifying client context per upstream of ``listeners``; upstreams trusting the same
    CAs (the system's, mostly) share one, since loading a CA store costs ~20 ms."""
    by_ca: dict[Path | None, ssl.SSLContext] = {}
    out = {}
    for name in {li.upstream for li in listeners}:
        up = upstream_of(config, name)  # a Graph upstream: its HTTPS endpoint
        if up.ca_file not in by_ca:
            try:
                by_ca[up.ca_file] = tls.upstream_context(up.ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise StartupError(f"upstreams.{up.name}.ca_file: {exc}") from None
        out[name] = by_ca[up.ca_file]
    return out


def _settings(config: Config, li: Listener, upstream_tls: ssl.SSLContext,
              server_tls: ssl.SSLContext | None, graph: GraphRoutes) -> ListenerSettings:
    """What the configuration says to one listener's sessions (at start and on reload)."""
    return ListenerSettings(li, upstream_of(config, li.upstream), upstream_tls, server_tls,
                            config.limits, config.relay_rules(li.name), graph.route(config, li))


def _server_tls(li: Listener) -> ssl.SSLContext | None:
    if li.tls == "none":
        return None
    try:
        return tls.server_context(li)
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(f"listeners {li.name}: cannot load cert_file/key_file: {exc}") from None


def _restart_notes(old: Config, config: Config) -> list[str]:
    """What of the daemon-wide settings a reload leaves as it was, for the log."""
    notes = []
    if config.state_dir != old.state_dir:
        notes.append(f"state_dir changed to {config.state_dir}: a restart applies it; "
                     f"token files are still read from {old.state_dir}")
    if config.metrics.listen != old.metrics.listen:
        notes.append("metrics.listen changed: a restart applies it")
    if config.store != old.store:
        notes.append(f"[store] changed to {config.store.display()}: a restart applies it; "
                     f"tokens are still kept in {old.store.display()}")
    return notes


class Daemon:
    def __init__(self, config: Config, *, token_store: store.TokenStore | None = None,
                 metrics_endpoint: bool = True) -> None:
        self.config = config
        self.metrics_endpoint = metrics_endpoint  # False in a worker: the supervisor serves it
        try:
            self.store = token_store or store.open_store(config)
        except store.StoreError as exc:
            raise StartupError(str(exc)) from None
        except OSError as exc:
            raise StartupError(f"state directory {config.state_dir}: {exc.strerror}") from None
        self.tokens = TokenService(config, self.store)
        tlsmemory.install()  # idle TLS sessions stay small (see proxy.server.tlsmemory)
        # Shared by every listener: failures and pre-login connections count across protocols.
        self.throttle = Throttle(config.limits)
        self.preauth = PreauthLimiter(config.limits)
        # Each IMAP upstream's post-login capabilities, announced before login (all listeners).
        self.capabilities = CapabilityCache(config.state_dir)
        self.graph = GraphRoutes()  # Graph clients and SMTP fallbacks (proxy.graph.route)
        self.listeners: list[ListenerBase] = []
        self.extra_servers: list[Callable[[], object]] = []
        self.metrics_server: MetricsServer | None = None
        self.operator = OperatorServices(self)  # notifications and the admin page
        self.state: State = "starting"
        # The context an implicit-TLS server was created with: asyncio keeps it for the
        # server's life, so a reload makes it hand each new handshake to the current context.
        self._bound_tls: dict[str, ssl.SSLContext] = {}

    @property
    def ready(self) -> bool:
        """Every listener accepts connections (what ``/readyz`` reports)."""
        return self.state in ("ready", "reloading")

    @property
    def metrics_port(self) -> int | None:
        return self.metrics_server.port if self.metrics_server is not None else None

    async def start(self, sockets: dict[str, socket.socket] | None = None, *,
                    metrics_socket: socket.socket | None = None) -> None:
        """Open the metrics endpoint, then every listener (on ``sockets[name]`` if given)."""
        sockets = sockets or {}
        self._prepare_metrics(self.config)
        try:
            await self._start_metrics(metrics_socket)
            upstream_tls = _upstream_tls(self.config, self.config.listeners)
            for li in self.config.listeners:
                await self._start_listener(li, upstream_tls[li.upstream], sockets.get(li.name))
            await self.operator.start()
        except BaseException:
            await self.operator.stop()
            for runtime in self.listeners:
                runtime.stop_accepting()
            self.listeners.clear()
            if self.metrics_server is not None:
                await self.metrics_server.stop()
            self.state = "stopped"
            raise
        await asyncio.to_thread(self._seed_account_metrics)
        self.state = "ready"
        metrics.LISTENERS_READY.set(1)
        metrics.RELOAD_TIME.set(time.time())

    async def _start_metrics(self, sock: socket.socket | None) -> None:
        listen = self.config.metrics.listen
        if (listen is None and sock is None) or not self.metrics_endpoint:
            return
        if (listen is not None and not listen.is_loopback
                and not self.config.metrics.allow_non_loopback):
            raise StartupError(f"metrics: {listen} is not a loopback address (see "
                               "metrics.allow_non_loopback)")  # config.parse refuses it too
        server = MetricsServer(lambda: self.ready)
        try:
            await server.start(listen.host if listen else "", listen.port if listen else 0, sock)
        except OSError as exc:
            raise StartupError(f"metrics: cannot listen on {listen}: "
                               f"{exc.strerror or exc}") from None
        self.metrics_server = server
        host = listen.host if listen else str(server.sockets[0].getsockname()[0])
        log_listening(str(config_mod.Address(host, server.port)))

    async def _start_listener(self, li: Listener, upstream_tls: ssl.SSLContext,
                              sock: socket.socket | None) -> None:
        server_tls = _server_tls(li)
        settings = _settings(self.config, li, upstream_tls, server_tls, self.graph)
        up = settings.upstream
        runtime: ListenerBase
        if li.protocol == "smtp":
            from proxy.server.smtp import SmtpListener  # aiosmtpd only when SMTP is used
            runtime = SmtpListener(settings, self.tokens, self.throttle, self.preauth)
        else:
            runtime = ListenerRuntime(Context(SPECS[li.protocol], li, up, self.tokens,
                                              upstream_tls, server_tls,
                                              throttle=self.throttle, preauth=self.preauth,
                                              capability_cache=self.capabilities,
                                              limits=settings.limits))
        await runtime.start(sock)
        self.listeners.append(runtime)
        if li.tls == "implicit" and server_tls is not None:
            self._bound_tls[li.name] = server_tls
        logs.event(log, logging.INFO, "listening", listener=li.name, protocol=li.protocol,
                   address=host_port(li.listen.host, runtime.port), tls=li.tls,
                   upstream=host_port(up.host, up.port), activated=True if sock is not None else None)
        _warn_old_tls(li)

    def ports(self) -> dict[str, int]:
        return {runtime.name: runtime.port for runtime in self.listeners}

    async def reload(self, config: Config) -> list[str]:
        """Use ``config`` from now on, without dropping a session.

        Applied at once: the token service's config (token files are read again on next use),
        each listener's upstream and TLS contexts (a renewed certificate is served to new
        connections, implicit TLS and STARTTLS alike), metrics label settings. What needs a
        restart (a listener added, removed or moved, another state directory, token store or
        metrics address) is kept as it was and returned as notes for the log. Raises ``ReloadError``
        — and changes nothing — if a certificate, key or CA file cannot be loaded.
        """
        old = self.config
        notes: list[str] = []
        wanted = {li.name: li for li in config.listeners}
        kept: list[tuple[ListenerBase, Listener]] = []
        for runtime in self.listeners:
            current, new = runtime.ctx.listener, wanted.get(runtime.name)
            if new is None:
                notes.append(f"listener {runtime.name} was removed from the config: it keeps "
                             "serving until a restart")
            elif (new.protocol, new.listen, new.tls) != (current.protocol, current.listen,
                                                           current.tls):
                notes.append(f"listener {runtime.name}: a new protocol, address or tls mode "
                             "needs a restart; it keeps its old settings")
            else:
                kept.append((runtime, new))
        running = {runtime.name for runtime in self.listeners}
        notes.extend(f"listener {name} is new: a restart opens it"
                     for name in wanted if name not in running)
        notes.extend(_restart_notes(old, config))

        def build() -> list[tuple[ssl.SSLContext, ssl.SSLContext | None]]:
            upstream_tls = _upstream_tls(config, (li for _, li in kept))
            return [(upstream_tls[li.upstream], _server_tls(li)) for _, li in kept]
        try:
            contexts = await asyncio.to_thread(build)
        except StartupError as exc:
            raise ReloadError(str(exc)) from None

        # Apply: nothing below awaits, so no session sees half a reload.
        self.config = config
        self.tokens.reconfigure(config)
        self.throttle.limits = self.preauth.limits = config.limits
        for (runtime, li), (upstream_tls, server_tls) in zip(kept, contexts, strict=True):
            runtime.ctx.reconfigure(_settings(config, li, upstream_tls, server_tls, self.graph))
            bound = self._bound_tls.get(li.name)
            if bound is not None and server_tls is not None:
                # The version range and ciphers come from the context a connection starts
                # with (the switch below brings only the certificate): set them on it too.
                tls.apply_policy(bound, li)
                bound.sni_callback = _use_context(server_tls)
            _warn_old_tls(li)
        self._prepare_metrics(config)
        await asyncio.to_thread(self._seed_account_metrics)
        return notes + await self.operator.reload(config)

    async def stop(self, grace: float | None = None) -> None:
        self.state = "draining"
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
        await self.operator.stop()
        await self.tokens.aclose()
        await self.graph.aclose()
        await self.capabilities.flush()
        if self.metrics_server is not None:
            await self.metrics_server.stop()
        self.state = "stopped"

    def _prepare_metrics(self, config: Config) -> None:
        metrics.prepare(((li.protocol, li.name) for li in config.listeners),
                        per_account_labels=config.metrics.per_account_labels,
                        accounts=config.accounts,
                        tls_listeners=((li.name, li.min_tls_version)
                                       for li in config.listeners if li.tls != "none"))

    def _seed_account_metrics(self) -> None:
        """Token facts from the token files' clear metadata (no password needed), so that an
        account needing authorisation shows before any client tries it (worker thread)."""
        metrics.ACCOUNTS.seed(self.store, self.config.accounts)


def _warn_old_tls(li: Listener) -> None:
    """A listener that accepts TLS 1.0/1.1 says so whenever it starts or is reloaded."""
    if li.old_tls and li.tls != "none":
        logs.event(log, logging.WARNING, "old_tls_enabled", listener=li.name,
                   min_tls_version=li.min_tls_version,
                   sources=",".join(map(str, li.allow_from)) or "loopback only",
                   risk="TLS below 1.2 is weak: serve only devices that need it, from these "
                        "sources")


SniCallback = Callable[[ssl.SSLObject, str | None, ssl.SSLContext], None]


def _use_context(context: ssl.SSLContext) -> SniCallback:
    def switch(ssl_object: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        ssl_object.context = context  # called for every ClientHello, with or without SNI
    return switch


# --- the process ---------------------------------------------------------------------------


def activated_sockets(config: Config, passed: dict[str, list[socket.socket]]
                       ) -> tuple[dict[str, socket.socket], socket.socket | None]:
    """Match sockets from socket activation to listeners by name (``FileDescriptorName=``)."""
    names = {li.name for li in config.listeners}
    sockets: dict[str, socket.socket] = {}
    for name, socks in passed.items():
        if name not in names and name != METRICS_SOCKET_NAME:
            raise StartupError(
                f"socket activation passed a socket named {name!r}, but no listener has that "
                f"name (set FileDescriptorName= to one of: {', '.join(sorted(names))}, or "
                f"{METRICS_SOCKET_NAME!r} for the metrics endpoint)")
        if len(socks) != 1:
            raise StartupError(f"socket activation passed {len(socks)} sockets named {name!r}; "
                               "one per listener")
        try:
            systemd.check_listening(socks[0], f"socket {name!r}")
        except systemd.ActivationError as exc:
            raise StartupError(str(exc)) from None
        sockets[name] = socks[0]
    return sockets, sockets.pop(METRICS_SOCKET_NAME, None)


class _Process:
    """Signals, service-manager notifications and reloads around one ``Daemon``."""

    def __init__(self, daemon: Daemon, notifier: systemd.Notifier, log_level: str | None) -> None:
        self.daemon, self.notifier, self.log_level = daemon, notifier, log_level
        self.stop = asyncio.Event()
        self.hup = asyncio.Event()

    def status(self, prefix: str = "ready") -> str:
        ports = ", ".join(f"{name} {port}" for name, port in self.daemon.ports().items())
        return f"{prefix}: listening ({ports})" if ports else f"{prefix}: no listeners"

    async def watchdog(self, interval: float) -> None:
        while True:  # from the event loop itself: if the loop hangs, the pings stop
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    async def reloader(self) -> None:
        while True:
            await self.hup.wait()
            self.hup.clear()  # SIGHUPs during a reload make one more reload
            await self.reload()

    async def reload(self) -> None:
        daemon = self.daemon
        path = daemon.config.path
        daemon.state = "reloading"
        self.notifier.reloading(f"reloading {path}")
        logs.event(log, logging.INFO, "reload", config=str(path))
        status = self.status()
        try:
            config = await asyncio.to_thread(config_mod.load, path)
            notes = await daemon.reload(config)
        except Exception as exc:  # a bad config (or a bug) must not end the daemon
            metrics.RELOADS.labels("failed").inc()
            metrics.RELOAD_OK.set(0)
            expected = isinstance(exc, config_mod.ConfigError | ReloadError)
            logs.event(log, logging.ERROR, "reload_failed", config=str(path),
                       reason=str(exc) if expected else f"{type(exc).__name__}: {exc}",
                       action="fix the config and reload again; still running with the "
                              "previous one")
            status = self.status("ready, with the previous config (reload failed)")
        else:
            metrics.RELOADS.labels("ok").inc()
            metrics.RELOAD_OK.set(1)
            metrics.RELOAD_TIME.set(time.time())
            logs.set_level(self.log_level or config.log_level)
            for note in notes:
                logs.event(log, logging.WARNING, "restart_required", reason=note)
            logs.event(log, logging.INFO, "reloaded", config=str(path),
                       restart_required=len(notes) or None)
        finally:
            if daemon.state == "reloading":
                daemon.state = "ready"
            if not self.stop.is_set():  # else STOPPING=1 has been sent: no READY=1 after it
                self.notifier.ready(status)


async def run(config: Config, *, on_ready: Callable[[Daemon], None] | None = None,
              log_level: str | None = None, metrics_endpoint: bool = True) -> int:
    """Serve until SIGTERM/SIGINT; reload on SIGHUP. ``log_level``: the command line's override
    of ``config.log_level`` (kept across reloads); ``metrics_endpoint``: False in a worker
    (``proxy.supervisor`` serves the metrics address)."""
    loop = asyncio.get_running_loop()
    notifier = systemd.Notifier.from_env()
    try:
        passed = systemd.listen_fds()
    except systemd.ActivationError as exc:
        raise StartupError(str(exc)) from None
    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    tasks: list[asyncio.Task[None]] = []
    try:
        try:
            sockets, metrics_socket = activated_sockets(config, passed)
            notifier.status("starting")
            daemon = Daemon(config, metrics_endpoint=metrics_endpoint)
            process = _Process(daemon, notifier, log_level)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, process.stop.set)
            loop.add_signal_handler(signal.SIGHUP, process.hup.set)
            # A worker starts with SIGHUP blocked (proxy.supervisor): one that came meanwhile
            # is handled now, as a reload once started.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
            await daemon.start(sockets, metrics_socket=metrics_socket)
        except StartupError as exc:
            notifier.status(f"cannot start: {exc}")
            for sock in (sock for socks in passed.values() for sock in socks):
                sock.close()
            raise
        reloader = loop.create_task(process.reloader(), name="reloader")
        tasks.append(reloader)
        interval = systemd.watchdog_interval()
        if interval is not None:
            tasks.append(loop.create_task(process.watchdog(interval), name="watchdog"))
        if on_ready is not None:
            on_ready(daemon)
        notifier.ready(process.status())
        logs.event(log, logging.INFO, "ready", listeners=len(daemon.listeners),
                   systemd=True if notifier.enabled else None, watchdog=interval,
                   event_loop=type(loop).__module__.split(".")[0])
        await process.stop.wait()
        notifier.stopping("stopping: draining sessions")
        logs.event(log, logging.INFO, "stopping")
        reloader.cancel()  # a reload in progress stops where it waits (reading files)
        await asyncio.gather(reloader, return_exceptions=True)
        await daemon.stop()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for sig in signals:
            loop.remove_signal_handler(sig)
        notifier.close()
    logs.event(log, logging.INFO, "stopped")
    return 0
