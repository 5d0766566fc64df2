"""Config of the Graph upstream kind and of an SMTP upstream's fallback to it.

``read_upstreams`` reads every ``[upstreams.NAME]``: those with ``protocol = "graph"`` here
(``read_upstream``), the others with the reader it is given, after taking an SMTP upstream's
``fallback``/``fallback_retry_seconds`` keys (``read_fallback``). It works on the config
reader's ``Table`` by its methods alone (``TableReader``): ``proxy.config.model`` imports this
module for ``GraphConfig``, so it imports nothing of ``proxy.config``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar
from urllib.parse import urlsplit

GraphResource = Literal["graph"]
GRAPH_RESOURCE = "https://graph.microsoft.com"
DEFAULT_BASE_URL = "https://graph.microsoft.com/v1.0"
# Delegated permissions the proxy asks for: Mail.Send for sendMail and send, Mail.ReadWrite
# for the draft and upload sessions of a message over the single-request limit.
DELEGATED_PERMISSIONS = ("Mail.Send", "Mail.ReadWrite")


class TableReader(Protocol):
    data: dict[str, Any]

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = ..., *,
            required_hint: str = "") -> Any: ...
    def text(self, name: str, default: Any = ..., **kw: Any) -> Any: ...
    def number(self, name: str, default: float, low: float, high: float) -> float: ...
    def file_path(self, name: str, *, must_exist: bool = False) -> Path | None: ...
    def subtables(self, name: str) -> Iterator[tuple[str, Any]]: ...
    def fail(self, name: str | None, message: str) -> Exception: ...
    def done(self) -> None: ...


@dataclass(frozen=True)
class GraphUpstream:
    name: str
    base_url: str = DEFAULT_BASE_URL  # national clouds: https://graph.microsoft.us/v1.0, …
    resource: str = GRAPH_RESOURCE  # the token audience: https://graph.microsoft.us, …
    ca_file: Path | None = None  # trust only this CA (tests); else the system's
    save_to_sent_items: bool = True
    timeout: float = 120.0  # seconds for one HTTP request (an upload chunk, the send)
    max_message_size: int = 150 * 1024 * 1024  # Graph's documented limit with upload sessions
    mime_limit: int = 3 * 1024 * 1024  # messages up to this go as one MIME sendMail

    def scopes(self, flow: str) -> tuple[str, ...]:
        if flow == "client_credentials":
            return (f"{self.resource}/.default",)
        return tuple(f"{self.resource}/{p}" for p in DELEGATED_PERMISSIONS)


@dataclass(frozen=True)
class Fallback:
    """An SMTP upstream's fallback: where an account's mail goes once SMTP AUTH is off."""

    graph: str  # the Graph upstream's name
    retry_seconds: float = 3600.0  # SMTP is tried again after this long


@dataclass(frozen=True)
class GraphConfig:
    upstreams: dict[str, GraphUpstream] = field(default_factory=dict)
    fallbacks: dict[str, Fallback] = field(default_factory=dict)  # by SMTP upstream name

    def scopes(self, flow: str) -> tuple[str, ...]:
        """The Graph scopes of an account with this flow (every Graph upstream shares its
        resource); none when no Graph upstream is configured."""
        for upstream in self.upstreams.values():
            return upstream.scopes(flow)
        return ()

    def login_scopes(self, flow: str) -> tuple[str, ...]:
        """Delegated Graph scopes for the first authorisation (app-only tokens need none)."""
        return () if flow == "client_credentials" else self.scopes(flow)


def is_graph(raw: object) -> bool:
    return isinstance(raw, dict) and raw.get("protocol") == "graph"


def read_upstream(name: str, t: TableReader) -> GraphUpstream:
    t.get("protocol", str)
    base_url = str(t.text("base_url", DEFAULT_BASE_URL)).rstrip("/")
    parts = urlsplit(base_url)
    if parts.scheme != "https" or not parts.hostname:
        raise t.fail("base_url", f"must be an https:// URL, e.g. {DEFAULT_BASE_URL}")
    if "verify" in t.data:
        raise t.fail("verify", "Graph's TLS is always verified; to trust a private CA, set "
                               "ca_file")
    upstream = GraphUpstream(
        name=name, base_url=base_url,
        resource=str(t.text("resource", GRAPH_RESOURCE)).rstrip("/"),
        ca_file=t.file_path("ca_file", must_exist=True),
        save_to_sent_items=t.get("save_to_sent_items", bool, True),
        timeout=t.number("timeout", 120.0, 1, 3600),
        max_message_size=int(t.number("max_message_size", 150 * 1024 * 1024, 1024,
                                      150 * 1024 * 1024)),
        mime_limit=int(t.number("mime_limit", 3 * 1024 * 1024, 1024, 4 * 1024 * 1024)),
    )
    t.done()
    return upstream


def read_fallback(t: TableReader, graph_names: set[str]) -> Fallback | None:
    """An SMTP upstream's ``fallback`` keys (None without them); call before ``t.done()``."""
    name = t.text("fallback", None)
    if name is not None and t.data.get("protocol") != "smtp":
        raise t.fail("fallback", "applies to SMTP upstreams only")
    if name is None:
        if "fallback_retry_seconds" in t.data:
            raise t.fail("fallback_retry_seconds", "needs fallback = \"<graph upstream>\"")
        return None
    if name not in graph_names:
        raise t.fail("fallback", f"no [upstreams.{name}] with protocol = \"graph\" is defined")
    return Fallback(name, t.number("fallback_retry_seconds", 3600.0, 10, 7 * 86400))


U = TypeVar("U")


def read_upstreams(top: TableReader, read_other: Callable[[str, Any], U]
                   ) -> tuple[dict[str, U], GraphConfig]:
    """Every ``[upstreams.NAME]``: Graph ones here, the others with ``read_other``."""
    raw = top.data.get("upstreams")
    names = {n for n, v in raw.items() if is_graph(v)} if isinstance(raw, dict) else set()
    others: dict[str, U] = {}
    graphs: dict[str, GraphUpstream] = {}
    fallbacks: dict[str, Fallback] = {}
    for name, t in top.subtables("upstreams"):
        if name in names:
            graphs[name] = read_upstream(name, t)
            continue
        fallback = read_fallback(t, names)
        if fallback is not None:
            fallbacks[name] = fallback
        others[name] = read_other(name, t)
    if len({u.resource for u in graphs.values()}) > 1:
        raise top.fail("upstreams", "Graph upstreams must share one resource (one national "
                                    "cloud)")
    return others, GraphConfig(graphs, fallbacks)
