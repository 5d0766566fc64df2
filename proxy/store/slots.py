"""Key slots: deriving wrapping keys (scrypt, HKDF), wrapping the data key, and the key cache.

Password slots of one file share one salt and cost (the file's *password salt*): a slot's
password key is scrypt(password, salt, n, r, p) itself. A password slot seals an X25519 private
key under it and has the data key wrapped to the public key (``proxy.store.pkslot``), so that
``rotate`` can re-wrap every slot without its password; slots of the old form (version 1 files)
wrap the data key under the password key directly, still open, and are converted to the
public-key form when their password next opens them. A GCM tag (with the label in its
associated data) tells which slot a password opens. So trying a password costs one
scrypt run however many device passwords the file holds; slots from files written before the
salt was shared (one salt per slot) still open, at one run per distinct salt, and are moved to
the shared salt when their password next opens them.

The default cost is n=2**17, r=8, p=1 (128 MiB, about 0.4 s). ``PasswordKeyCache`` keeps the
derived keys that *opened* a slot, keyed by (salt, n, r, p) and a keyed hash of the password,
so a password is stretched once per file per process; a different password, salt or cost never
matches an entry. It also remembers passwords that opened nothing, per set of slots, so a client
retrying a stale password does not cost scrypt on every attempt. Concurrent derivations for the
same salt run one at a time (striped locks).

Secrets in memory (derived keys, data keys) are Python bytes and cannot be wiped; the cache lives
as long as its ``TokenStore``.
"""

from __future__ import annotations

