"""SMTP relay rules end to end: devices (smtplib, swaks) bound to 127.0.0.2 (allowed) and
127.0.0.3 (not allowed) → proxy → fake Microsoft 365, plus the ``[[relay]]`` config checks.

Every test ends by checking that no password reached a log record."""

from __future__ import annotations

import asyncio
import io
import logging
import shutil
import smtplib
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy import config as config_mod
from proxy import metrics, store
from proxy.auth import flows
from proxy.config import ConfigError
from proxy.demo.process import DemoUpstream
from proxy.secret import Secret
from proxy.server.connection import Connection
from proxy.server.daemon import Daemon
from proxy.server.limits import PreauthLimiter
from proxy.server.smtp_relay import rule_for
from tests.proxyenv import PASSWORD, USER, ProxyEnv, config_dict, open_store, to_toml
from tests.server.smtp_util import (
    DEVICE_PASSWORD,
    RCPT,
    assert_no_leak,
    in_thread,
    login_count,
    message,
    poll,
    secret_forms,
)

ALLOWED, DENIED = "127.0.0.2", "127.0.0.3"
SCANNER = "scanner@contoso.example"
PRINTER = "hp-m404@printers.contoso.example"  # what the printers put in MAIL FROM
PRINTERS_RULE = {"name": "printers", "listener": "smtp", "sources": [ALLOWED],
                 "account": SCANNER, "allowed_senders": [SCANNER, "@printers.contoso.example"],
                 "force_sender": SCANNER}
SOURCE_REFUSED = b"5.7.1 Relaying from 127.0.0.3 is not allowed by the proxy's rules"


@pytest.fixture(autouse=True)
def no_password_in_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.DEBUG)
    yield
    records = caplog.get_records("setup") + caplog.get_records("call")
    assert_no_leak(records, secret_forms(PASSWORD, DEVICE_PASSWORD))


# --- environment ------------------------------------------------------------------------------


def relay_config(tmp_path: Path, upstream: DemoUpstream, relays: list[dict[str, Any]],
                 **kw: Any) -> dict[str, Any]:
    """An SMTP-only config: alice (password logins) and the scanner account (service key)."""
    key = tmp_path / "scanner.key"
    if not key.exists():
        store.generate_key_file(key)
    data = config_dict(tmp_path, upstream, protocols=("smtp",), accounts={
        USER: {"provider": "demo"},
        SCANNER: {"provider": "demo", "service_key_file": str(key)}}, **kw)
    data["relay"] = relays
    return data


def authorise(cfg: config_mod.Config, upstream: DemoUpstream, user: str) -> store.TokenStore:
    """``xoauth2-proxy login`` for ``user``: device code, password, and the service-key slot
    when the account has a service_key_file (as ``admin.cmd_login`` passes it)."""
    account = cfg.account(user)
    assert account is not None
    upstream.configure(auto_approve_user=account.mailbox)
    token_store = open_store(cfg)
    key = store.read_key_file(account.service_key_file) if account.service_key_file else None
    flows.login(cfg, account, token_store, Secret(PASSWORD), out=io.StringIO(), service_key=key)
    labels = {s.label for s in token_store.info(account.name).slots}
    assert labels == ({"default", "service"} if key else {"default"})
    return token_store


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    started: list[Daemon] = []

    async def run(upstream: DemoUpstream, relays: list[dict[str, Any]], **kw: Any) -> ProxyEnv:
        data = relay_config(tmp_path, upstream, relays, **kw)
        cfg = config_mod.parse(data, tmp_path / "config.toml")
        (tmp_path / "config.toml").write_text(to_toml(data))
        token_store = authorise(cfg, upstream, SCANNER)
        users = authorise(cfg, upstream, USER)
        users.add_password_slot(users.unlock(USER, Secret(PASSWORD)), "laptop",
                                Secret(DEVICE_PASSWORD))  # smtplib logs in with ASCII only
        daemon = Daemon(cfg)
        await daemon.start()
        started.append(daemon)
        return ProxyEnv(upstream, cfg, token_store, daemon)

    yield run
    for daemon in started:
        await daemon.stop(grace=1)


def device(port: int, source: str) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=(source, 0))


def relay_count(rule: str, result: str) -> float:
    value = metrics.REGISTRY.get_sample_value("xoauth2_proxy_relay_messages_total",
                                              {"rule": rule, "result": result})
    return value or 0.0


def cli(config: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", "-c", str(config), *args],
                          input=stdin, capture_output=True, text=True, timeout=60)


