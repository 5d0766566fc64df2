"""Where encrypted envelopes live: the ``Backend`` interface and the file backend.

``TokenStore`` (``proxy.store.store``) does everything that needs a key (unlocking, slots,
re-encryption); a backend only stores each account's envelope as opaque bytes with a version,
so that the file and the database hold the very same bytes and the database sees ciphertext
only. A backend offers:

- ``read(account, known)``: ``(version, bytes)``, or ``(version, None)`` when the record is
  still at version ``known`` (a cheap re-check); ``RecordMissing`` if there is none.
- ``write(account, data, expected)``: replace the record if it is still at version ``expected``
  (``None``: create it; ``REPLACE``: whatever is there); returns the new version. A record
  changed meanwhile raises
  ``VersionConflict`` and is left alone: the caller re-reads and applies its change again. The
  write is all or nothing.
- ``writing(account)``: a context for one read-modify-write cycle (the file backend's flock;
  the database needs none, the version check is its guard).
- ``refresh_lock(account, timeout)``: a per-account lock that other processes and machines
  respect, held across a token refresh; ``LockTimeout``/``StoreUnavailable`` when not granted.
- ``scan()``: every record as ``(where, bytes)``; ``delete(account)``; ``where(account)`` names
  the record in messages; ``close()``.

File backend: one file per account (``proxy.store.names``), written by ``atomic_write`` under
the account's ``.lock`` flock; the version is the file's identity (device, inode, size, mtime).
The refresh lock is a flock on ``<stem>.refresh`` beside the token file (0600, in the 0700 state
directory), a file of its own so that a refresh holding it may still save under ``.lock``.
Flocks bind processes on one machine only: the file store cannot be shared by two machines.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, cast

from proxy.store.atomic import (
    StatKey,
    atomic_write,
    ensure_state_dir,
    file_lock,
    read_regular,
    remove_stale_temps,
    unlink_durably,
)
from proxy.store.errors import CorruptTokenFile, StoreError, TokenFileExists
from proxy.store.format import MAX_FILE_SIZE
from proxy.store.names import LOCK_SUFFIX, SUFFIX, check_account, file_stem

log = logging.getLogger("proxy.store")

Version = object  # opaque to callers: compare with ==
REPLACE = "replace"  # ``write(..., expected=REPLACE)``: overwrite whatever is there
REFRESH_SUFFIX = ".refresh"


class RecordMissing(StoreError):
    """Internal: the backend has no record for the account."""


class VersionConflict(StoreError):
    """Internal: the record changed since it was read; read it again and redo the change."""


class Backend(Protocol):
    kind: str

    def where(self, account: str) -> Path | str: ...

    def read(self, account: str, known: Version | None = None) -> tuple[Version, bytes | None]:
        ...

    def write(self, account: str, data: bytes, expected: Version | None) -> Version: ...

    def writing(self, account: str) -> contextlib.AbstractContextManager[None]: ...

    def refresh_lock(self, account: str,
                     timeout: float) -> contextlib.AbstractContextManager[None]: ...

    def scan(self) -> Iterator[tuple[Path | str, bytes]]: ...

    def delete(self, account: str) -> bool: ...

    def close(self) -> None: ...


class FileBackend:
    """One file per account in a private state directory (see the module docstring)."""

    kind = "file"

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = ensure_state_dir(Path(state_dir))

    def where(self, account: str) -> Path:
        return self.state_dir / (file_stem(check_account(account)) + SUFFIX)

    def read(self, account: str, known: Version | None = None) -> tuple[Version, bytes | None]:
        path = self.where(account)
        try:
            key, data = read_regular(path, MAX_FILE_SIZE, cast(StatKey | None, known))
        except FileNotFoundError:
            raise RecordMissing(account) from None
        except OSError as exc:
            raise CorruptTokenFile(path, f"it cannot be read ({exc.strerror})") from None
        return key, data

    @contextlib.contextmanager
    def writing(self, account: str) -> Iterator[None]:
        path = self.where(account)
        with file_lock(path.with_suffix(LOCK_SUFFIX), path):
            remove_stale_temps(path)
            yield

    def write(self, account: str, data: bytes, expected: Version | None) -> Version:
        """Call inside ``writing(account)``: the flock makes the version check hold (no other
        writer), and keeps the file as written until the version is taken."""
        path = self.where(account)
        if expected is None and os.path.lexists(path):
            raise TokenFileExists(account, path)
        atomic_write(path, data)
        st = os.stat(path, follow_symlinks=False)
        key: StatKey = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        return key

    def refresh_lock(self, account: str, timeout: float) -> contextlib.AbstractContextManager[None]:
        path = self.where(account)
        return file_lock(path.with_suffix(REFRESH_SUFFIX), path, timeout)

    def scan(self) -> Iterator[tuple[Path, bytes]]:
        for name in sorted(os.listdir(self.state_dir)):
            if name.startswith(".") or not name.endswith(SUFFIX):
                continue
            path = self.state_dir / name
            try:
                _, data = read_regular(path, MAX_FILE_SIZE)
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("skipping token file %s: it cannot be read (%s)", path, exc.strerror)
                continue
            assert data is not None
            yield path, data

    def delete(self, account: str) -> bool:
        with self.writing(account):
            return unlink_durably(self.where(account))

    def close(self) -> None:
        return None
