"""The metrics endpoint: a scrape after real client sessions through the proxy, the health
probes through a daemon's life, the HTTP server's edges and the loopback-only rule."""

from __future__ import annotations

import asyncio
import imaplib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from proxy import config as config_mod
from proxy import metrics
from proxy.demo.process import DemoUpstream
from proxy.server.daemon import Daemon
from proxy.server.http import MetricsServer
from tests.ops.util import http_get, names, parse, poll, scrape, value
from tests.proxyenv import PASSWORD, USER, ProxyEnv, authorise, config_dict

P = "xoauth2_proxy_"


async def start_with_metrics(tmp_path: Path, upstream: DemoUpstream,
                             metrics_table: dict[str, Any] | None = None,
                             **kw: Any) -> ProxyEnv:
    data = config_dict(tmp_path, upstream, **kw)
    data["metrics"] = {"listen": "127.0.0.1:0", **(metrics_table or {})}
    cfg = config_mod.parse(data, tmp_path / "config.toml")
    token_store = authorise(cfg, upstream)
    daemon = Daemon(cfg)
    await daemon.start()
    return ProxyEnv(upstream, cfg, token_store, daemon)


def imap_session(port: int, password: str, *, select: bool = True) -> str:
    client = imaplib.IMAP4("127.0.0.1", port, timeout=30)
    try:
        client.literal = password.encode()  # type: ignore[attr-defined]
        typ, _ = client._simple_command("LOGIN", USER)  # type: ignore[attr-defined]
        if typ == "OK":
            client.state = "AUTH"
            if select:
                client.select("INBOX")
                client.fetch("1", "(RFC822)")
        return typ
    finally:
        client.logout()


async def test_scrape_after_sessions(tmp_path: Path,
                                     demo_upstream_factory: Callable[..., DemoUpstream]) -> None:
    # Access tokens live one second: the first login must refresh through the identity platform.
    upstream = demo_upstream_factory(access_token_lifetime=1)
    env = await start_with_metrics(tmp_path, upstream, protocols=("imap",))
    try:
        port = env.daemon.metrics_port
        assert port is not None
        upstream.deliver(USER, b"Subject: hi\r\n\r\n" + b"x" * 5000 + b"\r\n")
        before = await scrape(port)
        imap = env.ports["imap"]
        assert await asyncio.to_thread(imap_session, imap, "not the password") == "NO"
        assert await asyncio.to_thread(imap_session, imap, PASSWORD) == "OK"
        after = await scrape(port)

        def delta(name: str, **labels: str) -> float:
            return value(after, name, **labels) - value(before, name, **labels)

        assert delta(P + "logins_total", protocol="imap", result="bad_password") == 1
        assert delta(P + "logins_total", protocol="imap", result="ok") == 1
        assert delta(P + "connections_total", protocol="imap", listener="imap") == 2
        assert value(after, P + "connections_active", protocol="imap", listener="imap") == 0
        assert delta(P + "token_refreshes_total", result="ok") >= 1
        assert delta(P + "token_refresh_seconds_count") >= 1
        assert delta(P + "upstream_connect_seconds_count", protocol="imap") == 1
        assert delta(P + "upstream_login_seconds_count", protocol="imap") == 1
        relayed = P + "relayed_bytes_total"
        assert delta(relayed, protocol="imap", direction="upstream_to_client") > 5000
        assert delta(relayed, protocol="imap", direction="client_to_upstream") > 0
        # Every login result exists from the first scrape, at zero until it happens.
        for result in metrics.LOGIN_RESULTS:
            labels = frozenset({("protocol", "imap"), ("result", result)})
            assert (P + "logins_total", labels) in after
        assert value(after, P + "ready") == 1
        assert value(after, P + "accounts_needing_reauthorisation") == 0
        # Without per-account labels the token expiry is one label-free series.
        assert (P + "access_token_expiry_seconds", frozenset()) in after
        assert not any(dict(labels).get("account") for _, labels in after)
        assert value(after, P + "build_info", version=_version(after),
                     python=_python(after)) == 1
        assert "process_start_time_seconds" in names(after)
    finally:
        await env.daemon.stop(grace=1)


def _version(samples: Any) -> str:
    return next(dict(labels)["version"] for name, labels in samples if name == P + "build_info")


def _python(samples: Any) -> str:
    return next(dict(labels)["python"] for name, labels in samples if name == P + "build_info")


async def test_per_account_labels(tmp_path: Path, demo_upstream: DemoUpstream) -> None:
    env = await start_with_metrics(tmp_path, demo_upstream, {"per_account_labels": True},
                                   protocols=("imap",))
    try:
        port = env.daemon.metrics_port
        assert port is not None
        assert await asyncio.to_thread(imap_session, env.ports["imap"], PASSWORD,
                                       select=False) == "OK"
        samples = await scrape(port)
        assert value(samples, P + "account_needs_reauthorisation", account=USER) == 0
        expiry = value(samples, P + "access_token_expiry_seconds", account=USER)
        assert 3000 < expiry <= 3600
        # The refresh token's expiry is not known from Entra's answers: no made-up series.
        assert (P + "refresh_token_expiry_seconds", frozenset({("account", USER)})) not in samples

        # Microsoft revokes the refresh token; the next refresh marks the account.
        env.upstream.revoke(USER, access_tokens=True)
        assert await asyncio.to_thread(imap_session, env.ports["imap"], PASSWORD,
                                       select=False) == "NO"
        samples = await scrape(port)
        assert value(samples, P + "account_needs_reauthorisation", account=USER) == 1
        assert value(samples, P + "accounts_needing_reauthorisation") == 1
        assert value(samples, P + "token_refreshes_total", result="authorisation_needed") >= 1
    finally:
        await env.daemon.stop(grace=1)


