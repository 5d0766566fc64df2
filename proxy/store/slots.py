"""Key slots: deriving wrapping keys (scrypt, HKDF), wrapping the data key, and the key cache.

A password slot's wrapping key costs one scrypt run (about 0.1 s and 32 MiB at the default
n=2**15). ``PasswordKeyCache`` keeps the derived keys that *opened* a slot, keyed by the slot's
(salt, n, r, p) and checked against a keyed hash of the password, so a password is stretched
once per slot per process; a different password, salt or cost never matches an entry. It also
remembers, per slot, a few passwords that failed, so a client retrying a stale password does not
cost scrypt on every attempt. Concurrent derivations for the same slot run one at a time (striped
locks), so a burst of logins after a restart pays scrypt once, not once per connection.

Secrets in memory (derived keys, data keys) are Python bytes and cannot be wiped; the cache lives
as long as its ``TokenStore``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
import unicodedata
from collections import OrderedDict
from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from proxy.secret import Secret
from proxy.store.format import (
    KEY_SIZE,
    KIND_KEYFILE,
    KIND_PASSWORD,
    NONCE_SIZE,
    SALT_SIZE,
    ScryptParams,
    SlotRecord,
    check_label,
    slot_aad,
)

MIN_SERVICE_KEY = 32
_HKDF_INFO = b"xoauth2-proxy keyfile slot v1"


def password_bytes(password: Secret) -> bytes:
    """The bytes a password is stretched from: UTF-8 of its NFC form."""
    if not isinstance(password, Secret):
        raise TypeError("passwords are passed as proxy.secret.Secret")
    return unicodedata.normalize("NFC", password.reveal()).encode("utf-8", "surrogatepass")


def check_service_key(key: bytes) -> bytes:
    """Return ``key`` if it is usable as a service key (bytes, at least 32 of them)."""
    if not isinstance(key, bytes | bytearray):
        raise TypeError("a service key is bytes")
    if len(key) < MIN_SERVICE_KEY:
        raise ValueError(f"a service key needs at least {MIN_SERVICE_KEY} random bytes")
    return bytes(key)


def scrypt_derive(password: bytes, salt: bytes, params: ScryptParams) -> bytes:
    """The expensive step; tests count calls to this function."""
    return Scrypt(salt=salt, length=KEY_SIZE, n=params.n, r=params.r, p=params.p).derive(password)


def hkdf_derive(service_key: bytes, salt: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=salt, info=_HKDF_INFO).derive(
        service_key
    )


def wrap(
    wrapping_key: bytes, data_key: bytes, account: str, kind: str, label: str
) -> tuple[bytes, bytes]:
    nonce = os.urandom(NONCE_SIZE)
    return nonce, AESGCM(wrapping_key).encrypt(nonce, data_key, slot_aad(account, kind, label))


def unwrap(wrapping_key: bytes, slot: SlotRecord, account: str) -> bytes | None:
    """The data key, or None if ``wrapping_key`` does not open ``slot``."""
    try:
        return AESGCM(wrapping_key).decrypt(
            slot.nonce, slot.wrapped_key, slot_aad(account, slot.kind, slot.label)
        )
    except InvalidTag:
        return None


def new_password_slot(
    label: str, password: bytes, params: ScryptParams, data_key: bytes, account: str, now: float
) -> tuple[SlotRecord, bytes]:
    """A fresh password slot (new salt) and its wrapping key (for the cache)."""
    check_label(label)
    if not password:
        raise ValueError("a slot password must not be empty")
    salt = os.urandom(SALT_SIZE)
    wrapping_key = scrypt_derive(password, salt, params)
    nonce, wrapped = wrap(wrapping_key, data_key, account, KIND_PASSWORD, label)
    slot = SlotRecord(label, KIND_PASSWORD, now, None, salt, params, nonce, wrapped)
    return slot, wrapping_key


def new_keyfile_slot(
    label: str, service_key: bytes, data_key: bytes, account: str, now: float
) -> SlotRecord:
    check_label(label)
    salt = os.urandom(SALT_SIZE)
    nonce, wrapped = wrap(hkdf_derive(service_key, salt), data_key, account, KIND_KEYFILE, label)
    return SlotRecord(label, KIND_KEYFILE, now, None, salt, None, nonce, wrapped)


def open_keyfile_slot(slot: SlotRecord, service_key: bytes, account: str) -> bytes | None:
    return unwrap(hkdf_derive(service_key, slot.salt), slot, account)


_CacheKey = tuple[bytes, int, int, int]
_MISSING = object()
_WRONG = object()


def _cache_key(slot: SlotRecord) -> _CacheKey:
    assert slot.scrypt is not None
    return (slot.salt, slot.scrypt.n, slot.scrypt.r, slot.scrypt.p)


class PasswordKeyCache:
    """Thread-safe memory of scrypt results, per slot (salt, n, r, p) and password."""

    def __init__(self, max_slots: int = 4096, max_wrong_slots: int = 1024) -> None:
        self._pepper = os.urandom(32)
        self._lock = threading.Lock()
        self._good: OrderedDict[_CacheKey, tuple[bytes, bytes]] = OrderedDict()
        self._wrong: OrderedDict[_CacheKey, list[bytes]] = OrderedDict()
        self._max_slots = max_slots
        self._max_wrong_slots = max_wrong_slots
        self._flights = [threading.Lock() for _ in range(64)]

    def _tag(self, key: _CacheKey, password: bytes) -> bytes:
        salt, n, r, p = key
        header = len(salt).to_bytes(4, "big") + salt + b"%d,%d,%d;" % (n, r, p)
        return hmac.new(self._pepper, header + password, hashlib.sha256).digest()

    def _peek(self, key: _CacheKey, tag: bytes) -> object:
        """Caller holds the lock: the cached wrapping key, _WRONG, or _MISSING."""
        entry = self._good.get(key)
        if entry is not None and hmac.compare_digest(entry[0], tag):
            self._good.move_to_end(key)
            return entry[1]
        for known in self._wrong.get(key, ()):
            if hmac.compare_digest(known, tag):
                return _WRONG
        return _MISSING

    def open_cached(
        self, slot: SlotRecord, password: bytes, opener: Callable[[bytes], bytes | None]
    ) -> bytes | None:
        """Open ``slot`` only if a wrapping key for this password is cached; never scrypt."""
        key = _cache_key(slot)
        with self._lock:
            found = self._peek(key, self._tag(key, password))
        return opener(found) if isinstance(found, bytes) else None

    def open(
        self, slot: SlotRecord, password: bytes, opener: Callable[[bytes], bytes | None]
    ) -> bytes | None:
        """Open ``slot`` with ``password``: from the cache if possible, else by scrypt once.

        ``opener`` turns a wrapping key into the data key (or None if it does not fit).
        """
        key = _cache_key(slot)
        tag = self._tag(key, password)
        with self._lock:
            found = self._peek(key, tag)
        if found is _WRONG:
            return None
        if isinstance(found, bytes):
            data_key = opener(found)
            if data_key is not None:
                return data_key
        with self._flights[hash(key) % len(self._flights)]:
            with self._lock:
                found = self._peek(key, tag)
            if found is _WRONG:
                return None
            if isinstance(found, bytes):
                data_key = opener(found)
                if data_key is not None:
                    return data_key
            assert slot.scrypt is not None
            wrapping_key = scrypt_derive(password, slot.salt, slot.scrypt)
            data_key = opener(wrapping_key)
            if data_key is None:
                self._remember_wrong(key, tag)
            else:
                self._remember(key, tag, wrapping_key)
            return data_key

    def remember(self, slot: SlotRecord, password: bytes, wrapping_key: bytes) -> None:
        """Record a key known to open ``slot`` (used right after creating the slot)."""
        key = _cache_key(slot)
        self._remember(key, self._tag(key, password), wrapping_key)

    def _remember(self, key: _CacheKey, tag: bytes, wrapping_key: bytes) -> None:
        with self._lock:
            self._good[key] = (tag, wrapping_key)
            self._good.move_to_end(key)
            self._wrong.pop(key, None)
            while len(self._good) > self._max_slots:
                self._good.popitem(last=False)

    def _remember_wrong(self, key: _CacheKey, tag: bytes) -> None:
        with self._lock:
            tags = self._wrong.setdefault(key, [])
            tags.append(tag)
            del tags[:-8]
            self._wrong.move_to_end(key)
            while len(self._wrong) > self._max_wrong_slots:
                self._wrong.popitem(last=False)

    def forget(self, slot: SlotRecord) -> None:
        """Drop everything known about ``slot`` (after it is removed from its file)."""
        if slot.scrypt is None:
            return
        key = _cache_key(slot)
        with self._lock:
            self._good.pop(key, None)
            self._wrong.pop(key, None)

    def has(self, slot: SlotRecord, password: bytes) -> bool:
        """Whether a wrapping key for (slot, password) is cached; for tests and diagnostics."""
        key = _cache_key(slot)
        with self._lock:
            return isinstance(self._peek(key, self._tag(key, password)), bytes)
