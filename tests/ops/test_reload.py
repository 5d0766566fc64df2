"""``Daemon.reload``: a renewed certificate is served to new connections while established
sessions carry on; a config that cannot be applied changes nothing; what needs a restart is
said, not half-done."""

from __future__ import annotations

import asyncio
import imaplib
import shutil
import ssl
from pathlib import Path
from typing import Any

import pytest

from proxy import config as config_mod
from proxy.demo import certs
from proxy.demo.process import DemoUpstream
from proxy.server.daemon import Daemon, ReloadError
from tests.proxyenv import PASSWORD, USER, authorise, config_dict


def open_session(port: int, ca: Path) -> imaplib.IMAP4_SSL:
    context = ssl.create_default_context(cafile=str(ca))
    client = imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=context, timeout=30)
    client.literal = PASSWORD.encode()  # type: ignore[attr-defined]
    typ, data = client._simple_command("LOGIN", USER)  # type: ignore[attr-defined]
    assert typ == "OK", data
    client.state = "AUTH"
    return client


def install(src: certs.CertPaths, live: Path) -> None:
    shutil.copyfile(src.cert_file, live / "cert.pem")
    shutil.copyfile(src.key_file, live / "key.pem")


async def test_reload_serves_a_renewed_certificate(tmp_path: Path,
                                                   demo_upstream: DemoUpstream) -> None:
    old, new = certs.generate(tmp_path / "old"), certs.generate(tmp_path / "new")
    live = tmp_path / "live"
    live.mkdir()
    install(old, live)
    tls = {"tls": "implicit", "cert_file": str(live / "cert.pem"),
           "key_file": str(live / "key.pem")}

    def config(**listener: Any) -> config_mod.Config:
        data = config_dict(tmp_path, demo_upstream, protocols=("imap",),
                           listener_extra={"imap": {**tls, **listener}})
        return config_mod.parse(data, tmp_path / "config.toml")

    cfg = config()
    authorise(cfg, demo_upstream)
    daemon = Daemon(cfg)
    await daemon.start()
    port = daemon.ports()["imap"]
    try:
        established = await asyncio.to_thread(open_session, port, old.ca_file)

        install(new, live)
        assert await daemon.reload(config()) == []
        # New connections get the new certificate (the old CA no longer verifies it) …
        with pytest.raises(ssl.SSLCertVerificationError):
            await asyncio.to_thread(open_session, port, old.ca_file)
        fresh = await asyncio.to_thread(open_session, port, new.ca_file)
        # … and the session opened before the reload was not touched.
        assert (await asyncio.to_thread(established.noop))[0] == "OK"
        assert (await asyncio.to_thread(fresh.noop))[0] == "OK"

        # A key that does not load: the reload is refused as a whole, the new cert stays.
        (live / "key.pem").write_text("not a key\n")
        with pytest.raises(ReloadError, match="cannot load cert_file/key_file"):
            await daemon.reload(config())
        second = await asyncio.to_thread(open_session, port, new.ca_file)
        for client in (established, fresh, second):
            await asyncio.to_thread(client.logout)
    finally:
        await daemon.stop(grace=1)


async def test_reload_says_what_needs_a_restart(tmp_path: Path,
                                                demo_upstream: DemoUpstream) -> None:
    data = config_dict(tmp_path, demo_upstream, protocols=("imap",))
    cfg = config_mod.parse(data, tmp_path / "config.toml")
    authorise(cfg, demo_upstream)
    daemon = Daemon(cfg)
    await daemon.start()
    try:
        port = daemon.ports()["imap"]
        moved = config_dict(tmp_path, demo_upstream, protocols=("imap", "pop"))
        moved["listeners"][0]["listen"] = "127.0.0.2:0"
        moved["state_dir"] = str(tmp_path / "elsewhere")
        moved["log_level"] = "debug"
        moved["store"] = {"backend": "postgresql", "dsn": "postgresql://proxy@db.example/tokens"}
        notes = await daemon.reload(config_mod.parse(moved, tmp_path / "config.toml"))
        assert any("listener imap" in n and "restart" in n for n in notes)
        assert any("listener pop is new" in n for n in notes)
        assert any("state_dir" in n for n in notes)
        assert any(n.startswith("[store] changed to postgresql") and "restart" in n
                   for n in notes), notes
        # The rest applied; the listener still answers where it was.
        assert daemon.config.log_level == "debug"
        assert daemon.tokens.config is daemon.config
        assert daemon.ports() == {"imap": port}
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert (await reader.readline()).startswith(b"* OK")
        writer.close()
    finally:
        await daemon.stop(grace=1)


def plain_login(port: int) -> str:
    client = imaplib.IMAP4("127.0.0.1", port, timeout=30)
    try:
        client.literal = PASSWORD.encode()  # type: ignore[attr-defined]
        typ, _ = client._simple_command("LOGIN", USER)  # type: ignore[attr-defined]
        return typ
    finally:
        client.shutdown()


async def test_reload_drops_a_removed_account(tmp_path: Path, demo_upstream: DemoUpstream) -> None:
    data = config_dict(tmp_path, demo_upstream, protocols=("imap",))
    cfg = config_mod.parse(data, tmp_path / "config.toml")
    authorise(cfg, demo_upstream)
    daemon = Daemon(cfg)
    await daemon.start()
    try:
        port = daemon.ports()["imap"]
        assert await asyncio.to_thread(plain_login, port) == "OK"
        data["accounts"] = {"someone@contoso.example": {"provider": "demo"}}
        assert await daemon.reload(config_mod.parse(data, tmp_path / "config.toml")) == []
        assert await asyncio.to_thread(plain_login, port) == "NO"  # gone from the config
    finally:
        await daemon.stop(grace=1)
