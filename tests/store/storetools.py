"""Shared constants and helpers for the token store tests (file surgery, scrypt counting)."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from proxy.secret import Secret
from proxy.store import Meta

FAST_N = 2**10
ACCOUNT = "alice@example.com"
PASSWORD = Secret("correct horse battery staple")
SERVICE_KEY = bytes(range(32, 64))
PAYLOAD = b'{"RefreshToken": {"rt-1": {"secret": "REFRESH-TOKEN-0123456789abcdef"}}}'
META = Meta(
    identity="alice@example.com",
    flow="device_code",
    access_token_expires_at=1_900_000_000.0,
    refresh_token_present=True,
)


class ScryptCounter:
    """Wraps ``slots.scrypt_derive``; thread-safe call count."""

    def __init__(self, real: Callable[..., bytes]) -> None:
        self.real = real
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, password: bytes, salt: bytes, params: Any) -> bytes:
        with self._lock:
            self.calls += 1
        return self.real(password, salt, params)


def split_file(data: bytes) -> dict[str, Any]:
    line = data.split(b"\n", 1)[0]
    return json.loads(line)


def join_file(body: dict[str, Any]) -> bytes:
    """Serialize a (possibly doctored) body with a valid checksum."""
    line = json.dumps(body, separators=(",", ":")).encode()
    return line + b"\nsha256:" + hashlib.sha256(line).hexdigest().encode() + b"\n"


def doctor(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Edit a token file's JSON in place, keeping the checksum valid."""
    body = split_file(path.read_bytes())
    change(body)
    path.write_bytes(join_file(body))
