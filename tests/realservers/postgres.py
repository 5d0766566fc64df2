"""A private PostgreSQL server from Debian's packages, with TLS, for token store tests.

``Postgres.start()`` runs ``initdb`` into a fresh folder under /tmp (a superuser ``xoauth2``
with a password, scram-sha-256, and a ``pg_hba.conf`` that admits TLS connections from
127.0.0.1 only), starts ``postgres`` on a free port of 127.0.0.1 with a throwaway certificate
(its CA is ``ca_file``), and polls until it accepts a verified TLS login. ``stop()`` shuts it
down (fast mode) and removes the folder; ``restart()`` stops and starts it on the same port
and data. PostgreSQL refuses to run as root: as root, the folder is given to the ``postgres``
user and the programs run as that user (``setpriv``).

Skip rule: as for Dovecot/Postfix (``XOAUTH2_PROXY_REQUIRE_REAL_SERVERS=1`` turns a skip into
a failure); install with ``apt-get install -y postgresql``.
"""

from __future__ import annotations

import glob
import os
import pwd
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest

from proxy.store.settings import StoreSettings

from . import (
    HOST,
    free_ports,
    log_tail,
    make_instance_dir,
    make_tls_files,
    record_process_group,
    remove_tree,
)

REQUIRE_ENV = "XOAUTH2_PROXY_REQUIRE_REAL_SERVERS"
RUN_USER = "postgres"
DB_USER = "xoauth2"
PASSWORD = "test-db-password"  # a test instance on loopback only


def postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    return Path(found[-1]).parent if found else None


def require_postgres() -> Path:
    """Debian's PostgreSQL bin folder; skip (or fail when real servers are required) if absent."""
    bindir = postgres_bin()
    problem = None
    if bindir is None:
        problem = "PostgreSQL not installed (apt-get install -y postgresql; .ci/run does)"
    elif os.geteuid() == 0:
        try:
            pwd.getpwnam(RUN_USER)
        except KeyError:
            problem = f"running as root and there is no {RUN_USER!r} user to run PostgreSQL as"
    if problem is None:
        assert bindir is not None
        return bindir
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but {problem}", pytrace=False)
    pytest.skip(problem)


@dataclass
class Postgres:
    bindir: Path
    root: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.root / "postgres.log"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def ca_file(self) -> Path:
        return self.root / "tls" / "ca.pem"

    @property
    def dsn(self) -> str:
        return f"postgresql://{DB_USER}@127.0.0.1:{self.port}/postgres"

    def settings(self, **kw: object) -> StoreSettings:
        """``[store]`` settings for this server (password from ``password_file``)."""
        return StoreSettings(backend="postgresql", dsn=self.dsn,
                             password_file=self.root / "client-password", ca_file=self.ca_file,
                             **kw)  # type: ignore[arg-type]

    def toml(self) -> dict[str, object]:
        return {"backend": "postgresql", "dsn": self.dsn,
                "password_file": str(self.root / "client-password"),
                "ca_file": str(self.ca_file), "connect_timeout": 2, "lock_timeout": 20}

    @classmethod
    def start(cls, bindir: Path, timeout: float = 60) -> Postgres:
        root = make_instance_dir("xoauth2-test-postgres-")
        try:
            server = cls(bindir, root, free_ports(1)[0])
            server._initdb()
            server._launch(timeout)
            return server
        except BaseException:
            remove_tree(root)
            raise

    def _as_user(self, command: list[str]) -> list[str]:
        if os.geteuid() != 0:
            return command
        return ["setpriv", f"--reuid={RUN_USER}", f"--regid={RUN_USER}", "--init-groups",
                "--", *command]

    def _give(self, *paths: Path) -> None:
        if os.geteuid() != 0:
            return
        user = pwd.getpwnam(RUN_USER)
        for path in paths:
            os.chown(path, user.pw_uid, user.pw_gid)

    def _initdb(self) -> None:
        tls = make_tls_files(self.root / "tls")
        (self.root / "client-password").write_text(PASSWORD + "\n")
        pwfile = self.root / "pwfile"
        pwfile.write_text(PASSWORD + "\n")
        self.data.mkdir(mode=0o700)
        (self.root / "run").mkdir(mode=0o700)
        self._give(self.root / "tls", tls.key_file, tls.cert_file, pwfile, self.data,
                   self.root / "run")
        os.chmod(tls.key_file, 0o600)
        subprocess.run(self._as_user([str(self.bindir / "initdb"), "-D", str(self.data),
                                      "-U", DB_USER, "--auth=scram-sha-256",
                                      f"--pwfile={pwfile}", "--no-sync", "-E", "UTF8"]),
                       check=True, capture_output=True, timeout=120)
        (self.data / "pg_hba.conf").write_text(
            f"hostssl all {DB_USER} {HOST}/32 scram-sha-256\n")
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(f"listen_addresses = '{HOST}'\nport = {self.port}\n"
                       f"unix_socket_directories = '{self.root / 'run'}'\n"
                       f"ssl = on\nssl_cert_file = '{tls.cert_file}'\n"
                       f"ssl_key_file = '{tls.key_file}'\nfsync = off\n"
                       "max_connections = 100\nshared_buffers = 16MB\n")

    def _launch(self, timeout: float) -> None:
        log = self.log_path.open("ab")
        self.log_path.touch()
        self._give(self.log_path)
        self.proc = subprocess.Popen(self._as_user([str(self.bindir / "postgres"),
                                                    "-D", str(self.data)]),
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                     start_new_session=True)
        log.close()
        record_process_group(self.root, self.proc.pid)
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited ({self.proc.returncode}):\n"
                                   f"{log_tail(self.log_path)}")
            try:
                with psycopg.connect(**self.settings().connect_args(2)):
                    return
            except psycopg.OperationalError as exc:
                last = str(exc)
            time.sleep(0.1)
        self._halt()
        raise RuntimeError(f"postgres did not accept within {timeout}s ({last}):\n"
                           f"{log_tail(self.log_path)}")

    def halt(self) -> None:
        """Stop the server (fast shutdown), keeping its data for ``launch``."""
        self._halt()

    def launch(self, timeout: float = 60) -> None:
        """Start the server again on the same port and data; wait until it accepts."""
        self._launch(timeout)

    def _halt(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGINT)  # fast shutdown: disconnect clients, stop
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def clear(self) -> None:
        """Remove every token record (the schema stays)."""
        with psycopg.connect(**self.settings().connect_args(5), autocommit=True) as conn:
            conn.execute("DELETE FROM xoauth2_proxy_tokens")

    def advisory_locks(self) -> int:
        """Advisory locks granted right now (a refresh in progress holds one)."""
        with psycopg.connect(**self.settings().connect_args(5), autocommit=True) as conn:
            row = conn.execute("SELECT count(*) FROM pg_locks "
                               "WHERE locktype = 'advisory' AND granted").fetchone()
        return int(row[0]) if row else 0

    def stop(self) -> None:
        self._halt()
        if os.environ.get("XOAUTH2_PROXY_KEEP_SERVER_FILES") != "1":
            remove_tree(self.root)
