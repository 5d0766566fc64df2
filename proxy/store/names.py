"""Token file names, the account names that can have one, the scrypt cost new slots get, and
the two values ``TokenStore`` hands out (``FileInfo``, ``Unlocked``).

File names: ``<prefix>-<hash>.tokens`` where ``prefix`` is the account name with every character
outside ``A-Za-z0-9._@+-`` replaced by ``_``, cut to 40 characters, without leading dots or
dashes, and ``hash`` is the first 16 hex digits of SHA-256 of the UTF-8 account name. The name
cannot leave the state directory whatever the account name; the file itself records the account
and a file holding another account is refused (``CorruptTokenFile``). Beside each token file is an
empty ``<prefix>-<hash>.lock`` used only for ``flock``.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from proxy.store.format import Meta, SlotInfo

log = logging.getLogger("proxy.store")

SUFFIX = ".tokens"
LOCK_SUFFIX = ".lock"
MAX_ACCOUNT_LENGTH = 320
_UNSAFE = re.compile(r"[^A-Za-z0-9._@+-]")
DEFAULT_SCRYPT_N = 2**17  # with r=8, p=1: 128 MiB per derivation (OWASP's minimum)
TEST_SCRYPT_N_ENV = "XOAUTH2_PROXY_INSECURE_TEST_SCRYPT_N"


def default_scrypt_n() -> int:
    """``DEFAULT_SCRYPT_N``, unless the environment variable ``TEST_SCRYPT_N_ENV`` names a lower
    cost. That variable exists for test suites only: a config file cannot set it, and a store
    that uses it says so in its debug log."""
    value = os.environ.get(TEST_SCRYPT_N_ENV)
    if not value:
        return DEFAULT_SCRYPT_N
    n = int(value)
    log.debug("%s=%d: password slots are written at a cost meant for tests", TEST_SCRYPT_N_ENV, n)
    return n


@dataclass(frozen=True)
class FileInfo:
    """What can be known about an account's file without a secret (display data only)."""

    account: str
    path: Path | str  # a file, or a database row (PostgreSQL backend)
    meta: Meta
    slots: tuple[SlotInfo, ...]
    key_id: str = ""  # names the data key (format.py); a new login or a rotation changes it


@dataclass(frozen=True)
class Unlocked:
    """An opened token file: the decrypted payload and the data key to write it back."""

    account: str
    payload: bytes = field(repr=False)
    meta: Meta
    key_id: str
    slot_label: str
    data_key: bytes = field(repr=False, compare=False)
    stale_slot: bool = field(default=False, compare=False)  # see ``TokenStore.upgrade_slot``


def check_account(account: object) -> str:
    """Return ``account`` if it can name a token file, else raise TypeError/ValueError."""
    if not isinstance(account, str):
        raise TypeError("an account name is a str")
    if not account or len(account) > MAX_ACCOUNT_LENGTH:
        raise ValueError(f"an account name has 1 to {MAX_ACCOUNT_LENGTH} characters")
    if account != account.strip():
        raise ValueError(f"account name {account!r} has leading or trailing spaces")
    if any(unicodedata.category(char) in ("Cc", "Cs") for char in account):
        raise ValueError(f"account name {account!r} contains control characters")
    return account


@functools.lru_cache(maxsize=1024)
def file_stem(account: str) -> str:
    """``<readable prefix>-<16 hex of SHA-256>``; safe as a file name for any account."""
    prefix = re.sub(r"^[.-]+", "", _UNSAFE.sub("_", account)[:40]) or "account"
    return f"{prefix}-{hashlib.sha256(account.encode('utf-8')).hexdigest()[:16]}"
