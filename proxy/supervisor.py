"""``workers = N``: a small supervisor that holds the listening sockets and runs N workers.

The supervisor binds every listener's socket (or takes the ones systemd passed by socket
activation) and starts N ``xoauth2-proxy run`` processes that accept on them: each gets the
sockets as fds 3… with ``LISTEN_FDS``/``LISTEN_FDNAMES``, the form socket activation uses, so
a worker is the ordinary daemon (``proxy.server.daemon.run``). The kernel spreads new
connections over the workers accepting on a socket.

- **Crash**: a worker that exits while the supervisor is not stopping is started again at once
  on the same sockets (connections queued on them wait for it), then after 1, 2, 4 … 30 s if
  it keeps dying within ``STABLE_SECONDS`` of its start (its own sockets are closed meanwhile,
  so the other workers take every new connection).
- **systemd**: each worker sends its ``sd_notify`` datagrams to a private socket of the
  supervisor; ``READY=1`` goes to systemd once every worker is ready, ``RELOADING=1`` …
  ``READY=1`` around a reload, ``STOPPING=1`` on SIGTERM. With ``WatchdogSec=`` the workers
  ping the supervisor (a worker whose pings stop is killed with SIGABRT and replaced) and the
  supervisor pings systemd from its own loop: the whole is watched, the unit needs only
  ``NotifyAccess=main``.
- **Signals**: SIGHUP is forwarded to every worker (each reloads without dropping a session;
  a worker starts with SIGHUP blocked until its handler is set, so one that is still starting
  reloads once it is up instead of dying of the signal's default action);
  SIGTERM/SIGINT to every worker (each drains for ``shutdown_grace``), then the supervisor
  exits; a worker still there ``KILL_AFTER`` seconds later is killed.
- **Metrics**: workers write prometheus_client's multiprocess files into a private directory
  (created empty at start, removed at exit); the supervisor alone serves the metrics address
  (``proxy.supervisor_web``), so one scrape shows the whole daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy import config as config_mod
from proxy import logs, runtime, systemd
from proxy.config import Config

log = logging.getLogger("proxy.supervisor")

STABLE_SECONDS = 10.0  # a worker that lived this long before dying is restarted at once
MAX_BACKOFF = 30.0
KILL_AFTER = 15.0  # seconds after shutdown_grace before a stopping worker is killed
RELOAD_WAIT = 120.0  # seconds to wait for every worker's READY=1 after a reload
BACKLOG = 4096


class SupervisorError(Exception):
    """The supervisor cannot start (one line, for the operator)."""


@dataclass
class Worker:
    slot: int
    notify: socket.socket  # this slot's sd_notify socket (kept across restarts)
    pid: int = 0
    pidfd: int = -1
    started: float = 0.0
    ready: bool = False
    reloaded: int = 0  # the reload generation this worker has confirmed with READY=1
    last_ping: float = 0.0
    failures: int = 0  # deaths in a row within STABLE_SECONDS of the start
    aborted: bool = False  # the watchdog sent SIGABRT
    # Its own SO_REUSEPORT sockets (or the shared ones), kept for the next worker in this slot
    # when it starts at once, so connections queued on them wait for it instead of failing.
    sockets: list[socket.socket] | None = None
    exited: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class Socket:
    """A listener's socket(s). Passed by systemd: one socket all workers accept on (``shared``).
    Else each worker gets its own socket on the address, bound with SO_REUSEPORT, so the kernel
    spreads connections evenly over the workers (a fixed share each, which keeps each worker
    within its descriptor limit) and a dead worker's socket leaves the group with it;
    ``anchor`` (bound, never listening) holds the port while workers come and go."""

    name: str
    shared: socket.socket | None = None
    anchor: socket.socket | None = None

    def for_worker(self) -> socket.socket:
        if self.shared is not None:
            return self.shared
        assert self.anchor is not None
        host, port = self.anchor.getsockname()[:2]
        return socket.create_server((host, port), family=self.anchor.family, backlog=BACKLOG,
                                    reuse_port=True)

    def close(self) -> None:
        for sock in (self.shared, self.anchor):
            if sock is not None:
                sock.close()


def bind(config: Config, passed: dict[str, socket.socket]) -> list[Socket]:
    """Every listener's socket: the activated one, else an anchor on its address."""
    out: list[Socket] = []
    for li in config.listeners:
        if li.name in passed:
            out.append(Socket(li.name, shared=passed[li.name]))
            continue
        anchor = socket.socket(_family(li.listen.host), socket.SOCK_STREAM)
        try:
            anchor.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            anchor.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            anchor.bind((li.listen.host, li.listen.port))
        except OSError as exc:
            anchor.close()
            for sock in out:
                sock.close()
            raise SupervisorError(f"listener {li.name}: cannot listen on {li.listen}: "
                                  f"{exc.strerror or exc}") from None
        out.append(Socket(li.name, anchor=anchor))
    return out


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class Supervisor:
    def __init__(self, config: Config, log_level: str | None, notifier: systemd.Notifier,
                 sockets: list[Socket], private: Path) -> None:
        self.config, self.log_level, self.notifier = config, log_level, notifier
        self.private = private
        self.metrics_dir = private / "metrics"
        self.metrics_dir.mkdir(mode=0o700)
        self.sockets = sockets
        self.names = [sock.name for sock in sockets]
        self.watchdog_usec = _watchdog_usec()
        self.workers = [Worker(slot, self._notify_socket(slot))
                        for slot in range(1, config.runtime.workers + 1)]
        self.stopping = False  # SIGTERM came: workers that exit are not started again
        self.stop_requested = asyncio.Event()
        self.startup_failed: int | None = None  # a worker's exit code before all were ready
        self.all_ready = asyncio.Event()
        self.generation = 0  # reloads forwarded so far
        self.restarts = 0
        self._tasks: set[asyncio.Task[None]] = set()

    # --- workers -------------------------------------------------------------------------------

    def _notify_socket(self, slot: int) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        sock.bind(str(self.private / f"notify-{slot}.sock"))
        sock.setblocking(False)
        return sock

    def _environment(self, worker: Worker) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("LISTEN_", "WATCHDOG_", "NOTIFY_SOCKET"))}
        env.update({runtime.WORKER_ENV: str(worker.slot),
                    "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir),
                    "NOTIFY_SOCKET": str(self.private / f"notify-{worker.slot}.sock"),
                    "LISTEN_FDS": str(len(self.names)), "LISTEN_FDNAMES": ":".join(self.names)})
        if self.watchdog_usec:
            env["WATCHDOG_USEC"] = str(self.watchdog_usec)
        return env

    def spawn(self, worker: Worker) -> None:
        argv = [sys.executable, "-m", "proxy", "-c", str(self.config.path), "run"]
        if self.log_level:
            argv += ["--log-level", self.log_level]
        # Copies above fds 3…3+n, so that placing them there in the child overwrites none.
        n = len(self.sockets)
        fds = []
        try:
            if worker.sockets is None:
                worker.sockets = [sock.for_worker() for sock in self.sockets]
            for own in worker.sockets:
                fds.append(fcntl.fcntl(own.fileno(), fcntl.F_DUPFD_CLOEXEC, 3 + n))
            actions = [(os.POSIX_SPAWN_DUP2, fd, 3 + i) for i, fd in enumerate(fds)]
            # SIGHUP blocked until the worker's handler is in place (proxy.server.daemon.run
            # unblocks it): a reload sent while it starts waits instead of killing it.
            worker.pid = os.posix_spawn(sys.executable, argv, self._environment(worker),
                                        file_actions=actions, setsigmask={signal.SIGHUP})
        finally:
            for fd in fds:
                os.close(fd)
        worker.pidfd = os.pidfd_open(worker.pid)
        worker.started = worker.last_ping = time.monotonic()
        worker.ready, worker.reloaded, worker.aborted = False, self.generation, False
        worker.exited.clear()
        asyncio.get_running_loop().add_reader(worker.pidfd, self._reap, worker)
        logs.event(log, logging.INFO, "worker_started", worker=worker.slot, pid=worker.pid)

    def _reap(self, worker: Worker) -> None:
        try:
            pid, status = os.waitpid(worker.pid, os.WNOHANG)
        except ChildProcessError:  # reaped elsewhere: gone, status unknown
            pid, status = worker.pid, 1 << 8
        if pid == 0:
            return
        asyncio.get_running_loop().remove_reader(worker.pidfd)
        os.close(worker.pidfd)
        worker.pidfd, worker.ready = -1, False
        _mark_dead(worker.pid, self.metrics_dir)
        worker.exited.set()
        code = os.waitstatus_to_exitcode(status)
        if not self.all_ready.is_set() and not self.stopping:
            # It could not start (it said why on stderr): the others cannot either.
            logs.event(log, logging.ERROR, "worker_failed_to_start", worker=worker.slot,
                       pid=worker.pid, exit=code)
            self.startup_failed = code if code > 0 else 1
            self.stop_requested.set()
            return
        if self.stopping:
            logs.event(log, logging.INFO, "worker_stopped", worker=worker.slot, pid=worker.pid,
                       exit=code)
            return
        lived = time.monotonic() - worker.started
        worker.failures = worker.failures + 1 if lived < STABLE_SECONDS else 0
        delay = min(MAX_BACKOFF, 2.0 ** (worker.failures - 2)) if worker.failures > 1 else 0.0
        if delay:  # crashing at start: its sockets leave the group until it runs again
            self._close_sockets(worker)
        logs.event(log, logging.ERROR, "worker_exited", worker=worker.slot, pid=worker.pid,
                   exit=code if code >= 0 else None,
                   signal=signal.Signals(-code).name if code < 0 else None,
                   restart_in=round(delay, 1))
        self.notifier.status(self.status())
        self.background(self._restart(worker, delay), f"restart worker {worker.slot}")

    async def _restart(self, worker: Worker, delay: float) -> None:
        await asyncio.sleep(delay)
        while not self.stopping:
            try:
                self.spawn(worker)
            except OSError as exc:  # out of descriptors or processes, say: try again later
                self._close_sockets(worker)
                logs.event(log, logging.ERROR, "worker_start_failed", worker=worker.slot,
                           reason=exc.strerror or str(exc), retry_in=MAX_BACKOFF)
                await asyncio.sleep(MAX_BACKOFF)
            else:
                self.restarts += 1
                return

    def notified(self, worker: Worker) -> None:
        while True:
            try:
                data = worker.notify.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            lines = data.decode("utf-8", "replace").split("\n")
            if "WATCHDOG=1" in lines:
                worker.last_ping = time.monotonic()
            if "READY=1" in lines:
                worker.ready, worker.last_ping = True, time.monotonic()
                worker.reloaded = self.generation
                if all(w.ready for w in self.workers):
                    self.all_ready.set()
                if self.all_ready.is_set():
                    self.notifier.status(self.status())
            if "STOPPING=1" in lines:
                worker.ready = False

    def background(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def signal_all(self, sig: signal.Signals) -> None:
        for worker in self.workers:
            if worker.pidfd >= 0:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(worker.pidfd, sig)

    @property
    def ready(self) -> bool:
        """Every listener accepts: some worker is ready and the supervisor is not stopping."""
        return not self.stop_requested.is_set() and any(w.ready for w in self.workers)

    # --- the process ---------------------------------------------------------------------------

    def status(self) -> str:
        up = sum(w.ready for w in self.workers)
        return f"ready: {up} of {len(self.workers)} workers accepting"

    async def reload(self) -> None:
        """SIGHUP: to every worker; READY=1 to systemd once each has answered READY=1."""
        self.generation += 1
        generation = self.generation
        self.notifier.reloading("reloading: workers read the config again")
        logs.event(log, logging.INFO, "reload", config=str(self.config.path),
                   workers=len(self.workers))
        self.signal_all(signal.SIGHUP)
        try:
            new = await asyncio.to_thread(config_mod.load, self.config.path)
        except config_mod.ConfigError:
            new = self.config  # the workers log why; they keep their config too
        if new.runtime != self.config.runtime or new.metrics.listen != self.config.metrics.listen:
            logs.event(log, logging.WARNING, "restart_required",
                       reason="workers, event_loop or metrics.listen changed: a restart "
                              "applies it")
        self.config = new
        deadline = time.monotonic() + RELOAD_WAIT
        while time.monotonic() < deadline and not self.stop_requested.is_set() and any(
                w.pidfd >= 0 and w.reloaded < generation for w in self.workers):
            await asyncio.sleep(0.05)
        if not self.stop_requested.is_set():
            self.notifier.ready(self.status())

    async def watchdog(self, interval: float) -> None:
        """Ping systemd from this loop; kill a ready worker whose own pings stopped (one that
        is starting has not begun to ping)."""
        timeout = self.watchdog_usec / 1_000_000
        while True:
            self.notifier.watchdog()
            now = time.monotonic()
            for worker in self.workers:
                if worker.pidfd >= 0 and worker.ready and now - worker.last_ping > timeout:
                    # SIGABRT (as systemd does), SIGKILL if it is still there a timeout later
                    sig = signal.SIGKILL if worker.aborted else signal.SIGABRT
                    logs.event(log, logging.ERROR, "worker_watchdog", worker=worker.slot,
                               pid=worker.pid, silent_for=round(now - worker.last_ping, 1),
                               signal=sig.name)
                    worker.last_ping, worker.aborted = now, True
                    with contextlib.suppress(ProcessLookupError):
                        signal.pidfd_send_signal(worker.pidfd, sig)
            await asyncio.sleep(interval)

    async def stop(self) -> None:
        self.stopping = True
        self.notifier.stopping("stopping: workers drain their sessions")
        logs.event(log, logging.INFO, "stopping", workers=len(self.workers))
        self.signal_all(signal.SIGTERM)
        running = [w.exited.wait() for w in self.workers if w.pidfd >= 0]
        if running:
            grace = self.config.shutdown_grace + KILL_AFTER
            _, pending = await asyncio.wait([asyncio.ensure_future(c) for c in running],
                                            timeout=grace)
            if pending:
                self.signal_all(signal.SIGKILL)
                await asyncio.wait(pending, timeout=10)

    def _close_sockets(self, worker: Worker) -> None:
        shared = {id(sock.shared) for sock in self.sockets}
        for own in worker.sockets or ():
            if id(own) not in shared:
                own.close()
        worker.sockets = None

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        for task in self._tasks:
            task.cancel()
        for worker in self.workers:
            loop.remove_reader(worker.notify.fileno())
            worker.notify.close()
            if worker.pidfd >= 0:
                loop.remove_reader(worker.pidfd)
                os.close(worker.pidfd)
            self._close_sockets(worker)
        for sock in self.sockets:
            sock.close()
        shutil.rmtree(self.private, ignore_errors=True)


def _watchdog_usec() -> int:
    interval = systemd.watchdog_interval()
    return int(interval * 2 * 1_000_000) if interval is not None else 0


def _mark_dead(pid: int, directory: Path) -> None:
    """Drop a dead worker's live gauges (its counters stay in the sums)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, str(directory))


def _private_dir() -> Path:
    """An empty directory only this service reads: $RUNTIME_DIRECTORY (systemd) or a temp dir."""
    base = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0] or None
    return Path(tempfile.mkdtemp(prefix="xoauth2-proxy-workers.", dir=base))


def main(config: Config, *, log_level: str | None) -> int:
    """``xoauth2-proxy run`` with ``workers`` > 1 (asyncio: the supervisor does little)."""
    from proxy.server.daemon import StartupError

    try:
        return asyncio.run(_serve(config, log_level))
    except SupervisorError as exc:
        raise StartupError(str(exc)) from None


async def _serve(config: Config, log_level: str | None) -> int:
    from proxy import supervisor_web
    from proxy.server.daemon import StartupError, activated_sockets

    notifier = systemd.Notifier.from_env()
    try:
        passed = systemd.listen_fds()
        activated, metrics_socket = activated_sockets(config, passed)
        sockets = bind(config, activated)
    except (systemd.ActivationError, StartupError, SupervisorError) as exc:
        notifier.status(f"cannot start: {exc}")
        raise StartupError(str(exc)) from None
    sup = Supervisor(config, log_level, notifier, sockets, _private_dir())
    web = None
    try:
        web = await supervisor_web.start(config, sup, metrics_socket)
        return await _supervise(sup)
    finally:
        if web is not None:
            await web.cleanup()
        sup.close()
        notifier.close()


async def _supervise(sup: Supervisor) -> int:
    loop = asyncio.get_running_loop()
    stop, hup = sup.stop_requested, asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, hup.set)
    try:
        for worker in sup.workers:
            loop.add_reader(worker.notify.fileno(), sup.notified, worker)
            sup.spawn(worker)
        interval = systemd.watchdog_interval()
        if interval is not None:
            sup.background(sup.watchdog(interval), "watchdog")
        logs.event(log, logging.INFO, "supervisor_started", workers=len(sup.workers),
                   event_loop=sup.config.runtime.event_loop, runtime_dir=str(sup.private))
        if await _first(sup.all_ready, stop) is sup.all_ready:
            sup.notifier.ready(sup.status())
            logs.event(log, logging.INFO, "ready", workers=len(sup.workers),
                       systemd=True if sup.notifier.enabled else None)
        while await _first(hup, stop) is hup:
            hup.clear()  # SIGHUPs during a reload make one more reload
            await sup.reload()
        await sup.stop()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    if sup.startup_failed is not None:
        raise SupervisorError(f"a worker could not start (exit {sup.startup_failed}); "
                              "its log says why")
    logs.event(log, logging.INFO, "stopped")
    return 0


async def _first(a: asyncio.Event, b: asyncio.Event) -> asyncio.Event:
    """Wait for either event; ``b`` wins a tie (stop before anything else)."""
    if b.is_set():
        return b
    tasks = {asyncio.ensure_future(e.wait()): e for e in (a, b)}
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    return b if b.is_set() else a


__all__ = ["Supervisor", "SupervisorError", "bind", "main"]
