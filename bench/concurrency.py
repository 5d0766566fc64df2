"""Figure 2 — many idle sessions, and figure 3b — a burst of connects.

Ramp: the bench opens sessions on raw asyncio sockets (``LOGIN``, ``SELECT INBOX``,
``IDLE``) up to each step and keeps them all open. At each step, after a short settle:

- the contestant's RSS (``/proc/PID/status``) and RSS per session above the baseline
  taken with only a probe session open;
- event-loop lag, measured from outside through the proxy's own work: the latency of a
  fresh connection's greeting (the proxy answers it itself, no upstream involved) and the
  NOOP round trip on a probe session (proxy → upstream → proxy); 20 samples each;
- errors: sessions that failed to open, and open sessions the contestant has since closed.

A background prober also samples greeting latency every 100 ms *during* the ramp, i.e. while
thousands of logins are being served: that is the lag a new client sees under login load.

Burst: ``n`` connects at once (``asyncio.gather``); all must be greeted; the figure is the
time from the first ``connect()`` to the last greeting line.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from bench import clients, harness


async def _open_idle(target: clients.Target, sem: asyncio.Semaphore) -> clients.ImapConn:
    async with sem:
        async with asyncio.timeout(60):
            conn = await clients.ImapConn.open(target, limit=64 * 1024)
        try:
            async with asyncio.timeout(120):
                await conn.login(target)
                await conn.command("SELECT INBOX")
                await conn.idle()
        except BaseException:
            conn.close()
            raise
        return conn


async def _lag(target: clients.Target, probe: clients.ImapConn, samples: int = 20,
               limit: float = 10.0) -> dict[str, float]:
    """Greeting latency and NOOP round trip; a probe that takes over ``limit`` seconds (or
    fails) counts as ``limit`` and as a lag failure."""
    greet, noop = [], []
    failures = 0
    for _ in range(samples):
        try:
            greet.append(await asyncio.wait_for(clients.greeting_latency(target), limit))
        except Exception:
            greet.append(limit)
            failures += 1
        started = time.perf_counter()
        try:
            await asyncio.wait_for(probe.command("NOOP"), limit)
            noop.append(time.perf_counter() - started)
        except Exception:
            noop.append(limit)
            failures += 1
            break  # the probe session is out of step or gone
        await asyncio.sleep(0.01)
    return {"lag_probe_failures": float(failures),"greeting_ms_p50": harness.percentile(greet, 50) * 1e3,
            "greeting_ms_p99": harness.percentile(greet, 99) * 1e3,
            "noop_ms_p50": harness.percentile(noop, 50) * 1e3,
            "noop_ms_p99": harness.percentile(noop, 99) * 1e3}


async def _prober(target: clients.Target, out: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            out.append(await asyncio.wait_for(clients.greeting_latency(target), 30))
        except Exception:  # noqa: S112 - a failed probe is counted as a 30 s lag
            out.append(30.0)
        try:
            await asyncio.wait_for(stop.wait(), 0.1)
        except TimeoutError:
            pass


async def ramp(target: clients.Target, steps: list[int], *, rss: Callable[[], int],
               alive: Callable[[], bool], parallel: int = 64, settle: float = 1.0,
               stop_on_error: bool = False, step_timeout: float = 300.0,
               say: Callable[[str], None] = print) -> dict[str, Any]:
    """Open idle sessions up to each step; return per-step figures."""
    sem = asyncio.Semaphore(parallel)
    conns: list[clients.ImapConn] = []
    failed = 0
    first_error = ""
    out: dict[str, Any] = {"steps": []}
    probe = await clients.ImapConn.open(target)
    await probe.login(target)
    await probe.command("SELECT INBOX")
    await asyncio.sleep(settle)
    baseline = rss()
    out["baseline_rss_mib"] = baseline / harness.MIB
    during: list[float] = []
    stop = asyncio.Event()
    prober = asyncio.create_task(_prober(target, during, stop), name="lag prober")
    started = time.perf_counter()
    try:
        for step in steps:
            need = step - len(conns)
            step_started = time.perf_counter()
            tasks = [asyncio.create_task(_open_idle(target, sem)) for _ in range(need)]
            done, pending = await asyncio.wait(tasks, timeout=step_timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            errors = len(pending)
            for task in done:
                exc = task.exception()
                if exc is None:
                    conns.append(task.result())
                else:
                    errors += 1
                    first_error = first_error or f"{type(exc).__name__}: {exc}"[:200]
            failed += errors
            ramp_s = time.perf_counter() - step_started
            await asyncio.sleep(settle)
            closed = sum(1 for c in conns if c.reader.at_eof())
            if not alive():
                out["steps"].append({"sessions": step, "open": 0, "errors": failed + len(conns),
                                     "note": "the process died"})
                break
            now_rss = rss()
            lag = await _lag(target, probe)
            row = {"sessions": step, "open": len(conns) - closed, "errors": failed + closed,
                   "ramp_s": ramp_s, "rss_mib": now_rss / harness.MIB,
                   "rss_per_session_kib": (now_rss - baseline) / max(1, len(conns) - closed) / 1024,
                   **lag}
            out["steps"].append(row)
            say(f"  {target.name}: {row['open']} open, {row['errors']} errors, "
                f"RSS {row['rss_mib']:.0f} MiB ({row['rss_per_session_kib']:.1f} KiB/session), "
                f"greeting p50 {lag.get('greeting_ms_p50', float('nan')):.2f} ms, "
                f"NOOP p50 {lag.get('noop_ms_p50', float('nan')):.2f} ms, ramp {ramp_s:.1f} s")
            if stop_on_error and row["errors"]:
                break
    finally:
        stop.set()
        await prober
        out["ramp_total_s"] = time.perf_counter() - started
        out["greeting_during_ramp_ms"] = {
            "p50": harness.percentile(during, 50) * 1e3,
            "p99": harness.percentile(during, 99) * 1e3,
            "max": max(during) * 1e3 if during else float("nan"), "samples": len(during)}
        out["first_error"] = first_error
        for conn in conns:
            conn.close()
        probe.close()
        await asyncio.sleep(0.5)
    return out


async def burst(target: clients.Target, n: int, timeout: float = 60.0) -> dict[str, Any]:
    """``n`` connects at once; all greeted? time to the last greeting."""
    greeted: list[float] = []
    errors: list[str] = []
    writers: list[asyncio.StreamWriter] = []
    started = time.perf_counter()

    async def one() -> None:
        try:
            if target.direct:
                reader, writer = await asyncio.open_connection(
                    target.host, target.ports["imap"], ssl=target.tls())
            else:
                reader, writer = await asyncio.open_connection(target.host, target.ports["imap"])
            writers.append(writer)
            line = await reader.readline()
            if not line.startswith(b"* OK"):
                raise RuntimeError(f"greeting {line[:80]!r}")
            greeted.append(time.perf_counter() - started)
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}"[:200])

    try:
        async with asyncio.timeout(timeout):
            await asyncio.gather(*(one() for _ in range(n)))
    except TimeoutError:
        errors.append(f"timed out after {timeout} s")
    finally:
        for writer in writers:
            writer.close()
        await asyncio.sleep(0.2)
    return {"n": n, "greeted": len(greeted), "errors": n - len(greeted),
            "last_greeting_s": max(greeted) if greeted else float("nan"),
            "p50_greeting_s": harness.percentile(greeted, 50),
            "first_error": errors[0] if errors else ""}