async def test_readyz_through_the_daemon_life(tmp_path: Path, demo_upstream: DemoUpstream) -> None:
    env = await start_with_metrics(tmp_path, demo_upstream, protocols=("imap",))
    port = env.daemon.metrics_port
    assert port is not None
    assert (await http_get(port, "/readyz"))[0] == 200
    assert (await http_get(port, "/healthz"))[0] == 200

    # A logged-in session keeps the daemon draining until it ends.
    reader, writer = await asyncio.open_connection("127.0.0.1", env.ports["imap"])
    await reader.readline()
    writer.write(b'a LOGIN ' + USER.encode() + b' {%d+}\r\n' % len(PASSWORD.encode())
                 + PASSWORD.encode() + b'\r\n')
    assert (await reader.readuntil(b"a OK")).endswith(b"a OK")
    stopping = asyncio.create_task(env.daemon.stop(grace=30))
    try:
        await poll(lambda: env.daemon.state == "draining")
        status, _, body = await http_get(port, "/readyz")
        assert (status, body) == (503, b"not ready\n")
        assert (await http_get(port, "/healthz"))[0] == 200  # alive, just not taking connections
        assert value(await scrape(port), P + "ready") == 0
        writer.write(b"b LOGOUT\r\n")
        await writer.drain()
        async with asyncio.timeout(15):
            await stopping
    finally:
        writer.close()
        if not stopping.done():
            stopping.cancel()
    assert env.daemon.state == "stopped"
    with pytest.raises(OSError):
        await http_get(port, "/readyz")  # the endpoint is closed once the daemon has stopped


async def test_http_server_edges() -> None:
    ready = False
    server = MetricsServer(lambda: ready)
    await server.start("127.0.0.1", 0)
    try:
        assert (await http_get(server.port, "/readyz"))[0] == 503  # starting
        ready = True
        assert (await http_get(server.port, "/readyz?verbose=1"))[0] == 200
        status, headers, body = await http_get(server.port, "/metrics", "HEAD")
        assert status == 200 and body == b"" and int(headers["content-length"]) > 0
        accept = "Accept: application/openmetrics-text; version=1.0.0\r\n"
        status, headers, body = await http_get(server.port, "/metrics", headers=accept)
        assert headers["content-type"].startswith("application/openmetrics-text")
        assert body.endswith(b"# EOF\n")
        status, headers, _ = await http_get(server.port, "/metrics")
        assert headers["content-type"].startswith("text/plain; version=0.0.4")
        assert P + "ready" in names(parse((await http_get(server.port, "/metrics"))[2].decode()))
        assert (await http_get(server.port, "/nope"))[0] == 404
        assert (await http_get(server.port, "/metrics", "POST"))[0] == 405
        # An oversized request head is refused, not buffered (aiohttp's parser: 400).
        status, _, _ = await http_get(server.port, "/metrics", headers="X: " + "a" * 20000 + "\r\n")
        assert status == 400
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"garbage\r\n\r\n")
        assert (await reader.read()).split(b"\r\n")[0] in (b"HTTP/1.0 400 Bad Request",
                                                            b"HTTP/1.1 400 Bad Request")
        writer.close()
    finally:
        await server.stop()


@pytest.mark.parametrize("listen", ["0.0.0.0:9464", "192.0.2.1:9464", "[::]:9464"])
def test_metrics_refuses_non_loopback(tmp_path: Path, listen: str) -> None:
    data = _minimal(tmp_path)
    data["metrics"] = {"listen": listen}
    with pytest.raises(config_mod.ConfigError, match=r"metrics\.listen: .*not a loopback"):
        config_mod.parse(data, tmp_path / "config.toml")
    data["metrics"]["allow_non_loopback"] = True
    cfg = config_mod.parse(data, tmp_path / "config.toml")
    assert cfg.metrics.allow_non_loopback and cfg.metrics.listen is not None


@pytest.mark.parametrize("listen", ["127.0.0.1:9464", "[::1]:9464", "localhost:9464"])
def test_metrics_loopback_is_fine(tmp_path: Path, listen: str) -> None:
    data = _minimal(tmp_path)
    data["metrics"] = {"listen": listen}
    assert config_mod.parse(data, tmp_path / "config.toml").metrics.listen is not None


def _minimal(tmp_path: Path) -> dict[str, Any]:
    return {"state_dir": str(tmp_path),
            "providers": {"p": {"tenant": "t", "client_id": "c"}},
            "accounts": {"a@example.com": {}}}
