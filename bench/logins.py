"""Figures 4 and 5 — login latency and the refresh storm.

Login latency (one login at a time, warm token, a new connection for each sample):

- ``login``: from sending ``LOGIN`` (proxies) or ``AUTHENTICATE XOAUTH2`` (direct) to its
  tagged ``OK``. Through a proxy this includes the proxy's upstream connect, TLS handshake
  and XOAUTH2 exchange; direct, the client did its TLS handshake *before* the timer started.
- ``ready``: from ``connect()`` to the tagged ``OK`` of the login: what a client waits
  before it can issue its first command. Direct includes the client's own TLS handshake.

"Added" is proxy minus direct, per percentile.

Refresh storm: the account's access token is made to expire (the fake Entra issues a 2 s
token on re-authorisation, then the bench waits it out), ``n`` connections are opened and
greeted, then all send ``LOGIN`` at once. Figures: token-endpoint requests counted by the
fake Entra (``stats()["grant_types"]["refresh_token"]``; single flight means 1) and the
time from the first ``LOGIN`` to the last ``OK``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

from bench import clients, harness
from proxy.demo.process import DemoUpstream


async def _one_login(target: clients.Target) -> tuple[float, float]:
    started = time.perf_counter()
    conn = await clients.ImapConn.open(target)
    try:
        t0 = time.perf_counter()
        await conn.login(target)
        done = time.perf_counter()
        return done - t0, done - started
    finally:
        conn.close()


async def latency(target: clients.Target, samples: int) -> dict[str, float]:
    login, ready = [], []
    await _one_login(target)  # warm: the token, the key cache, the peer's config
    for _ in range(samples):
        a, b = await _one_login(target)
        login.append(a)
        ready.append(b)
        await asyncio.sleep(0.005)
    return {"login_p50_ms": harness.percentile(login, 50) * 1e3,
            "login_p99_ms": harness.percentile(login, 99) * 1e3,
            "ready_p50_ms": harness.percentile(ready, 50) * 1e3,
            "ready_p99_ms": harness.percentile(ready, 99) * 1e3,
            "samples": float(samples)}


async def storm(target: clients.Target | Sequence[clients.Target], n: int,
                upstream: DemoUpstream, timeout: float = 600.0,
                open_parallel: int = 200) -> dict[str, Any]:
    """``n`` concurrent LOGINs for one account whose access token has expired; with several
    targets (daemons sharing a token store), the connections go to each in turn."""
    targets = [target] if isinstance(target, clients.Target) else list(target)
    sem = asyncio.Semaphore(open_parallel)
    errors: list[str] = []

    async def connect(i: int) -> tuple[clients.ImapConn, clients.Target] | None:
        where = targets[i % len(targets)]
        async with sem:
            try:
                async with asyncio.timeout(30):
                    return await clients.ImapConn.open(where), where
            except Exception as exc:
                errors.append(f"connect: {type(exc).__name__}: {exc}"[:200])
                return None

    opened = await asyncio.gather(*(connect(i) for i in range(n)))
    conns = [c for c in opened if c is not None]
    upstream.reset_stats()
    done_at: list[float] = []
    started = time.perf_counter()

    async def one(conn: clients.ImapConn, where: clients.Target) -> None:
        try:
            await conn.login(where)
            done_at.append(time.perf_counter() - started)
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}"[:200])

    try:
        async with asyncio.timeout(timeout):
            await asyncio.gather(*(one(c, where) for c, where in conns))
    except TimeoutError:
        errors.append(f"timed out after {timeout} s")
    stats = upstream.stats()
    for conn, _ in conns:
        conn.close()
    await asyncio.sleep(0.5)
    return {"n": n, "ok": len(done_at), "errors": n - len(done_at),
            "token_requests": int(stats.get("grant_types", {}).get("refresh_token", 0)),
            "token_endpoint_requests": int(stats.get("token_requests", 0)),
            "all_ok_s": max(done_at) if len(done_at) == n else float("nan"),
            "p50_ok_s": harness.percentile(done_at, 50),
            "first_error": errors[0] if errors else ""}


def expire_token(world: Any, account: str, say: Callable[[str], None], *,
                 cfg: Any = None, token_store: Any = None) -> None:
    """Re-authorise ``account`` with a 2 s access token (into ``token_store`` under ``cfg``,
    default the world's token files), then let it run out."""
    world.upstream.configure(access_token_lifetime=2)
    try:
        world.authorise(account, cfg, token_store)
    finally:
        world.upstream.configure(access_token_lifetime=3600, auto_approve_user=None)
    time.sleep(3.0)
