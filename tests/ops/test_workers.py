"""``workers = 2``: the supervisor and its workers as real processes (``python -m proxy run``),
with the test as the service manager: one set of sockets, a killed worker replaced, SIGHUP to
every worker without dropping a session, SIGTERM stops all, one scrape for the whole daemon,
and one token request for a storm of logins spread over both workers."""

from __future__ import annotations

import asyncio
import imaplib
import os
import re
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from proxy.demo.process import DemoUpstream
from tests.ops.util import NotifySocket, ProxyProcess, http_get, poll, scrape, value
from tests.proxyenv import PASSWORD, USER, authorise, config_dict, make_config, to_toml

pytestmark = pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="Linux only (pidfds)")


@pytest.fixture
def event_loop_name(request: pytest.FixtureRequest) -> str:
    """The workers' ``event_loop``: the suite's ``--event-loop`` (CI runs both)."""
    return str(request.config.getoption("--event-loop"))


def write_config(tmp_path: Path, upstream: DemoUpstream, **extra: Any) -> Path:
    data = config_dict(tmp_path, upstream, protocols=("imap",))
    data.update({"workers": 2, "metrics": {"listen": "127.0.0.1:0"}, **extra})
    path = tmp_path / "config.toml"
    path.write_text(to_toml(data))
    return path


def open_session(port: int) -> imaplib.IMAP4:
    client = imaplib.IMAP4("127.0.0.1", port, timeout=30)
    client.literal = PASSWORD.encode()  # type: ignore[attr-defined]
    typ, data = client._simple_command("LOGIN", USER)  # type: ignore[attr-defined]
    assert typ == "OK", data
    client.state = "AUTH"
    return client


def login(port: int) -> None:
    client = open_session(port)
    try:
        assert client.noop()[0] == "OK"
    finally:
        client.logout()


def workers(proc: ProxyProcess) -> dict[int, int]:
    """Slot → pid of the newest ``worker_started`` line per slot."""
    out = {}
    for m in re.finditer(r"event=worker_started worker=(\d+) pid=(\d+)", proc.text()):
        out[int(m.group(1))] = int(m.group(2))
    return out


def logins_by_worker(proc: ProxyProcess) -> dict[str, int]:
    counts: dict[str, int] = {}
    for m in re.finditer(r"worker=(\d+) event=login .*result=ok", proc.text()):
        counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    return counts


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


async def start(tmp_path: Path, upstream: DemoUpstream, notify: NotifySocket,
                processes: list[ProxyProcess], event_loop: str
                ) -> tuple[ProxyProcess, int, int]:
    authorise(make_config(tmp_path, upstream, protocols=("imap",)), upstream)
    proc = ProxyProcess(write_config(tmp_path, upstream, event_loop=event_loop),
                        tmp_path / "proxy.log", notify=notify)
    processes.append(proc)
    ready = await asyncio.to_thread(notify.expect, "READY", proc=proc.proc, timeout=60)
    assert ready["STATUS"] == "ready: 2 of 2 workers accepting"
    line = f"event=ready listeners=1 systemd=true event_loop={event_loop}"
    await poll(lambda: proc.text().count(line) == 2)  # each logs it just after READY=1
    return proc, proc.port("listening", " listener=imap "), proc.port("metrics_listening")


