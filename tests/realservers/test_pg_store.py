"""The token store on a real PostgreSQL (Debian's, started by the test with TLS).

Schema init, the same envelope as the file store (the database sees ciphertext only), the
compare-and-swap save, the cross-machine refresh lock, an outage, and ``store migrate``.
"""

from __future__ import annotations

import asyncio
import io
import os
import threading
import time
from pathlib import Path

import psycopg
import pytest

from proxy import cli, config, store
from proxy.auth import flows
from proxy.auth.errors import AuthorisationNeeded
from proxy.auth.service import TokenService
from proxy.demo.process import DemoUpstream
from proxy.secret import Secret
from proxy.store import LockTimeout, StoreUnavailable, TokenStore, WrongPassword
from proxy.store import pg as pg_module
from proxy.store.backend import FileBackend, RecordMissing
from proxy.store.format import TokenDocument
from proxy.store.pg import PostgresBackend, SchemaError
from proxy.store.settings import StoreSettings, dsn_problem
from tests.proxyenv import PASSWORD as PASSWORD_TEXT
from tests.proxyenv import USER, config_dict, until_token_request_held
from tests.store.storetools import ACCOUNT, FAST_N, META, PASSWORD, PAYLOAD

from .postgres import Postgres

pytestmark = pytest.mark.realserver


@pytest.fixture
def settings(pg_store: Postgres) -> StoreSettings:
    return pg_store.settings(lock_timeout=5.0)


def open_db(settings: StoreSettings) -> TokenStore:
    return TokenStore(backend=PostgresBackend(settings), scrypt_n=FAST_N)


def raw_rows(postgres: Postgres) -> list[tuple[str, bytes, int]]:
    with psycopg.connect(**postgres.settings().connect_args(5)) as conn:
        rows = conn.execute("SELECT account, envelope, version FROM xoauth2_proxy_tokens").fetchall()
    return [(a, bytes(e), int(v)) for a, e, v in rows]


def test_schema_init_is_idempotent_and_required(postgres: Postgres, settings: StoreSettings) -> None:
    assert PostgresBackend(settings, check_schema=False).init_schema() == (1, 1)
    with psycopg.connect(**settings.connect_args(5), autocommit=True) as conn:
        conn.execute("CREATE SCHEMA IF NOT EXISTS empty")
    bare = StoreSettings(backend="postgresql", dsn=settings.dsn + "?options=-csearch_path%3Dempty",
                         password_file=settings.password_file, ca_file=settings.ca_file)
    with pytest.raises(SchemaError, match="schema version 0.*run: xoauth2-proxy store init"):
        PostgresBackend(bare)


def test_the_database_holds_the_files_envelope_and_sees_ciphertext_only(
        postgres: Postgres, settings: StoreSettings, tmp_path: Path) -> None:
    db = open_db(settings)
    created = db.create(ACCOUNT, PAYLOAD, META, password=PASSWORD)
    [(account, envelope, version)] = raw_rows(postgres)
    assert account == ACCOUNT and version == 1
    assert PAYLOAD not in envelope and PASSWORD.reveal().encode() not in envelope
    assert db.unlock(ACCOUNT, PASSWORD).payload == PAYLOAD
    files = TokenStore(tmp_path / "state", scrypt_n=FAST_N)
    files.write_raw(ACCOUNT, db.read_raw(ACCOUNT))
    assert files.unlock(ACCOUNT, PASSWORD).key_id == created.key_id
    db.save(created, b"next", META)
    assert raw_rows(postgres)[0][2] == 2
    with pytest.raises(WrongPassword):
        open_db(settings).unlock(ACCOUNT, Secret("not the password"))


