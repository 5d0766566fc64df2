"""``[[relay]]`` devices on a listener whose upstream is Microsoft Graph: no AUTH, the rule's
account's token unlocked by its service key, the message sent through the fake Graph."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.config import loader
from proxy.demo.process import DemoUpstream
from proxy.server.daemon import Daemon
from tests.server.test_relay import ALLOWED, DENIED, SCANNER, authorise, relay_config

RULE = {"name": "scanners", "listener": "smtp", "sources": [ALLOWED], "account": SCANNER,
        "allowed_senders": [SCANNER]}


@pytest.fixture
async def daemon(tmp_path: Path, demo_upstream: DemoUpstream) -> AsyncIterator[Daemon]:
    data = relay_config(tmp_path, demo_upstream, [RULE])
    data["upstreams"]["graph"] = {"protocol": "graph", "base_url": f"{demo_upstream.graph_url}/v1.0",
                                  "ca_file": demo_upstream.ca_file}
    data["listeners"][0]["upstream"] = "graph"
    cfg = loader.parse(data, tmp_path / "config.toml")
    authorise(cfg, demo_upstream, SCANNER)
    running = Daemon(cfg)
    await running.start()
    yield running
    await running.stop(grace=1)


async def swaks(port: int, source: str, *extra: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "swaks", "--server", "127.0.0.1", "--port", str(port), "--local-interface", source,
        "--from", SCANNER, "--to", "bob@contoso.example", "--header", "Subject: scan",
        "--body", "scanned page", "--timeout", "60", *extra,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed")
async def test_device_sends_through_graph_without_a_password(
        daemon: Daemon, demo_upstream: DemoUpstream) -> None:
    port = daemon.ports()["smtp"]
    code, out = await swaks(port, ALLOWED)
    assert code == 0, out
    assert "250 2.0.0 OK queued as" in out and "(Microsoft Graph)" in out
    (delivered,) = demo_upstream.mailbox("bob@contoso.example")
    assert b"Subject: scan" in delivered
    assert demo_upstream.graph_stats()["sendMail"] == 1
    code, out = await swaks(port, DENIED)
    assert code != 0 and "5.7.1" in out  # not a source of any rule: nothing reaches Graph
    assert demo_upstream.graph_stats()["sendMail"] == 1


