"""A proxy with the admin page on, for the admin tests: the demo upstream, alice authorised
with two device passwords, and the admin password set with the ``admin-password`` command."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy import cli
from proxy import config as config_mod
from proxy.demo.process import DemoUpstream
from proxy.secret import Secret
from proxy.server.daemon import Daemon
from tests.proxyenv import USER, ProxyEnv, authorise, config_dict, to_toml

ADMIN_PASSWORD = "correct horse battery"
PASSWORD = "alice-laptop"
PHONE, PHONE_PASSWORD = "phone", "alice-phone-pw"
BOB = "bob@contoso.example"


@dataclass
class AdminEnv:
    proxy: ProxyEnv

    @property
    def url(self) -> str:
        admin = self.proxy.daemon.operator.admin
        assert admin is not None
        return f"http://127.0.0.1:{admin.port}"


async def start_admin(tmp_path: Path, upstream: DemoUpstream, **admin: Any) -> AdminEnv:
    # bob is configured but never authorised: the accounts page shows him needing it.
    data = config_dict(tmp_path, upstream, protocols=("imap",), accounts={
        USER: {"provider": "demo"}, BOB: {"provider": "demo"}})
    data["admin"] = {"listen": "127.0.0.1:0", **admin}
    path = tmp_path / "config.toml"
    path.write_text(to_toml(data))
    secret = tmp_path / "admin-password-input"
    secret.write_text(ADMIN_PASSWORD + "\n")
    assert cli.main(["-c", str(path), "admin-password", "--password-file", str(secret)]) == 0
    cfg = config_mod.load(path)
    token_store = authorise(cfg, upstream, USER, PASSWORD)
    unlocked = token_store.unlock(USER, Secret(PASSWORD))
    token_store.add_password_slot(unlocked, PHONE, Secret(PHONE_PASSWORD))
    upstream.configure(auto_approve_user=None)
    daemon = Daemon(cfg)
    await daemon.start()
    return AdminEnv(ProxyEnv(upstream, cfg, token_store, daemon, USER, PASSWORD))


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', html)
    assert match, html
    return match.group(1)
