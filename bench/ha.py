"""Two machines on one PostgreSQL token store: the refresh storm.

Two daemons (each its own ``xoauth2-proxy run`` on its own ports, as two machines behind a
load balancer would be) keep their tokens in one PostgreSQL: Debian's server, started by the
bench into a temporary folder with TLS, as the tests start it (``tests/realservers/
postgres.py``). Each run makes the account's access token expire (re-authorised with a 2 s
token, then waited out) and sends ``n`` concurrent IMAP LOGINs, to each daemon in turn.
Beside it, in the same rounds and in an order that rotates: the same storm on one of the two
daemons alone, and on one daemon with the token-file store. Figures per set-up: requests that
reached the fake Entra's token endpoint (a refresh single-flighted across machines means 1),
the time from the first LOGIN to the last OK, and failed logins.

``python -m bench.ha [--quick] [--runs N] [--logins N]`` runs it alone.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import clients, env, harness, logins, workers
from bench.harness import Series
from proxy import config as config_mod
from proxy import store

TWO, ONE, FILES = ("2 daemons, PostgreSQL", "1 daemon, PostgreSQL", "1 daemon, token files")


def _pg_tables(settings: dict[str, object]) -> str:
    return "[store]\n" + "".join(f"{key} = {env._toml_value(value)}\n"
                                 for key, value in settings.items())


def measure(world: env.World, *, runs: int, n: int,
            say: Callable[[str], None] = print) -> dict[str, Any]:
    """{setup: {"token_requests", "all_ok", "errors"}} or {"missing": why}."""
    try:
        from tests.realservers.postgres import Postgres, postgres_bin
    except ImportError as exc:  # psycopg or the tests are not there
        return {"missing": f"cannot start PostgreSQL: {exc}"}
    bindir = postgres_bin()
    if bindir is None:
        return {"missing": "PostgreSQL not installed (apt-get install -y postgresql)"}
    pg = Postgres.start(bindir)
    procs: list[env.ProxyProcess] = []
    pg_store: store.TokenStore | None = None
    try:
        from proxy.store.pg import PostgresBackend
        PostgresBackend(pg.settings(), check_schema=False).init_schema()
        tables = _pg_tables(pg.toml())
        targets: dict[str, list[clients.Target]] = {}
        daemons = []
        for label in ("pg-a", "pg-b"):
            proc, ports = workers.start(world, label, 1, "asyncio", tables=tables)
            procs.append(proc)
            daemons.append(clients.Target(label, "127.0.0.1", ports, env.STORM,
                                          password=env.PASSWORD))
        proc, ports = workers.start(world, "files", 1, "asyncio")
        procs.append(proc)
        targets = {TWO: daemons, ONE: daemons[:1],
                   FILES: [clients.Target("files", "127.0.0.1", ports, env.STORM,
                                          password=env.PASSWORD)]}
        pg_cfg = config_mod.load(workers.config_file(world, "pg-a"))
        pg_store = store.open_store(pg_cfg)
        stores = {TWO: (pg_cfg, pg_store), ONE: (pg_cfg, pg_store), FILES: (None, None)}
        found: dict[str, list[dict[str, Any]]] = {label: [] for label in targets}
        order = list(targets)
        for run in range(runs):
            for label in order[run % 3:] + order[:run % 3]:
                cfg, token_store = stores[label]
                logins.expire_token(world, env.STORM, say, cfg=cfg, token_store=token_store)
                r = asyncio.run(logins.storm(targets[label], n, world.upstream))
                found[label].append(r)
                say(f"  {label}: {r['ok']}/{r['n']} OK, token requests "
                    f"{r['token_endpoint_requests']}, all OK in {r['all_ok_s']:.2f} s "
                    f"{r['first_error']}")
        return {"n": n, "runs": runs, **{
            label: {"token_requests": Series("requests",
                                             [r["token_endpoint_requests"] for r in rs]),
                    "all_ok": Series("s", [r["all_ok_s"] for r in rs]),
                    "errors": sum(r["errors"] for r in rs), "raw": rs}
            for label, rs in found.items()}}
    finally:
        if pg_store is not None:
            pg_store.close()
        for proc in procs:
            proc.stop()
            world.procs.remove(proc)
        pg.stop()


def rows(data: dict[str, Any]) -> list[tuple[str, str]]:
    """(figure, value) rows for RESULTS.md."""
    if not data:
        return []
    if data.get("missing"):
        return [("refresh storm, two daemons on PostgreSQL", f"n/a: {data['missing']}")]
    out = []
    for label in (TWO, ONE, FILES):
        r = data.get(label)
        if r:
            out.append((f"refresh storm, {data.get('n')} logins, expired token, {label}",
                        f"{workers._s(r['token_requests'], 0)} token requests; all OK in "
                        f"{workers._s(r['all_ok'], 2)} s; {r['errors']} failed logins"))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ha", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--logins", type=int, default=1000)
    args = p.parse_args(argv)
    harness.raise_nofile()
    workdir = Path(tempfile.mkdtemp(prefix="xoauth2-bench-ha-"))
    world = env.World.create(workdir, messages=1, message_size=1000)
    data: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                            "loadavg_before": os.getloadavg(), "machine": harness.machine()}
    try:
        data.update(measure(world, runs=1 if args.quick else args.runs,
                            n=100 if args.quick else args.logins))
    finally:
        world.close()
    from bench import report
    report.standalone("ha", data, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
