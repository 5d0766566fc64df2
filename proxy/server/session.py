"""The per-connection driver for IMAP and POP3: one mechanism for both protocols.

It runs the protocol's sans-I/O client machine until the client gives credentials, asks the
token service for an access token, logs in upstream with the protocol's XOAUTH2 machine (over
verified TLS), hands the verdict back to the client machine, and then relays bytes.

Everything that can go wrong in one connection ends in that connection: a reply the client can
act on where the protocol allows one, a log line with the peer, and a closed socket. No
exception leaves ``Session.run``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from proxy import logs, metrics, tlspolicy
from proxy.auth.service import TokenService
from proxy.config import Limits, Listener, Upstream
from proxy.protocol.events import (
    Authenticate,
    CloseConnection,
    Failure,
    SendToClient,
    SendToServer,
    StartClientTLS,
    StartRelay,
    StartServerTLS,
    UpstreamBroken,
    UpstreamLoggedIn,
    UpstreamRejected,
)
from proxy.secret import Secret
from proxy.server.capabilities import CapabilityCache
from proxy.server.connection import Connection
from proxy.server.endpoint import ConnectionClosed, Endpoint, relay
from proxy.server.limits import PreauthLimiter, Throttle
from proxy.server.listener import ListenerSettings
from proxy.server.logins import LoginAttempt
from proxy.server.pipeline import Denied, PasswordToken, Pipeline, UpstreamUnavailable
from proxy.server.pool import WarmPool
from proxy.text import host_port, untrusted_certificate

log = logging.getLogger("proxy.session")

UPSTREAM_LOGIN_TIMEOUT = 30.0
TLS_HANDSHAKE_TIMEOUT = 15.0  # a client's STARTTLS, and the upstream's TLS (IMAP, POP3)

Outcome = UpstreamLoggedIn | UpstreamRejected | UpstreamBroken


class ClientMachine(Protocol):
    def greeting(self) -> Sequence[object]: ...
    def receive(self, data: bytes) -> Sequence[object]: ...
    def tls_started(self) -> Sequence[object]: ...
    def login_succeeded(self, capabilities: str | None, server_bytes: bytes = b"") -> Sequence[object]: ...
    def login_failed(self, failure: Failure, text: str) -> Sequence[object]: ...


class UpstreamMachine(Protocol):
    def receive(self, data: bytes) -> Sequence[object]: ...
    def tls_started(self) -> Sequence[object]: ...


@dataclass(frozen=True)
class Spec:
    """What differs between IMAP and POP3: the two machines and a goodbye for timeouts.

    ``mirrors_capabilities``: the client machine announces the upstream's post-login
    capabilities (``upstream_capabilities=``) and the upstream machine can ask for them
    (``ask_capabilities=``); see ``proxy.server.capabilities``."""

    protocol: str
    client_machine: Callable[..., ClientMachine]
    upstream_machine: Callable[..., UpstreamMachine]
    timeout_reply: bytes
    busy_reply: bytes
    refused_prefix: bytes  # before the sentence that refuses a source not in allow_from
    mirrors_capabilities: bool = False


@dataclass
class Context:
    """What every session of one listener shares."""

    spec: Spec
    listener: Listener
    upstream: Upstream
    tokens: TokenService
    upstream_tls: ssl.SSLContext
    server_tls: ssl.SSLContext | None
    throttle: Throttle = field(default_factory=lambda: Throttle(Limits()))
    preauth: PreauthLimiter = field(default_factory=lambda: PreauthLimiter(Limits()))
    capability_cache: CapabilityCache = field(default_factory=lambda: CapabilityCache(None))
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        p = self.spec.protocol
        self.count_up = metrics.BYTES_RELAYED.labels(p, "client_to_upstream").inc
        self.count_down = metrics.BYTES_RELAYED.labels(p, "upstream_to_client").inc
        self.warm = WarmPool(self.connect, self.upstream.warm_connections,
                             self.upstream.warm_seconds, protocol=p, name=self.upstream.name)
        self.capabilities = self.capability_cache.get(self.upstream)

    def connect(self) -> Awaitable[Endpoint]:
        """A new connection to the upstream as currently configured."""
        return connect_upstream(self.upstream, self.upstream_tls)

    def reconfigure(self, settings: ListenerSettings) -> None:
        """A reload: new sessions use ``settings``; warm connections made before are closed."""
        self.listener, self.server_tls, self.limits = (settings.listener, settings.server_tls,
                                                       settings.limits)
        self.upstream, self.upstream_tls = settings.upstream, settings.upstream_tls
        self.capabilities = self.capability_cache.get(self.upstream)
        self.warm.clear()
        self.warm.size, self.warm.max_age = self.upstream.warm_connections, self.upstream.warm_seconds


async def connect_upstream(upstream: Upstream, context: ssl.SSLContext) -> Endpoint:
    """A connected (and, for implicit TLS, verified) upstream endpoint."""
    loop = asyncio.get_running_loop()
    implicit = upstream.tls == "implicit"
    where = host_port(upstream.host, upstream.port)
    try:
        async with asyncio.timeout(upstream.connect_timeout):
            _, endpoint = await loop.create_connection(
                Endpoint, upstream.host, upstream.port,
                ssl=context if implicit else None,
                server_hostname=upstream.host if implicit else None,
                ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT if implicit else None)
    except TimeoutError:
        raise UpstreamUnavailable(f"connecting to {where} timed out") from None
    except ssl.SSLCertVerificationError as exc:
        raise UpstreamUnavailable(untrusted_certificate(upstream.host, exc)) from None
    except (OSError, ssl.SSLError) as exc:
        raise UpstreamUnavailable(f"cannot connect to {where}: {exc.strerror or exc}") from None
    return endpoint


@dataclass(frozen=True)
class LoggedIn:
    """An upstream endpoint the upstream machine logged in, and the machine's verdict."""

    endpoint: Endpoint
    verdict: UpstreamLoggedIn


