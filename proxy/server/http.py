"""The operations HTTP endpoint: Prometheus metrics and health probes on a loopback port.

A deliberately tiny HTTP/1.1 server on the daemon's own event loop (no threads, no framework):
one request per connection (``Connection: close``), ``GET`` and ``HEAD`` only, the request head
capped at 8 KiB and 10 seconds. Paths:

- ``/metrics``  the exposition of ``proxy.metrics.REGISTRY`` (text format 0.0.4, or OpenMetrics
  when the scraper asks for it in ``Accept``);
- ``/healthz``  200 while the process runs and its event loop answers;
- ``/readyz``   200 when every listener accepts connections, 503 while starting or draining.

It serves nothing else and reads no request body, so it exposes no secret and takes no input
worth attacking; it still refuses a non-loopback address unless the config allows one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable

from prometheus_client.exposition import choose_encoder

from proxy import logs, metrics

log = logging.getLogger("proxy.http")

MAX_HEAD = 8192
HEAD_TIMEOUT = 10.0
WRITE_TIMEOUT = 30.0

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 431: "Request Header Fields Too Large",
            503: "Service Unavailable"}


class MetricsServer:
    """Serves ``/metrics``, ``/healthz`` and ``/readyz``; ``ready()`` decides ``/readyz``."""

    def __init__(self, ready: Callable[[], bool]) -> None:
        self._ready = ready
        self.server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def start(self, host: str, port: int, sock: socket.socket | None = None) -> None:
        if sock is not None:
            self.server = await asyncio.start_server(self._client, sock=sock, limit=MAX_HEAD)
        else:
            self.server = await asyncio.start_server(self._client, host, port,
                                                     reuse_address=True, limit=MAX_HEAD)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self._clients):
            task.cancel()
        await asyncio.gather(*self._clients, return_exceptions=True)
        if self.server is not None:
            await self.server.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass
        except Exception:  # a bug: this request fails, the daemon does not
            log.exception("http_request_failed")
        finally:
            self._clients.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(HEAD_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            await _respond(writer, 431, b"request head too large\n")
            return
        except TimeoutError:
            await _respond(writer, 408, b"request timeout\n")
            return
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            await _respond(writer, 400, b"bad request\n")
            return
        method, target = parts[0], parts[1]
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        path = target.split("?", 1)[0]
        head_only = method == "HEAD"
        logs.event(log, logging.DEBUG, "http_request", method=method[:16], path=path[:200],
                   peer=_peer(writer))
        if method not in ("GET", "HEAD"):
            await _respond(writer, 405, b"only GET and HEAD\n", extra={"Allow": "GET, HEAD"})
            return
        if path == "/metrics":
            encoder, content_type = choose_encoder(headers.get("accept", ""))
            body = encoder(metrics.REGISTRY)
            await _respond(writer, 200, body, content_type=content_type, head_only=head_only)
        elif path == "/healthz":
            await _respond(writer, 200, b"ok\n", head_only=head_only)
        elif path == "/readyz":
            ready = self._ready()
            await _respond(writer, 200 if ready else 503, b"ready\n" if ready else b"not ready\n",
                           head_only=head_only)
        else:
            await _respond(writer, 404, b"not found: try /metrics, /healthz or /readyz\n",
                           head_only=head_only)


async def _respond(writer: asyncio.StreamWriter, status: int, body: bytes, *,
                   content_type: str = "text/plain; charset=utf-8", head_only: bool = False,
                   extra: dict[str, str] | None = None) -> None:
    head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
            f"Content-Type: {content_type}", f"Content-Length: {len(body)}",
            "Cache-Control: no-store", "Connection: close"]
    head.extend(f"{k}: {v}" for k, v in (extra or {}).items())
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
    if not head_only:
        writer.write(body)
    async with asyncio.timeout(WRITE_TIMEOUT):
        await writer.drain()


def _peer(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)


def log_listening(address: str) -> None:
    logs.event(log, logging.INFO, "metrics_listening", address=address,
               url=f"http://{address}/metrics")


__all__ = ["MetricsServer", "log_listening"]
