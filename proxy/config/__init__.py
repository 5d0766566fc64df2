"""Typed, validated configuration, loaded from TOML.

``load(path)`` returns a frozen ``Config`` or raises ``ConfigError`` whose message is one line
naming the file, the key and what is wrong (the CLI prints it and exits 2). The whole file is
validated at once: cross references (a listener's upstream, an account's provider) are checked
too, so a config that loads is a config that can run.

``model`` holds the dataclasses, ``reader`` the TOML reader (``Table``), one module per group
of sections reads them, and ``loader`` calls the sections. ``load`` and ``parse`` are imported
from ``loader`` on first use, so a section module in another package can import
``proxy.config.model`` and ``proxy.config.reader`` without an import cycle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from proxy.config.model import (
    DEFAULT_APP_SCOPE,
    DEFAULT_CONFIG_PATH,
    DEFAULT_SCOPES,
    FLOWS,
    PROTOCOLS,
    Account,
    Address,
    BareLineEndings,
    Config,
    ConfigError,
    Flow,
    Limits,
    Listener,
    LocalTLS,
    Metrics,
    Network,
    Protocol,
    Provider,
    RelayRule,
    Upstream,
    UpstreamTLS,
)
from proxy.config.reader import Table, parse_address

if TYPE_CHECKING:
    from proxy.config.loader import load, parse


def __getattr__(name: str) -> Any:
    if name in ("load", "parse"):
        from proxy.config import loader
        return getattr(loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DEFAULT_APP_SCOPE", "DEFAULT_CONFIG_PATH", "DEFAULT_SCOPES", "FLOWS", "PROTOCOLS",
           "Account", "Address", "BareLineEndings", "Config", "ConfigError", "Flow", "Limits",
           "Listener", "LocalTLS", "Metrics", "Network", "Protocol", "Provider", "RelayRule",
           "Table", "Upstream", "UpstreamTLS", "load", "parse", "parse_address"]
