"""Warm upstream connections (``proxy.server.pool``) against the demo upstream: opened by
logins only, used by the next login, closed unused after ``warm_seconds``, and skipped when the
upstream has closed them meanwhile (the demo's IMAP/POP3 servers end a connection that has not
logged in after ``preauth_timeout`` seconds, as Microsoft 365 does)."""

from __future__ import annotations

import asyncio
import imaplib
import os
import poplib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from proxy import metrics
from proxy.demo.process import DemoUpstream
from proxy.server.pool import WarmPool
from proxy.server.session import Context
from tests.proxyenv import PASSWORD, USER, ProxyEnv, make_config, start_proxy
from tests.server.test_imap import login

PROTOCOLS = ("imap", "pop")


def session(env: ProxyEnv, protocol: str, password: str = PASSWORD) -> None:
    """A real client logs in, does one thing and leaves."""
    port = env.ports[protocol]
    if protocol == "imap":
        with imaplib.IMAP4("127.0.0.1", port, timeout=30) as imap:
            login(imap, USER, password)
            assert imap.select("INBOX")[0] == "OK"
            imap.logout()
    else:
        pop = poplib.POP3("127.0.0.1", port, timeout=30)
        try:
            pop.user(USER)
            pop.pass_(password)
            pop.stat()
        finally:
            pop.quit()


def pool(env: ProxyEnv, protocol: str) -> WarmPool:
    for runtime in env.daemon.listeners:
        if runtime.name == protocol:
            assert isinstance(runtime.ctx, Context)
            return runtime.ctx.warm
    raise AssertionError(protocol)


def warm_count(protocol: str, result: str) -> float:
    value = metrics.REGISTRY.get_sample_value("xoauth2_proxy_upstream_warm_connections_total",
                                              {"protocol": protocol, "result": result})
    return value or 0.0


async def until(condition: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def ready(warm: WarmPool) -> list[bool]:
    """Whether each ready connection is still open (white box: the pool's own list)."""
    return [endpoint.usable() for _, endpoint in warm._ready]


@pytest.fixture
async def env(tmp_path: Path, demo_upstream: DemoUpstream,
              request: pytest.FixtureRequest) -> AsyncIterator[ProxyEnv]:
    upstream = getattr(request, "param", {})
    env = await start_proxy(tmp_path, demo_upstream, protocols=PROTOCOLS,
                            upstreams={p: upstream for p in PROTOCOLS})
    yield env
    await env.daemon.stop(grace=1)


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_a_login_warms_connections_for_the_next(env: ProxyEnv, protocol: str) -> None:
    warm = pool(env, protocol)
    hits, misses = warm_count(protocol, "hit"), warm_count(protocol, "miss")
    await asyncio.to_thread(session, env, protocol)
    assert warm_count(protocol, "miss") == misses + 1
    await until(lambda: len(warm) == 2, "two warm connections (the default)")
    for n in range(1, 4):
        await asyncio.to_thread(session, env, protocol)
        assert warm_count(protocol, "hit") == hits + n
        await until(lambda: len(warm) == 2, "the pool to be topped up again")
    assert warm_count(protocol, "miss") == misses + 1


async def test_no_login_no_upstream_connection(env: ProxyEnv) -> None:
    """Clients that only connect, or give a wrong password, make the proxy open nothing."""
    def strangers() -> None:
        for _ in range(5):
            with imaplib.IMAP4("127.0.0.1", env.ports["imap"], timeout=30) as imap:
                with pytest.raises(imaplib.IMAP4.error):
                    login(imap, USER, "wrong password")
            poplib.POP3("127.0.0.1", env.ports["pop"], timeout=30).quit()

    taken = [warm_count(p, r) for p in PROTOCOLS for r in ("hit", "miss")]
    await asyncio.to_thread(strangers)
    for protocol in PROTOCOLS:
        warm = pool(env, protocol)
        assert len(warm) == 0 and not warm._opening
    assert [warm_count(p, r) for p in PROTOCOLS for r in ("hit", "miss")] == taken


@pytest.mark.parametrize("env", [{"warm_seconds": 1}], indirect=True)
async def test_unused_warm_connections_are_closed(env: ProxyEnv) -> None:
    warm = pool(env, "imap")
    before = 0
    for round_ in range(2):  # the first login also opens what the token service keeps
        expired = warm_count("imap", "expired")
        await asyncio.to_thread(session, env, "imap")
        await until(lambda: len(warm) == 2, "two warm connections")
        await until(lambda: len(warm) == 0, "the warm connections to expire")
        assert warm_count("imap", "expired") == expired + 2
        if round_ == 0:
            before = len(os.listdir("/proc/self/fd"))
    await until(lambda: len(os.listdir("/proc/self/fd")) <= before,
                "their descriptors to be closed")


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_warm_connections_the_upstream_closed_are_skipped(
        env: ProxyEnv, demo_upstream: DemoUpstream, protocol: str) -> None:
    warm = pool(env, protocol)
    demo_upstream.configure(preauth_timeout=1)
    await asyncio.to_thread(session, env, protocol)
    await until(lambda: len(warm) == 2, "two warm connections")
    stale = warm_count(protocol, "stale")
    await until(lambda: ready(warm) == [False, False], "the upstream to close them", timeout=10)
    demo_upstream.configure(preauth_timeout=60)
    await asyncio.to_thread(session, env, protocol)  # on a new connection, not on a dead one
    assert warm_count(protocol, "stale") == stale + 2


@pytest.mark.parametrize("env", [{"warm_connections": 0}], indirect=True)
async def test_warm_connections_can_be_turned_off(env: ProxyEnv) -> None:
    await asyncio.to_thread(session, env, "imap")
    warm = pool(env, "imap")
    assert len(warm) == 0 and not warm._opening


async def test_a_reload_replaces_warm_connections(env: ProxyEnv, tmp_path: Path,
                                                  demo_upstream: DemoUpstream) -> None:
    warm = pool(env, "imap")
    await asyncio.to_thread(session, env, "imap")
    await until(lambda: len(warm) == 2, "two warm connections")
    await env.daemon.reload(make_config(tmp_path, demo_upstream, protocols=PROTOCOLS,
                                        upstreams={p: {"warm_connections": 1} for p in PROTOCOLS}))
    assert len(warm) == 0 and warm.size == 1  # made under the old settings: closed
    await asyncio.to_thread(session, env, "imap")
    await until(lambda: len(warm) == 1, "one warm connection")
