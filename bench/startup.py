"""Figure 6 — start-up, and the first login of a password.

- exec → ready: the bench starts ``python -m proxy -c CONFIG run`` with ``NOTIFY_SOCKET``
  pointing at its own datagram socket and waits for ``READY=1`` (sd_notify). It also polls
  the IMAP listener; if the daemon sends no ``READY=1`` the figure is exec → first accept.
- first login: right after start, the first ``LOGIN`` of the account's password pays one
  scrypt (the token file's key slot; cached in memory afterwards). Reported next to the
  warm ``LOGIN`` on the same fresh process, and the difference.
- import cost: ``python -X importtime -c "import proxy.cli"`` (what ``--help`` and
  ``check-config`` pay) and ``… -c "import proxy.server.daemon"`` (what ``run`` pays before
  it can listen), cumulative microseconds of the top module, and the wall time of the
  interpreter run against ``python -c pass``.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from typing import Any

from bench import clients, env, harness
from bench.harness import Series
from proxy.demo.process import PROJECT_ROOT


def _importtime(module: str) -> tuple[float, float]:
    """(cumulative import µs of ``module``, wall seconds of the whole interpreter run)."""
    environ = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"],
                          capture_output=True, text=True, env=environ, timeout=120)
    wall = time.perf_counter() - started
    cumulative = float("nan")
    for line in done.stderr.splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) == 3 and parts[2] == module:
            cumulative = float(parts[1])
    return cumulative, wall


def imports(runs: int) -> dict[str, Series]:
    out = {"cli_import_ms": Series("ms"), "daemon_import_ms": Series("ms"),
           "cli_wall_ms": Series("ms"), "python_bare_ms": Series("ms")}
    environ = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    for _ in range(runs):
        cumulative, wall = _importtime("proxy.cli")
        out["cli_import_ms"].add(cumulative / 1e3)
        out["cli_wall_ms"].add(wall * 1e3)
        cumulative, _ = _importtime("proxy.server.daemon")
        out["daemon_import_ms"].add(cumulative / 1e3)
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], env=environ, timeout=60, check=True)
        out["python_bare_ms"].add((time.perf_counter() - started) * 1e3)
    return out


def measure(world: env.World, runs: int, say: Any) -> dict[str, Any]:
    ready, first, warm = Series("ms"), Series("ms"), Series("ms")
    how = "listener accept (no READY=1 from the daemon)"
    target = clients.Target("xoauth2-proxy", "127.0.0.1", world.ports, env.IDLE,
                            password=env.PASSWORD)
    for run in range(runs):
        proc = world.start_proxy()
        try:
            if proc.ready_at is not None:
                how = "READY=1 over NOTIFY_SOCKET (sd_notify)"
            ready.add(proc.startup_seconds * 1e3)

            async def logins() -> tuple[float, float]:
                cold, conn = await clients.login_latency(target)
                conn.close()
                warm_values = []
                for _ in range(5):
                    t, conn = await clients.login_latency(target)
                    conn.close()
                    warm_values.append(t)
                return cold, harness.percentile(warm_values, 50)

            cold, hot = asyncio.run(logins())
            first.add(cold * 1e3)
            warm.add(hot * 1e3)
            say(f"  start {run + 1}/{runs}: ready in {proc.startup_seconds * 1e3:.0f} ms "
                f"({how.split(' ')[0]}), first LOGIN {cold * 1e3:.1f} ms, warm {hot * 1e3:.1f} ms")
        finally:
            proc.stop()
            world.procs.remove(proc)
    scrypt = Series("ms")
    for a, b in zip(first.values, warm.values, strict=True):
        scrypt.add(a - b)
    return {"exec_to_ready": ready, "ready_signal": how, "first_login": first,
            "warm_login": warm, "first_login_extra": scrypt}


def peer_startup(start: Any, runs: int) -> Series:
    """exec → the peer's IMAP listener accepts; ``start()`` returns (popen, port)."""
    out = Series("ms")
    for _ in range(runs):
        started = time.perf_counter()
        stop, port = start()
        try:
            harness.wait_port(port, timeout=60)
            out.add((time.perf_counter() - started) * 1e3)
        finally:
            stop()
    return out
