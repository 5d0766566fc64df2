"""Where an SMTP listener's mail goes when Graph is involved, as the daemon and the SMTP front
use it.

``GraphRoutes`` (one per daemon) keeps one ``GraphClient`` per Graph upstream (its aiohttp
session and connection pool), one ``FallbackState`` per SMTP upstream with a ``fallback``, and
gives each SMTP listener its ``GraphRoute``: ``direct`` when the listener names a Graph upstream,
else the fallback of its SMTP upstream (or None). ``upstream_of`` describes a Graph upstream as
an ``Upstream`` record (host, port 443, its CA) where the daemon wants one per listener: its
verified TLS context is made from it; no SMTP session is ever opened with it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from proxy.auth.service import TokenService
from proxy.config import Config, Listener, RelayRule, Upstream
from proxy.graph.client import GraphClient
from proxy.graph.fallback import FallbackState, is_smtp_auth_disabled
from proxy.graph.opener import GraphOpener
from proxy.graph.settings import GraphUpstream
from proxy.graph.sink import GraphSink, spool_dir
from proxy.protocol.events import ReplyKind
from proxy.secret import Secret
from proxy.server.logins import LoginAttempt
from proxy.server.pipeline import Denied, PasswordToken, Pipeline, ServiceToken
from proxy.server.smtp_relay import RelayRefused, open_service_session, relay_refusal
from proxy.server.smtp_upstream import SmtpOpener, UpstreamSession

PERMISSION = "Microsoft Graph Mail.Send"
_ENHANCED = re.compile(r"\b([245]\.\d{1,3}\.\d{1,3})\b")


@dataclass(frozen=True)
class GraphRoute:
    upstream: GraphUpstream
    client: GraphClient
    spool: Path
    fallback: FallbackState | None  # None: the listener names the Graph upstream itself

    @property
    def direct(self) -> bool:
        return self.fallback is None

    def wanted(self, account: str) -> bool:
        """Does this account's next session go through Graph?"""
        return self.fallback is None or self.fallback.via_graph(account)

    def falls_back(self, reason: str, account: str, kind: ReplyKind | None = None) -> bool:
        """The SMTP upstream refused the login (``reason``: its reply) because SMTP AUTH is
        off: from now on this account goes through Graph (the switch is logged once)."""
        if self.fallback is None or kind not in (None, ReplyKind.OTHER):
            return False
        code = _ENHANCED.search(reason)
        if not is_smtp_auth_disabled(code.group(1) if code else None, reason):
            return False
        self.fallback.switched(account, reason)
        return True

    def smtp_worked(self, account: str) -> None:
        if self.fallback is not None:
            self.fallback.recovered(account)

    def pipeline(self, tokens: TokenService, user: str, password: Secret | None,
                 attempt: LoginAttempt | None, size_limit: int, *,
                 client_tls: str | None = None) -> Pipeline[GraphSink]:
        """A login for Graph: the local password's (or, None, the service key's) token."""
        source: PasswordToken | ServiceToken = (
            PasswordToken(tokens, user, password, "graph") if password is not None
            else ServiceToken(tokens, user, "graph"))
        opener = GraphOpener(self.client, source.token, self.spool, account=user,
                             size_limit=min(size_limit, self.upstream.max_message_size))
        return Pipeline(tokens, source, opener, attempt=attempt, permission=PERMISSION,
                        client_tls=client_tls)


class GraphRoutes:
    def __init__(self) -> None:
        self._clients: dict[str, GraphClient] = {}
        self._retired: list[GraphClient] = []  # replaced by a reload; closed at stop
        self._fallbacks: dict[str, FallbackState] = {}

    def route(self, config: Config, li: Listener) -> GraphRoute | None:
        graph = config.graph
        name, fallback = li.upstream, None
        if name not in graph.upstreams:
            setting = graph.fallbacks.get(name)
            if setting is None:
                return None
            state = self._fallbacks.get(name)
            if state is None or state.fallback != setting:
                state = self._fallbacks[name] = FallbackState(name, setting)
            name, fallback = setting.graph, state
        upstream = graph.upstreams[name]
        client = self._clients.get(name)
        if client is None or client.upstream != upstream:
            if client is not None:
                self._retired.append(client)
            client = self._clients[name] = GraphClient(upstream)
        return GraphRoute(upstream, client, spool_dir(config.state_dir), fallback)

    async def aclose(self) -> None:
        for client in [*self._clients.values(), *self._retired]:
            await client.close()


async def service_session(route: GraphRoute | None, tokens: TokenService, opener: SmtpOpener,
                          rule: RelayRule) -> UpstreamSession | GraphSink:
    """A ``[[relay]]`` device's session as the rule's account (its service key's token):
    upstream SMTP, or Graph when the route says so or SMTP AUTH turns out to be off. Raises
    ``RelayRefused`` (a ``451``: the device keeps the message and retries)."""
    if route is None or not route.wanted(rule.account):
        try:
            return await open_service_session(tokens, opener, rule)
        except RelayRefused as refused:
            if route is None or not route.falls_back(refused.reason, rule.account):
                raise
    verdict = await route.pipeline(tokens, rule.account, None, None,
                                   route.upstream.max_message_size).run()
    if isinstance(verdict, Denied):
        raise relay_refusal(verdict, rule, route.client.host)
    return verdict.upstream


def upstream_of(config: Config, name: str) -> Upstream:
    """The upstream named ``name``; a Graph upstream as its HTTPS endpoint."""
    if name in config.upstreams:
        return config.upstreams[name]
    graph = config.graph.upstreams[name]
    url = urlsplit(graph.base_url)
    return Upstream(name=name, protocol="smtp", host=url.hostname or name, port=url.port or 443,
                    tls="implicit", ca_file=graph.ca_file)
