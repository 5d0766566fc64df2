"""Service key files: the secret behind a token file's ``keyfile`` slot.

A service key file holds raw bytes and its whole content, byte for byte, is the key: no
encoding, no trailing-newline stripping. It must hold at least 32 bytes and at most 4096.
``generate_key_file`` writes 32 bytes from ``os.urandom`` (raw, not base64), mode 0600, and never
overwrites. Equivalent by hand: ``(umask 077; head -c 32 /dev/urandom > service.key)``.
With systemd, pass it as a credential (``LoadCredential=NAME`` finds ``/etc/credstore/NAME``)
and point the config at ``/run/credentials/xoauth2-proxy.service/NAME``; a missing one is
reported as the credential systemd did not pass (``proxy.systemd.missing_credential``).
"""

from __future__ import annotations

import errno
import logging
import os
import shlex
import stat
from pathlib import Path

from proxy.store.atomic import fsync_dir
from proxy.store.errors import KeyFileError
from proxy.store.slots import MIN_SERVICE_KEY
from proxy.systemd import missing_credential

log = logging.getLogger("proxy.store")

MAX_SERVICE_KEY = 4096
GENERATED_KEY_SIZE = 32


def read_key_file(path: Path) -> bytes:
    """Return the service key in ``path``; ``KeyFileError`` says what is wrong and how to fix it.

    A key file that group or others can access is refused (the key opens the tokens alone).
    """
    path = Path(path)
    quoted = shlex.quote(str(path))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        advice = (missing_credential(path)  # under systemd: a credential it did not pass
                  or f"create one with: (umask 077; head -c 32 /dev/urandom > {quoted})")
        raise KeyFileError(f"service key file {path} does not exist; {advice}") from None
    except OSError as exc:
        raise KeyFileError(f"cannot open service key file {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"service key file {path} is not a regular file")
        if st.st_size > MAX_SERVICE_KEY:
            raise KeyFileError(
                f"service key file {path} is {st.st_size} bytes; a key file holds "
                f"{MIN_SERVICE_KEY} to {MAX_SERVICE_KEY} bytes (is this the right file?)"
            )
        data = os.read(fd, MAX_SERVICE_KEY + 1)
    except OSError as exc:
        raise KeyFileError(f"cannot read service key file {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) < MIN_SERVICE_KEY:
        raise KeyFileError(
            f"service key file {path} holds {len(data)} bytes; it needs at least "
            f"{MIN_SERVICE_KEY} random bytes: (umask 077; head -c 32 /dev/urandom > {quoted})"
        )
    if st.st_mode & 0o077:
        raise KeyFileError(
            f"service key file {path} is accessible to group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {quoted}"
        )
    return data


def generate_key_file(path: Path) -> None:
    """Write 32 random raw bytes to a new file ``path``, mode 0600; refuse to overwrite."""
    path = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise KeyFileError(f"{path} already exists; not overwriting a key file") from None
    except OSError as exc:
        raise KeyFileError(f"cannot create service key file {path}: {exc.strerror}") from None
    try:
        try:
            os.fchmod(fd, 0o600)
            data = os.urandom(GENERATED_KEY_SIZE)
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        try:
            os.unlink(path)
        except OSError:
            pass
        raise KeyFileError(f"cannot write service key file {path}: {exc.strerror}") from None
    fsync_dir(path.parent)
