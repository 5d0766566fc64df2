"""The Graph upstream as the login pipeline sees it: opening it is making a ``GraphSink``.

The pipeline has already done what proves a login for Graph — the local password unlocked the
token file and the account has a Graph token — so ``open`` talks to nobody: Graph is first
asked after the final dot, and a token it refuses then is refreshed once there (``client``).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from proxy.graph.client import GraphClient, TokenSource
from proxy.graph.sink import GraphSink


class GraphOpener:
    def __init__(self, client: GraphClient, token: TokenSource, spool: Path, *,
                 account: str, size_limit: int) -> None:
        self.client, self.token, self.spool = client, token, spool
        self.account, self.size_limit = account, size_limit

    @property
    def host(self) -> str:
        return urlsplit(self.client.upstream.base_url).hostname or "graph"

    async def open(self, mailbox: str, token: str) -> GraphSink:
        return GraphSink(self.client, account=self.account, mailbox=mailbox, token=self.token,
                         spool=self.spool, size_limit=self.size_limit)

    def tls_version(self, upstream: GraphSink) -> str | None:
        return None
