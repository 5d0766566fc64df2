"""The ``[store]`` config section: which backend holds the token envelopes (files, PostgreSQL).

``proxy.store.settings.open_store(config)`` opens the store it names.

```toml
[store]
backend = "postgresql"                 # "file" (default: files in state_dir, one machine)
dsn = "postgresql://xoauth2@db1.example.net:5432/xoauth2"   # no password, no sslmode here
password_file = "/run/credentials/xoauth2-proxy.service/pgpassword"  # or password_env = "PGPASS"
ca_file = "/etc/xoauth2-proxy/db-ca.pem"   # default: the system's CAs
connect_timeout = 5                    # seconds per connection attempt
lock_timeout = 30                      # seconds a refresh waits for another one (then temporary)
```

TLS to the database is always verified (``sslmode=verify-full``: the certificate chains to the
CA and names the DSN's host). A DSN that carries a password or its own ``ssl*`` settings is
refused with the setting to use instead, so that a secret never sits in the config file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from proxy.config.reader import Table

Backend = Literal["file", "postgresql"]
_FORBIDDEN = ("password", "sslmode", "sslrootcert", "sslcert", "sslkey", "passfile")


class PasswordUnreadable(Exception):
    """The database password file cannot be read (the message names it)."""


@dataclass(frozen=True)
class StoreSettings:
    backend: Backend = "file"
    dsn: str | None = None
    password_file: Path | None = None
    password_env: str | None = None
    ca_file: Path | None = None  # None: the system's CAs
    connect_timeout: float = 5.0
    lock_timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.backend == "postgresql" and not self.dsn:
            raise ValueError("the postgresql backend needs a dsn")
        if self.dsn:
            problem = dsn_problem(self.dsn)
            if problem:
                raise ValueError(problem)

    def display(self) -> str:
        """The database, for messages: no password (there is none in the DSN); "token files"
        for the file store."""
        if self.backend == "file":
            return "token files"
        from psycopg.conninfo import conninfo_to_dict

        parts = conninfo_to_dict(self.dsn or "")
        user = f"{parts['user']}@" if parts.get("user") else ""
        port = f":{parts['port']}" if parts.get("port") else ""
        return f"postgresql://{user}{parts.get('host', 'localhost')}{port}/{parts.get('dbname', '')}"

    def password(self) -> str | None:
        if self.password_file is not None:
            return self.password_file.read_text(encoding="utf-8").rstrip("\r\n")
        if self.password_env is not None:
            return os.environ.get(self.password_env)
        return None

    def connect_args(self, timeout: float) -> dict[str, Any]:
        """Keyword arguments for ``psycopg.connect``: verified TLS, the password from its source."""
        args: dict[str, Any] = {
            "conninfo": self.dsn or "",
            "sslmode": "verify-full",
            "sslrootcert": str(self.ca_file) if self.ca_file is not None else "system",
            "connect_timeout": max(1, int(timeout + 0.999)),
            "application_name": "xoauth2-proxy",
        }
        try:
            password = self.password()
        except OSError as exc:
            raise PasswordUnreadable(f"cannot read password_file {self.password_file}: "
                                     f"{exc.strerror}") from None
        if password is not None:
            args["password"] = password
        return args

    def with_dsn(self, dsn: str) -> StoreSettings:
        """These settings (password source, CA, timeouts) for another database."""
        from dataclasses import replace

        return replace(self, backend="postgresql", dsn=dsn)


def dsn_problem(dsn: str) -> str | None:
    """Why ``dsn`` cannot be used, or None."""
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict

    try:
        parts = conninfo_to_dict(dsn)
    except ProgrammingError:  # libpq's message may quote the text, password included: not shown
        return ("the dsn cannot be parsed: write it as a libpq URI or key=value string "
                "(percent-encode special characters in a URI)")
    for key in _FORBIDDEN:
        if key in parts:
            fix = ("use password_file or password_env" if key in ("password", "passfile") else
                   "TLS is always verified (verify-full); set ca_file for a private CA")
            return f"the dsn must not set {key}: {fix}"
    return None


def read_store(top: Table) -> StoreSettings:
    """Parse ``[store]`` (absent: files in state_dir)."""
    table = top.table("store")
    if table is None:
        return StoreSettings()
    backend = table.choice("backend", ("file", "postgresql"), "file")
    dsn = table.text("dsn", None)
    if backend == "postgresql" and dsn is None:
        raise table.fail("dsn", "is required with backend = \"postgresql\" "
                                "(postgresql://USER@HOST:PORT/DBNAME)")
    if backend == "file" and dsn is not None:
        raise table.fail("dsn", "is only used with backend = \"postgresql\"")
    problem = dsn_problem(dsn) if dsn else None
    if problem:
        raise table.fail("dsn", problem)
    password_file = table.file_path("password_file", must_exist=True)
    password_env = table.text("password_env", None)
    if password_file is not None and password_env is not None:
        raise table.fail("password_env", "set password_file or password_env, not both")
    settings = StoreSettings(
        backend=backend, dsn=dsn, password_file=password_file, password_env=password_env,
        ca_file=table.file_path("ca_file", must_exist=True),
        connect_timeout=table.number("connect_timeout", 5.0, 1, 120),
        lock_timeout=table.number("lock_timeout", 30.0, 1, 600),
    )
    table.done()
    return settings
