"""A proxy in front of the demo upstream, for integration tests: config, authorised accounts,
and a running daemon on the test's own event loop (listeners on 127.0.0.1, port 0)."""

from __future__ import annotations

import asyncio
import imaplib
import io
import os
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy import config as config_mod
from proxy import store
from proxy.auth import flows
from proxy.demo import certs
from proxy.demo.process import DemoUpstream
from proxy.secret import Secret
from proxy.server.daemon import Daemon

USER = "alice@contoso.example"
PASSWORD = 'pa ss "w\\ord" ünï'  # spaces, quotes, a backslash and non-ASCII on purpose
CLIENT_SECRET = "demo-client-secret"


def config_dict(tmp_path: Path, upstream: DemoUpstream, *, protocols: tuple[str, ...] = ("imap", "pop", "smtp"),
                accounts: dict[str, dict[str, Any]] | None = None,
                listener_extra: dict[str, dict[str, Any]] | None = None,
                upstream_ports: dict[str, int] | None = None,
                limits: dict[str, Any] | None = None,
                upstreams: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """A config for the demo upstream; ``upstreams`` replaces a protocol's upstream (e.g. a real
    Dovecot: ``{"imap": {"port": …, "tls": "implicit", "ca_file": …}}``)."""
    ca = upstream.ca_file
    ports = {"imap": upstream.ports["imaps"], "pop": upstream.ports["pop3s"],
             "smtp": upstream.ports["submission"], **(upstream_ports or {})}
    tls = {"imap": "implicit", "pop": "implicit", "smtp": "starttls"}
    secret_file = tmp_path / "client-secret"
    secret_file.write_text(CLIENT_SECRET)
    state = tmp_path / "state"
    return {
        "state_dir": str(state),
        "shutdown_grace": 2,
        "workers": 1,  # one process; tests/ops/test_workers.py runs the supervisor
        # Fast failure replies keep tests quick; tests of throttling set their own limits.
        "limits": {"failure_delay": 0.05, "max_failure_delay": 0.2, **(limits or {})},
        "providers": {"demo": {"authority": upstream.entra_url, "tenant": "demo-tenant",
                               "client_id": "11111111-2222-3333-4444-555555555555",
                               "ca_file": ca, "timeout": 5,
                               "client_secret_file": str(secret_file)}},
        "upstreams": {p: {"protocol": p, "host": "127.0.0.1", "port": ports[p], "tls": tls[p],
                          "ca_file": ca, "connect_timeout": 5, **(upstreams or {}).get(p, {})}
                      for p in protocols},
        "listeners": [{"name": p, "protocol": p, "listen": "127.0.0.1:0", "upstream": p,
                       **(listener_extra or {}).get(p, {})} for p in protocols],
        "accounts": accounts if accounts is not None else {USER: {"provider": "demo"}},
    }


def make_config(tmp_path: Path, upstream: DemoUpstream, **kw: Any) -> config_mod.Config:
    return config_mod.parse(config_dict(tmp_path, upstream, **kw), tmp_path / "config.toml")


def open_store(cfg: config_mod.Config) -> store.TokenStore:
    cfg.state_dir.mkdir(mode=0o700, exist_ok=True)
    os.chmod(cfg.state_dir, 0o700)
    return store.TokenStore(cfg.state_dir)


def authorise(cfg: config_mod.Config, upstream: DemoUpstream, user: str = USER,
              password: str = PASSWORD) -> store.TokenStore:
    """Log ``user`` in through the real device-code flow, approved at once by the fake Entra."""
    account = cfg.account(user)
    assert account is not None
    upstream.configure(auto_approve_user=account.mailbox)
    token_store = open_store(cfg)
    flows.login(cfg, account, token_store, Secret(password), out=io.StringIO())
    return token_store


@dataclass
class ProxyEnv:
    upstream: DemoUpstream
    config: config_mod.Config
    store: store.TokenStore
    daemon: Daemon
    user: str = USER
    password: str = PASSWORD

    @property
    def ports(self) -> dict[str, int]:
        return self.daemon.ports()


async def start_proxy(tmp_path: Path, upstream: DemoUpstream, *, user: str = USER,
                      password: str = PASSWORD, **kw: Any) -> ProxyEnv:
    """Config, ``user`` authorised with ``password`` (if it is a configured account), daemon."""
    cfg = make_config(tmp_path, upstream, **kw)
    token_store = (authorise(cfg, upstream, user, password) if user in cfg.accounts
                   else open_store(cfg))
    daemon = Daemon(cfg)
    await daemon.start()
    return ProxyEnv(upstream, cfg, token_store, daemon, user, password)


def local_tls(tmp_path: Path, mode: str) -> tuple[dict[str, Any], ssl.SSLContext]:
    """Listener settings for ``mode`` ("none", "starttls", "implicit") with a certificate for
    127.0.0.1, and a client context that trusts it."""
    paths = certs.generate(tmp_path / "local-tls")
    context = ssl.create_default_context(cafile=str(paths.ca_file))
    if mode == "none":
        return {}, context
    return {"tls": mode, "cert_file": str(paths.cert_file),
            "key_file": str(paths.key_file)}, context


def imap_client(port: int, mode: str, context: ssl.SSLContext) -> imaplib.IMAP4:
    """An imaplib client on a listener in ``mode``; its ``capabilities`` are those announced
    before login (read once at connect, as imaplib does; again after STARTTLS)."""
    if mode == "implicit":
        return imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=context, timeout=30)
    return imaplib.IMAP4("127.0.0.1", port, timeout=30)


