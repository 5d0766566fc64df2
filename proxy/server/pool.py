"""Warm upstream connections: the TCP connect and TLS handshake done before a login needs them.

Connecting to Microsoft 365 costs a TCP round trip, a TLS handshake and the greeting: most of
the time a login takes. ``WarmPool`` keeps a few connections ready for one listener's upstream
(``[upstreams.X] warm_connections``, IMAP and POP3), so that a login only has to send the
XOAUTH2 command.

It is filled by demand only: a connection is opened ahead each time a login takes one (or finds
none), never because a client merely connected, so nobody can make the proxy open upstream
connections without a valid local password and token. A warm connection is closed unused after
``warm_seconds`` (well inside the upstream's own pre-login timeout); a proxy nobody logs in
through holds none. The greeting is not read here: the login reads it from the connection's
buffer as if it had just arrived, and a connection the upstream has closed meanwhile is skipped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable

from proxy import logs, metrics
from proxy.server.endpoint import Endpoint

log = logging.getLogger("proxy.pool")


class WarmPool:
    def __init__(self, connect: Callable[[], Awaitable[Endpoint]], size: int,
                 max_age: float, *, protocol: str, name: str = "") -> None:
        self._connect = connect
        self.size, self.max_age, self.name = size, max_age, name
        self._count = {result: metrics.UPSTREAM_WARM.labels(protocol, result).inc
                       for result in metrics.WARM_RESULTS}
        self._ready: deque[tuple[float, Endpoint]] = deque()
        self._opening: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._failed_at: float | None = None

    def __len__(self) -> int:
        return len(self._ready)

    def take(self) -> Endpoint | None:
        """A connected upstream endpoint, its greeting unread; None if none is ready. Either way
        a replacement is opened (demand), unless the last attempt failed a moment ago."""
        if self.size <= 0 or self._closed:
            return None
        self._expire()
        endpoint = None
        while self._ready:
            _, candidate = self._ready.popleft()
            if candidate.usable():
                endpoint = candidate
                break
            self.discard(candidate)
        self._count["hit" if endpoint is not None else "miss"]()
        self._fill()
        return endpoint

    def discard(self, endpoint: Endpoint) -> None:
        """A warm connection that turned out closed (or broke during the login)."""
        endpoint.close()
        self._count["stale"]()

    def clear(self) -> None:
        """Close what is ready (the upstream or its TLS settings changed); openings in flight
        are abandoned."""
        for task in self._opening:
            task.cancel()
        self._opening.clear()
        while self._ready:
            self._ready.popleft()[1].close()
        self._failed_at = None

    def close(self) -> None:
        self._closed = True
        self.clear()
        if self._timer is not None:
            self._timer.cancel()

    def _fill(self) -> None:
        if self._failed_at is not None and time.monotonic() - self._failed_at < self.max_age:
            return  # the upstream just failed: logins connect (and report) on their own
        loop = asyncio.get_running_loop()
        while len(self._ready) + len(self._opening) < self.size:
            task = loop.create_task(self._open(), name=f"warm {self.name}")
            self._opening.add(task)
            task.add_done_callback(self._opening.discard)

    async def _open(self) -> None:
        try:
            endpoint = await self._connect()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 (any failure: stop warming for a while)
            self._failed_at = time.monotonic()
            logs.event(log, logging.DEBUG, "warm_connect_failed", upstream=self.name,
                       reason=str(exc))
            return
        if self._closed or asyncio.current_task() not in self._opening:
            endpoint.close()  # cleared or closed meanwhile
            return
        self._ready.append((time.monotonic(), endpoint))
        self._arm()

    def _expire(self) -> None:
        limit = time.monotonic() - self.max_age
        while self._ready and self._ready[0][0] <= limit:
            self._ready.popleft()[1].close()
            self._count["expired"]()

    def _arm(self) -> None:
        """A timer for the oldest ready connection's expiry (one timer per pool)."""
        if self._timer is not None or not self._ready:
            return
        delay = self._ready[0][0] + self.max_age - time.monotonic()

        def fire() -> None:
            self._timer = None
            self._expire()
            self._arm()
        self._timer = asyncio.get_running_loop().call_later(max(delay, 0.0) + 0.01, fire)


__all__ = ["WarmPool"]
