"""systemd integration: the notify protocol, socket activation and SIGHUP reload, with the test
playing the service manager around a real ``python -m proxy run`` child process."""

from __future__ import annotations

import asyncio
import imaplib
import os
import signal
import socket
import tempfile
from pathlib import Path
from typing import Any

import pytest

from proxy import systemd
from proxy.demo.process import DemoUpstream
from tests.ops.util import NotifySocket, ProxyProcess, http_get, scrape, value
from tests.proxyenv import PASSWORD, USER, authorise, config_dict, make_config, to_toml

# --- the protocol, in process -----------------------------------------------------------------


def test_notifier_without_socket_is_a_no_op() -> None:
    notifier = systemd.Notifier.from_env({})
    assert not notifier.enabled and notifier.ready("x") is False


def test_notifier_path_and_abstract_sockets() -> None:
    with tempfile.TemporaryDirectory(dir="/tmp") as d:  # AF_UNIX paths must be short
        path = os.path.join(d, "notify")
        receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        receiver.bind(path)
        notifier = systemd.Notifier.from_env({"NOTIFY_SOCKET": path})
        assert notifier.ready("serving\nsecond line")
        assert receiver.recv(1024) == b"READY=1\nSTATUS=serving second line"
        assert notifier.reloading()
        lines = receiver.recv(1024).decode().split("\n")
        assert lines[0] == "RELOADING=1" and lines[1].startswith("MONOTONIC_USEC=")
        assert int(lines[1].split("=")[1]) > 0
        receiver.close()
        notifier.close()
    abstract = NotifySocket()
    notifier = systemd.Notifier.from_env({"NOTIFY_SOCKET": abstract.env})
    assert notifier.stopping("bye") and notifier.watchdog()
    assert abstract.expect("STOPPING") == {"STOPPING": "1", "STATUS": "bye"}
    assert abstract.expect("WATCHDOG") == {"WATCHDOG": "1"}
    abstract.close()
    assert notifier.status("gone") is False  # the manager went away: logged, not raised
    notifier.close()


def test_watchdog_interval() -> None:
    me = str(os.getpid())
    assert systemd.watchdog_interval({}) is None
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "400000"}) == 0.2
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": me}) == 0.2
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "1"}) is None
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "soon"}) is None


def test_listen_fds_ignores_other_pids_and_unsets() -> None:
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "imap"}
    assert systemd.listen_fds(env) == {}
    assert env == {}  # never inherited by a child process
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "imap"}
    with pytest.raises(systemd.ActivationError, match="names 1 sockets but LISTEN_FDS is 2"):
        systemd.listen_fds(env)


def test_check_listening_refuses_a_connected_socket() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    systemd.check_listening(listener, "imap")
    client = socket.create_connection(listener.getsockname())
    with pytest.raises(systemd.ActivationError, match="not a listening stream socket"):
        systemd.check_listening(client, "imap")
    client.close()
    listener.close()


# --- the real process -------------------------------------------------------------------------


def write_config(tmp_path: Path, upstream: DemoUpstream, **extra: Any) -> Path:
    data = config_dict(tmp_path, upstream, protocols=("imap",))
    data.update(extra)
    path = tmp_path / "config.toml"
    path.write_text(to_toml(data))
    return path


def imap_login(port: int) -> str:
    client = imaplib.IMAP4("127.0.0.1", port, timeout=30)
    try:
        client.literal = PASSWORD.encode()  # type: ignore[attr-defined]
        typ, _ = client._simple_command("LOGIN", USER)  # type: ignore[attr-defined]
        if typ == "OK":
            client.state = "AUTH"
            client.noop()
        return typ
    finally:
        client.logout()


