"""The operations HTTP endpoint: Prometheus metrics and health probes, served by aiohttp.

Paths (``GET`` and ``HEAD``; anything else is 405):

- ``/metrics``  the exposition of ``proxy.metrics.REGISTRY`` (text format 0.0.4, or OpenMetrics
  when the scraper asks for it in ``Accept``);
- ``/healthz``  200 while the process runs and its event loop answers;
- ``/readyz``   200 when every listener accepts connections, 503 while starting or draining.

One request per connection (``Connection: close``), each request line and header capped at
8 KiB (aiohttp answers 400 beyond), no body read. It exposes no secret and takes no input worth attacking; it still
refuses a non-loopback address unless the config allows one. ``ops_routes`` adds the same
three paths to another aiohttp application (the admin page's).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client.exposition import choose_encoder

from proxy import logs, metrics
from proxy.text import one_line

log = logging.getLogger("proxy.http")

MAX_HEAD = 8192
HEAD_TIMEOUT = 10.0
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _BadRequests(logging.Filter):
    """aiohttp logs every malformed request as an error with a traceback: a peer could fill
    the journal. Those become one debug event; real errors still pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            logs.event(log, logging.DEBUG, "http_bad_request", reason=one_line(str(exc))[:200])
            return False
        return True


_FILTER = _BadRequests()


def quiet_bad_requests() -> None:
    logging.getLogger("aiohttp.server").addFilter(_FILTER)  # once: a filter is kept in a set


def _text(status: int, body: str) -> web.Response:
    return web.Response(status=status, text=body, content_type="text/plain", charset="utf-8",
                        headers={"Cache-Control": "no-store"})


def ops_routes(app: web.Application, ready: Callable[[], bool]) -> None:
    """``/metrics``, ``/healthz`` and ``/readyz`` on ``app`` (GET, and HEAD through it)."""

    async def scrape(request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encoder(metrics.REGISTRY), headers={
            "Content-Type": content_type, "Cache-Control": "no-store"})

    async def healthz(request: web.Request) -> web.Response:
        return _text(200, "ok\n")

    async def readyz(request: web.Request) -> web.Response:
        return _text(200, "ready\n") if ready() else _text(503, "not ready\n")

    app.router.add_get("/metrics", scrape)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)


@web.middleware
async def _one_request(request: web.Request, handler: Handler) -> web.StreamResponse:
    logs.event(log, logging.DEBUG, "http_request", method=request.method[:16],
               path=request.path[:200], peer=request.remote)
    try:
        response = await handler(request)
    except web.HTTPNotFound:
        response = _text(404, "not found: try /metrics, /healthz or /readyz\n")
    except web.HTTPMethodNotAllowed:
        response = _text(405, "only GET and HEAD\n")
        response.headers["Allow"] = "GET, HEAD"
    response.force_close()
    return response


class MetricsServer:
    """Serves ``/metrics``, ``/healthz`` and ``/readyz``; ``ready()`` decides ``/readyz``."""

    def __init__(self, ready: Callable[[], bool]) -> None:
        self.app = web.Application(middlewares=[_one_request], handler_args={
            "max_field_size": MAX_HEAD, "max_line_size": MAX_HEAD})
        ops_routes(self.app, ready)
        quiet_bad_requests()
        self.runner = web.AppRunner(self.app, access_log=None, handle_signals=False,
                                    keepalive_timeout=HEAD_TIMEOUT)
        self.server: web.BaseSite | None = None

    @property
    def port(self) -> int:
        assert self.runner.server is not None
        return int(self.sockets[0].getsockname()[1])

    @property
    def sockets(self) -> list[socket.socket]:
        return [s for server in self.runner.sites for s in _sockets(server)]

    async def start(self, host: str, port: int, sock: socket.socket | None = None) -> None:
        await self.runner.setup()
        site: web.BaseSite = (web.SockSite(self.runner, sock) if sock is not None
                              else web.TCPSite(self.runner, host or None, port,
                                               reuse_address=True))
        await site.start()
        self.server = site

    async def stop(self) -> None:
        await self.runner.cleanup()


def _sockets(site: web.BaseSite) -> list[socket.socket]:
    server = site._server  # noqa: SLF001 - aiohttp keeps the asyncio server here
    return list(getattr(server, "sockets", None) or ())


def log_listening(address: str) -> None:
    logs.event(log, logging.INFO, "metrics_listening", address=address,
               url=f"http://{address}/metrics")


__all__ = ["MetricsServer", "log_listening", "ops_routes"]