def to_toml(data: dict[str, Any]) -> str:
    """Enough TOML for test configs: strings, numbers, booleans, lists, tables, [[arrays]]."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    def key(k: str) -> str:
        return k if k.replace("-", "").replace("_", "").isalnum() else value(k)

    lines: list[str] = []

    def table(prefix: str, d: dict[str, Any]) -> None:
        for k, v in d.items():
            if not isinstance(v, dict) and not (isinstance(v, list) and v and isinstance(v[0], dict)):
                lines.append(f"{key(k)} = {value(v)}")
        for k, v in d.items():
            name = f"{prefix}.{key(k)}" if prefix else key(k)
            if isinstance(v, dict):
                lines.append(f"[{name}]")
                table(name, v)
            elif isinstance(v, list) and v and isinstance(v[0], dict):
                for item in v:
                    lines.append(f"[[{name}]]")
                    table(name, item)

    table("", data)
    return "\n".join(lines) + "\n"


def write_config(tmp_path: Path, upstream: DemoUpstream, **kw: Any) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(to_toml(config_dict(tmp_path, upstream, **kw)))
    return path


def login_reply(client: imaplib.IMAP4, user: str, password: str) -> str:
    """LOGIN on ``client`` (ASCII passwords): "OK", or the refusal's text."""
    try:
        client.login(user, password)
    except imaplib.IMAP4.error as exc:
        text = exc.args[0]
        return text.decode() if isinstance(text, bytes) else str(text)
    return "OK"


def fresh_login_reply(port: int, user: str, password: str) -> str:
    """``login_reply`` on a new plain connection to 127.0.0.1:``port``, closed afterwards."""
    client = imaplib.IMAP4("127.0.0.1", port, timeout=30)
    try:
        return login_reply(client, user, password)
    finally:
        client.shutdown()


def imap_login_reply(port: int, user: str, password: str) -> str:
    """LOGIN through the proxy's IMAP listener with imaplib: "OK", or the refusal's text."""
    client = imaplib.IMAP4("127.0.0.1", port, timeout=60)
    try:
        client.login(user, password)
    except imaplib.IMAP4.error as exc:
        return str(exc)
    finally:
        client.shutdown()
    return "OK"


async def until_token_request_held(upstream: DemoUpstream, task: asyncio.Future[Any]) -> None:
    """Until the fake Entra holds a token request (``token_endpoint_delay``): the refresh
    ``task`` runs is then in flight at the token endpoint."""
    deadline = time.monotonic() + 60
    while not (await asyncio.to_thread(upstream.stats))["delayed_token_requests"]:
        assert time.monotonic() < deadline and not task.done()
        await asyncio.sleep(0.02)
