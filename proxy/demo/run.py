"""``xoauth2-proxy demo``: the fake Microsoft 365, an authorised account and the proxy, together.

Starts the embedded upstream in its own process, writes a proxy config for it (kept in the
demo folder, so it doesn't only run, it shows how), authorises the demo account through the
real device-code flow (approved at once by the fake Entra ID), then serves. With ``--check``
it runs a scripted round trip with stdlib clients instead and exits 0 or 1. No Twisted is
imported in this process.
"""

from __future__ import annotations

import asyncio
import email.message
import imaplib
import io
import poplib
import shutil
import smtplib
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from proxy import config as config_mod
from proxy import logs, store
from proxy.auth import flows
from proxy.demo.process import DemoUpstream
from proxy.secret import Secret
from proxy.server.daemon import Daemon

DEMO_USER = "demo@contoso.example"
DEMO_PASSWORD = "demo-password"  # the *local* password the demo account is set up with
PREFERRED_PORTS = {"imap": 11143, "pop": 11110, "smtp": 11587, "graph": 11588}


def _free(port: int) -> int:
    """``port`` if it can be bound on loopback, else 0 (any free port)."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return 0
    return port


# name (of the upstream, its listener and their protocol), the fake server's port, its TLS
_MAIL = (("imap", "imaps", "implicit"), ("pop", "pop3s", "implicit"), ("smtp", "submission", "starttls"))


def _mail_tables(upstream: DemoUpstream, ports: dict[str, int], ca: Path | str) -> str:
    """An upstream per protocol (the fake server, trusted through its CA) and a listener in
    front of each (plain loopback ports)."""
    upstreams = "\n".join(f"""[upstreams.{name}]
protocol = "{name}"
host = "127.0.0.1"
port = {upstream.ports[port]}
tls = "{tls}"
ca_file = "{ca}"
""" for name, port, tls in _MAIL)
    listeners = "\n".join(f"""[[listeners]]
name = "{name}"
protocol = "{name}"
listen = "127.0.0.1:{ports[name]}"
upstream = "{name}"
""" for name, _, _ in _MAIL)
    graph = f"""[upstreams.graph]        # Microsoft Graph sendMail: for tenants with SMTP AUTH off
protocol = "graph"
base_url = "{upstream.graph_url}/v1.0"
ca_file = "{ca}"

[[listeners]]
name = "graph"
protocol = "smtp"
listen = "127.0.0.1:{ports["graph"]}"
upstream = "graph"
"""
    return f"{upstreams}\n{graph}\n{listeners}"


def write_config(workdir: Path, upstream: DemoUpstream, *, fixed_ports: bool = True) -> Path:
    ports = {p: _free(n) if fixed_ports else 0 for p, n in PREFERRED_PORTS.items()}
    ca = upstream.ca_file
    text = f"""# Written by `xoauth2-proxy demo`: the proxy in front of the embedded fake Microsoft 365.
state_dir = "state"
log_level = "info"
shutdown_grace = 2

[providers.demo]
authority = "{upstream.entra_url}"
tenant = "demo-tenant"
client_id = "00000000-0000-0000-0000-00000000d3m0"
ca_file = "{ca}"        # the fake Entra ID's CA; real Microsoft 365 needs no ca_file

{_mail_tables(upstream, ports, ca)}
[accounts."{DEMO_USER}"]
provider = "demo"
flow = "device_code"
"""
    path = workdir / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def authorise(cfg: config_mod.Config, out: TextIO) -> None:
    account = cfg.account(DEMO_USER)
    assert account is not None
    token_store = store.TokenStore(cfg.state_dir)
    flows.login(cfg, account, token_store, Secret(DEMO_PASSWORD), out=out)


def instructions(ports: dict[str, int]) -> str:
    return f"""
xoauth2-proxy demo is running against the embedded fake Microsoft 365.
Point any mail client at it (no TLS on these loopback ports):

  IMAP  127.0.0.1:{ports.get("imap")}    user {DEMO_USER}   password {DEMO_PASSWORD}
  POP3  127.0.0.1:{ports.get("pop")}    (same user and password)
  SMTP  127.0.0.1:{ports.get("smtp")}    AUTH PLAIN or LOGIN, same user and password
  SMTP  127.0.0.1:{ports.get("graph")}    the same, sent through Microsoft Graph (sendMail)

