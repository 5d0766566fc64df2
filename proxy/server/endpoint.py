"""One side of a proxied connection: an asyncio Protocol with two modes.

Before login a coroutine drives the protocol machine and reads with ``await read()``: incoming
bytes are buffered (bounded: reading pauses above ``limit``). After login ``relay(a, b)`` joins
two endpoints: each chunk the kernel hands over is written straight to the peer's transport —
no per-line or per-byte work, no extra copy — and backpressure is the transports' own: when a
peer's write buffer passes its high-water mark, ``pause_writing`` pauses reading on this side
until it drains. A slow client therefore slows only its own upstream read.

Half-close: an EOF from one side is passed on with ``write_eof`` where the transport can (plain
TCP), else the peer is closed once its pending writes are flushed. Either side closing closes
the other.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any, cast

READ_LIMIT = 256 * 1024  # pre-login buffer before reading pauses
HIGH_WATER = 512 * 1024  # per-transport write buffer before the peer's reading pauses



def writable(transport: asyncio.BaseTransport | None) -> asyncio.WriteTransport | None:
    """``transport`` to write to, on any event loop (uvloop's transports are not asyncio's
    classes, so no isinstance check), or None when it is gone or closing."""
    if transport is None or transport.is_closing():
        return None
    return cast(asyncio.WriteTransport, transport)

class ConnectionClosed(Exception):
    """The peer closed or reset the connection."""


def _close(transport: asyncio.BaseTransport | None) -> None:
    """Close once. Python 3.11's TLS transport forgets its protocol on a second ``close()``,
    after which ``get_extra_info`` raises AttributeError (even from inside a callback)."""
    if transport is not None and not transport.is_closing():
        transport.close()


def _pass_eof(transport: asyncio.Transport) -> None:
    """Hand an end of stream on: half-close where the transport can (plain TCP), else close
    it once its pending writes are flushed."""
    if transport.can_write_eof():
        transport.write_eof()
    else:
        _close(transport)


class Endpoint(asyncio.Protocol):
    # Thousands are open at once (two per idle session): no instance dict.
    __slots__ = ("transport", "peer", "_on_connect", "_buffer", "_eof", "_closed", "_waiter",
                 "_write_paused", "_drain_waiters", "_count", "_read_paused", "_tls")

    def __init__(self, on_connect: Callable[[Endpoint], None] | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: Endpoint | None = None
        self._on_connect = on_connect
        self._buffer = bytearray()
        self._eof = False
        self._closed: asyncio.Future[None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._count: Callable[[float], None] | None = None
        self._read_paused = False
        self._tls = False

    # --- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Any event loop's transport will do (uvloop's are not asyncio.Transport subclasses).
        self.transport = cast(asyncio.Transport, transport)
        self._tls = transport.get_extra_info("sslcontext") is not None
        self.transport.set_write_buffer_limits(high=HIGH_WATER)
        self._closed = asyncio.get_running_loop().create_future()
        on_connect, self._on_connect = self._on_connect, None  # once; not kept
        if on_connect is not None:
            on_connect(self)

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None:  # relaying: the hot path
            assert peer.transport is not None
            peer.transport.write(data)
            if self._count is not None:
                self._count(len(data))
            return
        self._buffer += data
        if len(self._buffer) > READ_LIMIT and not self._read_paused:
            assert self.transport is not None
            self._read_paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.transport.is_closing():
            if peer._eof:  # both directions have ended
                _close(peer.transport)
                return False
            _pass_eof(peer.transport)
        self._wake()
        # Keep our side open for writing (half-close); TLS transports cannot do that.
        return not self._tls

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)
        self._wake()
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()
        peer = self.peer
        if peer is not None:
            _close(peer.transport)  # flushes what was already written to it

    def pause_writing(self) -> None:
        self._write_paused = True
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()

    # --- coroutine side (before relaying) ----------------------------------------------------

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def read(self) -> bytes:
        """The bytes received so far (waiting for some); ``b""`` once the peer has closed."""
        while not self._buffer and not self._eof:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = bytes(self._buffer)
        self._buffer.clear()
        if self._read_paused and self.transport is not None:
            self._read_paused = False
            self.transport.resume_reading()
        return data

    def write(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            raise ConnectionClosed("connection closed")
        self.transport.write(data)

    async def drain(self) -> None:
        if self._write_paused and not self.is_closed:
            waiter = asyncio.get_running_loop().create_future()
            self._drain_waiters.append(waiter)
            await waiter

    def usable(self) -> bool:
        """Open both ways: the peer has neither closed nor ended its side (a warm connection)."""
        return (self.transport is not None and not self.transport.is_closing()
                and not self._eof)

    @property
    def is_closed(self) -> bool:
        return self._closed is None or self._closed.done()

    async def wait_closed(self) -> None:
        if self._closed is not None:
            await asyncio.shield(self._closed)

    def close(self) -> None:
        _close(self.transport)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    async def start_tls(self, context: ssl.SSLContext, *, server_side: bool,
                        server_hostname: str | None = None, timeout: float = 30.0) -> None:
        """Upgrade to TLS in place; bytes received before the upgrade are discarded."""
        assert self.transport is not None
        self._buffer.clear()
        loop = asyncio.get_running_loop()
        transport = await loop.start_tls(self.transport, self, context, server_side=server_side,
                                         server_hostname=server_hostname,
                                         ssl_handshake_timeout=timeout)
        if transport is None:
            raise ConnectionClosed("closed during the TLS handshake")
        self.transport = transport
        self._tls = True
        transport.set_write_buffer_limits(high=HIGH_WATER)

    def extra(self, name: str) -> Any:
        return self.transport.get_extra_info(name) if self.transport is not None else None


async def relay(client: Endpoint, upstream: Endpoint, *,
                count_up: Callable[[float], None] | None = None,
                count_down: Callable[[float], None] | None = None) -> None:
    """Join two endpoints and return when both are closed."""
    for side, peer, count in ((client, upstream, count_up), (upstream, client, count_down)):
        side._count = count
        pending = bytes(side._buffer)
        side._buffer.clear()
        side.peer = peer
        if pending and peer.transport is not None and not peer.transport.is_closing():
            peer.transport.write(pending)
            if count is not None:
                count(len(pending))
        if side._read_paused and side.transport is not None:
            side._read_paused = False
            side.transport.resume_reading()
    for side, peer in ((client, upstream), (upstream, client)):
        if side._eof and peer.transport is not None and not peer.transport.is_closing():
            _pass_eof(peer.transport)  # this side ended before the relay started
        if side._write_paused and peer.transport is not None:
            peer.transport.pause_reading()
        if side.is_closed:
            _close(peer.transport)
    # One after the other, in this task: no task, frame or shield per side for the session's
    # life. Cancelling the session cancels the future awaited here, which then reads as closed:
    # the session closes both sides as it ends anyway.
    for side in (client, upstream):
        if side._closed is not None:
            await side._closed
