"""What the daemon runs for its operators besides the mail listeners: the notifier (operator
events to ``[[notify]]`` targets) and, when ``[admin]`` is configured, the admin web page.
With ``workers = N`` the admin page is served by worker 1 alone (one process may bind its
address); each worker has its own notifier."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from proxy import runtime
from proxy.config import Config
from proxy.notify.dispatch import Notifier

if TYPE_CHECKING:
    from proxy.admin_web.app import AdminServer
    from proxy.admin_web.config import AdminSettings
    from proxy.server.daemon import Daemon

_ANY = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # noqa: S104 - mapped to loopback


class OperatorServices:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.notifier: Notifier | None = None
        self.admin: AdminServer | None = None
        self.admin_settings: AdminSettings | None = None

    def smtp_address(self, listener: str) -> tuple[str, int, str]:
        """Where the notifier reaches the proxy's own SMTP listener ``listener``."""
        li = next(li for li in self.daemon.config.listeners if li.name == listener)
        return _ANY.get(li.listen.host, li.listen.host), self.daemon.ports()[listener], li.tls

    async def start(self) -> None:
        self.notifier = Notifier(self.daemon.config.notify, self.smtp_address)
        self.notifier.start()
        settings = self.admin_settings = self.daemon.config.admin
        if settings is not None and os.environ.get(runtime.WORKER_ENV, "1") == "1":
            from proxy.admin_web.app import AdminServer  # aiohttp-jinja2 only when enabled
            self.admin = AdminServer(self.daemon, settings)
            await self.admin.start()

    async def reload(self, config: Config) -> list[str]:
        """New ``[[notify]]`` targets take over (queued deliveries of old ones are dropped);
        returns notes for the log about what needs a restart (``[admin]``)."""
        if self.notifier is not None:
            await self.notifier.aclose()
        self.notifier = Notifier(config.notify, self.smtp_address)
        self.notifier.start()
        if config.admin != self.admin_settings:
            return ["[admin] changed: a restart applies it; the admin page keeps its settings"]
        return []

    async def stop(self) -> None:
        if self.admin is not None:
            await self.admin.stop()
            self.admin = None
        if self.notifier is not None:
            await self.notifier.aclose()
            self.notifier = None
