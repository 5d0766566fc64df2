"""The automatic fallback from SMTP to Graph when SMTP AUTH is switched off.

Exchange Online answers AUTH with ``535 5.7.139 … SmtpClientAuthentication is disabled for
the Tenant`` when SMTP AUTH is off for the tenant or the mailbox. ``is_smtp_auth_disabled``
recognises it; ``FallbackState`` (one per SMTP upstream with a ``fallback``) remembers which
accounts go through Graph and until when: the message that met the refusal and the account's
next ones go via Graph, and after ``fallback_retry_seconds`` the next login tries SMTP again.
One log event and one metric increment when an account switches (either way), none per
message.
"""

from __future__ import annotations

import logging
import time

from prometheus_client import Counter

from proxy import logs, metrics
from proxy.graph.settings import Fallback
from proxy.protocol.login_reply import SMTP_AUTH_DISABLED

log = logging.getLogger("proxy.graph")

SWITCHES = Counter("xoauth2_proxy_graph_fallback_switches_total",
                   "Accounts switched between SMTP and the Graph fallback.",
                   ["upstream", "direction"], registry=metrics.REGISTRY)


def is_smtp_auth_disabled(code: str | None, text: str) -> bool:
    """The upstream's AUTH refusal says SMTP AUTH is off (by enhanced code or by its text)."""
    return code == SMTP_AUTH_DISABLED or "smtpclientauthentication is disabled" in text.lower()


class FallbackState:
    def __init__(self, upstream: str, fallback: Fallback) -> None:
        self.upstream, self.fallback = upstream, fallback
        self._since: dict[str, float] = {}

    def via_graph(self, account: str, now: float | None = None) -> bool:
        """Should this account's next session go straight to Graph?"""
        since = self._since.get(account)
        if since is None:
            return False
        if (time.monotonic() if now is None else now) - since < self.fallback.retry_seconds:
            return True
        return False  # time to probe SMTP again; ``switched``/``recovered`` record the answer

    def switched(self, account: str, reason: str, now: float | None = None) -> None:
        """SMTP AUTH is off for ``account``: Graph from now on (logged once per switch)."""
        first = account not in self._since
        self._since[account] = time.monotonic() if now is None else now
        if first:
            SWITCHES.labels(self.upstream, "to_graph").inc()
            logs.event(log, logging.WARNING, "graph_fallback", account=account,
                       upstream=self.upstream, graph=self.fallback.graph, reason=reason,
                       retry_smtp_after=self.fallback.retry_seconds)

    def recovered(self, account: str) -> None:
        """SMTP AUTH worked again for ``account``."""
        if self._since.pop(account, None) is not None:
            SWITCHES.labels(self.upstream, "to_smtp").inc()
            logs.event(log, logging.INFO, "graph_fallback_ended", account=account,
                       upstream=self.upstream)
