"""The supervisor's operations endpoint (``workers`` > 1): ``/metrics``, ``/healthz``,
``/readyz`` on the configured metrics address, for the whole daemon.

``/metrics`` merges the workers' prometheus_client multiprocess files (counters and histograms
summed over workers, dead ones included; gauges by their declared mode, see
``proxy.metrics``), and adds what only the supervisor knows: ``workers``,
``worker_restarts_total``, the build, its own ``process_*`` series and the per-account token
facts, read from the token files' clear metadata at each scrape (a worker that refreshed a
token has written them there). ``/readyz`` is 200 while some worker accepts and the daemon is
not stopping. Served with aiohttp, on loopback unless the config allows otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import platform
import socket
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from proxy import __version__, logs, metrics, store
from proxy.config import Config
from proxy.text import host_port

if TYPE_CHECKING:
    from proxy.supervisor import Supervisor

log = logging.getLogger("proxy.http")


class _SupervisorCollector(Collector):
    """Worker counts, restarts, the build, and token facts from the token files."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.accounts = metrics.AccountCollector()
        self.store: store.TokenStore | None = None  # opened at the first scrape

    def collect(self) -> Iterator[Metric]:
        sup = self.sup
        yield GaugeMetricFamily("xoauth2_proxy_workers", "Worker processes accepting now.",
                                value=sum(w.ready for w in sup.workers))
        yield CounterMetricFamily("xoauth2_proxy_worker_restarts",
                                  "Workers started again after they exited.",
                                  value=sup.restarts)
        yield InfoMetricFamily("xoauth2_proxy_build", "Version of the running proxy.",
                               value={"version": __version__,
                                      "python": platform.python_version()})
        config = sup.config
        self.accounts.configure(per_account_labels=config.metrics.per_account_labels,
                                accounts=config.accounts)
        try:
            if self.store is None:
                self.store = store.open_store(config)
        except (store.StoreError, OSError):
            yield from self.accounts.collect()
            return
        self.accounts.seed(self.store, config.accounts)
        yield from self.accounts.collect()


def registry(sup: Supervisor) -> CollectorRegistry:
    reg = CollectorRegistry()
    MultiProcessCollector(reg, str(sup.metrics_dir))
    ProcessCollector(registry=reg)
    reg.register(_SupervisorCollector(sup))
    return reg


def app(sup: Supervisor) -> web.Application:
    reg = registry(sup)

    async def scrape(request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        body = await asyncio.to_thread(encoder, reg)
        return web.Response(body=body, headers={"Content-Type": content_type,
                                                "Cache-Control": "no-store"})

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n", headers={"Cache-Control": "no-store"})

    async def readyz(request: web.Request) -> web.Response:
        ready = sup.ready
        return web.Response(status=200 if ready else 503,
                            text="ready\n" if ready else "not ready\n",
                            headers={"Cache-Control": "no-store"})

    @web.middleware
    async def one_request(request: web.Request,
                          handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                          ) -> web.StreamResponse:
        response = await handler(request)
        response.force_close()  # one request per connection, as a scraper uses it
        return response

    application = web.Application(middlewares=[one_request])
    application.router.add_get("/metrics", scrape)
    application.router.add_get("/healthz", healthz)
    application.router.add_get("/readyz", readyz)
    return application


async def start(config: Config, sup: Supervisor,
                sock: socket.socket | None) -> web.AppRunner | None:
    """Serve on ``sock`` (socket activation) or ``metrics.listen``; None if neither is set."""
    listen = config.metrics.listen
    if listen is None and sock is None:
        return None
    runner = web.AppRunner(app(sup), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site: web.BaseSite = (web.SockSite(runner, sock) if sock is not None
                              else web.TCPSite(runner, listen.host if listen else None,
                                               listen.port if listen else 0,
                                               reuse_address=True))
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        from proxy.supervisor import SupervisorError
        raise SupervisorError(f"metrics: cannot listen on {listen}: "
                              f"{exc.strerror or exc}") from None
    host, port = runner.addresses[0][:2]  # the bound port (site.name keeps a requested 0)
    address = f"http://{host_port(host, port)}"
    logs.event(log, logging.INFO, "metrics_listening", address=address, url=f"{address}/metrics")
    return runner
