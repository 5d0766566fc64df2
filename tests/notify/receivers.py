"""Notification receivers for tests: an HTTPS webhook (aiohttp, demo certificates) and a
command that appends its environment to a file."""

from __future__ import annotations

import json
import ssl
import sys
from pathlib import Path
from typing import Any

from aiohttp import web

from proxy.demo import certs

COMMAND = ("import json, os, sys; "
           "doc = {k: v for k, v in os.environ.items() if k.startswith('XOAUTH2_PROXY_')}; "
           "doc['stdin'] = json.load(sys.stdin); "
           "open(sys.argv[1], 'a').write(json.dumps(doc) + '\\n')")


class Webhook:
    """An HTTPS server on 127.0.0.1 that records every JSON body POSTed to ``/hook``;
    ``fail_first`` requests are answered 500."""

    def __init__(self, workdir: Path, fail_first: int = 0) -> None:
        self.paths = certs.generate(workdir / "webhook-tls")
        self.received: list[dict[str, Any]] = []
        self.fail_first = fail_first
        self.requests = 0
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def _hook(self, request: web.Request) -> web.Response:
        self.requests += 1
        if self.requests <= self.fail_first:
            return web.Response(status=500)
        self.received.append(await request.json())
        return web.Response(status=204)

    async def __aenter__(self) -> Webhook:
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.paths.cert_file, self.paths.key_file)
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()

    def target(self, **extra: Any) -> dict[str, Any]:
        return {"type": "webhook", "url": f"https://127.0.0.1:{self.port}/hook",
                "ca_file": str(self.paths.ca_file), **extra}


def command_target(out: Path, **extra: Any) -> dict[str, Any]:
    return {"type": "command", "argv": [sys.executable, "-c", COMMAND, str(out)], **extra}


def command_calls(out: Path) -> list[dict[str, Any]]:
    if not out.exists():
        return []
    return [json.loads(line) for line in out.read_text().splitlines()]