def test_a_write_sent_again_after_its_answer_was_lost_is_not_a_conflict(
        postgres: Postgres, settings: StoreSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    """The connection drops after the server committed a write and before its answer came:
    the backend sends the statement again on a new connection, and that must not report a
    conflict with the write it already made (nor take another machine's for its own)."""
    backend = PostgresBackend(settings)
    real = psycopg.Connection.execute
    lost: list[str] = []

    def answer_lost(self: psycopg.Connection[object], query: object, *args: object,
                    **kw: object) -> object:
        text = str(query)
        if not (text.startswith(("INSERT INTO xoauth2_proxy_tokens", "UPDATE")) and arm):
            return real(self, query, *args, **kw)  # type: ignore[arg-type]
        how = arm.pop()
        lost.append(text.split(" ", 1)[0])
        if how == "committed":
            real(self, query, *args, **kw)  # type: ignore[arg-type]
        else:  # never arrived; meanwhile another machine wrote its own record
            other.write(ACCOUNT, foreign, how)
        self.close()  # the answer never arrives
        raise psycopg.OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(psycopg.Connection, "execute", answer_lost)
    other = PostgresBackend(settings)
    arm: list[object] = []
    first, second, foreign = os.urandom(64), os.urandom(64), os.urandom(64)
    with pytest.raises(RecordMissing):  # leaves a kept connection, which the drop then hits
        backend.read(ACCOUNT)
    arm.append("committed")
    version = backend.write(ACCOUNT, first, None)
    backend.read(ACCOUNT)
    arm.append("committed")
    assert backend.write(ACCOUNT, second, version) == 2
    assert lost == ["INSERT", "UPDATE"]
    assert raw_rows(postgres) == [(ACCOUNT, second, 2)]
    backend.read(ACCOUNT)
    arm.append(2)  # our UPDATE is lost before the server; another machine's lands
    with pytest.raises(pg_module.VersionConflict):
        backend.write(ACCOUNT, os.urandom(64), 2)
    assert raw_rows(postgres) == [(ACCOUNT, foreign, 3)]
    with pytest.raises(store.TokenFileExists):  # without a lost answer: still a conflict
        backend.write(ACCOUNT, second, None)
    backend.close()
    other.close()


def test_a_save_racing_a_slot_change_keeps_both(postgres: Postgres,
                                               settings: StoreSettings) -> None:
    machine_a, machine_b = open_db(settings), open_db(settings)
    unlocked = machine_a.create(ACCOUNT, PAYLOAD, META, password=PASSWORD)
    attempts: list[int] = []

    def change(where: object, doc: TokenDocument) -> TokenDocument:
        attempts.append(len(doc.slots))
        if len(attempts) == 1:  # another machine writes between our read and our write
            machine_b.add_password_slot(unlocked, "printer", Secret("printer password"))
        return doc

    machine_a._rewrite(ACCOUNT, change, key_id=unlocked.key_id)
    assert attempts == [1, 2]  # the version check failed once; the change was applied again
    machine_a.save(unlocked, b"rotated refresh token", META)
    fresh = open_db(settings)
    assert fresh.unlock(ACCOUNT, Secret("printer password")).payload == b"rotated refresh token"
    assert [s.label for s in fresh.info(ACCOUNT).slots] == ["default", "printer"]


def test_rotate_on_one_machine_keeps_every_device_password_on_another(
        settings: StoreSettings) -> None:
    machine_a, machine_b = open_db(settings), open_db(settings)
    created = machine_a.create(ACCOUNT, PAYLOAD, META, password=PASSWORD)
    for label in ("printer", "scanner", "fax"):
        machine_a.add_password_slot(created, label, Secret(f"{label} password"))
    assert machine_b.unlock(ACCOUNT, Secret("scanner password")).key_id == created.key_id
    machine_a.remove_slot(ACCOUNT, "printer")

    def no_password() -> Secret:
        raise AssertionError("rotate generated a password")

    rotated, issued = machine_a.rotate(machine_a.unlock(ACCOUNT, PASSWORD), PASSWORD,
                                       generate=no_password)
    assert issued == {} and rotated.key_id != created.key_id
    for label in ("scanner", "fax"):
        opened = machine_b.unlock(ACCOUNT, Secret(f"{label} password"))
        assert (opened.slot_label, opened.key_id) == (label, rotated.key_id)
    with pytest.raises(WrongPassword):
        machine_b.unlock(ACCOUNT, Secret("printer password"))


def test_the_refresh_lock_excludes_other_machines_until_released(settings: StoreSettings) -> None:
    machine_a, machine_b = open_db(settings), open_db(settings)
    machine_a.create(ACCOUNT, PAYLOAD, META, password=PASSWORD)
    with machine_a.refresh_lock(ACCOUNT):
        with pytest.raises(LockTimeout, match="refresh lock"):
            with machine_b.refresh_lock(ACCOUNT, timeout=0.3):
                pass
        with machine_b.refresh_lock("someone@else.example", timeout=5):
            pass  # other accounts are not held up
    got = threading.Event()

    def take() -> None:
        with machine_b.refresh_lock(ACCOUNT, timeout=10):
            got.set()

    thread = threading.Thread(target=take)
    with machine_a.refresh_lock(ACCOUNT):
        thread.start()
        assert not got.wait(0.2)
    thread.join(15)
    assert got.is_set()


def test_an_outage_keeps_unlocking_from_the_last_read_and_refuses_writes(
        postgres: Postgres, settings: StoreSettings) -> None:
    db = open_db(settings)
    unlocked = db.create(ACCOUNT, PAYLOAD, META, password=PASSWORD)
    db.unlock(ACCOUNT, PASSWORD)  # read once: remembered
    postgres.halt()
    try:
        assert db.unlock(ACCOUNT, PASSWORD).payload == PAYLOAD
        with pytest.raises(StoreUnavailable):
            db.save(unlocked, b"new", META)
        with pytest.raises(StoreUnavailable):
            with db.refresh_lock(ACCOUNT, timeout=0.5):
                pass
        with pytest.raises(StoreUnavailable):
            db.unlock("never-read@x.example", PASSWORD)
    finally:
        postgres.launch()
    assert open_db(settings).unlock(ACCOUNT, PASSWORD).payload == PAYLOAD


def test_a_dsn_with_a_password_or_weaker_tls_is_refused() -> None:
    assert "password_file" in (dsn_problem("postgresql://u:secret@h/db") or "")
    assert "verify-full" in (dsn_problem("postgresql://u@h/db?sslmode=require") or "")
    assert dsn_problem("host=db1 user=u dbname=x") is None


def test_migrate_moves_every_account_and_slot_both_ways(
        postgres: Postgres, settings: StoreSettings, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    files = TokenStore(state, scrypt_n=FAST_N)
    unlocked = files.create(ACCOUNT, PAYLOAD, META, password=PASSWORD,
                            service_key=b"k" * 32)
    files.add_password_slot(unlocked, "scanner", Secret("scanner password"))
    files.create("bob@example.test", b"bob", META, password=Secret("bob password"))
    config = _config(tmp_path, postgres, state)
    assert cli.main(["-c", str(config), "store", "migrate", "--to", postgres.dsn]) == 0
    db = open_db(settings)
    assert db.accounts() == sorted(["bob@example.test", ACCOUNT])
    assert db.unlock(ACCOUNT, Secret("scanner password")).payload == PAYLOAD
    assert db.unlock_with_service_key(ACCOUNT, b"k" * 32).payload == PAYLOAD
    assert cli.main(["-c", str(config), "store", "migrate", "--to", postgres.dsn]) == 1
    assert "--force replaces it" in capsys.readouterr().out
    back = tmp_path / "back"
    config2 = _config(tmp_path, postgres, back, name="back.toml")
    assert cli.main(["-c", str(config2), "store", "migrate", "--from", postgres.dsn]) == 0
    again = TokenStore(back, scrypt_n=FAST_N)
    assert again.accounts() == sorted(["bob@example.test", ACCOUNT])
    assert [s.label for s in again.info(ACCOUNT).slots] == ["default", "service", "scanner"]
    assert isinstance(again.backend, FileBackend)


def _config(tmp_path: Path, postgres: Postgres, state: Path, name: str = "c.toml") -> Path:
    path = tmp_path / name
    path.write_text(
        f'state_dir = "{state}"\n'
        '[providers.demo]\nauthority = "https://login.example"\ntenant = "t"\n'
        'client_id = "11111111-2222-3333-4444-555555555555"\n'
        f'[store]\nbackend = "postgresql"\ndsn = "{postgres.dsn}"\n'
        f'password_file = "{postgres.root / "client-password"}"\n'
        f'ca_file = "{postgres.ca_file}"\n')
    os.chmod(path, 0o600)
    return path


async def test_a_refresh_that_could_not_be_saved_is_saved_before_the_next(
        tmp_path: Path, demo_upstream: DemoUpstream, pg_store: Postgres,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The database goes away in the middle of a refresh (strict rotation: the old refresh
    token dies with it): the login still gets its token, and the rotated refresh token, kept in
    memory, reaches the database under the lock before the next refresh uses it."""
    monkeypatch.setattr(pg_module, "DOWN_SECONDS", 0.0)  # every read asks the database
    data = config_dict(tmp_path, demo_upstream, protocols=("imap",))
    data["store"] = {**pg_store.toml(), "lock_timeout": 5}
    data["providers"]["demo"]["timeout"] = 30  # waits out the held token request below
    cfg = config.parse(data, tmp_path / "config.toml")
    account = cfg.account(USER)
    assert account is not None
    demo_upstream.configure(access_token_lifetime=1, auto_approve_user=account.mailbox)
    token_store = store.open_store(cfg)
    flows.login(cfg, account, token_store, Secret(PASSWORD_TEXT), out=io.StringIO())
    demo_upstream.configure(access_token_lifetime=3600, strict_rotation=True,
                            token_endpoint_delay=10.0)  # far longer than a fast shutdown
    service = TokenService(cfg, token_store)
    login = asyncio.create_task(service.access_token(USER, Secret(PASSWORD_TEXT), "imap"))
    await until_token_request_held(demo_upstream, login)  # halted only mid-refresh
    assert await asyncio.to_thread(pg_store.advisory_locks)  # held across the refresh
    await asyncio.to_thread(pg_store.halt)
    assert (await asyncio.to_thread(demo_upstream.stats))["token_requests"] == 1  # held still
    try:
        first = await login  # the refresh finished; its save did not
    finally:
        await asyncio.to_thread(pg_store.launch)
    demo_upstream.configure(token_endpoint_delay=0.0)
    # Another machine, reading the database's (stale) refresh token, is refused and marks the
    # account as needing a login; this one still holds the live refresh token in memory.
    elsewhere = TokenService(cfg, await _store_when_up(cfg))
    demo_upstream.revoke(USER, access_tokens=True, refresh_tokens=False)
    with pytest.raises(AuthorisationNeeded):
        await elsewhere.access_token(USER, Secret(PASSWORD_TEXT), "imap")
    second = await service.access_token(USER, Secret(PASSWORD_TEXT), "imap", rejected=first)
    assert second != first  # saved its refresh first (clearing the mark), then refreshed
    third = await elsewhere.access_token(USER, Secret(PASSWORD_TEXT), "imap")
    assert third == second  # the other machine now reads the live record, mark cleared
    await service.aclose()
    await elsewhere.aclose()


async def _store_when_up(cfg: config.Config) -> store.TokenStore:
    deadline = time.monotonic() + 60
    while True:
        try:
            return await asyncio.to_thread(store.open_store, cfg)
        except store.StoreError:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