import dataclasses
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
    TokenDocument,
    check_label,
    slot_aad,
)
from proxy.store.pkslot import (
    new_anchor,
    new_pk_slot,
    open_anchor,
    open_pk_slot,
    rewrap_pk_slot,
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
    """The data key, or None if ``wrapping_key`` does not open ``slot`` directly (a keyfile
    slot or an old-form password slot)."""
    try:
        return AESGCM(wrapping_key).decrypt(
            slot.nonce, slot.wrapped_key, slot_aad(account, slot.kind, slot.label)
        )
    except InvalidTag:
        return None


def open_slot(wrapping_key: bytes, slot: SlotRecord, account: str) -> bytes | None:
    """The data key if the password key ``wrapping_key`` opens the password slot ``slot``;
    ``pkslot.BrokenSlot`` if it opens an altered public-key slot."""
    if slot.pk is not None:
        return open_pk_slot(wrapping_key, slot, account)
    return unwrap(wrapping_key, slot, account)


def new_password_slot(
    label: str,
    password: bytes,
    params: ScryptParams,
    data_key: bytes,
    account: str,
    now: float,
) -> tuple[SlotRecord, bytes]:
    """An old-form password slot (the data key wrapped under the password key, own salt) and
    its password key. This release writes public-key slots only (``new_pk_slot``); this is the
    reference for the version 1 form, which tests build files with."""
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


def shared_salt(slots: tuple[SlotRecord, ...], params: ScryptParams) -> bytes | None:
    """The salt password slots share at cost ``params`` (None: no slot has that cost yet)."""
    for slot in slots:
        if slot.kind == KIND_PASSWORD and slot.scrypt == params:
            return slot.salt
    return None


def slots_fingerprint(account: str, slots: tuple[SlotRecord, ...]) -> bytes:
    """Names a file's set of password slots (a wrong password is remembered per set)."""
    digest = hashlib.sha256(account.encode())
    for slot in slots:
        if slot.kind == KIND_PASSWORD and slot.scrypt is not None:
            s = slot.scrypt
            digest.update(slot.salt + b"%d,%d,%d" % (s.n, s.r, s.p) + slot.nonce
                          + slot.wrapped_key)
            if slot.pk is not None:
                digest.update(slot.pk.public_key + slot.pk.private_sealed)
    return digest.digest()


@dataclasses.dataclass(frozen=True)
class Rewrapped:
    """What ``rewrap_all`` made: the new data key and anchor, the slots, the passwords
    issued (by label) and, per slot made anew, (slot, password, password key) for the cache."""

    data_key: bytes
    anchor: bytes
    slots: list[SlotRecord]
    issued: dict[str, Secret]
    remembered: list[tuple[SlotRecord, bytes, bytes]]


def rewrap_all(
    doc: TokenDocument,
    old_key: bytes,
    kept: tuple[str, bytes, bytes, bytes],
    params: ScryptParams,
    generate: Callable[[], Secret],
    service_key: bytes | None,
    reissue: bool = False,
) -> Rewrapped:
    """Every slot of ``doc`` around a new data key (``TokenStore.rotate``). ``kept``: (label,
    password, salt, password key at ``salt``/``params``) of the slot whose password was given,
    made anew in the public-key form. Every other public-key slot is re-wrapped to its own
    public key (its password keeps working); an old-form password slot gets a new password
    from ``generate`` (returned by label: it cannot be re-wrapped without its password); a
    keyfile slot is re-wrapped with ``service_key``, which must open it (ValueError otherwise).

    ``reissue``: a new anchor, and every other password slot gets a new password and key pair.
    A removed password's holder knows the old anchor; with write access to the file it could
    wrap a key of its own to the slots' public keys, so only this shuts it out entirely.
    """
    kept_label, kept_password, salt, kept_key = kept
    anchor = new_anchor() if doc.anchor is None or reissue else open_anchor(doc, old_key)
    if anchor is None:
        raise ValueError("its anchor does not open with its data key (altered)")
    done = Rewrapped(os.urandom(KEY_SIZE), anchor, [], {}, [])
    for slot in doc.slots:
        if slot.kind == KIND_KEYFILE:
            fresh = _rewrap_keyfile(slot, doc.account, service_key, done.data_key)
        elif slot.pk is not None and slot.label != kept_label and not reissue:
            fresh = rewrap_pk_slot(slot, anchor, done.data_key, doc.account)
        else:
            if slot.label == kept_label:
                secret, wrapping_key = kept_password, kept_key
            else:
                done.issued[slot.label] = generate()
                secret = password_bytes(done.issued[slot.label])
                wrapping_key = scrypt_derive(secret, salt, params)
            fresh = new_pk_slot(slot.label, wrapping_key, salt, params, anchor,
                                done.data_key, doc.account, slot.created_at)
            done.remembered.append((fresh, secret, wrapping_key))
        done.slots.append(dataclasses.replace(fresh, last_used_at=slot.last_used_at))
    return done


def _rewrap_keyfile(slot: SlotRecord, account: str, service_key: bytes | None,
                    data_key: bytes) -> SlotRecord:
    if service_key is None:
        raise ValueError(f"it has a service-key slot ({slot.label!r}) and no service key "
                         "is configured to re-wrap it; set the account's "
                         "service_key_file or remove the slot first")
    if open_keyfile_slot(slot, check_service_key(service_key), account) is None:
        raise ValueError("the configured service key does not open its service-key "
                         "slot; remove that slot first")
    return new_keyfile_slot(slot.label, service_key, data_key, account, slot.created_at)


_CacheKey = tuple[bytes, int, int, int]


def cache_key(salt: bytes, params: ScryptParams) -> _CacheKey:
    return (salt, params.n, params.r, params.p)


def slot_cache_key(slot: SlotRecord) -> _CacheKey:
    assert slot.scrypt is not None
    return cache_key(slot.salt, slot.scrypt)


class PasswordKeyCache:
    """Thread-safe memory of scrypt results, per (salt, n, r, p) and password.

    ``derive`` stretches a password at most once at a time per (salt, cost) (striped locks);
    only keys that opened a slot are kept (``remember``). Wrong passwords are remembered per
    *set of slots* (``wrong``/``known_wrong``): a new slot added elsewhere changes the set, so a
    password that was wrong before is tried again.
    """

    def __init__(self, max_keys: int = 4096, max_wrong: int = 8192) -> None:
        self._pepper = os.urandom(32)
        self._lock = threading.Lock()
        self._good: OrderedDict[tuple[_CacheKey, bytes], bytes] = OrderedDict()
        self._wrong: OrderedDict[bytes, None] = OrderedDict()
        self._max_keys = max_keys
        self._max_wrong = max_wrong
        self._flights = [threading.Lock() for _ in range(64)]

    def _tag(self, key: _CacheKey, password: bytes) -> bytes:
        salt, n, r, p = key
        header = len(salt).to_bytes(4, "big") + salt + b"%d,%d,%d;" % (n, r, p)
        return hmac.new(self._pepper, header + password, hashlib.sha256).digest()

    def cached(self, key: _CacheKey, password: bytes) -> bytes | None:
        """The scrypt output for (key, password) if it is known to open a slot."""
        entry = (key, self._tag(key, password))
        with self._lock:
            found = self._good.get(entry)
            if found is not None:
                self._good.move_to_end(entry)
            return found

    def derive(self, key: _CacheKey, password: bytes) -> bytes:
        """scrypt(password, salt, cost), from the cache if known; one run at a time per key."""
        found = self.cached(key, password)
        if found is not None:
            return found
        with self._flights[hash(key) % len(self._flights)]:
            found = self.cached(key, password)
            if found is not None:
                return found
            salt, n, r, p = key
            return scrypt_derive(password, salt, ScryptParams(n, r, p))

    def remember(self, key: _CacheKey, password: bytes, derived: bytes) -> None:
        """Record a derived key known to open a slot."""
        entry = (key, self._tag(key, password))
        with self._lock:
            self._good[entry] = derived
            self._good.move_to_end(entry)
            while len(self._good) > self._max_keys:
                self._good.popitem(last=False)

    def _wrong_tag(self, fingerprint: bytes, password: bytes) -> bytes:
        return hmac.new(self._pepper, b"wrong;" + len(fingerprint).to_bytes(4, "big")
                        + fingerprint + password, hashlib.sha256).digest()

    def known_wrong(self, fingerprint: bytes, password: bytes) -> bool:
        """Whether ``password`` already failed against exactly this set of slots."""
        tag = self._wrong_tag(fingerprint, password)
        with self._lock:
            return tag in self._wrong

    def wrong(self, fingerprint: bytes, password: bytes) -> None:
        tag = self._wrong_tag(fingerprint, password)
        with self._lock:
            self._wrong[tag] = None
            self._wrong.move_to_end(tag)
            while len(self._wrong) > self._max_wrong:
                self._wrong.popitem(last=False)

    def forget(self, slot: SlotRecord) -> None:
        """Drop the derived keys of ``slot``'s salt and cost (after it left its file)."""
        if slot.scrypt is None:
            return
        key = slot_cache_key(slot)
        with self._lock:
            for entry in [entry for entry in self._good if entry[0] == key]:
                del self._good[entry]

    def has(self, slot: SlotRecord, password: bytes) -> bool:
        """Whether a derived key for (slot, password) is cached; for tests and diagnostics."""
        return self.cached(slot_cache_key(slot), password) is not None
