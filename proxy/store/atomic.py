"""File-system mechanics of the token store: a safe state directory, locks, atomic writes.

- ``ensure_state_dir`` creates the directory 0700 or refuses one that others can enter or that
  another user owns, with the command that fixes it.
- ``file_lock`` is an exclusive ``fcntl.flock`` on a per-account lock file; it serialises
  read-modify-write cycles among threads and processes (the daemon and the CLI). Lock files are
  empty and left in place: removing one while another process waits on it would split the lock.
- ``atomic_write`` writes a hidden temp file in the same directory (``O_EXCL``, 0600 from the
  start), fsyncs it, renames it over the target with ``os.replace`` and fsyncs the directory.
  A crash leaves the old file or the new one; on an error the temp file is removed and a
  ``StoreWriteError`` is raised. Temp files a killed writer left behind are swept by the next
  writer of the same account (it holds the lock, so no live writer owns them).
- ``read_regular`` reads a file without following symlinks or blocking on a FIFO, and reports
  an identity of the file (device, inode, size, mtime) so callers can skip unchanged files.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import secrets
import shlex
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from proxy.store.errors import InsecureStateDir, LockTimeout, StoreWriteError

log = logging.getLogger("proxy.store")

TEMP_SUFFIX = ".tmp"
LOCK_TIMEOUT = 30.0

StatKey = tuple[int, int, int, int]


def ensure_state_dir(path: Path) -> Path:
    """Create ``path`` 0700 if missing; refuse it if it is shared or owned by someone else."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(path, 0o700)
            os.chmod(path, 0o700)  # in case the umask removed owner bits
        except FileExistsError:
            pass  # another process created it first; checked below like any directory
    quoted = shlex.quote(str(path))
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise InsecureStateDir(
            path, f"cannot be examined ({exc.strerror})", f"ls -ld {quoted}"
        ) from None
    if stat.S_ISLNK(st.st_mode):
        # Whoever can change the link can point the token files elsewhere.
        real = shlex.quote(os.path.realpath(path))
        raise InsecureStateDir(path, "is a symbolic link",
                               f"set state_dir to the real directory ({real})")
    _check_parents(path)
    if not stat.S_ISDIR(st.st_mode):
        raise InsecureStateDir(path, "is not a directory", f"rm {quoted} or choose another path")
    euid = os.geteuid()
    if st.st_uid != euid:
        raise InsecureStateDir(
            path,
            f"is owned by uid {st.st_uid}, not by this user (uid {euid})",
            f"chown {euid} {quoted} (or run as its owner)",
        )
    if st.st_mode & 0o077:
        raise InsecureStateDir(
            path,
            f"is accessible to group or others (mode {stat.S_IMODE(st.st_mode):04o})",
            f"chmod 700 {quoted}",
        )
    return path


def _check_parents(path: Path) -> None:
    """Refuse a state directory that someone else could rename away and replace: an
    ancestor writable by group or others without the sticky bit (``/tmp``'s 1777 is fine),
    or owned by another user than root or this one."""
    euid = os.geteuid()
    for parent in Path(os.path.abspath(path)).parents:
        try:
            st = os.stat(parent)
        except OSError as exc:
            raise InsecureStateDir(path, f"has a parent {parent} that cannot be examined "
                                         f"({exc.strerror})", f"ls -ld {shlex.quote(str(parent))}"
                                   ) from None
        quoted = shlex.quote(str(parent))
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise InsecureStateDir(
                path,
                f"is inside {parent}, which group or others can write "
                f"(mode {stat.S_IMODE(st.st_mode):04o})",
                f"chmod go-w {quoted} (or choose a state_dir under a private directory)",
            )
        if st.st_uid not in (0, euid):
            raise InsecureStateDir(
                path,
                f"is inside {parent}, owned by uid {st.st_uid} (neither root nor this user)",
                f"choose a state_dir whose parents belong to root or uid {euid}",
            )


def fsync_dir(directory: Path) -> None:
    """Make a rename or unlink in ``directory`` durable; failure is logged, not raised."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        log.warning("could not fsync directory %s: %s", directory, exc.strerror)


@contextmanager
def file_lock(lock_path: Path, target: Path, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    """Hold an exclusive flock on ``lock_path``; errors name ``target`` (the file protected)."""
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise StoreWriteError(
            target, f"cannot open lock file {lock_path}: {exc.strerror}"
        ) from None
    try:
        deadline = time.monotonic() + timeout
        delay = 0.001
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockTimeout(
                        target, f"timed out after {timeout:g}s waiting for lock {lock_path}"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.01)
            except OSError as exc:
                raise StoreWriteError(target, f"cannot lock {lock_path}: {exc.strerror}") from None
        yield
    finally:
        os.close(fd)  # releases the lock


def temp_name(path: Path) -> str:
    return f".{path.name}.{secrets.token_hex(8)}{TEMP_SUFFIX}"


def is_temp_of(name: str, path: Path) -> bool:
    return name.startswith(f".{path.name}.") and name.endswith(TEMP_SUFFIX)


def remove_stale_temps(path: Path) -> None:
    """Remove temp files of ``path`` left by a killed writer; call with the lock held."""
    try:
        names = os.listdir(path.parent)
    except OSError:
        return
    for name in names:
        if is_temp_of(name, path):
            _unlink_quietly(path.parent / name)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _describe(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "no space left on device"
    if exc.errno == errno.EDQUOT:
        return "disk quota exceeded"
    return exc.strerror or str(exc)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` so that readers and crashes see the old or the new file."""
    tmp = path.parent / temp_name(path)
    try:
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600
        )
    except OSError as exc:
        raise StoreWriteError(path, f"cannot create a temporary file: {_describe(exc)}") from None
    try:
        try:
            os.fchmod(fd, 0o600)
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                if written <= 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        _unlink_quietly(tmp)
        raise StoreWriteError(path, _describe(exc)) from None
    except BaseException:
        _unlink_quietly(tmp)
        raise
    fsync_dir(path.parent)


def unlink_durably(path: Path) -> bool:
    """Remove ``path``; True if it existed. Errors become ``StoreWriteError``."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise StoreWriteError(path, f"cannot delete: {_describe(exc)}") from None
    fsync_dir(path.parent)
    return True


def read_regular(
    path: Path, limit: int, known: StatKey | None = None
) -> tuple[StatKey, bytes | None]:
    """Read ``path`` (at most ``limit`` + 1 bytes); data is None if its identity is ``known``.

    Raises FileNotFoundError if it is missing and OSError (with a strerror) if it cannot be
    read, is a symlink, or is not a regular file.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        key: StatKey = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if key == known:
            return key, None
        chunks: list[bytes] = []
        remaining = limit + 1
        while remaining > 0:
            chunk = os.read(fd, min(remaining, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        return key, b"".join(chunks)
    finally:
        os.close(fd)
