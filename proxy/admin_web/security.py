"""The admin page's locks: the admin password (only its scrypt hash is stored), sessions,
CSRF tokens and the response headers every page carries.

The password file holds one line, ``scrypt$N$r$p$SALT$HASH`` (base64), mode 0600, written
by ``xoauth2-proxy admin-password``. A session is a random 256-bit cookie (``HttpOnly``,
``SameSite=Strict``, ``Secure`` when the page is served over TLS) that maps to a server-side
record with its own CSRF token; sessions live in memory only and end when the daemon stops.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

from proxy.secret import Secret
from proxy.store.atomic import atomic_write

COOKIE = "xoauth2_proxy_admin"
PRE_COOKIE = "xoauth2_proxy_admin_login"  # the sign-in form's CSRF token (double submit)
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
MIN_PASSWORD = 12
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "Cross-Origin-Opener-Policy": "same-origin",
}


class PasswordFileError(Exception):
    pass


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=32,
                          maxmem=256 * 1024 * 1024)


def hash_password(password: Secret) -> str:
    salt = secrets.token_bytes(16)
    digest = _scrypt(password.reveal(), salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    b64 = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def write_password_file(path: Path, password: Secret) -> None:
    if len(password.reveal()) < MIN_PASSWORD:
        raise PasswordFileError(f"the admin password needs at least {MIN_PASSWORD} characters")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write(path, (hash_password(password) + "\n").encode("ascii"))
    os.chmod(path, 0o600)


def check_password(path: Path, password: str) -> bool:
    """Whether ``password`` matches the hash in ``path`` (False if there is none)."""
    try:
        kind, n, r, p, salt, digest = path.read_text("ascii").strip().split("$")
        if kind != "scrypt":
            return False
        expected = base64.b64decode(digest, validate=True)
        actual = _scrypt(password, base64.b64decode(salt, validate=True), int(n), int(r), int(p))
    except (OSError, ValueError):
        return False
    return hmac.compare_digest(actual, expected)


@dataclass
class Session:
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    expires_at: float = 0.0
    shown: dict[str, str] = field(default_factory=dict)  # a new device password, shown once


class Sessions:
    def __init__(self, lifetime: float) -> None:
        self.lifetime = lifetime
        self._by_id: dict[str, Session] = {}

    def create(self) -> tuple[str, Session]:
        self._expire()
        sid = secrets.token_urlsafe(32)
        session = self._by_id[sid] = Session(expires_at=time.time() + self.lifetime)
        return sid, session

    def get(self, sid: str | None) -> Session | None:
        self._expire()
        return self._by_id.get(sid) if sid else None

    def end(self, sid: str | None) -> None:
        if sid:
            self._by_id.pop(sid, None)

    def _expire(self) -> None:
        now = time.time()
        for sid in [s for s, v in self._by_id.items() if v.expires_at <= now]:
            del self._by_id[sid]


def same_token(given: object, expected: str) -> bool:
    return isinstance(given, str) and hmac.compare_digest(given.encode(), expected.encode())
