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
from proxy.auth.errors import TokenError
from proxy.auth.service import TokenService
from proxy.config import Limits, Listener, Upstream
from proxy.protocol.events import (
    Authenticate,
    CloseConnection,
    Failure,
    ReplyKind,
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
from proxy.server.endpoint import ConnectionClosed, Endpoint, relay
from proxy.server.limits import PreauthLimiter, Throttle, is_loopback
from proxy.server.logins import LoginAttempt, unreachable, upstream_refusal
from proxy.server.pool import WarmPool
from proxy.server.tls import handshake_done

log = logging.getLogger("proxy.session")

UPSTREAM_LOGIN_TIMEOUT = 30.0
TLS_HANDSHAKE_TIMEOUT = 15.0

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


class UpstreamUnavailable(Exception):
    """Could not connect to, or complete TLS with, the upstream server."""


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

    def reconfigure(self, upstream: Upstream, upstream_tls: ssl.SSLContext) -> None:
        """A reload: new sessions use ``upstream``; warm connections made before are closed."""
        self.upstream, self.upstream_tls = upstream, upstream_tls
        self.capabilities = self.capability_cache.get(upstream)
        self.warm.clear()
        self.warm.size, self.warm.max_age = upstream.warm_connections, upstream.warm_seconds


def source_refused(listener: Listener, host: str) -> bytes:
    """The reply sentence (and a log line) for a source the listener's allow_from excludes."""
    logs.event(log, logging.WARNING, "connection_refused", protocol=listener.protocol,
               listener=listener.name, peer=host, reason="source not in the listener's allow_from")
    return (f"Connections from {host} are not accepted on this port; ask the administrator "
            "to add the address to the listener's allow_from").encode("ascii", "replace")


async def connect_upstream(upstream: Upstream, context: ssl.SSLContext) -> Endpoint:
    """A connected (and, for implicit TLS, verified) upstream endpoint."""
    loop = asyncio.get_running_loop()
    implicit = upstream.tls == "implicit"
    try:
        async with asyncio.timeout(upstream.connect_timeout):
            _, endpoint = await loop.create_connection(
                Endpoint, upstream.host, upstream.port,
                ssl=context if implicit else None,
                server_hostname=upstream.host if implicit else None,
                ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT if implicit else None)
    except TimeoutError:
        raise UpstreamUnavailable(f"connecting to {upstream.host}:{upstream.port} timed out") from None
    except ssl.SSLCertVerificationError as exc:
        raise UpstreamUnavailable(f"TLS certificate of {upstream.host} not trusted: "
                                  f"{exc.verify_message}") from None
    except (OSError, ssl.SSLError) as exc:
        raise UpstreamUnavailable(f"cannot connect to {upstream.host}:{upstream.port}: "
                                  f"{exc.strerror or exc}") from None
    return endpoint


class Session:
    def __init__(self, ctx: Context, client: Endpoint) -> None:
        self.ctx = ctx
        self.client = client
        self.upstream: Endpoint | None = None
        peer = client.extra("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "?")
        self.peer_host = peer[0] if isinstance(peer, tuple) else ""
        self.account: str | None = None
        self.preauth_slot = False  # holds one of the pre-login connection slots
        self.tls_version: str | None = None  # the client's, once TLS is up

    async def run(self) -> None:
        labels = (self.ctx.spec.protocol, self.ctx.listener.name)
        metrics.CONNECTIONS.labels(*labels).inc()
        metrics.CONNECTIONS_ACTIVE.labels(*labels).inc()
        started = time.monotonic()
        try:
            if not self.ctx.listener.admits(self.peer_host):
                self.client.write(self.ctx.spec.refused_prefix + b" "
                                  + source_refused(self.ctx.listener, self.peer_host) + b"\r\n")
                return
            if not self.ctx.preauth.admit(self.peer_host):
                logs.event(log, logging.WARNING, "connection_refused", protocol=self.ctx.spec.protocol,
                           peer=self.peer, reason="too many connections before login")
                self.client.write(self.ctx.spec.busy_reply)
                return
            self.preauth_slot = True
            await self._serve()
        except (ConnectionClosed, ConnectionError, ssl.SSLError) as exc:
            logs.event(log, logging.DEBUG, "connection_closed", peer=self.peer,
                       reason=type(exc).__name__)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug: this connection ends, the daemon does not
            log.exception("session_failed", extra={"fields": {"peer": self.peer}})
        finally:
            self._release_preauth()
            metrics.CONNECTIONS_ACTIVE.labels(*labels).dec()
            for endpoint in (self.client, self.upstream):
                if endpoint is not None:
                    endpoint.close()
            if self.account is not None:
                logs.event(log, logging.INFO, "session_end", protocol=self.ctx.spec.protocol,
                           account=self.account, peer=self.peer,
                           duration=time.monotonic() - started)

    async def _serve(self) -> None:
        ctx, client = self.ctx, self.client
        mirrored = ({"upstream_capabilities": ctx.capabilities.text}
                    if ctx.spec.mirrors_capabilities else {})
        machine = ctx.spec.client_machine(
            starttls=ctx.listener.tls == "starttls",
            tls_active=ctx.listener.tls == "implicit",
            login_disabled=self._login_disabled(), **mirrored)
        if ctx.listener.tls == "implicit":
            self._handshake_done()
        work: deque[object] = deque(machine.greeting())
        limits = ctx.tokens.config.limits
        deadline = asyncio.get_running_loop().time() + limits.preauth_total
        while True:
            while work:
                cmd = work.popleft()
                if isinstance(cmd, SendToClient):
                    client.write(cmd.data)
                elif isinstance(cmd, Authenticate):
                    work.extend(await self._login(machine, cmd))
                elif isinstance(cmd, StartRelay):
                    await self._relay(cmd.client_bytes)
                    return
                elif isinstance(cmd, StartClientTLS):
                    assert ctx.server_tls is not None
                    await client.drain()
                    await client.start_tls(ctx.server_tls, server_side=True,
                                           timeout=TLS_HANDSHAKE_TIMEOUT)
                    self._handshake_done()
                    work.extend(machine.tls_started())
                elif isinstance(cmd, CloseConnection):
                    await client.drain()
                    return
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
                           peer=self.peer)
                return
            work.extend(machine.receive(data))

    def _handshake_done(self) -> None:
        self.tls_version = handshake_done(self.ctx.listener, self.client.extra("ssl_object"),
                                          self.peer, self.peer_host)

    def _login_disabled(self) -> bool:
        li = self.ctx.listener
        if li.tls == "implicit" or li.allow_insecure_non_loopback:
            return False
        return not is_loopback(self.peer_host)

    def _release_preauth(self) -> None:
        if self.preauth_slot:
            self.preauth_slot = False
            self.ctx.preauth.release(self.peer_host)

    async def _login(self, machine: ClientMachine, cmd: Authenticate) -> Sequence[object]:
        ctx = self.ctx
        protocol = ctx.spec.protocol
        login = LoginAttempt(ctx.throttle, log, protocol=protocol, listener=ctx.listener.name,
                             user=cmd.username, peer=self.peer, peer_host=self.peer_host,
                             mechanism=cmd.mechanism)
        finish = login.finish
        refusal = login.refusal()
        if refusal is not None:
            return machine.login_failed(Failure.THROTTLED, refusal)
        try:
            token = await ctx.tokens.access_token(cmd.username, cmd.password, protocol)  # type: ignore[arg-type]
            account = ctx.tokens.account(cmd.username)
        except TokenError as exc:
            if exc.failure is Failure.BAD_CREDENTIALS:
                await login.bad_credentials()
            finish(exc.result, exc.detail)
            return machine.login_failed(exc.failure, exc.user_text)
        login.good_credentials()
        for attempt in (1, 2):
            try:
                upstream, outcome = await self._upstream_login(account.mailbox, token)
            except UpstreamUnavailable as exc:
                finish("upstream_unavailable", str(exc))
                return machine.login_failed(Failure.UNAVAILABLE, unreachable(ctx.upstream.host))
            if isinstance(outcome, UpstreamLoggedIn):
                self.upstream, self.account = upstream, account.name
                self._release_preauth()
                finish("ok", attempt=attempt if attempt > 1 else None, tls=self.tls_version,
                       upstream_tls=tlspolicy.wire_version(upstream.extra("ssl_object")))
                return machine.login_succeeded(outcome.capabilities, outcome.server_bytes)
            upstream.close()
            if isinstance(outcome, UpstreamBroken):
                finish("upstream_unavailable", outcome.text)
                return machine.login_failed(
                    Failure.UNAVAILABLE, f"The mail server {ctx.upstream.host} did not complete "
                                         "the login; try again later.")
            if outcome.kind is ReplyKind.AUTH_FAILED and attempt == 1:
                # A token the service thought valid was refused: refresh once, and only then.
                try:
                    token = await ctx.tokens.access_token(cmd.username, cmd.password, protocol,  # type: ignore[arg-type]
                                                          rejected=token)
                except TokenError as exc:
                    finish(exc.result, exc.detail)
                    return machine.login_failed(exc.failure, exc.user_text)
                continue
            refused = upstream_refusal(outcome.kind, outcome.code, outcome.text,
                                       host=ctx.upstream.host, mailbox=account.mailbox,
                                       permission=f"{protocol.upper()} access")
            finish(refused.result, outcome.text, upstream_reply=outcome.kind.value,
                   attempt=attempt if attempt > 1 else None)
            return machine.login_failed(refused.failure, refused.text)
        raise AssertionError("unreachable")

    async def _upstream_login(self, user: str, token: str) -> tuple[Endpoint, Outcome]:
        """Log in on a warm connection if one is ready, else (or if the upstream dropped it
        meanwhile) on a new one."""
        ctx = self.ctx
        warm = ctx.warm.take()
        if warm is not None:
            upstream, outcome = await self._login_on(warm, user, token)
            if not isinstance(outcome, UpstreamBroken):
                return upstream, outcome
            ctx.warm.discard(upstream)
        started = time.monotonic()
        upstream = await ctx.connect()
        metrics.UPSTREAM_CONNECT_SECONDS.labels(ctx.spec.protocol).observe(time.monotonic() - started)
        return await self._login_on(upstream, user, token)

    async def _login_on(self, upstream: Endpoint, user: str, token: str) -> tuple[Endpoint, Outcome]:
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
                            return upstream, cmd
        except TimeoutError:
            return upstream, UpstreamBroken("the server did not answer the login in time")
        except ssl.SSLCertVerificationError as exc:
            upstream.close()
            raise UpstreamUnavailable(f"TLS certificate of {ctx.upstream.host} not trusted: "
                                      f"{exc.verify_message}") from None
        except (ConnectionClosed, ConnectionError, ssl.SSLError) as exc:
            return upstream, UpstreamBroken(f"connection failed during login: {exc}")

    async def _relay(self, client_bytes: bytes) -> None:
        upstream = self.upstream
        assert upstream is not None
        if client_bytes:
            upstream.write(client_bytes)
            self.ctx.count_up(len(client_bytes))
        await relay(self.client, upstream, count_up=self.ctx.count_up,
                    count_down=self.ctx.count_down)