async def test_two_workers_one_scrape_reload_crash_and_stop(
        tmp_path: Path, demo_upstream: DemoUpstream, notify: NotifySocket,
        processes: list[ProxyProcess], event_loop_name: str) -> None:
    proc, port, metrics_port = await start(tmp_path, demo_upstream, notify, processes,
                                           event_loop_name)
    pids = workers(proc)
    assert sorted(pids) == [1, 2] and all(alive(pid) for pid in pids.values())
    assert "activated=true" in proc.text()  # the workers took the supervisor's socket

    # Logins until both workers served some: the kernel spreads connections over them.
    done = 0
    while len(logins_by_worker(proc)) < 2:
        await asyncio.to_thread(login, port)
        done += 1
        assert done < 200, "one worker took every connection"
    await poll(lambda: sum(logins_by_worker(proc).values()) == done)
    samples = await scrape(metrics_port)
    assert value(samples, "xoauth2_proxy_logins_total", protocol="imap", result="ok") == done
    assert value(samples, "xoauth2_proxy_workers") == 2
    assert value(samples, "xoauth2_proxy_ready") == 1
    assert value(samples, "xoauth2_proxy_accounts_needing_reauthorisation") == 0
    assert (await http_get(metrics_port, "/readyz"))[0] == 200

    # SIGHUP reaches both workers; a session opened before the reload goes on after it.
    session = await asyncio.to_thread(open_session, port)
    proc.signal(signal.SIGHUP)
    await asyncio.to_thread(notify.expect, "RELOADING", proc=proc.proc)
    await asyncio.to_thread(notify.expect, "READY", proc=proc.proc)
    await poll(lambda: proc.text().count("event=reloaded") == 2)
    assert (await asyncio.to_thread(session.noop))[0] == "OK"
    assert (await asyncio.to_thread(session.select, "INBOX"))[0] == "OK"

    await asyncio.to_thread(session.logout)

    # SIGKILL one worker: it is replaced; the listener never stops accepting.
    victim = pids[1]
    os.kill(victim, signal.SIGKILL)
    for _ in range(4):  # served by the survivor while the slot restarts
        await asyncio.to_thread(login, port)
    await poll(lambda: workers(proc)[1] != victim, timeout=30)
    assert re.search(r"event=worker_exited worker=1 pid=\d+ signal=SIGKILL", proc.text())

    async def both_ready() -> bool:
        return value(await scrape(metrics_port), "xoauth2_proxy_workers") == 2
    await poll(both_ready, timeout=60, every=0.2)
    for _ in range(6):
        await asyncio.to_thread(login, port)
    samples = await scrape(metrics_port)
    assert value(samples, "xoauth2_proxy_worker_restarts_total") == 1
    # The dead worker's logins stay counted (1 is the session's).
    assert value(samples, "xoauth2_proxy_logins_total", protocol="imap", result="ok") == done + 11

    # SIGTERM: STOPPING=1, every worker drains and exits, then the supervisor.
    pids = workers(proc)
    proc.signal(signal.SIGTERM)
    await asyncio.to_thread(notify.expect, "STOPPING")
    assert await asyncio.to_thread(proc.wait) == 0
    assert not any(alive(pid) for pid in pids.values())
    assert "event=stopped" in proc.text()
    private = re.search(r"event=supervisor_started .*runtime_dir=(\S+)", proc.text())
    assert private and not Path(private.group(1)).exists()  # metrics files removed


async def test_a_reload_reaching_a_worker_that_is_still_starting_waits_for_it(
        tmp_path: Path, demo_upstream: DemoUpstream, notify: NotifySocket,
        processes: list[ProxyProcess], event_loop_name: str) -> None:
    proc, port, _ = await start(tmp_path, demo_upstream, notify, processes, event_loop_name)
    victim = workers(proc)[1]
    os.kill(victim, signal.SIGKILL)
    # SIGHUP the replacement the moment it exists: long before its interpreter has started.
    replacement = await poll(lambda: workers(proc)[1] != victim and workers(proc)[1],
                             timeout=30, every=0.002)
    os.kill(replacement, signal.SIGHUP)
    await poll(lambda: "signal=SIGHUP" in proc.text()
               or re.search(r"worker=1 event=reloaded", proc.text()), timeout=60)
    assert "signal=SIGHUP" not in proc.text()  # not killed by it: reloaded once up
    assert alive(replacement) and workers(proc)[1] == replacement
    await asyncio.to_thread(login, port)


async def test_two_workers_on_socket_activated_sockets(
        tmp_path: Path, demo_upstream: DemoUpstream, notify: NotifySocket,
        processes: list[ProxyProcess]) -> None:
    """Sockets from systemd are shared by the workers; the metrics socket stays with the
    supervisor."""
    authorise(make_config(tmp_path, demo_upstream, protocols=("imap",)), demo_upstream)
    imap = socket.create_server(("127.0.0.1", 0), backlog=64)
    metrics_sock = socket.create_server(("127.0.0.1", 0))
    port, metrics_port = imap.getsockname()[1], metrics_sock.getsockname()[1]
    proc = ProxyProcess(write_config(tmp_path, demo_upstream), tmp_path / "proxy.log",
                        notify=notify, activate={"imap": imap, "metrics": metrics_sock})
    processes.append(proc)
    imap.close()
    metrics_sock.close()
    await asyncio.to_thread(notify.expect, "READY", proc=proc.proc, timeout=60)
    assert proc.text().count(f"address=127.0.0.1:{port} ") == 2  # both workers, one socket
    for _ in range(3):
        await asyncio.to_thread(login, port)
    samples = await scrape(metrics_port)
    assert value(samples, "xoauth2_proxy_logins_total", protocol="imap", result="ok") == 3
    proc.signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait) == 0


