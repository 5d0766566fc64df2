"""Two daemons (``xoauth2-proxy run`` processes) on one PostgreSQL token store, like two
machines behind a load balancer, in front of the fake Microsoft 365.

- 1,000 concurrent IMAP logins split across both, with an expired access token: exactly one
  token request reaches the identity platform.
- SIGKILL of one daemon in the middle of a refresh (strict refresh token rotation, a slow
  token endpoint): the other daemon and the restarted one keep working, and the stored refresh
  token still works afterwards.
- PostgreSQL stopped and started again: logins with a cached token go on during the outage, a
  refresh is answered as temporary (IMAP ``NO [UNAVAILABLE]``, POP3 ``-ERR [SYS/TEMP]``, SMTP
  ``454 4.7.0``), and everything works after.
"""

from __future__ import annotations

import asyncio
import io
import poplib
import smtplib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from proxy import config as config_mod
from proxy import store
from proxy.auth import flows
from proxy.demo.process import DemoUpstream
from proxy.secret import Secret
from tests.ops.util import NotifySocket, ProxyProcess
from tests.proxyenv import config_dict, to_toml

from .postgres import Postgres

pytestmark = pytest.mark.realserver

USER = "alice@contoso.example"
PASSWORD = "two-daemons-password"
STORM = 1000


@dataclass
class Daemons:
    path: Path
    tmp: Path
    procs: list[ProxyProcess]
    notifies: list[NotifySocket]

    def start(self, index: int) -> None:
        notify = NotifySocket()
        proc = ProxyProcess(self.path, self.tmp / f"proxy{index}-{time.monotonic_ns()}.log",
                            notify=notify)
        notify.expect("READY", timeout=60, proc=proc.proc)
        if index < len(self.procs):
            self.procs[index], self.notifies[index] = proc, notify
        else:
            self.procs.append(proc)
            self.notifies.append(notify)

    def port(self, index: int) -> int:
        return self.procs[index].port("listening", " listener=imap ")

    def stop(self) -> None:
        for proc in self.procs:
            proc.stop()
        for notify in self.notifies:
            notify.close()

    def logs(self) -> str:
        return "\n".join(proc.text()[-3000:] for proc in self.procs)


@pytest.fixture
async def daemons(tmp_path: Path, demo_upstream: DemoUpstream,
                  pg_store: Postgres) -> AsyncIterator[Daemons]:
    # A busy machine: the fake upstream's TLS handshakes for 1,000 logins may queue for a while.
    data = config_dict(tmp_path, demo_upstream, protocols=("imap", "pop", "smtp"),
                       limits={"max_preauth_per_source": 4096},
                       upstreams={"imap": {"connect_timeout": 120}})
    data["store"] = {**pg_store.toml(), "lock_timeout": 5}
    path = tmp_path / "config.toml"
    path.write_text(to_toml(data))
    cfg = config_mod.load(path)
    account = cfg.account(USER)
    assert account is not None
    # Authorised with an access token that is already expired for MSAL (it refreshes any with
    # less than 5 minutes left); the tokens issued from now on live an hour.
    demo_upstream.configure(auto_approve_user=account.mailbox, access_token_lifetime=1)
    token_store = store.open_store(cfg)
    flows.login(cfg, account, token_store, Secret(PASSWORD), out=io.StringIO())
    token_store.close()
    demo_upstream.configure(access_token_lifetime=3600)
    demo_upstream.reset_stats()
    group = Daemons(path, tmp_path, [], [])
    try:
        for index in range(2):
            await asyncio.to_thread(group.start, index)
        yield group
    finally:
        group.stop()