async def test_notify_watchdog_reload_stop(tmp_path: Path, demo_upstream: DemoUpstream,
                                           notify: NotifySocket,
                                           processes: list[ProxyProcess]) -> None:
    authorise(make_config(tmp_path, demo_upstream, protocols=("imap",)), demo_upstream)
    path = write_config(tmp_path, demo_upstream, metrics={"listen": "127.0.0.1:0"})
    proc = ProxyProcess(path, tmp_path / "proxy.log", notify=notify,
                        env={"WATCHDOG_USEC": "400000"})
    processes.append(proc)

    ready = await asyncio.to_thread(notify.expect, "READY", proc=proc.proc)
    assert ready["STATUS"].startswith("ready: listening (imap ")
    # READY=1 came after every listener accepts: connect and log in at once.
    port = proc.port("listening", " listener=imap ")
    assert await asyncio.to_thread(imap_login, port) == "OK"
    metrics_port = proc.port("metrics_listening")
    assert (await http_get(metrics_port, "/readyz"))[0] == 200

    # Watchdog pings at half of WATCHDOG_USEC: several within a second or two.
    for _ in range(3):
        await asyncio.to_thread(notify.expect, "WATCHDOG", timeout=5)

    # A good reload: RELOADING=1 (with the monotonic time), then READY=1; new settings apply.
    samples = await scrape(metrics_port)
    assert (("xoauth2_proxy_account_needs_reauthorisation", frozenset({("account", USER)}))
            not in samples)
    path.write_text(to_toml({**config_dict(tmp_path, demo_upstream, protocols=("imap",)),
                             "metrics": {"listen": "127.0.0.1:0", "per_account_labels": True}}))
    proc.signal(signal.SIGHUP)
    reloading = await asyncio.to_thread(notify.expect, "RELOADING", proc=proc.proc)
    assert int(reloading["MONOTONIC_USEC"]) > 0
    await asyncio.to_thread(notify.expect, "READY", proc=proc.proc)
    assert "event=reloaded" in proc.text()
    samples = await scrape(metrics_port)
    assert value(samples, "xoauth2_proxy_account_needs_reauthorisation", account=USER) == 0
    assert value(samples, "xoauth2_proxy_config_reloads_total", result="ok") == 1

    # A broken config on SIGHUP: logged, the old one kept, still serving.
    path.write_text("this is [not toml\n")
    proc.signal(signal.SIGHUP)
    await asyncio.to_thread(notify.expect, "RELOADING", proc=proc.proc)
    ready = await asyncio.to_thread(notify.expect, "READY", proc=proc.proc)
    assert "previous config" in ready["STATUS"]
    assert "event=reload_failed" in proc.text() and "TOML syntax error" in proc.text()
    assert await asyncio.to_thread(imap_login, port) == "OK"
    samples = await scrape(metrics_port)
    assert value(samples, "xoauth2_proxy_config_last_reload_successful") == 0
    assert (await http_get(metrics_port, "/readyz"))[0] == 200

    # SIGTERM: STOPPING=1, a clean exit.
    proc.signal(signal.SIGTERM)
    await asyncio.to_thread(notify.expect, "STOPPING")
    assert await asyncio.to_thread(proc.wait) == 0
    assert "event=stopped" in proc.text()


async def test_socket_activation(tmp_path: Path, demo_upstream: DemoUpstream,
                                 notify: NotifySocket, processes: list[ProxyProcess]) -> None:
    """Sockets passed as systemd does (fds 3…, LISTEN_PID of the child, LISTEN_FDNAMES) are
    used instead of binding: the IMAP listener's and the metrics endpoint's."""
    authorise(make_config(tmp_path, demo_upstream, protocols=("imap",)), demo_upstream)
    path = write_config(tmp_path, demo_upstream, metrics={"listen": "127.0.0.1:0"})
    imap = socket.create_server(("127.0.0.1", 0), backlog=16)
    metrics_sock = socket.create_server(("127.0.0.1", 0))
    ports = imap.getsockname()[1], metrics_sock.getsockname()[1]
    proc = ProxyProcess(path, tmp_path / "proxy.log", notify=notify,
                        activate={"imap": imap, "metrics": metrics_sock})
    processes.append(proc)
    imap.close()  # the child holds them now
    metrics_sock.close()
    await asyncio.to_thread(notify.expect, "READY", proc=proc.proc)
    assert "activated=true" in proc.text()
    assert proc.port("listening", " listener=imap ") == ports[0]
    assert await asyncio.to_thread(imap_login, ports[0]) == "OK"
    samples = await scrape(ports[1])
    assert value(samples, "xoauth2_proxy_logins_total", protocol="imap", result="ok") == 1
    proc.signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait) == 0


async def test_socket_activation_with_an_unknown_name(tmp_path: Path, demo_upstream: DemoUpstream,
                                                      processes: list[ProxyProcess]) -> None:
    path = write_config(tmp_path, demo_upstream)
    listener = socket.create_server(("127.0.0.1", 0))
    proc = ProxyProcess(path, tmp_path / "proxy.log", activate={"imaps": listener})
    processes.append(proc)
    listener.close()
    assert await asyncio.to_thread(proc.wait) == 1
    assert "named 'imaps', but no listener has that name" in proc.text()
