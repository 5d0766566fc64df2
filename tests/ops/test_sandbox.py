"""The service unit's sandbox holds for this program: the daemon, run as a child the way the unit
runs it (notify socket, watchdog), serves the demo round trip — send by SMTP, read back by IMAP
and POP3, with a token refresh over HTTPS on the way — reloads on SIGHUP and stops cleanly on
SIGTERM, while the kernel enforces what systemd derives from the unit (``tests/ops/sandbox.py``):

- W^X memory (``MemoryDenyWriteExecute=yes``) through the kernel's ``PR_SET_MDWE`` (what newer
  systemd uses on Linux 6.3+);
- everything systemd 252 (Debian 12) installs with seccomp for the unit at once: its W^X filter,
  the ``SystemCallFilter=`` allow list with ``SystemCallErrorNumber=EPERM``, native
  architecture only, ``RestrictAddressFamilies=`` and ``RestrictNamespaces=``;
- ``/proc`` as ``ProtectProc=`` (and ``ProcSubset=``, if set) mounts it, in a private mount
  namespace (root only), with the ``process_*`` metrics still there.

Only the daemon is sandboxed, as under systemd: the fake Microsoft 365 runs outside it (the
``demo_upstream_factory`` fixture). A first test shows each restriction is in force, so a
passing round trip is not a sandbox that does nothing. Needs ``systemd-analyze`` (Debian
``systemd``) and libseccomp's Python bindings (``python3-seccomp``): skipped without them,
failed in CI.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from proxy.demo.process import DemoUpstream
from proxy.demo.run import DEMO_PASSWORD, DEMO_USER, round_trip
from tests.ops.sandbox import (
    Sandbox,
    kernel_has_mdwe,
    require_mount_namespace,
    seccomp_python,
    syscall_groups,
    unit_settings,
)
from tests.ops.util import SERVICE_UNIT, NotifySocket, ProxyProcess, http_get, names, require_tool, scrape
from tests.proxyenv import authorise, config_dict, make_config, to_toml

# What the sandboxed process tries; the errno of each attempt (0: it worked).
PROBE = r"""
import ctypes, json, mmap, os, socket, threading
out = {}
def attempt(name, action):
    try:
        action()
        out[name] = 0
    except OSError as exc:
        out[name] = exc.errno
attempt("wx_mmap", lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE
                                                     | mmap.PROT_EXEC).close())
attempt("sched_setaffinity", lambda: os.sched_setaffinity(0, os.sched_getaffinity(0)))
attempt("netlink_socket", lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW).close())
attempt("proc_stat", lambda: open("/proc/stat").close())  # what the process_* metrics need
libc = ctypes.CDLL(None, use_errno=True)
def unshare_uts():  # a namespace of its own (only root may, without the filter)
    if libc.unshare(0x04000000) != 0:
        raise OSError(ctypes.get_errno(), "unshare")
attempt("unshare", unshare_uts)
thread = threading.Thread(target=lambda: None)  # clone3, or clone when it is refused
attempt("thread", thread.start)
thread.join()
with open("/proc/self/mounts") as mounts:
    out["proc_mount"] = [line.split()[3] for line in mounts if line.split()[1] == "/proc"][-1]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def unit_sandbox() -> Sandbox:
    """Everything seccomp-based in the shipped unit, built as systemd 252 builds it."""
    analyze = require_tool("systemd-analyze", "systemd")
    settings = unit_settings(SERVICE_UNIT.read_text())
    return Sandbox.from_unit(settings, syscall_groups(analyze), mdwe="seccomp")


@pytest.fixture(scope="module")
def python() -> str:
    return seccomp_python()


