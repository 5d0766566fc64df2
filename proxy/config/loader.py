"""``load`` a TOML config file, and ``parse`` a decoded one by calling each section's reader.

A new section is a function ``read_x(top: Table) -> X`` (X a frozen dataclass, a field of
``Config``) and one line in ``parse``. Its module may live in any package, and may import
``proxy.config.model`` and ``proxy.config.reader``; ``proxy.config`` imports this module only
when ``load`` or ``parse`` is first used, so that makes no import cycle.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from proxy.admin_web.config import read_admin
from proxy.config.accounts import read_accounts, read_providers
from proxy.config.limits import read_limits, read_metrics
from proxy.config.listeners import read_listeners, read_upstreams, restrict_old_tls
from proxy.config.model import Config, ConfigError
from proxy.config.reader import Table
from proxy.config.relays import read_relays
from proxy.config.store import read_store
from proxy.notify.config import read_notify
from proxy.runtime import read as read_runtime

DEFAULT_STATE_DIR = Path("/var/lib/xoauth2-proxy")


def parse(data: dict[str, Any], file: Path) -> Config:
    """Validate a decoded TOML document (``file`` is used in messages and for relative paths)."""
    top = Table(data, "", file)
    state_dir = top.file_path("state_dir") or DEFAULT_STATE_DIR
    log_level = top.choice("log_level", ("debug", "info", "warning", "error"), "info")
    shutdown_grace = top.number("shutdown_grace", 30.0, 0, 3600)
    upstreams, graph = read_upstreams(top)
    providers = read_providers(top)
    accounts = read_accounts(top, providers)
    listeners = read_listeners(top, upstreams, frozenset(graph.upstreams))
    relays = read_relays(top, {li.name: li for li, _ in listeners}, accounts)
    config = Config(path=file, state_dir=state_dir, listeners=restrict_old_tls(listeners, relays),
                    upstreams=upstreams, providers=providers, accounts=accounts,
                    metrics=read_metrics(top), limits=read_limits(top), log_level=log_level,
                    shutdown_grace=shutdown_grace, relays=relays, store=read_store(top),
                    notify=read_notify(top, accounts, {li.name: li.protocol for li, _ in listeners}),
                    admin=read_admin(top, state_dir), graph=graph,
                    runtime=read_runtime(top))
    top.done()
    return config


def load(path: Path | str) -> Config:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: TOML syntax error: {exc}") from None
    return parse(data, path.resolve())
