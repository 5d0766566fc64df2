"""``xoauth2-proxy store init`` and ``xoauth2-proxy store migrate --to DSN | --from DSN``.

``init`` creates or migrates the PostgreSQL schema the ``[store]`` section names (safe to run
again, and from several machines at once: an advisory lock serialises it). ``migrate`` copies
every account's envelope, as it is (every key slot kept, nothing decrypted), from the file
store in ``state_dir`` into the database at DSN (``--to``), or back (``--from``); the password,
CA file and timeouts come from ``[store]``. An account already at the destination is skipped
unless ``--force``; the source is left as it was.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from proxy.store.errors import StoreError, TokenFileExists
from proxy.store.settings import StoreSettings, dsn_problem

if TYPE_CHECKING:
    from proxy.config import Config
    from proxy.store.store import TokenStore

class Failed(Exception):
    """A store command failed; the message is one line for the user."""


def cmd_store(config: Config, args: argparse.Namespace) -> int:
    try:
        if args.action == "init":
            return _init(config.store)
        if not (args.to or args.from_):
            raise Failed("store migrate needs --to DSN or --from DSN")
        return _migrate(config, args.to, args.from_, args.force)
    except StoreError as exc:
        raise Failed(str(exc)) from None


def _database(settings: StoreSettings, dsn: str | None, *, check_schema: bool) -> TokenStore:
    from proxy.store.pg import PostgresBackend
    from proxy.store.store import TokenStore

    if dsn is not None:
        problem = dsn_problem(dsn)
        if problem:
            raise Failed(f"DSN: {problem}")
        settings = settings.with_dsn(dsn)
    return TokenStore(backend=PostgresBackend(settings, check_schema=check_schema))


def _init(settings: StoreSettings) -> int:
    if settings.backend != "postgresql":
        raise Failed('[store] backend is "file": there is no schema to create '
                     '(set backend = "postgresql" and dsn first)')
    from proxy.store.pg import PostgresBackend

    backend = PostgresBackend(settings, check_schema=False)
    try:
        before, after = backend.init_schema()
    finally:
        backend.close()
    label = settings.display()
    print(f"{label}: schema version {after}" +
          (" (already current)" if before == after else f" (was {before})"))
    return 0


def _migrate(config: Config, to: str | None, from_: str | None, force: bool) -> int:
    from proxy.store.store import TokenStore

    files = TokenStore(config.state_dir)
    database = _database(config.store, to or from_, check_schema=True)
    source, target = (files, database) if to else (database, files)
    failed = 0
    try:
        for account in source.accounts():
            slots = len(source.info(account).slots)
            try:
                target.write_raw(account, source.read_raw(account), replace=force)
            except TokenFileExists:
                print(f"{account}: skipped, it exists at {target.path(account)} "
                      "(--force replaces it)")
                failed += 1
                continue
            print(f"{account}: copied with {slots} key slot(s) to {target.path(account)}")
    finally:
        database.close()
    return 1 if failed else 0