async def swaks(port: int, source: str, sender: str, subject: str,
                *extra: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "swaks", "--server", "127.0.0.1", "--port", str(port), "--local-interface", source,
        "--from", sender, "--to", RCPT, "--header", f"Subject: {subject}",
        "--body", "sent by swaks", "--timeout", "30", *extra,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


# --- devices without AUTH ---------------------------------------------------------------------


async def test_allowed_device_relays_without_auth_sender_forced(
        demo_upstream: DemoUpstream, start: Callable[..., Any],
        caplog: pytest.LogCaptureFixture) -> None:
    env = await start(demo_upstream, [PRINTERS_RULE])
    port = env.ports["smtp"]
    accepted, refused = relay_count("printers", "accepted"), relay_count("printers", "refused")
    unmatched, logins = relay_count("(none)", "refused"), login_count("ok")
    scans = [message(f"scan {i}", sender=PRINTER) for i in range(2)]

    def run() -> None:
        with device(port, ALLOWED) as s:
            assert s.ehlo()[0] == 250
            # The header From stays the printer's; upstream, the envelope sender is the
            # scanner mailbox (the fake M365, like the real one, refuses any other: 5.7.60).
            assert s.sendmail(PRINTER, [RCPT], scans[0]) == {}
            assert s.noop() == (250, b"2.0.0 OK")  # the upstream's reply: the session is relayed
            assert s.sendmail(SCANNER, [RCPT], scans[1]) == {}
            with pytest.raises(smtplib.SMTPSenderRefused) as info:
                s.sendmail("mallory@evil.example", [RCPT], message("spoof"))
            assert (info.value.smtp_code, info.value.smtp_error) == (
                550, b"5.7.1 Sender mallory@evil.example is not allowed for relay rule printers")
            assert s.rset()[0] == 250
            assert s.mail("<>") == (  # the null sender only where a rule lists "<>"
                550, b"5.7.1 Sender <> is not allowed for relay rule printers")
        with device(port, DENIED) as s:
            with pytest.raises(smtplib.SMTPSenderRefused) as info:
                s.sendmail(SCANNER, [RCPT], message("from the wrong network"))
            assert (info.value.smtp_code, info.value.smtp_error) == (550, SOURCE_REFUSED)
        with device(port, DENIED) as s:  # a password login works there exactly as before
            s.login(USER, DEVICE_PASSWORD)
            assert s.sendmail(USER, [RCPT], message("logged in")) == {}

    await in_thread(run)
    delivered = await in_thread(lambda: demo_upstream.mailbox(RCPT))
    assert delivered[:2] == scans and len(delivered) == 3
    assert relay_count("printers", "accepted") == accepted + 2
    assert relay_count("printers", "refused") == refused + 2
    assert relay_count("(none)", "refused") == unmatched + 1
    assert login_count("ok") == logins + 1  # alice's; the relayed session never logged in
    lines = [getattr(r, "fields", {}) for r in caplog.records
             if r.name == "proxy.smtp" and r.getMessage() == "message"]
    relayed = [f for f in lines if f.get("rule") == "printers"]
    assert len(relayed) == 2
    first = relayed[0]
    assert first["peer"].startswith(f"{ALLOWED}:") and first["account"] == SCANNER
    assert first["sender"] == PRINTER and first["envelope_sender"] == SCANNER
    assert first["recipients"] == 1 and first["size"] == len(scans[0])
    assert first["queue_id"] and first["result"] == "accepted"
    assert "Hello from the scanner" not in caplog.text  # envelope only, never content
    refusals = [getattr(r, "fields", {}) for r in caplog.records
                if r.getMessage() == "relay_refused"]
    assert {(f["rule"], f["reason"]) for f in refusals} == {
        ("printers", "sender not allowed"), (None, "source not allowed by any relay rule")}


async def test_auth_in_a_relayed_transaction_is_refused(
        demo_upstream: DemoUpstream, start: Callable[..., Any]) -> None:
    """RFC 4954 4: AUTH during a mail transaction is a 503. A device's relayed transaction
    goes on as it was (no login happened); after RSET the login works."""
    env = await start(demo_upstream, [PRINTERS_RULE])
    logins = login_count("ok")

    def run() -> None:
        with device(env.ports["smtp"], ALLOWED) as s:
            assert s.ehlo()[0] == 250
            assert s.mail(PRINTER)[0] == 250
            # smtplib's login takes a 503 for "already authenticated" and returns it
            assert s.login(USER, DEVICE_PASSWORD) == (
                503, b"5.5.1 AUTH is not allowed in a mail transaction; finish the message or "
                     b"send RSET first")
            assert s.rcpt(RCPT)[0] == 250
            assert s.data(message("relayed", sender=PRINTER))[0] == 250
            assert s.rset()[0] == 250
            s.login(USER, DEVICE_PASSWORD)
            assert s.sendmail(USER, [RCPT], message("logged in")) == {}

    await in_thread(run)
    assert len(await in_thread(lambda: demo_upstream.mailbox(RCPT))) == 2
    assert login_count("ok") == logins + 1


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed")
async def test_swaks_devices(demo_upstream: DemoUpstream, start: Callable[..., Any]) -> None:
    env = await start(demo_upstream, [PRINTERS_RULE])
    port = env.ports["smtp"]
    code, out = await swaks(port, ALLOWED, PRINTER, "swaks relay")
    assert code == 0, out
    assert " -> AUTH" not in out and "<-  250 2.1.0 Sender OK" in out  # no AUTH at all
    code, out = await swaks(port, DENIED, PRINTER, "swaks denied")
    assert code != 0 and SOURCE_REFUSED.decode() in out, out
    code, out = await swaks(port, ALLOWED, "someone@contoso.example", "swaks wrong sender")
    assert code != 0, out
    assert "550 5.7.1 Sender someone@contoso.example is not allowed for relay rule printers" in out
    delivered = await in_thread(lambda: demo_upstream.mailbox(RCPT))
    assert len(delivered) == 1 and b"Subject: swaks relay" in delivered[0]
    assert f"From: {PRINTER}".encode() in delivered[0]  # swaks's header From, untouched


async def test_relay_keeps_sending_after_the_access_token_expires(
        demo_upstream_factory: Callable[..., DemoUpstream], start: Callable[..., Any]) -> None:
    upstream = demo_upstream_factory(access_token_lifetime=2)
    rule = {"name": "nas", "listener": "smtp", "sources": [f"{ALLOWED}/32"], "account": SCANNER,
            "allowed_senders": [SCANNER]}  # no force_sender: the sender goes up as it is
    env = await start(upstream, [rule])
    port = env.ports["smtp"]
    logins = login_count("ok")

    def send(subject: str) -> None:
        with device(port, ALLOWED) as s:
            assert s.sendmail(SCANNER, [RCPT], message(subject, sender=SCANNER)) == {}

    await in_thread(lambda: send("before expiry"))

    def expired() -> bool:  # the newest token the service key's account holds is past its life
        expiry = env.store.info(SCANNER).meta.access_token_expires_at
        return expiry is not None and time.time() > expiry + 0.2

    await poll(expired, timeout=30, interval=0.1)
    upstream.reset_stats()
    await in_thread(lambda: send("after expiry"))
    assert upstream.stats()["grant_types"].get("refresh_token", 0) >= 1
    assert len(await in_thread(lambda: upstream.mailbox(RCPT))) == 2
    assert login_count("ok") == logins  # no client ever logged in
    service = next(s for s in env.store.info(SCANNER).slots if s.label == "service")
    assert service.last_used_at is not None  # the daemon records the slot's last use

    def wrong_sender() -> tuple[int, bytes]:
        with device(port, ALLOWED) as s:
            s.ehlo()
            return s.mail(PRINTER)

    assert await in_thread(wrong_sender) == (
        550, b"5.7.1 Sender hp-m404@printers.contoso.example is not allowed for relay rule nas")


async def test_broken_service_key_is_a_temporary_failure_and_passwd_repairs_it(
        tmp_path: Path, demo_upstream: DemoUpstream, start: Callable[..., Any]) -> None:
    env = await start(demo_upstream, [PRINTERS_RULE])
    port = env.ports["smtp"]
    key = tmp_path / "scanner.key"
    key.unlink()
    store.generate_key_file(key)  # a new key: the token file's service slot no longer opens

    def attempt() -> tuple[int, bytes]:
        with device(port, ALLOWED) as s:
            s.ehlo()
            return s.mail(PRINTER)

    unavailable = relay_count("printers", "unavailable")
    assert await in_thread(attempt) == (
        451, b"4.3.5 The proxy is not configured correctly for relay rule printers; contact the "
             b"administrator")
    assert relay_count("printers", "unavailable") == unavailable + 1
    fixed = await in_thread(lambda: cli(tmp_path / "config.toml", "passwd", SCANNER,
                                        "--service-key", "--password-file", "-",
                                        stdin=PASSWORD + "\n"))
    assert fixed.returncode == 0, fixed.stderr
    assert "service key slot added" in fixed.stdout
    assert await in_thread(attempt) == (250, b"2.1.0 Sender OK")
    again = await in_thread(lambda: cli(tmp_path / "config.toml", "passwd", SCANNER,
                                        "--service-key"))
    assert again.returncode == 0 and "already opens" in again.stdout, again.stderr


# --- one mailbox, many device passwords ---------------------------------------------------------


async def test_device_passwords_on_one_mailbox_added_listed_and_revoked(
        tmp_path: Path, demo_upstream: DemoUpstream, start: Callable[..., Any]) -> None:
    fleet = {"name": "fleet", "listener": "smtp", "sources": [f"{ALLOWED}/32"], "account": USER,
             "require_password": True, "allowed_senders": ["@contoso.example"],
             "force_sender": USER}
    env = await start(demo_upstream, [fleet])
    config, port = tmp_path / "config.toml", env.ports["smtp"]
    passwords = {}
    for label in ("scanner-2nd-floor", "printer-lobby"):
        added = await in_thread(lambda label=label: cli(  # type: ignore[misc]
            config, "passwd", USER, "--add", label, "--password-file", "-", stdin=PASSWORD + "\n"))
        assert added.returncode == 0, added.stderr
        passwords[label] = added.stdout.strip().splitlines()[-1]

    def send(source: str, label: str, subject: str) -> None:
        with device(port, source) as s:
            s.login(USER, passwords[label])
            assert s.sendmail(f"{label}@contoso.example", [RCPT], message(subject)) == {}

    def refused(source: str) -> tuple[int, bytes]:
        with device(port, source) as s:
            s.ehlo()
            return s.mail(USER)

    await in_thread(lambda: send(ALLOWED, "scanner-2nd-floor", "from the scanner"))
    await in_thread(lambda: send(ALLOWED, "printer-lobby", "from the printer"))
    # Inside the rule's network a password is required; outside it, nothing relays.
    assert await in_thread(lambda: refused(ALLOWED)) == (
        530, b"5.7.0 Authentication required: relay rule fleet needs the device's password")
    assert await in_thread(lambda: refused(DENIED)) == (550, SOURCE_REFUSED)

    listed = await in_thread(lambda: cli(config, "passwd", USER, "--list"))
    rows = {line.split("\t")[0]: line for line in listed.stdout.splitlines()[1:]}
    assert set(rows) == {"default", "laptop", "scanner-2nd-floor", "printer-lobby"}
    assert not rows["printer-lobby"].endswith("\tnever")  # the daemon recorded their use
    assert not rows["scanner-2nd-floor"].endswith("\tnever")

    removed = await in_thread(lambda: cli(config, "passwd", USER, "--remove", "scanner-2nd-floor"))
    assert removed.returncode == 0, removed.stderr

    def revoked() -> tuple[int, bytes]:
        with device(port, ALLOWED) as s:
            s.ehlo()
            return s.docmd("AUTH", "PLAIN " + __import__("base64").b64encode(
                f"\0{USER}\0{passwords['scanner-2nd-floor']}".encode()).decode())

    assert await in_thread(revoked) == (535, b"5.7.8 Invalid user name or local password.")
    await in_thread(lambda: send(ALLOWED, "printer-lobby", "still sending"))
    delivered = await in_thread(lambda: demo_upstream.mailbox(RCPT))
    assert len(delivered) == 3 and b"Subject: still sending" in delivered[-1]
    assert all(b"From: alice@contoso.example" in m for m in delivered)  # headers untouched

    def outside_allowed_senders() -> tuple[int, bytes]:
        with device(port, ALLOWED) as s:
            s.login(USER, passwords["printer-lobby"])
            return s.mail("someone@fabrikam.example")

    assert await in_thread(outside_allowed_senders) == (
        550, b"5.7.1 Sender someone@fabrikam.example is not allowed for relay rule fleet")


# --- config -------------------------------------------------------------------------------------


def parse_error(tmp_path: Path, upstream: DemoUpstream, relays: list[dict[str, Any]],
                **kw: Any) -> str:
    with pytest.raises(ConfigError) as info:
        config_mod.parse(relay_config(tmp_path, upstream, relays, **kw), tmp_path / "c.toml")
    text = str(info.value)
    assert "\n" not in text
    return text


def test_relay_config_errors(tmp_path: Path, demo_upstream: DemoUpstream) -> None:
    def bad(**change: Any) -> str:
        return parse_error(tmp_path, demo_upstream, [{**PRINTERS_RULE, **change}])

    assert "relay[0].listener: no listener is named 'smtp2' (smtp listeners: smtp)" in bad(
        listener="smtp2")
    assert "relay[0].account: no [accounts.\"nobody@contoso.example\"]" in bad(
        account="nobody@contoso.example")
    assert "relay[0].account: account alice@contoso.example has no service_key_file" in bad(
        account=USER)
    assert "relay[0].sources: '10.1.2.3/24' is not an address or CIDR network; did you mean " \
           "10.1.2.0/24?" in bad(sources=["10.1.2.3/24"])
    assert "relay[0].sources: 'printers' is not an address" in bad(sources=["printers"])
    assert "relay[0].sources: '0.0.0.0/0' matches every address" in bad(sources=["0.0.0.0/0"])
    assert "relay[0].sources: must list" in bad(sources=[])
    assert "relay[0].allowed_senders: 'contoso.com' is not an address, an @domain" in bad(
        allowed_senders=["contoso.com"])
    assert "relay[0].force_sender: must be an address" in bad(force_sender="@contoso.example")
    assert "relay[0].name: must be letters" in bad(name="(none)")
    assert "relay[0].sorces: unknown key; did you mean 'sources'?" in bad(sorces=["10.0.0.1"])
    assert "relay[1].name: 'printers' is used by another relay rule" in parse_error(
        tmp_path, demo_upstream, [PRINTERS_RULE, PRINTERS_RULE])
    # A password rule for a tls = "none" listener reachable from beyond loopback would make
    # devices send passwords in clear (which the listener refuses): said at load time.
    password_rule = {**PRINTERS_RULE, "account": USER, "require_password": True,
                     "sources": ["192.0.2.0/24"]}
    assert "relay[0].require_password: listener 'smtp' has tls = 'none'" in parse_error(
        tmp_path, demo_upstream, [password_rule])


def test_relay_listener_may_listen_beyond_loopback_without_tls(
        tmp_path: Path, demo_upstream: DemoUpstream) -> None:
    wide = {"smtp": {"listen": "0.0.0.0:2525"}}
    cfg = config_mod.parse(relay_config(tmp_path, demo_upstream, [PRINTERS_RULE],
                                        listener_extra=wide), tmp_path / "c.toml")
    assert cfg.listeners[0].tls == "none" and not cfg.listeners[0].allow_insecure_non_loopback
    (rule,) = cfg.relay_rules("smtp")
    assert rule.force_sender == SCANNER and not rule.require_password
    text = parse_error(tmp_path, demo_upstream, [], listener_extra=wide)
    assert "listeners[0].listen: 0.0.0.0:2525 is not a loopback address" in text
    assert "[[relay]]" in text


def test_rule_matching_and_auth_over_plaintext_beyond_loopback(
        tmp_path: Path, demo_upstream: DemoUpstream) -> None:
    fleet = {**PRINTERS_RULE, "name": "fleet", "account": USER, "require_password": True,
             "sources": ["127.0.0.3", "::1"], "force_sender": USER}
    nets = {**PRINTERS_RULE, "sources": ["192.0.2.0/24", "2001:db8::/32"]}
    cfg = config_mod.parse(relay_config(tmp_path, demo_upstream, [nets, fleet],
                                        listener_extra={"smtp": {"listen": "0.0.0.0:2525"}}),
                           tmp_path / "c.toml")
    rules = cfg.relay_rules("smtp")
    assert rule_for(rules, "192.0.2.9", None).name == "printers"  # type: ignore[union-attr]
    assert rule_for(rules, "::ffff:192.0.2.9", None).name == "printers"  # type: ignore[union-attr]
    assert rule_for(rules, "2001:db8::5", None).name == "printers"  # type: ignore[union-attr]
    assert rule_for(rules, "198.51.100.1", None) is None
    assert rule_for(rules, "127.0.0.3", None).name == "fleet"  # type: ignore[union-attr]
    # Logged in: only password rules for that account apply; other sessions are as before.
    assert rule_for(rules, "127.0.0.3", USER).name == "fleet"  # type: ignore[union-attr]
    assert rule_for(rules, "192.0.2.9", SCANNER) is None
    assert rule_for(rules, "127.0.0.3", "bob@contoso.example") is None
    assert rules[0].allows_sender("Anyone@PRINTERS.contoso.example")
    assert not rules[0].allows_sender("x@sub.printers.contoso.example")
    assert not rules[0].allows_sender("")  # the null sender only when "<>" is listed
    assert not rules[0].allows_sender("<>")
    assert config_mod.RelayRule("r", "smtp", (), SCANNER, ("<>",)).allows_sender("<>")

    # The listener is plaintext beyond loopback: AUTH stays loopback-only (or after TLS).
    def may_send_password(host: str) -> bool:
        conn = Connection(cfg.listeners[0], PreauthLimiter(cfg.limits), (host, 2525))
        return conn.may_send_password(tls_active=False)
    assert not may_send_password("192.0.2.9")
    assert may_send_password("127.0.0.3")