For example:
  curl -s --url 'imap://127.0.0.1:{ports.get("imap")}/INBOX' --user '{DEMO_USER}:{DEMO_PASSWORD}'
  swaks --server 127.0.0.1:{ports.get("smtp")} --auth PLAIN \\
        --auth-user {DEMO_USER} --auth-password {DEMO_PASSWORD} --to {DEMO_USER}

The proxy logged in upstream with OAuth 2.0 (XOAUTH2); the client only knew a local password.
Press Ctrl-C to stop.
"""


def _send(port: int, subject: str) -> None:
    msg = email.message.EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = DEMO_USER, DEMO_USER, subject
    msg.set_content("Sent through xoauth2-proxy with a local password.\n")
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.login(DEMO_USER, DEMO_PASSWORD)
        smtp.send_message(msg)


def round_trip(ports: dict[str, int], say: Callable[[str], None]) -> None:
    """Send a message through the SMTP proxy, read it back through IMAP and POP3."""
    subject = f"xoauth2-proxy demo check {time.time():.0f}"
    _send(ports["smtp"], subject)
    say(f"SMTP: sent {subject!r}")
    if "graph" in ports:
        _send(ports["graph"], subject + " via Graph")
        say(f"SMTP through Microsoft Graph: sent {subject + ' via Graph'!r}")
    imap = imaplib.IMAP4("127.0.0.1", ports["imap"], timeout=30)
    try:
        imap.login(DEMO_USER, DEMO_PASSWORD)
        typ, boxes = imap.list()
        assert typ == "OK" and boxes, "LIST failed"
        typ, data = imap.select("INBOX")
        assert typ == "OK", "SELECT failed"
        typ, found = imap.search(None, "SUBJECT", f'"{subject}"')
        assert typ == "OK" and found[0], "the message sent by SMTP is not in the INBOX"
        if "graph" in ports:
            typ, via = imap.search(None, "SUBJECT", f'"{subject} via Graph"')
            assert typ == "OK" and via[0], "the message sent through Graph is not in the INBOX"
        number = found[0].split()[-1]
        typ, fetched = imap.fetch(number, "(BODY.PEEK[])")
        part = fetched[0]
        assert typ == "OK" and isinstance(part, tuple) and subject.encode() in part[1], \
            "FETCH returned another message"
        messages = data[0].decode() if isinstance(data[0], bytes) else "?"
        say(f"IMAP: LOGIN, LIST ({len(boxes)} folders), SELECT INBOX ({messages} "
            f"messages), FETCH {number.decode()}: found it")
    finally:
        imap.logout()
    pop = poplib.POP3("127.0.0.1", ports["pop"], timeout=30)
    try:
        pop.user(DEMO_USER)
        pop.pass_(DEMO_PASSWORD)
        count, _ = pop.stat()
        lines = pop.retr(count)[1]
        assert any(subject.encode() in line for line in lines), "RETR returned another message"
        say(f"POP3: USER/PASS, STAT ({count} messages), RETR {count}: found it")
    finally:
        pop.quit()


async def _serve(cfg: config_mod.Config, check: bool, out: TextIO) -> int:
    daemon = Daemon(cfg)
    await daemon.start()
    try:
        ports = daemon.ports()
        if check:
            try:
                await asyncio.to_thread(round_trip, ports, lambda s: print(s, file=out))
            except Exception as exc:  # report any failure of the round trip, then exit 1
                print(f"demo check FAILED: {type(exc).__name__}: {exc}", file=out)
                return 1
            print("demo check OK", file=out)
            return 0
        print(instructions(ports), file=out, flush=True)
        await asyncio.Event().wait()  # until Ctrl-C
        return 0
    finally:
        await daemon.stop(grace=1)


def main(workdir: Path | None, *, check: bool, out: TextIO = sys.stdout) -> int:
    keep = workdir is not None
    workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="xoauth2-proxy-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    logs.setup("warning" if check else "info")
    print(f"Starting the fake Microsoft 365 in {workdir} …", file=out, flush=True)
    upstream = DemoUpstream.start(workdir / "upstream", knobs={"auto_approve_user": DEMO_USER})
    try:
        cfg = config_mod.load(write_config(workdir, upstream, fixed_ports=not check))
        log = io.StringIO()
        authorise(cfg, log)
        print(f"Authorised {DEMO_USER} with the device-code flow (approved by the fake "
              f"Entra ID); token file in {cfg.state_dir}. Config: {cfg.path}", file=out)
        return asyncio.run(_serve(cfg, check, out))
    except KeyboardInterrupt:
        return 0
    finally:
        upstream.stop()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