class EndpointOpener:
    """How IMAP and POP3 open and authenticate their upstream (the pipeline's
    ``UpstreamOpener``): a warm connection if one is ready, else (or if the upstream dropped
    it meanwhile) a new one, driven by the protocol's upstream machine."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    @property
    def host(self) -> str:
        return self.ctx.upstream.host

    def tls_version(self, upstream: LoggedIn) -> str | None:
        return tlspolicy.wire_version(upstream.endpoint.extra("ssl_object"))

    async def open(self, mailbox: str, token: str) -> LoggedIn | UpstreamRejected | UpstreamBroken:
        ctx = self.ctx
        warm = ctx.warm.take()
        if warm is not None:
            outcome = await self._login_on(warm, mailbox, token)
            if not isinstance(outcome, UpstreamBroken):
                return outcome
            ctx.warm.discard(warm)
        started = time.monotonic()
        upstream = await ctx.connect()
        metrics.UPSTREAM_CONNECT_SECONDS.labels(ctx.spec.protocol).observe(time.monotonic() - started)
        return await self._login_on(upstream, mailbox, token)

    async def _login_on(self, upstream: Endpoint, user: str,
                        token: str) -> LoggedIn | UpstreamRejected | UpstreamBroken:
        outcome = await self._drive(upstream, user, token)
        if isinstance(outcome, UpstreamLoggedIn):
            return LoggedIn(upstream, outcome)
        upstream.close()
        return outcome

    async def _drive(self, upstream: Endpoint, user: str, token: str) -> Outcome:
        ctx = self.ctx
        mirrors = ctx.spec.mirrors_capabilities
        ask = {"ask_capabilities": ctx.capabilities.due()} if mirrors else {}
        machine = ctx.spec.upstream_machine(user=user, token=Secret(token),
                                            starttls=ctx.upstream.tls == "starttls", **ask)
        try:
            async with asyncio.timeout(UPSTREAM_LOGIN_TIMEOUT):
                while True:
                    work: deque[object] = deque(machine.receive(await upstream.read()))
                    while work:
                        cmd = work.popleft()
                        if isinstance(cmd, SendToServer):
                            upstream.write(cmd.data)
                        elif isinstance(cmd, StartServerTLS):
                            await upstream.start_tls(ctx.upstream_tls, server_side=False,
                                                     server_hostname=ctx.upstream.host,
                                                     timeout=TLS_HANDSHAKE_TIMEOUT)
                            work.extend(machine.tls_started())
                        elif isinstance(cmd, UpstreamLoggedIn | UpstreamRejected | UpstreamBroken):
                            if isinstance(cmd, UpstreamLoggedIn) and cmd.capabilities and mirrors:
                                ctx.capabilities.learned(cmd.capabilities)
                            return cmd
        except TimeoutError:
            return UpstreamBroken("the server did not answer the login in time")
        except ssl.SSLCertVerificationError as exc:
            upstream.close()
            raise UpstreamUnavailable(untrusted_certificate(ctx.upstream.host, exc)) from None
        except (ConnectionClosed, ConnectionError, ssl.SSLError) as exc:
            return UpstreamBroken(f"connection failed during login: {exc}")


class Session:
    __slots__ = ("ctx", "client", "upstream", "conn", "__weakref__")

    def __init__(self, ctx: Context, client: Endpoint) -> None:
        self.ctx = ctx
        self.client = client
        self.upstream: Endpoint | None = None
        self.conn = Connection(ctx.listener, ctx.preauth, client.extra("peername"))

    async def run(self) -> None:
        conn, spec = self.conn, self.ctx.spec
        conn.opened()
        try:
            refusal = conn.admit(spec.refused_prefix, spec.busy_reply)
            if refusal is not None:
                self.client.write(refusal)
                return
            client_bytes = await self._serve()
            if client_bytes is not None:  # the login dialogue and its machine are gone
                await self.relay(client_bytes)
        except (ConnectionClosed, ConnectionError, ssl.SSLError) as exc:
            logs.event(log, logging.DEBUG, "connection_closed", peer=conn.peer,
                       reason=type(exc).__name__)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug: this connection ends, the daemon does not
            log.exception("session_failed", extra={"fields": {"peer": conn.peer}})
        finally:
            for endpoint in (self.client, self.upstream):
                if endpoint is not None:
                    endpoint.close()
            conn.closed()

    async def _serve(self) -> bytes | None:
        """The dialogue before the relay, driven by the protocol's client machine: the bytes
        the client sent past its login when it is time to relay, None when the connection is
        to close."""
        ctx, client = self.ctx, self.client
        mirrored = ({"upstream_capabilities": ctx.capabilities.text}
                    if ctx.spec.mirrors_capabilities else {})
        machine = ctx.spec.client_machine(
            starttls=ctx.listener.tls == "starttls",
            tls_active=ctx.listener.tls == "implicit",
            login_disabled=not self.conn.may_send_password(tls_active=False), **mirrored)
        if ctx.listener.tls == "implicit":
            self.conn.handshake_done(client.extra("ssl_object"))
        work: deque[object] = deque(machine.greeting())
        limits = ctx.limits
        deadline = asyncio.get_running_loop().time() + limits.preauth_total
        while True:
            while work:
                cmd = work.popleft()
                if isinstance(cmd, SendToClient):
                    client.write(cmd.data)
                elif isinstance(cmd, Authenticate):
                    work.extend(await self._login(machine, cmd))
                elif isinstance(cmd, StartRelay):
                    return cmd.client_bytes
                elif isinstance(cmd, StartClientTLS):
                    await self._start_tls()
                    work.extend(machine.tls_started())
                elif isinstance(cmd, CloseConnection):
                    await client.drain()
                    return None
                else:
                    raise AssertionError(f"unexpected command {cmd!r}")
            await client.drain()
            left = deadline - asyncio.get_running_loop().time()
            try:
                async with asyncio.timeout(max(0.0, min(limits.preauth_idle, left))):
                    data = await client.read()
            except TimeoutError:
                with contextlib.suppress(ConnectionClosed):
                    client.write(ctx.spec.timeout_reply)
                logs.event(log, logging.INFO, "preauth_timeout", protocol=ctx.spec.protocol,
                           peer=self.conn.peer)
                return None
            work.extend(machine.receive(data))

    async def _start_tls(self) -> None:
        assert self.ctx.server_tls is not None
        await self.client.drain()
        await self.client.start_tls(self.ctx.server_tls, server_side=True,
                                    timeout=TLS_HANDSHAKE_TIMEOUT)
        self.conn.handshake_done(self.client.extra("ssl_object"))

    async def _login(self, machine: ClientMachine, cmd: Authenticate) -> Sequence[object]:
        ctx, conn = self.ctx, self.conn
        protocol = ctx.listener.protocol
        attempt = LoginAttempt(ctx.throttle, log, protocol=protocol, listener=ctx.listener.name,
                               user=cmd.username, peer=conn.peer, peer_host=conn.peer_host,
                               mechanism=cmd.mechanism)
        try:
            verdict = await Pipeline(ctx.tokens,
                                     PasswordToken(ctx.tokens, cmd.username, cmd.password,
                                                   protocol),
                                     EndpointOpener(ctx), attempt=attempt,
                                     permission=f"{protocol.upper()} access",
                                     client_tls=conn.tls_version).run()
        finally:
            attempt.leave()
        if isinstance(verdict, Denied):
            return machine.login_failed(verdict.failure, verdict.text)
        self.upstream = verdict.upstream.endpoint
        conn.logged_in(verdict.account.name)
        logged_in = verdict.upstream.verdict
        return machine.login_succeeded(logged_in.capabilities, logged_in.server_bytes)

    def relay(self, client_bytes: bytes) -> Awaitable[None]:
        """Bytes both ways until both sides have closed (after login); awaited by ``run``
        directly, so the relay adds no frame of its own for the session's lifetime."""
        upstream = self.upstream
        assert upstream is not None
        if client_bytes:
            upstream.write(client_bytes)
            self.ctx.count_up(len(client_bytes))
        return relay(self.client, upstream, count_up=self.ctx.count_up,
                     count_down=self.ctx.count_down)
