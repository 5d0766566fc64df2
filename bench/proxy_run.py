"""``python -m bench.proxy_run -c CONFIG run``: the proxy's own CLI (``proxy.cli.main``) with
optional experiments set from the environment, so the bench can measure a change before
anyone makes it in the proxy:

- ``BENCH_UVLOOP=1``: run on uvloop's event loop instead of asyncio's;
- ``BENCH_SSL_BUFFER=BYTES``: the read buffer each asyncio TLS connection allocates
  (``asyncio.sslproto.SSLProtocol.max_size``, 256 KiB in CPython 3.11+, zero-filled, so
  resident from the first byte) — the upstream side of every session is TLS.

Without these variables it is exactly ``python -m proxy``. The proxy does not depend on it.
"""

import asyncio
import asyncio.sslproto
import os
import sys

from proxy.cli import main

if os.environ.get("BENCH_UVLOOP") == "1":  # whatever the config's event_loop says
    import uvloop

    from proxy import runtime

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    runtime.loop_factory = lambda _: uvloop.new_event_loop  # type: ignore[assignment]

if os.environ.get("BENCH_SSL_BUFFER"):
    asyncio.sslproto.SSLProtocol.max_size = int(os.environ["BENCH_SSL_BUFFER"])

sys.exit(main())