async def imap_login(port: int) -> bytes:
    """LOGIN and LOGOUT over a plain connection; the tagged reply to LOGIN."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await reader.readline()  # greeting
        writer.write(f'a1 LOGIN "{USER}" "{PASSWORD}"\r\n'.encode())
        await writer.drain()
        while True:
            line = await reader.readline()
            if not line or line.startswith(b"a1 "):
                break
        if line.startswith(b"a1 OK"):
            writer.write(b"a2 LOGOUT\r\n")
            await writer.drain()
            while (more := await reader.readline()) and not more.startswith(b"a2 "):
                pass
        return line
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


def pop_and_smtp_logins(proc: ProxyProcess) -> tuple[str, tuple[int, str]]:
    """A POP3 USER/PASS and an SMTP AUTH that fail: the POP3 error line, the SMTP reply."""
    pop = poplib.POP3("127.0.0.1", proc.port("listening", " listener=pop "), timeout=60)
    try:
        pop.user(USER)
        pop.pass_(PASSWORD)
        raise AssertionError("POP3 login succeeded")
    except poplib.error_proto as exc:
        pop_error = exc.args[0].decode()
    finally:
        pop.close()
    with smtplib.SMTP("127.0.0.1", proc.port("listening", " listener=smtp "), timeout=60) as smtp:
        smtp.ehlo()
        try:
            smtp.login(USER, PASSWORD)
            raise AssertionError("SMTP AUTH succeeded")
        except smtplib.SMTPAuthenticationError as exc:
            return pop_error, (exc.smtp_code, exc.smtp_error.decode())


async def logins(daemons: Daemons, count: int) -> list[bytes]:
    ports = [daemons.port(0), daemons.port(1)]
    return await asyncio.gather(*(imap_login(ports[i % 2]) for i in range(count)))


async def poll(check: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(check):
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_a_login_storm_on_two_daemons_makes_one_token_request(
        daemons: Daemons, demo_upstream: DemoUpstream) -> None:
    started = time.monotonic()
    replies = await logins(daemons, STORM)
    elapsed = time.monotonic() - started
    failed = [r for r in replies if not r.startswith(b"a1 OK")]
    assert not failed, (failed[:3], daemons.logs())
    stats = demo_upstream.stats()
    assert stats["token_requests"] == 1, stats
    print(f"{STORM} logins over two daemons in {elapsed:.1f}s, "
          f"{stats['token_requests']} token request")


async def test_sigkill_in_the_middle_of_a_refresh_loses_no_refresh_token(
        daemons: Daemons, demo_upstream: DemoUpstream, pg_store: Postgres) -> None:
    demo_upstream.configure(strict_rotation=True, token_endpoint_delay=30.0)
    victim = asyncio.create_task(imap_login(daemons.port(0)))
    await poll(lambda: demo_upstream.stats()["delayed_token_requests"] >= 1)  # mid-refresh
    assert pg_store.advisory_locks() >= 1  # daemon 0 holds the account's lock meanwhile
    daemons.procs[0].proc.kill()
    daemons.procs[0].proc.wait(timeout=30)
    try:
        reply = await victim
    except OSError:
        reply = b""
    assert not reply.startswith(b"a1 OK")  # its connection died with the daemon
    demo_upstream.configure(token_endpoint_delay=0.0)
    assert (await imap_login(daemons.port(1))).startswith(b"a1 OK"), daemons.logs()
    await asyncio.to_thread(daemons.start, 0)  # the killed daemon comes back
    assert (await imap_login(daemons.port(0))).startswith(b"a1 OK"), daemons.logs()
    assert demo_upstream.stats()["token_requests"] == 1  # the killed one's was never read
    # The stored refresh token is the live one: Microsoft revokes the access tokens, both
    # daemons get new ones (strict rotation: a stale refresh token would fail here).
    demo_upstream.revoke(USER, access_tokens=True, refresh_tokens=False)
    for index in (0, 1, 0):
        assert (await imap_login(daemons.port(index))).startswith(b"a1 OK"), daemons.logs()
    assert demo_upstream.stats()["token_requests"] == 2


async def test_postgresql_restarted_mid_run(daemons: Daemons, demo_upstream: DemoUpstream,
                                           pg_store: Postgres) -> None:
    assert all(r.startswith(b"a1 OK") for r in await logins(daemons, 20))  # tokens cached
    await asyncio.to_thread(pg_store.halt)
    try:
        during = await logins(daemons, 100)
        assert all(r.startswith(b"a1 OK") for r in during), (during[:3], daemons.logs())
        # A refresh cannot be done without the store: temporary, and quick.
        demo_upstream.revoke(USER, access_tokens=True, refresh_tokens=False)
        refused = await imap_login(daemons.port(1))
        assert refused.startswith(b"a1 NO [UNAVAILABLE]"), refused
        assert b"token store is unavailable right now; try again in a minute" in refused
        # The same answer, as temporary, in POP3 and SMTP.
        pop, smtp = await asyncio.to_thread(pop_and_smtp_logins, daemons.procs[0])
        assert pop.startswith("-ERR [SYS/TEMP]"), pop
        assert smtp[0] == 454 and smtp[1].startswith("4.7.0"), smtp
    finally:
        await asyncio.to_thread(pg_store.launch)

    async def works() -> bool:
        replies = await logins(daemons, 2)
        return all(r.startswith(b"a1 OK") for r in replies)

    deadline = time.monotonic() + 60
    while not await works():
        assert time.monotonic() < deadline, daemons.logs()
        await asyncio.sleep(0.2)
    assert demo_upstream.stats()["token_requests"] == 2  # the first, and one after the revoke
