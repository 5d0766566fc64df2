"""Fixtures for tests against real Dovecot and Postfix (Debian packages).

``dovecot`` and ``postfix`` are function-scoped because ``demo_upstream`` (the fake
Entra ID whose introspection endpoint they call) is function-scoped: each test gets a
fresh token authority, so a revocation or knob change in one test cannot leak into the
next. Measured here: Dovecot starts in ~0.1 s and stops in ~1 s, Postfix starts in
0.4-0.9 s and stops in <0.2 s, the demo upstream takes ~0.5 s: affordable per test.

Skip rule: when the server programs are missing (or we are not root, which both need
for their own privilege separation) the tests are skipped, unless
``XOAUTH2_PROXY_REQUIRE_REAL_SERVERS=1`` is set, in which case they fail.
Set ``XOAUTH2_PROXY_KEEP_SERVER_FILES=1`` to keep the instance folders for debugging.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from proxy.store.pg import PostgresBackend

from . import missing_binaries
from .dovecot import Dovecot
from .postfix import Postfix
from .postgres import Postgres, require_postgres

REQUIRE_ENV = "XOAUTH2_PROXY_REQUIRE_REAL_SERVERS"
KEEP_ENV = "XOAUTH2_PROXY_KEEP_SERVER_FILES"
INSTALL_HINT = "install dovecot-imapd dovecot-pop3d dovecot-lmtpd postfix from Debian; .ci/run does"


def require_real_servers(*names: str) -> None:
    """Skip (or fail, when the environment demands real servers) if ``names`` can't run."""
    problems = []
    missing = missing_binaries(names)
    if missing:
        problems.append(f"{', '.join(missing)} not installed ({INSTALL_HINT})")
    if os.geteuid() != 0:
        problems.append("real Dovecot/Postfix instances need root to start")
    if not problems:
        return
    reason = "; ".join(problems)
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Any:
    # Remember the call phase's outcome so that fixtures can print server logs on failure.
    report = yield
    if report.when == "call":
        item.stash[_failed_key] = report.failed
    return report


_failed_key = pytest.StashKey[bool]()


def _test_failed(request: pytest.FixtureRequest) -> bool:
    return request.node.stash.get(_failed_key, False)


def _keep_files() -> bool:
    return os.environ.get(KEEP_ENV) == "1"


@pytest.fixture
def _dovecot_runnable() -> None:
    require_real_servers("dovecot")


@pytest.fixture
def _postfix_runnable() -> None:
    require_real_servers("postfix")


@pytest.fixture
def dovecot(
    request: pytest.FixtureRequest, _dovecot_runnable: None, demo_upstream: Any
) -> Iterator[Dovecot]:
    """A Dovecot that validates tokens of ``demo_upstream`` by introspection.

    Attributes: ``ports`` (imap, imaps, pop3, pop3s), ``host``, ``ca_file``, ``log_path``,
    ``domain`` ("example.test"), ``auth_socket``, ``lmtp_socket``; methods
    ``mailbox_messages(user)``, ``log_tail()``.
    """
    server = Dovecot.start(
        introspection_url=f"{demo_upstream.authority}/oauth2/v2.0/introspect",
        introspection_ca_file=demo_upstream.ca_file,
    )
    try:
        yield server
    finally:
        if _test_failed(request):
            print(f"\n--- Dovecot log ({server.log_path}):\n{server.log_tail(80)}")
        server.stop(keep_files=_keep_files())


@pytest.fixture
def postfix(
    request: pytest.FixtureRequest, _postfix_runnable: None, dovecot: Dovecot
) -> Iterator[Postfix]:
    """A Postfix whose submission port authenticates with ``dovecot`` and delivers to it.

    Attributes: ``submission_port``, ``ports``, ``host``, ``ca_file`` (same CA as
    Dovecot), ``log_path``, ``domain``; method ``log_tail()``.
    """
    server = Postfix.start(dovecot)
    try:
        yield server
    finally:
        if _test_failed(request):
            print(f"\n--- Postfix log ({server.log_path}):\n{server.log_tail(80)}")
        server.stop(keep_files=_keep_files())


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    """A private PostgreSQL with TLS and the token store's schema, for one test module."""
    server = Postgres.start(require_postgres())
    try:
        PostgresBackend(server.settings(), check_schema=False).init_schema()
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_store(postgres: Postgres) -> Postgres:
    """``postgres`` with no token records left by an earlier test."""
    postgres.clear()
    return postgres
