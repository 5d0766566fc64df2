"""Event loops and workers: the proxy with ``workers`` 1 and 2 and ``event_loop`` asyncio and
uvloop, and idle sessions past one process's descriptor limit with 2 workers.

- **Throughput** (``measure``): the four set-ups run side by side (each its own ``python -m
  proxy run`` on its own ports, same token files); each round fetches the whole mailbox
  over IMAP and POP3 through the direct path and every set-up, in an order that rotates
  from round to round, so drift on a shared machine hits them alike. Per set-up: MB/s,
  its ratio to the direct run of the same round, and CPU seconds per GB of the proxy's
  processes (supervisor and workers).
- **Idle sessions** (``idle``): a 2-worker proxy; ``clients`` client processes (one process
  may hold 20,000 descriptors here) each open their share of IMAP sessions (LOGIN, SELECT,
  IDLE) and hold them; then how many are open, errors, and the proxy's RSS (supervisor and
  workers) per session above its baseline.

``python -m bench.workers [--quick] [--sessions N]`` runs both alone and prints the rows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import clients, env, harness
from bench.harness import Series

SETUPS = (("1 worker, asyncio", 1, "asyncio"), ("1 worker, uvloop", 1, "uvloop"),
          ("2 workers, asyncio", 2, "asyncio"), ("2 workers, uvloop", 2, "uvloop"))


def tree(pid: int) -> list[int]:
    """``pid`` and its children (a supervisor's workers)."""
    pids = [pid]
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as f:
                pids += [int(p) for p in f.read().split()]
    except FileNotFoundError:
        pass
    return pids


def tree_cpu(pid: int) -> float:
    return sum(harness.cpu_seconds(p) for p in tree(pid))


def tree_rss(pid: int) -> int:
    return sum(harness.rss_bytes(p) for p in tree(pid))


def config_file(world: env.World, label: str) -> Path:
    """Where ``start`` writes the config of the set-up ``label``."""
    return world.workdir / f"proxy-{label.replace(' ', '').replace(',', '-')}.toml"


def start(world: env.World, label: str, workers: int, event_loop: str, *, tables: str = ""
          ) -> tuple[env.ProxyProcess, dict[str, int]]:
    """The world's proxy config with new ports and these settings (and ``tables``, TOML
    appended at its end), started."""
    text = re.sub(r"(?m)^(workers|event_loop) = .*\n", "", world.config_path.read_text())
    ports = {}
    for proto, port in world.ports.items():
        ports[proto] = harness.free_port()
        text = text.replace(f'"127.0.0.1:{port}"', f'"127.0.0.1:{ports[proto]}"')
    path = config_file(world, label)
    path.write_text(f"workers = {workers}\nevent_loop = \"{event_loop}\"\n{text}\n{tables}")
    proc = world.start_proxy(config=(path, ports))
    return proc, ports


def _fetch(protocol: str, target: clients.Target, messages: int) -> tuple[int, float]:
    if protocol == "imap":
        return clients.imap_fetch_all(target, messages)
    return clients.pop_retr_all(target, messages)


def measure(world: env.World, direct: clients.Target, *, runs: int, messages: int,
            say: Callable[[str], None] = print) -> dict[str, Any]:
    """{protocol: {setup: {"mbps", "x_direct", "cpu_s_per_gb"}}, "direct": {protocol: Series}}."""
    procs: dict[str, env.ProxyProcess] = {}
    targets: dict[str, clients.Target] = {}
    out: dict[str, Any] = {"direct": {}, "runs": runs}
    try:
        for label, workers, loop in SETUPS:
            procs[label], ports = start(world, label, workers, loop)
            targets[label] = clients.Target(label, "127.0.0.1", ports, env.BIG,
                                            password=env.PASSWORD)
            for protocol in ("imap", "pop"):  # warm: scrypt once, a token per protocol
                _fetch(protocol, targets[label], 1)
        for protocol in ("imap", "pop"):
            direct_series = out["direct"][protocol] = Series("MB/s")
            rows = {label: {"mbps": Series("MB/s"), "x_direct": Series("×"),
                            "cpu_s_per_gb": Series("s/GB")} for label, _, _ in SETUPS}
            for run in range(runs):
                order = [label for label, _, _ in SETUPS]
                order = order[run % len(order):] + order[:run % len(order)]
                nbytes, seconds = _fetch(protocol, direct, messages)
                base = nbytes / seconds / 1e6
                direct_series.add(base)
                for label in order:
                    before = tree_cpu(procs[label].pid)
                    nbytes, seconds = _fetch(protocol, targets[label], messages)
                    cpu = tree_cpu(procs[label].pid) - before
                    mbps = nbytes / seconds / 1e6
                    rows[label]["mbps"].add(mbps)
                    rows[label]["x_direct"].add(mbps / base)
                    rows[label]["cpu_s_per_gb"].add(cpu / (nbytes / 1e9))
                say(f"  {protocol} round {run + 1}/{runs}: direct {base:.0f} MB/s; "
                    + "; ".join(f"{label} {rows[label]['mbps'].values[-1]:.0f}"
                                for label in order))
            out[protocol] = rows
    finally:
        for proc in procs.values():
            proc.stop()
            world.procs.remove(proc)
    return out


CLIENT = """
import asyncio, json, sys
from bench import clients, concurrency, env, harness
harness.raise_nofile()
port, n, parallel = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
target = clients.Target("xoauth2-proxy", "127.0.0.1", {"imap": port}, env.IDLE,
                        password=env.PASSWORD)
async def main():
    sem = asyncio.Semaphore(parallel)
    results = await asyncio.gather(*(concurrency._open_idle(target, sem) for _ in range(n)),
                                   return_exceptions=True)
    conns = [r for r in results if not isinstance(r, BaseException)]
    errors = [r for r in results if isinstance(r, BaseException)]
    print(json.dumps({"open": len(conns), "errors": len(errors),
                      "first_error": repr(errors[0])[:200] if errors else ""}), flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)
    await asyncio.sleep(0)
    print(json.dumps({"still_open": sum(not c.reader.at_eof() for c in conns)}), flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)
    for c in conns:
        c.close()
asyncio.run(main())
"""


def idle(world: env.World, sessions: int, *, clients_n: int = 2, parallel: int = 32,
         event_loop: str = "asyncio", workers: int = 2,
         say: Callable[[str], None] = print) -> dict[str, Any]:
    """``sessions`` idle IMAP sessions on a ``workers``-worker proxy from ``clients_n``
    processes."""
    proc, ports = start(world, f"{workers} workers idle {event_loop}", workers, event_loop)
    kids: list[subprocess.Popen[str]] = []
    try:
        target = clients.Target("xoauth2-proxy", "127.0.0.1", ports, env.IDLE,
                                password=env.PASSWORD)
        for _ in range(4):  # each worker: scrypt once
            asyncio.run(_one_login(target))
        time.sleep(1.0)
        baseline = tree_rss(proc.pid)
        started = time.perf_counter()
        share = [sessions // clients_n + (i < sessions % clients_n) for i in range(clients_n)]
        for n in share:
            kids.append(subprocess.Popen(
                [sys.executable, "-c", CLIENT, str(ports["imap"]), str(n), str(parallel)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                cwd=env.PROJECT_ROOT))
        opened = [json.loads(_line(k)) for k in kids]
        ramp_s = time.perf_counter() - started
        time.sleep(3.0)
        rss = tree_rss(proc.pid)
        fds = {p: harness.fd_count(p) for p in tree(proc.pid)}
        for k in kids:
            assert k.stdin is not None
            k.stdin.write("check\n")
            k.stdin.flush()
        still = sum(json.loads(_line(k))["still_open"] for k in kids)
        open_n = sum(o["open"] for o in opened)
        out = {"sessions": sessions, "open": open_n, "still_open": still,
               "errors": sum(o["errors"] for o in opened) + (open_n - still),
               "first_error": next((o["first_error"] for o in opened if o["first_error"]), ""),
               "rss_per_session_kib": (rss - baseline) / max(1, still) / 1024,
               "rss_mib": rss / harness.MIB, "ramp_s": ramp_s, "fds_by_process": fds,
               "client_processes": clients_n, "event_loop": event_loop, "workers": workers}
        say(f"  {workers} workers: {still} open of {sessions}, {out['errors']} errors, "
            f"{out['rss_per_session_kib']:.1f} KiB/session, descriptors {fds}, "
            f"ramp {ramp_s:.0f} s {out['first_error']}")
        return out
    finally:
        for k in kids:
            if k.stdin is not None:
                k.stdin.close()
        for k in kids:
            try:
                k.wait(timeout=60)
            except subprocess.TimeoutExpired:
                k.kill()
        proc.stop()
        world.procs.remove(proc)


def _line(kid: subprocess.Popen[str]) -> str:
    assert kid.stdout is not None
    line = kid.stdout.readline()
    if not line:
        raise RuntimeError(f"idle client exited with {kid.wait()}")
    return line


async def _one_login(target: clients.Target) -> None:
    _, conn = await clients.login_latency(target)
    conn.close()


def rows(data: dict[str, Any]) -> list[tuple[str, str]]:
    """(figure, value) rows for RESULTS.md."""
    out = []
    for protocol, name in (("imap", "IMAP FETCH"), ("pop", "POP3 RETR")):
        setups = data.get(protocol) or {}
        direct = (data.get("direct") or {}).get(protocol)
        if direct is not None:
            out.append((f"{name}, direct, MB/s", f"{_s(direct, 0)}"))
        for label, r in setups.items():
            out.append((f"{name}, {label}: MB/s (× direct); CPU s/GB",
                        f"{_s(r['mbps'], 0)} (×{_s(r['x_direct'], 2)}); "
                        f"{_s(r['cpu_s_per_gb'], 2)}"))
    i = data.get("idle")
    if i:
        out.append((f"idle IMAP sessions, {i.get('workers')} worker(s) ({i.get('event_loop')}), "
                    f"{i['client_processes']} client processes",
                    f"{i['still_open']:,} open of {i['sessions']:,}, {i['errors']} errors; "
                    f"{i['rss_per_session_kib']:.1f} KiB/session; descriptors per process "
                    f"{sorted(i['fds_by_process'].values())}; ramp {i['ramp_s']:.0f} s"))
    return out


def _s(series: Series | dict[str, Any], digits: int) -> str:
    """median [min–max] of a Series, or of its JSON form (``report.jsonable``)."""
    if isinstance(series, Series):
        series = {"median": series.median, "min": series.min, "max": series.max}
    if series.get("median") is None:
        return "–"
    return f"{series['median']:.{digits}f} [{series['min']:.{digits}f}–{series['max']:.{digits}f}]"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.workers", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--sessions", type=int, default=19_000)
    p.add_argument("--only", choices=("throughput", "idle"))
    p.add_argument("--idle-loop", choices=("asyncio", "uvloop"), default="asyncio")
    p.add_argument("--idle-workers", type=int, default=2)
    args = p.parse_args(argv)
    harness.raise_nofile()
    messages = 20 if args.quick else 200
    workdir = Path(tempfile.mkdtemp(prefix="xoauth2-bench-workers-"))
    world = env.World.create(workdir, messages=messages, message_size=1_000_000)
    data: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                            "loadavg_before": os.getloadavg(), "machine": harness.machine()}
    try:
        direct = clients.Target("direct", "127.0.0.1",
                                {"imap": world.upstream.ports["imaps"],
                                 "pop": world.upstream.ports["pop3s"]}, env.BIG,
                                token=lambda proto: _token(world, proto),
                                ca_file=world.upstream.ca_file)
        if args.only in (None, "throughput"):
            data.update(measure(world, direct, runs=1 if args.quick else args.runs,
                                messages=messages))
        if args.only in (None, "idle"):
            data["idle"] = idle(world, 200 if args.quick else args.sessions,
                                event_loop=args.idle_loop, workers=args.idle_workers)
    finally:
        world.close()
    from bench import report
    report.standalone("workers", data, rows)
    return 0


_TOKENS: dict[str, str] = {}


def _token(world: env.World, protocol: str) -> str:
    if protocol not in _TOKENS:
        _TOKENS[protocol] = world.token(env.BIG, protocol)
    return _TOKENS[protocol]


if __name__ == "__main__":
    sys.exit(main())
