"""The notifier: hands each operator event to the targets that want it, once per incident.

Per target, an (event, account) pair — and for ``authorisation_needed`` its device code — is
sent once and then not again for ``repeat_after`` seconds (a device that retries its login
every minute makes one notification, not sixty). Each target has its own bounded queue and
worker: a slow webhook delays nobody, and a login that publishes an event never waits for a
delivery. A failed delivery is logged and retried with exponential back-off (2 s, 4 s, …,
at most 5 minutes apart) up to ``retries`` times; every outcome is counted in
``xoauth2_proxy_notifications_total{type, result}``.
"""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
from prometheus_client import Counter

from proxy import logs, metrics
from proxy.notify import events, senders
from proxy.notify.config import NotifyTarget
from proxy.notify.events import Event

log = logging.getLogger("proxy.notify")

NOTIFICATIONS = Counter("xoauth2_proxy_notifications_total",
                        "Operator notifications by target type and outcome (sent, retried, "
                        "failed, suppressed: a repeat within repeat_after, dropped: queue full).",
                        ["type", "result"], registry=metrics.REGISTRY)
QUEUE_SIZE = 100
MAX_BACKOFF = 300.0


class Notifier:
    def __init__(self, targets: tuple[NotifyTarget, ...], smtp_address: senders.SmtpAddress,
                 *, backoff: float = 2.0, hub: events.Hub = events.HUB) -> None:
        self.targets = targets
        self.smtp_address = smtp_address
        self.backoff = backoff
        self.hub = hub
        self.queues: dict[str, asyncio.Queue[Event]] = {}
        self.workers: list[asyncio.Task[None]] = []
        self.sent_at: dict[tuple[str, ...], float] = {}
        self.session: aiohttp.ClientSession | None = None
        self.busy = 0  # deliveries in progress

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        for target in self.targets:
            queue: asyncio.Queue[Event] = asyncio.Queue(QUEUE_SIZE)
            self.queues[target.name] = queue
            self.workers.append(loop.create_task(self._work(target, queue),
                                                 name=f"notify {target.name}"))
        if self.targets:
            events.WATCH.after = 60 * min(t.refresh_failing_minutes for t in self.targets)
        self.hub.subscribers.append(self.offer)

    def offer(self, event: Event) -> None:
        """Queue ``event`` for every target that wants it and has not just sent it."""
        now = time.monotonic()
        for target in self.targets:
            if not target.wants(event.kind, event.account):
                continue
            key = (target.name, *event.key, event.fields.get("user_code", ""))
            last = self.sent_at.get(key)
            if last is not None and now - last < target.repeat_after:
                NOTIFICATIONS.labels(target.type, "suppressed").inc()
                continue
            try:
                self.queues[target.name].put_nowait(event)
            except asyncio.QueueFull:
                NOTIFICATIONS.labels(target.type, "dropped").inc()
                logs.event(log, logging.ERROR, "notification_dropped", target=target.name,
                           kind=event.kind, account=event.account, reason="queue full")
                continue
            self.sent_at[key] = now

    async def _work(self, target: NotifyTarget, queue: asyncio.Queue[Event]) -> None:
        while True:
            event = await queue.get()
            self.busy += 1
            try:
                await self._deliver(target, event)
            finally:
                self.busy -= 1

    async def _deliver(self, target: NotifyTarget, event: Event) -> None:
        for attempt in range(target.retries + 1):
            try:
                await self._send(target, event)
            except senders.DeliveryFailed as exc:
                last = attempt == target.retries
                NOTIFICATIONS.labels(target.type, "failed" if last else "retried").inc()
                logs.event(log, logging.ERROR if last else logging.WARNING,
                           "notification_failed", target=target.name, kind=event.kind,
                           account=event.account, attempt=attempt + 1, reason=str(exc),
                           action=None if not last else "check the [[notify]] target")
                if last:
                    return
                await asyncio.sleep(min(self.backoff * 2 ** attempt, MAX_BACKOFF))
                continue
            NOTIFICATIONS.labels(target.type, "sent").inc()
            logs.event(log, logging.INFO, "notification_sent", target=target.name,
                       kind=event.kind, account=event.account, attempt=attempt + 1)
            return

    async def _send(self, target: NotifyTarget, event: Event) -> None:
        if target.type == "command":
            await senders.run_command(target, event)
        elif target.type == "webhook":
            if self.session is None:
                self.session = aiohttp.ClientSession()
            await senders.post_webhook(self.session, target, event)
        else:
            await senders.send_email(target, event, self.smtp_address)

    async def idle(self) -> None:
        """Wait until every queued notification has been handled (tests, shutdown)."""
        while self.busy or any(not q.empty() for q in self.queues.values()):
            await asyncio.sleep(0.05)

    async def aclose(self) -> None:
        if self.offer in self.hub.subscribers:
            self.hub.subscribers.remove(self.offer)
        for task in self.workers:
            task.cancel()
        await asyncio.gather(*self.workers, return_exceptions=True)
        self.workers.clear()
        if self.session is not None:
            await self.session.close()
            self.session = None
