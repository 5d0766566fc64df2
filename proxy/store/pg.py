"""The PostgreSQL backend: one row per account holding the same encrypted envelope as a file.

Table ``xoauth2_proxy_tokens(account text primary key, envelope bytea, version bigint,
updated_at timestamptz)``; the database sees ciphertext only. ``xoauth2_proxy_schema`` holds the
schema version: ``init_schema`` creates and migrates (``xoauth2-proxy store init``), and the
daemon refuses a database whose schema it does not know, with the command that fixes it.

- A write is a compare-and-swap on ``version`` (``UPDATE … WHERE version = %s``; a create is an
  ``INSERT … ON CONFLICT DO NOTHING``): one statement, so never a partial record, and a writer
  that lost the race re-reads and applies its change again (``VersionConflict``).
- The refresh lock is a session advisory lock (``pg_advisory_lock``) on a connection of its own,
  held for the refresh; ``lock_timeout`` bounds the wait. If the holder dies, the server drops
  its session and the lock with it.
- Connections: TLS verified (``sslmode=verify-full``, the CA from ``ca_file`` or the system's),
  the password from a file or an environment variable, never in the DSN. A few idle
  connections are kept for reads and writes. The pool is a few lines on purpose: during an
  outage it fails fast (``StoreUnavailable``) instead of queueing behind a background
  reconnection, and it connects again at the next use once the server is back.
- Outage: after a connection failure the backend stays "down" for ``DOWN_SECONDS`` (reads fail
  at once, so logins served from the last record read are not slowed by connect timeouts); the
  refresh lock keeps trying to connect until its timeout, then raises ``StoreUnavailable``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pg_errors

from proxy.config.store import PasswordUnreadable, StoreSettings
from proxy.store.backend import REPLACE, RecordMissing, Version, VersionConflict
from proxy.store.errors import LockTimeout, StoreError, StoreUnavailable, TokenFileExists
from proxy.store.names import check_account

log = logging.getLogger("proxy.store")
T = TypeVar("T")

SCHEMA_VERSION = 1
LOCK_CLASS = 0x78_6F_61  # advisory lock namespace ("xoa"); the key is hashtext(account)
DOWN_SECONDS = 1.0
IDLE_CONNECTIONS = 4
RETRY_DELAY = 0.2

_MIGRATIONS = {
    1: (
        """CREATE TABLE xoauth2_proxy_tokens (
               account text PRIMARY KEY,
               envelope bytea NOT NULL,
               version bigint NOT NULL DEFAULT 1,
               updated_at timestamptz NOT NULL DEFAULT now())""",
    ),
}


class SchemaError(StoreError):
    """The database has no schema, or one this version does not know."""


class PostgresBackend:
    kind = "postgresql"

    def __init__(self, settings: StoreSettings, *, check_schema: bool = True) -> None:
        self.settings = settings
        self._label = settings.display()
        self._idle: list[psycopg.Connection[Any]] = []
        self._lock = threading.Lock()
        self._down_until = 0.0
        if check_schema:
            try:
                self.check_schema()
            except StoreUnavailable as exc:  # start anyway: logins answer "temporary" meanwhile
                log.warning("token store %s unreachable at start (%s); schema not checked",
                            self._label, exc.reason)

    # --- connections ----------------------------------------------------------------------

    def _connect(self, timeout: float) -> psycopg.Connection[Any]:
        try:
            conn = psycopg.connect(**self.settings.connect_args(timeout), autocommit=True)
        except psycopg.OperationalError as exc:
            raise StoreUnavailable(self._label, _reason(exc)) from None
        except PasswordUnreadable as exc:
            raise StoreUnavailable(self._label, str(exc)) from None
        self._down_until = 0.0  # it answers again
        return conn

    def _run(self, op: Callable[[psycopg.Connection[Any]], T]) -> T:
        """Run ``op`` on a connection. A kept connection the server dropped (a restart) is
        replaced by a new one once; a failure to connect is ``StoreUnavailable``."""
        for attempt in (1, 2):
            if time.monotonic() < self._down_until:
                raise StoreUnavailable(self._label, "the database did not answer a moment ago")
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            kept = conn is not None
            try:
                if conn is None:
                    conn = self._connect(self.settings.connect_timeout)
                result = op(conn)
            except StoreUnavailable:
                self._down_until = time.monotonic() + DOWN_SECONDS
                raise
            except psycopg.OperationalError as exc:
                assert conn is not None
                conn.close()
                self._drop_idle()
                if kept and attempt == 1:
                    continue
                self._down_until = time.monotonic() + DOWN_SECONDS
                raise StoreUnavailable(self._label, _reason(exc)) from None
            except psycopg.Error as exc:
                assert conn is not None
                self._give_back(conn)
                raise StoreError(f"token store {self._label}: {_reason(exc)}") from None
            except BaseException:
                if conn is not None:
                    self._give_back(conn)
                raise
            self._give_back(conn)
            return result
        raise AssertionError("unreachable")

    def _give_back(self, conn: psycopg.Connection[Any]) -> None:
        healthy = not conn.closed and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        with self._lock:
            if healthy and len(self._idle) < IDLE_CONNECTIONS:
                self._idle.append(conn)
                return
        conn.close()

    def _drop_idle(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def close(self) -> None:
        self._drop_idle()

    # --- schema ---------------------------------------------------------------------------

    def schema_version(self) -> int:
        def op(conn: psycopg.Connection[Any]) -> int:
            exists = conn.execute("SELECT to_regclass('xoauth2_proxy_schema')").fetchone()
            if exists is None or exists[0] is None:
                return 0
            row = conn.execute("SELECT max(version) FROM xoauth2_proxy_schema").fetchone()
            return int(row[0]) if row and row[0] is not None else 0
        return self._run(op)

    def check_schema(self) -> None:
        found = self.schema_version()
        if found != SCHEMA_VERSION:
            raise SchemaError(
                f"token store {self._label} has schema version {found}, this version needs "
                f"{SCHEMA_VERSION}; run: xoauth2-proxy store init")

    def init_schema(self) -> tuple[int, int]:
        """Create or migrate the schema (serialised by an advisory lock); (before, after)."""
        return self._run(self._migrate)

    def _migrate(self, conn: psycopg.Connection[Any]) -> tuple[int, int]:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s, 0)", (LOCK_CLASS,))
            conn.execute("CREATE TABLE IF NOT EXISTS xoauth2_proxy_schema ("
                         "version integer PRIMARY KEY, applied_at timestamptz NOT NULL "
                         "DEFAULT now())")
            row = conn.execute("SELECT max(version) FROM xoauth2_proxy_schema").fetchone()
            before = int(row[0]) if row and row[0] is not None else 0
            if before > SCHEMA_VERSION:
                raise SchemaError(f"token store {self._label} has schema version {before}, "
                                  f"newer than this version knows ({SCHEMA_VERSION})")
            for version in range(before + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[version]:
                    conn.execute(statement)
                conn.execute("INSERT INTO xoauth2_proxy_schema (version) VALUES (%s)", (version,))
        return before, SCHEMA_VERSION

    # --- records --------------------------------------------------------------------------

    def where(self, account: str) -> str:
        return f"{self._label} account {check_account(account)!r}"

    def read(self, account: str, known: Version | None = None) -> tuple[Version, bytes | None]:
        check_account(account)
        row = self._run(lambda conn: conn.execute(
            "SELECT version, CASE WHEN version = %s THEN NULL ELSE envelope END "
            "FROM xoauth2_proxy_tokens WHERE account = %s",
            (known if isinstance(known, int) else -1, account)).fetchone())
        if row is None:
            raise RecordMissing(account)
        return int(row[0]), None if row[1] is None else bytes(row[1])

    def writing(self, account: str) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # the version check in ``write`` is the guard

    def write(self, account: str, data: bytes, expected: Version | None) -> Version:
        check_account(account)
        if expected is None:
            sql = ("INSERT INTO xoauth2_proxy_tokens (account, envelope) VALUES (%s, %s) "
                   "ON CONFLICT (account) DO NOTHING RETURNING version")
            args: tuple[object, ...] = (account, data)
        elif expected == REPLACE:
            sql = ("INSERT INTO xoauth2_proxy_tokens (account, envelope) VALUES (%s, %s) "
                   "ON CONFLICT (account) DO UPDATE SET envelope = excluded.envelope, "
                   "version = xoauth2_proxy_tokens.version + 1, updated_at = now() "
                   "RETURNING version")
            args = (account, data)
        else:
            sql = ("UPDATE xoauth2_proxy_tokens SET envelope = %s, version = version + 1, "
                   "updated_at = now() WHERE account = %s AND version = %s RETURNING version")
            args = (data, account, expected)
        sent: list[None] = []

        def op(conn: psycopg.Connection[Any]) -> Any:
            sent.append(None)
            return conn.execute(sql, args).fetchone()

        row = self._run(op)
        if row is None and len(sent) > 1:
            row = self._own_write(account, data, expected)
        if row is None:
            if expected is None:
                raise TokenFileExists(account, self.where(account))
            raise VersionConflict(account)  # changed meanwhile
        return int(row[0])

    def _own_write(self, account: str, data: bytes, expected: Version | None
                   ) -> tuple[int] | None:
        """After ``_run`` sent a write again (its kept connection dropped): the record's version
        if it holds exactly ``data``, one version after ``expected`` — the first statement had
        been committed and only its answer was lost. Every envelope has a fresh random nonce,
        so equal bytes there are this write's."""
        row = self._run(lambda conn: conn.execute(
            "SELECT version, envelope FROM xoauth2_proxy_tokens WHERE account = %s",
            (account,)).fetchone())
        if row is None or bytes(row[1]) != data:
            return None
        if isinstance(expected, int) and int(row[0]) != expected + 1:
            return None
        return (int(row[0]),)

    def scan(self) -> Iterator[tuple[str, bytes]]:
        rows = self._run(lambda conn: conn.execute(
            "SELECT account, envelope FROM xoauth2_proxy_tokens ORDER BY account").fetchall())
        for account, envelope in rows:
            yield self.where(account), bytes(envelope)

    def delete(self, account: str) -> bool:
        check_account(account)
        return self._run(lambda conn: conn.execute(
            "DELETE FROM xoauth2_proxy_tokens WHERE account = %s", (account,)).rowcount == 1)

    # --- the refresh lock -----------------------------------------------------------------

    @contextlib.contextmanager
    def refresh_lock(self, account: str, timeout: float) -> Iterator[None]:
        """A session advisory lock on a connection of its own, held until the block ends."""
        check_account(account)
        conn = self._locked_connection(account, time.monotonic() + timeout, timeout)
        try:
            yield
        finally:
            try:
                conn.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))", (LOCK_CLASS, account))
            except psycopg.Error:
                pass  # the session is gone, and its lock with it
            conn.close()

    def _locked_connection(self, account: str, deadline: float,
                           timeout: float) -> psycopg.Connection[Any]:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StoreUnavailable(self._label, f"no connection within {timeout:g}s")
            try:
                conn = self._connect(min(remaining, self.settings.connect_timeout))
            except StoreUnavailable:
                time.sleep(min(RETRY_DELAY, max(0.0, deadline - time.monotonic())))
                continue
            try:
                wait_ms = max(1, int((deadline - time.monotonic()) * 1000))
                conn.execute("SELECT set_config('lock_timeout', %s, false)", (str(wait_ms),))
                conn.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", (LOCK_CLASS, account))
                conn.execute("SELECT set_config('lock_timeout', '0', false)")
                return conn
            except pg_errors.LockNotAvailable:
                conn.close()
                raise LockTimeout(self.where(account), f"another process held the refresh lock "
                                                      f"for {timeout:g}s") from None
            except psycopg.OperationalError:
                conn.close()
                time.sleep(min(RETRY_DELAY, max(0.0, deadline - time.monotonic())))


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
