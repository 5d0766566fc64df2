"""The Graph spool folder, ``state_dir/graph-spool`` (0700), and what a killed process left in it.

Each process that spools messages there takes a lock file of its own first: created under a
temporary name, locked (``flock``), then renamed to ``lock-TOKEN``, so every ``lock-`` file
another process can see is locked for as long as its owner lives. The process's spool files
are named ``msg-TOKEN-…`` (and a decoded part ``msg-TOKEN-….part``). On its first use of the
folder a process removes the files of every token whose lock it can take: their owner is gone
(killed in the middle of a message; the client was never told ``250`` and sends again). A
lock, unlike a process id, is not fooled by a process id used again after a restart (a
container's daemon is process 1 every time) nor blind across containers sharing the folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import os
import secrets
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from proxy import logs

log = logging.getLogger("proxy.graph")

T = TypeVar("T")

_OWN: dict[Path, str] = {}  # spool folder -> this process's token
_FDS: list[int] = []  # this process's lock files, held open (and locked) until it exits
_LOCK = threading.Lock()


def spool_dir(state_dir: Path) -> Path:
    """``state_dir/graph-spool`` (0700); on its first use here, the lock, then the sweep."""
    path = state_dir / "graph-spool"
    with _LOCK:
        if path in _OWN:
            return path
        path.mkdir(mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)
        _OWN[path] = token = _take_lock(path)
    removed = remove_orphans(path, token)
    if removed:
        logs.event(log, logging.INFO, "graph_spool_orphans_removed", files=removed,
                   where=str(path))
    return path


async def in_thread(function: Callable[..., T], *args: object,
                    undo: Callable[[T], object] | None = None) -> T:
    """``function(*args)`` in a worker thread. A cancel waits for the thread to end before it
    goes on (then ``undo`` gets what the thread made), so a spool file the thread creates is
    never created after its caller's clean-up already ran."""
    future = asyncio.get_running_loop().run_in_executor(None, functools.partial(function, *args))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        while not future.done():  # through further cancels too (EOF, then the lost connection)
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([future])
        if undo is not None and not future.cancelled() and future.exception() is None:
            try:
                undo(future.result())
            except OSError as exc:
                logs.event(log, logging.WARNING, "graph_spool_cleanup_failed", error=str(exc))
        raise


def spool_prefix(path: Path) -> str:
    """The name prefix of this process's spool files in ``path`` (``spool_dir`` first)."""
    return f"msg-{_OWN[path]}-"


def _take_lock(path: Path) -> str:
    token = secrets.token_hex(8)
    temporary = path / f".lock-{token}"
    fd = os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.rename(temporary, path / f"lock-{token}")
    _FDS.append(fd)
    return token


def remove_orphans(path: Path, own: str) -> int:
    """Remove the spool and lock files of every process that is gone; the number removed.

    The spool files are listed first: each was made after its owner's lock file was in place,
    so an owner whose lock is missing or free now is gone, and a process that starts
    meanwhile has no file in the list."""
    spooled: dict[str, list[str]] = {}
    for entry in os.scandir(path):
        if entry.name.startswith("msg-") and entry.name.count("-") >= 2:
            spooled.setdefault(entry.name.split("-", 2)[1], []).append(entry.path)
    dead = {token for token in spooled if token != own and not _held(path / f"lock-{token}")}
    removed = 0
    for token in dead:
        for file in spooled[token]:
            removed += _unlink(file)
    for entry in os.scandir(path):  # lock files of processes gone without a spool file
        if (entry.name.startswith("lock-") and entry.name[5:] != own
                and not _held(Path(entry.path))):
            removed += _unlink(entry.path)
    return removed


def _held(lock: Path) -> bool:
    """Whether a live process holds ``lock``; a lock file found free is removed."""
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        _unlink(str(lock))
        return False
    finally:
        os.close(fd)


def _unlink(file: str) -> int:
    try:
        os.unlink(file)
    except FileNotFoundError:
        return 0
    return 1
