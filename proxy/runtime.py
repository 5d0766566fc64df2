"""How the daemon runs: which event loop, and how many worker processes (top-level keys).

- ``event_loop = "asyncio" | "uvloop"``: the loop every daemon process runs on (asyncio by
  default; uvloop is a dependency on Linux). The measured difference is in bench/RESULTS.md
  ("Event loops and workers").
- ``workers = N``: 1 is a single process, as before; N > 1 starts a small supervisor
  (``proxy.supervisor``) that holds the listening sockets and runs N ``xoauth2-proxy run``
  workers accepting on them; ``"auto"`` is the number of CPUs this process may use, at most
  ``MAX_DEFAULT_WORKERS``. The default is 1: what a worker keeps in memory (in-band
  re-authorisation flows, the notifier's once-per-incident memory, the SMTP→Graph fallback,
  the admin page) is per process, so one process is the consistent choice until a
  deployment needs the cores.

``serve(config)`` is what ``xoauth2-proxy run`` does: a worker (started by the supervisor, so
``WORKER_ENV`` is set) or a one-process daemon runs ``proxy.server.daemon.run``; otherwise
the supervisor runs.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from proxy.config import Config

EventLoop = Literal["asyncio", "uvloop"]
EVENT_LOOPS: tuple[EventLoop, ...] = ("asyncio", "uvloop")
MAX_DEFAULT_WORKERS = 8
MAX_WORKERS = 64
WORKER_ENV = "XOAUTH2_PROXY_WORKER"  # set by the supervisor in each worker: its slot number


def uvloop_available() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def default_workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_DEFAULT_WORKERS))


def default_event_loop() -> EventLoop:
    """asyncio: measured interleaved, uvloop used about 6 % less CPU per GB relayed with no
    clear throughput gain, and costs about 9 KiB (28 %) more per idle TLS session
    (proxy.server.tlsmemory adjusts asyncio's TLS, not uvloop's), and a proxy's load is mostly
    idle devices; bench/RESULTS.md, "Event loops and workers"."""
    return "asyncio"


@dataclass(frozen=True)
class Runtime:
    workers: int = 1
    event_loop: EventLoop = "asyncio"

    def __post_init__(self) -> None:
        if not 1 <= self.workers <= MAX_WORKERS:
            raise ValueError(f"workers must be between 1 and {MAX_WORKERS}")
        if self.event_loop not in EVENT_LOOPS:
            raise ValueError(f"event_loop must be one of {', '.join(EVENT_LOOPS)}")


class _Reader(Protocol):  # proxy.config's table reader (not imported: config imports us)
    def get(self, name: str, kind: type | tuple[type, ...], default: Any = ...) -> Any: ...
    def choice(self, name: str, choices: tuple[str, ...], default: Any = ...) -> Any: ...
    def fail(self, name: str | None, message: str) -> Exception: ...


def read(top: _Reader) -> Runtime:
    """``workers`` and ``event_loop`` from the config's top level."""
    workers = top.get("workers", (int, str), 1)
    if workers == "auto":
        workers = default_workers()
    elif isinstance(workers, str):
        raise top.fail("workers", f'must be a whole number or "auto" (got "{workers}")')
    elif not 1 <= workers <= MAX_WORKERS:
        raise top.fail("workers", f"must be between 1 and {MAX_WORKERS} (got {workers}); 1 runs "
                                  "one process without a supervisor")
    event_loop = top.choice("event_loop", EVENT_LOOPS, None) or default_event_loop()
    if event_loop == "uvloop" and not uvloop_available():
        raise top.fail("event_loop", 'is "uvloop" but the uvloop package is not installed: '
                                     'install it (pip install uvloop) or set event_loop = '
                                     '"asyncio"')
    return Runtime(workers=workers, event_loop=event_loop)


def loop_factory(event_loop: EventLoop) -> Callable[[], asyncio.AbstractEventLoop]:
    """A new-loop function for ``asyncio.Runner``: the configured loop, whatever the policy."""
    if event_loop == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.SelectorEventLoop


def run_on(event_loop: EventLoop, main: Coroutine[Any, Any, int]) -> int:
    """``asyncio.run(main)`` on the chosen event loop."""
    with asyncio.Runner(loop_factory=loop_factory(event_loop)) as runner:
        return runner.run(main)


def is_worker() -> bool:
    return bool(os.environ.get(WORKER_ENV))


def serve(config: Config, *, log_level: str | None) -> int:
    """``xoauth2-proxy run``: a worker or one process serves; else the supervisor runs."""
    if config.runtime.workers > 1 and not is_worker():
        from proxy import supervisor

        return supervisor.main(config, log_level=log_level)
    from proxy.server import daemon

    worker = is_worker()
    if worker:  # the sockets the supervisor passed are meant for this process
        os.environ["LISTEN_PID"] = str(os.getpid())
    return run_on(config.runtime.event_loop,
                  daemon.run(config, log_level=log_level, metrics_endpoint=not worker))
