"""Entry point of the demo upstream process: ``python -m proxy.demo.upstream --workdir DIR``.

Generates throw-away certificates, starts the fake Entra ID (HTTPS) and the fake mail
servers on free ports, then prints one JSON line to stdout and writes the same object to
``DIR/upstream.json``::

    {"ready": true, "pid": ..., "host": "127.0.0.1", "entra_url": "https://127.0.0.1:PORT",
     "authority": "https://127.0.0.1:PORT/demo-tenant", "graph_url": "https://127.0.0.1:PORT",
     "ca_file": ".../ca.pem",
     "cert_file": ".../server.pem", "key_file": ".../server.key",
     "ports": {"entra": PORT, "imaps": ..., "imap": ..., "pop3s": ..., "pop3": ...,
               "submission": ..., "smtps": ..., "graph": ...}}

It runs until SIGTERM or SIGINT (or, with ``--exit-on-stdin-eof``, until its parent goes
away and stdin closes). Nothing else is written to stdout; warnings go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

from proxy.demo.knobs import Knobs

DEMO_TENANT = "demo-tenant"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m proxy.demo.upstream", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--workdir", type=Path, required=True, help="folder for certificates and upstream.json"
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)"
    )
    parser.add_argument("--knobs", default="{}", help="JSON object of initial knob values")
    parser.add_argument(
        "--exit-on-stdin-eof",
        action="store_true",
        help="stop when stdin reaches end of file (the parent died)",
    )
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    return parser.parse_args(argv)


def start_logging(verbose: bool) -> None:
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    level = LogLevel.info if verbose else LogLevel.warn
    # Twisted's zope interfaces are opaque to mypy, hence the Any.
    text: Any = textFileLogObserver(sys.stderr)
    predicate: Any = LogLevelFilterPredicate(defaultLogLevel=level)
    observer: Any = FilteringLogObserver(text, [predicate])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def build(reactor: Any, workdir: Path, host: str, knobs: Knobs) -> dict:
    """Start everything on ``reactor``; return the ready record (without ``ready``/``pid``)."""
    from twisted.web import server

    from proxy.demo import certs, graph, mail
    from proxy.demo.admin import Admin
    from proxy.demo.entra import Entra
    from proxy.demo.tokens import TokenAuthority, Validator

    paths = certs.generate(workdir)
    tls = certs.server_tls_options(paths)
    authority = TokenAuthority(knobs)
    store = mail.MailStore()
    entra = Entra(knobs, authority)
    entra.admin = Admin(entra, store)  # type: ignore[assignment]
    site = server.Site(entra)
    site.noisy = False
    port = reactor.listenSSL(0, site, tls, interface=host)
    entra_port = port.getHost().port
    ports: dict[str, int] = {"entra": entra_port}
    ports.update(mail.start_mail_servers(reactor, host=host, tls=tls,
                                         validator=Validator(authority), store=store,
                                         knobs=knobs))
    ports["graph"] = graph.start(reactor, host=host, tls=tls, knobs=knobs, authority=authority,
                                 store=store)
    url_host = f"[{host}]" if ":" in host else host
    entra_url = f"https://{url_host}:{entra_port}"
    return {
        "host": host,
        "entra_url": entra_url,
        "graph_url": f"https://{url_host}:{ports['graph']}",
        "authority": f"{entra_url}/{DEMO_TENANT}",
        "ca_file": str(paths.ca_file),
        "cert_file": str(paths.cert_file),
        "key_file": str(paths.key_file),
        "ports": ports,
    }


def write_ready(workdir: Path, record: dict) -> None:
    line = json.dumps(record)
    target = workdir / "upstream.json"
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(line + "\n")
    os.replace(tmp, target)
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def watch_stdin(reactor: Any) -> None:
    def wait() -> None:
        try:
            while os.read(0, 65536):  # the raw fd: a buffered read would abort at exit
                pass
        except (OSError, ValueError):
            pass
        reactor.callFromThread(reactor.stop)

    threading.Thread(target=wait, name="stdin-eof", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    knobs = Knobs()
    try:
        values = json.loads(args.knobs)
        if not isinstance(values, dict):
            raise ValueError("--knobs must be a JSON object")
        knobs.update(values)
    except (ValueError, KeyError, TypeError) as exc:
        print(f"upstream: bad --knobs: {exc!r}", file=sys.stderr)
        return 2

    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor

    start_logging(args.verbose)
    workdir: Path = args.workdir.resolve()
    record = build(reactor, workdir, args.host, knobs)
    # Announce readiness only once reactor.run() has installed its SIGTERM/SIGINT handlers,
    # so a stop right after the ready line is a clean one.
    reactor.callWhenRunning(write_ready, workdir, {"ready": True, "pid": os.getpid(), **record})
    if args.exit_on_stdin_eof:
        reactor.callWhenRunning(watch_stdin, reactor)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