STORM = 1000  # the two-machine storm's size (tests/realservers/test_pg_two_daemons.py)


async def _storm_login(port: int, n: int) -> list[bytes]:
    """``n`` connections greeted first, then all send LOGIN at once; the tagged replies."""
    conns = []
    for _ in range(n):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await reader.readline()
        conns.append((reader, writer))
    user = USER.encode()
    secret = PASSWORD.encode()
    try:
        for _, writer in conns:
            writer.write(b"a LOGIN " + user + b" {" + str(len(secret)).encode() + b"+}\r\n"
                         + secret + b"\r\n")

        async def reply(reader: asyncio.StreamReader) -> bytes:
            while not (line := await reader.readline()).startswith(b"a ") and line:
                pass
            return line
        async with asyncio.timeout(120):
            return await asyncio.gather(*(reply(reader) for reader, _ in conns))
    finally:
        for _, writer in conns:
            writer.close()


async def test_storm_over_two_workers_makes_one_token_request(
        tmp_path: Path, demo_upstream: DemoUpstream, notify: NotifySocket,
        processes: list[ProxyProcess], event_loop_name: str) -> None:
    """An expired access token and 1,000 concurrent logins spread over both workers: one token
    request at the fake Entra (the token file's lock and re-read across processes)."""
    upstream = demo_upstream
    upstream.configure(access_token_lifetime=3)  # the authorised token: 3 s
    try:
        proc, port, _ = await start(tmp_path, upstream, notify, processes, event_loop_name)
    finally:
        upstream.configure(access_token_lifetime=3600)  # the refreshed one: an hour
    issued = time.monotonic()
    await asyncio.sleep(max(0.0, issued + 4 - time.monotonic()))  # the 3 s token runs out
    upstream.reset_stats()
    replies = await _storm_login(port, STORM)
    assert all(line.startswith(b"a OK") for line in replies), set(replies)
    assert len(logins_by_worker(proc)) == 2  # both workers served logins
    stats = upstream.stats()
    assert stats["grant_types"].get("refresh_token", 0) == 1, stats


async def test_watchdog_for_the_whole(tmp_path: Path, demo_upstream: DemoUpstream,
                                      notify: NotifySocket, processes: list[ProxyProcess],
                                      event_loop_name: str) -> None:
    """With WATCHDOG_USEC the supervisor pings systemd, and a worker whose loop stops pinging
    (SIGSTOP here) is aborted, killed and replaced."""
    authorise(make_config(tmp_path, demo_upstream, protocols=("imap",)), demo_upstream)
    proc = ProxyProcess(write_config(tmp_path, demo_upstream, event_loop=event_loop_name),
                        tmp_path / "proxy.log", notify=notify, env={"WATCHDOG_USEC": "2000000"})
    processes.append(proc)
    await asyncio.to_thread(notify.expect, "READY", proc=proc.proc, timeout=60)
    for _ in range(2):
        await asyncio.to_thread(notify.expect, "WATCHDOG", timeout=5, proc=proc.proc)
    stuck = workers(proc)[2]
    os.kill(stuck, signal.SIGSTOP)
    await poll(lambda: workers(proc)[2] != stuck, timeout=30)
    text = proc.text()
    assert re.search(rf"event=worker_watchdog worker=2 pid={stuck} ", text), text
    # A stopped process keeps SIGABRT pending: SIGKILL follows a timeout later.
    assert re.search(rf"event=worker_watchdog worker=2 pid={stuck} .*signal=SIGKILL", text), text
    assert re.search(rf"event=worker_exited worker=2 pid={stuck} signal=SIGKILL", text), text
    port = proc.port("listening", " listener=imap ")
    for _ in range(3):
        await asyncio.to_thread(login, port)
