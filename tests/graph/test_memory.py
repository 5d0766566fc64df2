"""The daemon's peak memory does not grow with the size of a message sent through Graph: the
proxy as its own process (``python -m proxy run``), its VmHWM read after a 1 MB message (one
MIME sendMail) and again after a 25 MB one (a draft and upload sessions), the peak reset to
the current RSS before each."""

from __future__ import annotations

import asyncio
import smtplib
from pathlib import Path

from proxy.config import loader
from proxy.demo.process import DemoUpstream
from proxy.secret import Secret
from tests.graph.test_sink import big_message
from tests.graph.util import graph_dict
from tests.ops.util import ProxyProcess, poll
from tests.proxyenv import PASSWORD, USER, authorise, to_toml
from tests.server.smtp_util import DEVICE_PASSWORD

MIB = 1024 * 1024


def peak_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def peak_of(pid: int, port: int, raw: bytes) -> int:
    """VmHWM while one message is sent: the peak is first reset to the current RSS (Linux:
    ``clear_refs`` 5), so the login's key derivation and start-up do not hide it."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    send(port, raw)
    return peak_kib(pid)


def send(port: int, raw: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=300) as client:
        client.login(USER, DEVICE_PASSWORD)
        assert client.sendmail(USER, [USER], raw) == {}


async def test_peak_memory_does_not_grow_with_message_size(
        tmp_path: Path, demo_upstream: DemoUpstream) -> None:
    data = graph_dict(tmp_path, demo_upstream, protocols=("smtp",))
    data["listeners"] = [{"name": "graph", "protocol": "smtp", "listen": "127.0.0.1:0",
                          "upstream": "graph"}]
    data["log_level"] = "info"
    path = tmp_path / "config.toml"
    path.write_text(to_toml(data))
    cfg = loader.parse(data, path)
    token_store = authorise(cfg, demo_upstream)
    token_store.add_password_slot(token_store.unlock(USER, Secret(PASSWORD)), "scanner",
                                  Secret(DEVICE_PASSWORD))
    proc = ProxyProcess(path, tmp_path / "proxy.log")
    try:
        await poll(lambda: " event=listening " in proc.text() and "graph" in proc.text(), 60)
        port = proc.port("listening", "listener=graph")
        small, _, _ = big_message(700_000)  # about 1 MB once in base64: one MIME sendMail
        medium, _, _ = big_message(5 * MIB // 4 * 3)  # 5 MB: a draft and upload sessions
        large, _, _ = big_message(25 * MIB // 4 * 3)  # 25 MB: the same, five times the bytes
        await asyncio.to_thread(send, port, small)  # warm: imports, TLS, the token
        pid = proc.proc.pid
        after_small = await asyncio.to_thread(peak_of, pid, port, small)
        after_medium = await asyncio.to_thread(peak_of, pid, port, medium)
        after_large = await asyncio.to_thread(peak_of, pid, port, large)
    finally:
        proc.stop()
    print(f"VmHWM sending 1 MB: {after_small / 1024:.1f} MiB, 5 MB: {after_medium / 1024:.1f} "
          f"MiB, 25 MB: {after_large / 1024:.1f} MiB")
    assert len(large) > 25_000_000 and len(small) < 1_100_000
    # The draft path holds a few chunks (an upload chunk of 3.75 MiB, 1 MiB reads) whatever the
    # size: a fixed step over the MIME path, then flat. Buffering would add the message itself.
    assert (after_large - after_medium) * 1024 < 8 * MIB, "peak memory grows with the size"
    assert (after_large - after_small) * 1024 < 24 * MIB, "a 25 MB message is held in memory"
    assert len(demo_upstream.mailbox(USER)) == 4
