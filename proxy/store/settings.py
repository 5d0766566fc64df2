"""``open_store(config)``: the token store the config's ``[store]`` section names (the section
itself is read by ``proxy.config.store``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy.config.store import StoreSettings, dsn_problem

if TYPE_CHECKING:
    from proxy.config import Config
    from proxy.store.store import TokenStore

__all__ = ["StoreSettings", "dsn_problem", "open_store"]


def open_store(config: Config, *, check_schema: bool = True) -> TokenStore:
    """The token store ``config``'s ``[store]`` section names."""
    from proxy.store.store import TokenStore

    settings = config.store
    if settings.backend == "file":
        return TokenStore(config.state_dir, lock_timeout=settings.lock_timeout)
    from proxy.store.atomic import ensure_state_dir
    from proxy.store.pg import PostgresBackend

    ensure_state_dir(config.state_dir)  # other state (capabilities) still lives there
    return TokenStore(backend=PostgresBackend(settings, check_schema=check_schema),
                      lock_timeout=settings.lock_timeout)
