"""Old devices on TLS 1.0/1.1: a listener that chooses ``min_tls_version = "1.0"`` serves
Debian's ``openssl s_client -tls1``/``-tls1_1`` end to end (SMTP AUTH and a message, IMAP
LOGIN, POP3) to the fake Microsoft 365 over TLS 1.2+, while default listeners beside it refuse
the same handshakes; each handshake is counted, old ones are logged (rate-limited), and
``allow_from`` keeps other sources out."""

from __future__ import annotations

import logging
import smtplib
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy import config as config_mod
from proxy import metrics, systemd
from proxy.demo import certs
from proxy.demo.process import DemoUpstream
from proxy.server import tls as tls_mod
from proxy.server.daemon import Daemon, _Process
from tests.ops.util import require_tool
from tests.proxyenv import USER, ProxyEnv, authorise, config_dict, to_toml
from tests.server.sclient import handshake, s_client
from tests.server.smtp_util import (
    DEVICE_PASSWORD,
    RCPT,
    add_device_password,
    assert_no_leak,
    in_thread,
    message,
    plain_b64,
    secret_forms,
)

OLD = {"min_tls_version": "1.0"}


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Each test starts with no old-TLS warning remembered; no password reaches the logs."""
    require_tool("openssl", "openssl")
    monkeypatch.setattr(tls_mod, "OLD_TLS_WARNINGS", tls_mod.OldTlsWarnings())
    caplog.set_level(logging.DEBUG)
    yield
    assert_no_leak(caplog.get_records("call"), secret_forms(DEVICE_PASSWORD))


def listeners(local: certs.CertPaths) -> list[dict[str, Any]]:
    files = {"cert_file": str(local.cert_file), "key_file": str(local.key_file)}
    plain = [("old-smtp", "smtp", "starttls", OLD), ("old-imap", "imap", "implicit", OLD),
             ("old-pop", "pop", "starttls", {"min_tls_version": "1.1"}),
             ("smtp", "smtp", "starttls", {}), ("imap", "imap", "implicit", {})]
    return [{"name": name, "protocol": protocol, "listen": "127.0.0.1:0", "upstream": protocol,
             "tls": mode, **files, **extra} for name, protocol, mode, extra in plain]


def config_data(tmp_path: Path, upstream: DemoUpstream,
                change: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    where = tmp_path / "local-tls"
    local = (certs.CertPaths(where / "ca.pem", where / "server.pem", where / "server.key")
             if (where / "ca.pem").exists() else certs.generate(where))
    data = config_dict(tmp_path, upstream)
    data["listeners"] = [{**li, **(change or {}).get(li["name"], {})} for li in listeners(local)]
    return data


@pytest.fixture
async def env(tmp_path: Path, demo_upstream: DemoUpstream) -> AsyncIterator[ProxyEnv]:
    cfg = config_mod.parse(config_data(tmp_path, demo_upstream), tmp_path / "config.toml")
    token_store = authorise(cfg, demo_upstream)
    daemon = Daemon(cfg)
    await daemon.start()
    proxy_env = ProxyEnv(demo_upstream, cfg, token_store, daemon)
    add_device_password(proxy_env)
    yield proxy_env
    await daemon.stop(grace=1)


def ca(env: ProxyEnv) -> Path:
    return env.config.path.parent / "local-tls" / "ca.pem"


def handshakes(listener: str, version: str) -> float:
    value = metrics.REGISTRY.get_sample_value("xoauth2_proxy_tls_handshakes_total",
                                              {"listener": listener, "version": version})
    assert value is not None, "the series is created at start, at zero"
    return value


def fields(caplog: pytest.LogCaptureFixture, event: str) -> list[dict[str, Any]]:
    return [getattr(r, "fields", {}) for r in caplog.records if r.getMessage() == event]


def logins(caplog: pytest.LogCaptureFixture, listener: str) -> list[dict[str, Any]]:
    return [f for f in fields(caplog, "login") if f.get("listener") == listener]


async def test_smtp_over_tls_1_0_sends_through_tls_1_2_upstream(
        env: ProxyEnv, caplog: pytest.LogCaptureFixture) -> None:
    before = handshakes("old-smtp", "1.0")
    port = env.ports["old-smtp"]
    async with s_client(port, "1.0", ca(env), starttls="smtp") as c:
        assert (await c.smtp("EHLO printer.example")).startswith("250 ")
        assert (await c.smtp(f"AUTH PLAIN {plain_b64(USER, DEVICE_PASSWORD)}")).startswith("235 ")
        assert (await c.smtp(f"MAIL FROM:<{USER}>")).startswith("250 ")
        assert (await c.smtp(f"RCPT TO:<{RCPT}>")).startswith("250 ")
        assert (await c.smtp("DATA")).startswith("354 ")
        for line in message("scan over TLS 1.0").decode().split("\r\n"):
            await c.send(line)
        assert (await c.smtp(".")).startswith("250 ")
        assert (await c.smtp("QUIT")).startswith("221 ")
        assert "Protocol version: TLSv1\n" in await c.stderr()
    delivered = await in_thread(lambda: env.upstream.mailbox(RCPT))
    assert [m for m in delivered if b"Subject: scan over TLS 1.0" in m]
    (login,) = logins(caplog, "old-smtp")
    assert login["result"] == "ok" and login["tls"] == "1.0"
    assert login["upstream_tls"] in ("1.2", "1.3")  # the Microsoft side is never weakened
    assert handshakes("old-smtp", "1.0") == before + 1
    (warning,) = fields(caplog, "old_tls_handshake")
    assert warning["listener"] == "old-smtp" and warning["tls"] == "1.0"
    assert warning["peer"].startswith("127.0.0.1:") and "SHA" in warning["cipher"]


async def test_imap_login_over_tls_1_1_implicit(env: ProxyEnv,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    async with s_client(env.ports["old-imap"], "1.1", ca(env)) as c:
        await c.until(r"\* OK")
        assert (await c.command(f"a1 LOGIN {USER} {DEVICE_PASSWORD}", r"a1 ")).startswith("a1 OK")
        assert (await c.command("a2 SELECT INBOX", r"a2 ")).startswith("a2 OK")
        await c.command("a3 LOGOUT", r"a3 ")
        assert "Protocol version: TLSv1.1\n" in await c.stderr()
    (login,) = logins(caplog, "old-imap")
    assert login["result"] == "ok" and login["tls"] == "1.1"
    assert login["upstream_tls"] in ("1.2", "1.3")
    assert handshakes("old-imap", "1.1") >= 1


async def test_pop3_stls_over_tls_1_1(env: ProxyEnv, caplog: pytest.LogCaptureFixture) -> None:
    async with s_client(env.ports["old-pop"], "1.1", ca(env), starttls="pop3") as c:
        assert (await c.command(f"USER {USER}", r"[+-]")).startswith("+OK")
        assert (await c.command(f"PASS {DEVICE_PASSWORD}", r"[+-]")).startswith("+OK")
        assert (await c.command("STAT", r"[+-]")).startswith("+OK")
        await c.command("QUIT", r"[+-]")
    (login,) = logins(caplog, "old-pop")
    assert login["tls"] == "1.1" and login["upstream_tls"] in ("1.2", "1.3")
    # "1.1" is this listener's floor: TLS 1.0 is refused there.
    status, err = await handshake(env.ports["old-pop"], "1.0", ca(env), starttls="pop3")
    assert status != 0 and "Protocol version" not in err


@pytest.mark.parametrize("version", ["1.0", "1.1"])
async def test_default_listeners_refuse_old_tls(env: ProxyEnv, version: str) -> None:
    for name, starttls in (("smtp", "smtp"), ("imap", None)):
        status, err = await handshake(env.ports[name], version, ca(env), starttls)
        assert status != 0 and "CONNECTION ESTABLISHED" not in err, err
        # The same client at TLS 1.2 gets in: the refusal is the version, nothing else.
        status, err = await handshake(env.ports[name], "1.2", ca(env), starttls)
        assert "Protocol version: TLSv1.2" in err, err


async def test_only_the_chosen_listener_is_weakened(env: ProxyEnv) -> None:
    contexts = {runtime.name: runtime.ctx for runtime in env.daemon.listeners}
    for name in ("old-smtp", "old-imap"):
        server_tls = contexts[name].server_tls
        assert server_tls is not None and server_tls.security_level == 0
        assert server_tls.minimum_version == ssl.TLSVersion.TLSv1
        assert any(c["name"].endswith("-SHA") for c in server_tls.get_ciphers())
    for name in ("smtp", "imap"):
        server_tls = contexts[name].server_tls
        assert server_tls is not None and server_tls.security_level == 2
        assert server_tls.minimum_version == ssl.TLSVersion.TLSv1_2
        assert not any(c["name"].endswith("-SHA") for c in server_tls.get_ciphers())
    for ctx in contexts.values():
        assert ctx.upstream_tls.minimum_version == ssl.TLSVersion.TLSv1_2
        assert ctx.upstream_tls.security_level >= 2
        assert ctx.upstream_tls.verify_mode == ssl.CERT_REQUIRED


async def test_old_tls_warning_is_rate_limited(env: ProxyEnv,
                                               caplog: pytest.LogCaptureFixture) -> None:
    for _ in range(3):
        status, err = await handshake(env.ports["old-imap"], "1.0", ca(env))
        assert "Protocol version: TLSv1\n" in err, err
    warnings = fields(caplog, "old_tls_handshake")
    assert len(warnings) == 1 and warnings[0]["cipher"]
    tls_mod.OLD_TLS_WARNINGS.interval = 0  # the interval has passed: logged, with the count
    await handshake(env.ports["old-imap"], "1.0", ca(env))
    warnings = fields(caplog, "old_tls_handshake")
    assert len(warnings) == 2 and warnings[1]["not_logged"] == 2
    started = [getattr(r, "fields", {}) for r in caplog.get_records("setup")
               if r.getMessage() == "old_tls_enabled"]
    assert {f["listener"]: f["sources"] for f in started} == {
        "old-smtp": "loopback only", "old-imap": "loopback only", "old-pop": "loopback only"}


async def test_allow_from_keeps_other_sources_out(tmp_path: Path, demo_upstream: DemoUpstream,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    only = {"allow_from": ["127.0.0.2/32"]}
    data = config_data(tmp_path, demo_upstream, {"old-smtp": only, "old-imap": only})
    cfg = config_mod.parse(data, tmp_path / "config.toml")
    daemon = Daemon(cfg)
    await daemon.start()
    try:
        ports = daemon.ports()
        with pytest.raises(smtplib.SMTPConnectError) as refused:
            await in_thread(lambda: smtplib.SMTP("127.0.0.1", ports["old-smtp"], timeout=10))
        assert refused.value.smtp_code == 554 and b"allow_from" in refused.value.smtp_error
        allowed = await in_thread(lambda: smtplib.SMTP("127.0.0.1", ports["old-smtp"], timeout=10,
                                                       source_address=("127.0.0.2", 0)))
        assert (await in_thread(allowed.noop))[0] == 250
        await in_thread(allowed.quit)
        async with s_client(ports["old-imap"], "1.0",
                            tmp_path / "local-tls" / "ca.pem") as c:
            bye = await c.until(r"\* ")
        assert bye.startswith("* BYE Connections from 127.0.0.1 are not accepted")
        refused = fields(caplog, "connection_refused")
        assert [(f["listener"], f["peer"]) for f in refused] == [("old-smtp", "127.0.0.1"),
                                                                 ("old-imap", "127.0.0.1")]
        assert all("allow_from" in f["reason"] for f in refused)
        # Listeners without allow_from still take everyone.
        assert (await in_thread(lambda: smtplib.SMTP("127.0.0.1", ports["smtp"],
                                                     timeout=10).quit()))[0] == 221
    finally:
        await daemon.stop(grace=1)


async def test_reload_applies_the_version_floor_to_implicit_tls(
        env: ProxyEnv, caplog: pytest.LogCaptureFixture) -> None:
    port, ca_file = env.ports["imap"], ca(env)
    assert (await handshake(port, "1.0", ca_file))[0] != 0
    tmp_path = env.config.path.parent
    lowered = config_data(tmp_path, env.upstream, {"imap": OLD})
    await env.daemon.reload(config_mod.parse(lowered, env.config.path))
    before = handshakes("imap", "1.0")  # the reload made the series for the new floor
    status, err = await handshake(port, "1.0", ca_file)
    assert "Protocol version: TLSv1\n" in err, err
    assert handshakes("imap", "1.0") == before + 1
    await env.daemon.reload(config_mod.parse(config_data(tmp_path, env.upstream),
                                             env.config.path))
    status, err = await handshake(port, "1.0", ca_file)
    assert status != 0 and "CONNECTION ESTABLISHED" not in err


async def test_sighup_refuses_old_tls_open_to_any_address(
        env: ProxyEnv, caplog: pytest.LogCaptureFixture) -> None:
    data = config_data(env.config.path.parent, env.upstream,
                       {"old-imap": {"listen": "0.0.0.0:9993"}})  # noqa: S104 (never bound)
    env.config.path.write_text(to_toml(data))
    process = _Process(env.daemon, systemd.Notifier(None), None)
    await process.reload()
    (failed,) = fields(caplog, "reload_failed")
    assert "min_tls_version" in failed["reason"] and "open to any address" in failed["reason"]
    assert env.daemon.config.listeners[1].min_tls_version == "1.0"
    assert env.daemon.state == "ready"
    status, err = await handshake(env.ports["old-imap"], "1.0", ca(env))
    assert "Protocol version: TLSv1\n" in err  # still serving with the previous config