def probe(sandbox: Sandbox, python: str) -> dict[str, int]:
    result = subprocess.run(sandbox.command(python, [sys.executable, "-c", PROBE]),
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_each_restriction_is_in_force(unit_sandbox: Sandbox, python: str) -> None:
    # The system-call filter refuses what the unit leaves out (@resources: sched_setaffinity)
    # with EPERM, and a socket family it does not list with EAFNOSUPPORT; W^X refuses a
    # writable and executable mapping. Without the sandbox all three work.
    # RestrictNamespaces= refuses a new namespace (root could make one otherwise); threads still
    # start.
    calls = ("wx_mmap", "sched_setaffinity", "netlink_socket", "proc_stat", "unshare", "thread")
    root = os.geteuid() == 0

    def attempts(sandbox: Sandbox) -> dict[str, int]:
        found = {name: value for name, value in probe(sandbox, python).items() if name in calls}
        if not root and sandbox.namespaces is False:
            found.pop("unshare")  # refused without root anyway: shows nothing
        return found

    free = dict.fromkeys(calls, 0)
    if not root:
        del free["unshare"]
    assert attempts(Sandbox()) == free
    seccomp_filters = {"wx_mmap": errno.EPERM, "sched_setaffinity": errno.EPERM,
                       "netlink_socket": errno.EAFNOSUPPORT, "proc_stat": 0,
                       "unshare": errno.EPERM, "thread": 0}
    assert attempts(unit_sandbox.only(mdwe="seccomp", syscalls=True)) == seccomp_filters
    assert attempts(unit_sandbox.only(mdwe="seccomp")) == {**free, "wx_mmap": errno.EPERM}
    assert attempts(unit_sandbox.only(syscalls=True)) == {**seccomp_filters, "wx_mmap": 0}
    if kernel_has_mdwe():
        assert attempts(Sandbox(mdwe="prctl")) == {**free, "wx_mmap": errno.EACCES}


def test_the_units_proc_view_is_in_force(unit_sandbox: Sandbox, python: str) -> None:
    """ProtectProc=invisible mounts /proc with hidepid=invisible; /proc/stat stays readable
    (ProcSubset=pid would hide it, and with it the process_* metrics)."""
    require_mount_namespace()
    assert unit_sandbox.proc is not None and "hidepid=invisible" in unit_sandbox.proc
    result = probe(unit_sandbox.only(proc=True), python)
    assert "hidepid=invisible" in result["proc_mount"].split(","), result
    assert result["proc_stat"] == 0, "the unit hides /proc/stat: no process_* metrics"


@pytest.mark.parametrize(("restrictions", "workers"), [
    ("w^x by prctl(PR_SET_MDWE)", 1), ("the unit's seccomp filters", 1), ("the unit's /proc", 1),
    ("the unit's seccomp filters", 2),  # the supervisor: posix_spawn, pidfds, SO_REUSEPORT
    ("w^x by prctl(PR_SET_MDWE)", 2)])
async def test_demo_round_trip_in_the_sandbox(
        restrictions: str, workers: int, tmp_path: Path, unit_sandbox: Sandbox, python: str,
        demo_upstream_factory: Callable[..., DemoUpstream],
        processes: list[ProxyProcess]) -> None:
    if restrictions.startswith("w^x"):
        if not kernel_has_mdwe():
            pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3+); systemd 252 enforces "
                        "MemoryDenyWriteExecute= with the seccomp filter tested beside this")
        sandbox = Sandbox(mdwe="prctl")
    elif restrictions.endswith("/proc"):
        require_mount_namespace()
        sandbox = unit_sandbox.only(proc=True)
    else:
        sandbox = unit_sandbox.only(mdwe="seccomp", syscalls=True)
    # Access tokens live a second: every login refreshes over HTTPS, inside the sandbox.
    upstream = demo_upstream_factory(access_token_lifetime=1)
    accounts = {DEMO_USER: {"provider": "demo"}}
    authorise(make_config(tmp_path, upstream, accounts=accounts), upstream, DEMO_USER,
              DEMO_PASSWORD)
    data = config_dict(tmp_path, upstream, accounts=accounts)
    data["metrics"] = {"listen": "127.0.0.1:0"}
    data["workers"] = workers
    path = tmp_path / "config.toml"
    path.write_text(to_toml(data))
    upstream.reset_stats()

    notify = NotifySocket()
    try:
        proc = ProxyProcess(path, tmp_path / "proxy.log", notify=notify,
                            env={"WATCHDOG_USEC": "2000000"},
                            wrap=lambda argv: sandbox.command(python, argv))
        processes.append(proc)
        await asyncio.to_thread(notify.expect, "READY", proc=proc.proc)
        # The daemon itself (the wrapper exec'd it: same pid) runs with the filters.
        status = Path(f"/proc/{proc.proc.pid}/status").read_text()
        if sandbox.seccomp_filters:  # libseccomp sets no_new_privs, as NoNewPrivileges=
            assert "\nSeccomp:\t2\n" in status and "\nNoNewPrivs:\t1\n" in status
            assert f"\nSeccomp_filters:\t{sandbox.seccomp_filters}\n" in status
        ports = {p: proc.port("listening", f" listener={p} ") for p in ("imap", "pop", "smtp")}
        said: list[str] = []
        await asyncio.to_thread(round_trip, ports, said.append)
        assert [line.split(":")[0] for line in said] == ["SMTP", "IMAP", "POP3"], said
        assert upstream.stats()["grant_types"].get("refresh_token", 0) >= 1
        metrics_port = proc.port("metrics_listening")
        assert (await http_get(metrics_port, "/readyz"))[0] == 200
        assert "process_start_time_seconds" in names(await scrape(metrics_port))
        await asyncio.to_thread(notify.expect, "WATCHDOG", timeout=5)

        proc.signal(signal.SIGHUP)
        await asyncio.to_thread(notify.expect, "RELOADING", proc=proc.proc)
        await asyncio.to_thread(notify.expect, "READY", proc=proc.proc)
        proc.signal(signal.SIGTERM)
        await asyncio.to_thread(notify.expect, "STOPPING")
        assert await asyncio.to_thread(proc.wait) == 0
    finally:
        notify.close()
    log = proc.text()
    assert "event=reloaded" in log and "event=stopped" in log, log
    assert "level=error" not in log and "Traceback" not in log, log
