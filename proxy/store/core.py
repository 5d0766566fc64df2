"""The token store's core: reading, unlocking and writing envelopes through a backend.

``StoreCore`` holds what every operation needs; ``proxy.store.store.TokenStore`` adds the slot
operations. The backend (``proxy.store.backend``: files; ``proxy.store.pg``: PostgreSQL) keeps
each account's envelope as opaque bytes with a version; the format is ``proxy.store.format``.

Concurrency: readers (``info``, ``unlock``) take no lock, because writers replace records
atomically. Every read-modify-write (``save``, slot changes, ``touch_slot``, ``create``,
``delete``) re-reads the record inside ``backend.writing`` and writes with a version check
(compare-and-swap), redoing its change when another writer came first; so a slot added by the
CLI survives a ``save`` from the daemon, and a ``save`` after a new login fails with
``FileReplaced`` instead of writing the old data key over the new one. The caches are guarded by
locks; methods may be called from several threads at once.

A token refresh runs under ``refresh_lock(account)`` (one refresh per account across processes
and machines) and calls ``reload`` under it, so it never uses a refresh token another process
already rotated. When the backend is unreachable, ``unlock`` falls back to the last envelope it
read (logins with a cached access token go on); writes and the refresh lock raise
``StoreUnavailable``.
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

from proxy.secret import Secret
from proxy.store import slots as slot_module
from proxy.store.backend import REPLACE, Backend, FileBackend, RecordMissing, Version, VersionConflict
from proxy.store.errors import (
    CorruptTokenFile,
    DerivationNeeded,
    FileReplaced,
    SlotError,
    StoreUnavailable,
    TokenFileExists,
    TokenFileMissing,
    WrongPassword,
)
from proxy.store.format import (
    KEY_SIZE,
    KIND_KEYFILE,
    KIND_PASSWORD,
    SALT_SIZE,
    Meta,
    ScryptParams,
    SlotRecord,
    TokenDocument,
    check_label,
    decode,
    decrypt_payload,
    encode,
    encrypt_payload,
    make_key_id,
)
from proxy.store.names import FileInfo, Unlocked, default_scrypt_n
from proxy.store.pkslot import BrokenSlot, new_anchor, new_pk_slot, seal_anchor
from proxy.store.slots import (
    PasswordKeyCache,
    check_service_key,
    new_keyfile_slot,
    open_keyfile_slot,
    open_slot,
    password_bytes,
    shared_salt,
    slot_cache_key,
    slots_fingerprint,
)

log = logging.getLogger("proxy.store")

REFRESH_LOCK_TIMEOUT = 30.0  # how long a refresh waits for another process's refresh
# How long a sign-in or a rotation, already done by a person, waits for a refresh in flight
# (a provider timeout is at most 120 s, an MSAL call may retry once) rather than lose its work.
WRITER_LOCK_WAIT = 300.0
CAS_ATTEMPTS = 20  # a write that keeps losing the version race gives up (temporary)

Where = Path | str
Change = Callable[[Where, TokenDocument], TokenDocument | None]


def same_key_id(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def slot_label(label: str) -> str:
    try:
        return check_label(label)
    except ValueError as exc:
        raise SlotError(str(exc)) from None


class StoreCore:
    """Encrypted per-account envelopes in one backend (see the module docstring)."""

    def __init__(
        self, state_dir: Path | None = None, *, backend: Backend | None = None,
        scrypt_n: int | None = None, scrypt_r: int = 8, scrypt_p: int = 1,
        lock_timeout: float = REFRESH_LOCK_TIMEOUT,
    ) -> None:
        if backend is None:
            if state_dir is None:
                raise ValueError("a token store needs a state directory or a backend")
            backend = FileBackend(state_dir)
        self.backend = backend
        self.state_dir = Path(state_dir) if state_dir is not None else None
        n = default_scrypt_n() if scrypt_n is None else scrypt_n
        self.scrypt = ScryptParams(n, scrypt_r, scrypt_p)
        self.lock_timeout = lock_timeout
        self._absent_salt = os.urandom(SALT_SIZE)
        self._keys = PasswordKeyCache()
        self._lock = threading.Lock()
        self._docs: dict[str, tuple[Version, TokenDocument]] = {}
        self._touched: dict[tuple[str, str, str], float] = {}

    def close(self) -> None:
        self.backend.close()

    # --- reading ------------------------------------------------------------------------

    def path(self, account: str) -> Where:
        """Where the account's envelope lives (a file, or a database row): for messages."""
        return self.backend.where(account)

    def exists(self, account: str) -> bool:
        try:
            self.backend.read(account)
        except RecordMissing:
            return False
        except CorruptTokenFile:
            return True
        return True

    def _invalidate(self, account: str) -> None:
        with self._lock:
            self._docs.pop(account, None)

    def _remember(self, account: str, version: Version, doc: TokenDocument) -> None:
        """The record as just written: the next read re-checks only its version, and during
        an outage unlocking goes on from it. A failed write keeps the previous one (still a
        record that was valid, and the version check sees any change)."""
        with self._lock:
            self._docs[account] = (version, doc)

    def _load_versioned(self, account: str, *, stale_ok: bool = False,
                        ) -> tuple[Version, TokenDocument]:
        """The account's record, reusing the last parse if it is unchanged.

        ``stale_ok``: if the backend is unreachable, the last record read (for unlocking only).
        """
        with self._lock:
            cached = self._docs.get(account)
        where = self.backend.where(account)
        try:
            version, data = self.backend.read(account, cached[0] if cached else None)
        except RecordMissing:
            self._invalidate(account)
            raise TokenFileMissing(account, where) from None
        except StoreUnavailable as exc:
            if stale_ok and cached is not None:
                log.warning("token store unavailable (%s); using the last record read for %r",
                            exc.reason, account)
                return cached
            raise
        except CorruptTokenFile:
            self._invalidate(account)
            raise
        if data is None:
            assert cached is not None
            return cached
        doc = decode(data, where)
        if doc.account != account:
            raise CorruptTokenFile(where, f"it belongs to account {doc.account!r}, not {account!r}")
        self._remember(account, version, doc)
        return version, doc

    def _load(self, account: str, *, stale_ok: bool = False) -> tuple[Where, TokenDocument]:
        _, doc = self._load_versioned(account, stale_ok=stale_ok)
        return self.backend.where(account), doc

    def info(self, account: str) -> FileInfo:
        path, doc = self._load(account)
        return FileInfo(account, path, doc.meta, tuple(slot.info() for slot in doc.slots),
                        doc.key_id)

    def _scan(self) -> Iterator[tuple[Where, TokenDocument]]:
        """Every readable record whose place matches its account; others are logged, skipped."""
        for where, data in self.backend.scan():
            try:
                doc = decode(data, where)
                expected = self.backend.where(doc.account)
            except (CorruptTokenFile, ValueError) as exc:
                log.warning("skipping token record %s: %s", where, exc)
                continue
            if expected != where:
                log.warning("skipping token record %s: it holds account %r, whose place is %s",
                            where, doc.account, expected)
                continue
            yield where, doc

    def accounts(self) -> list[str]:
        """Accounts with a readable record; unreadable or misplaced ones are logged, skipped."""
        return sorted(doc.account for _, doc in self._scan())

    def read_raw(self, account: str) -> bytes:
        """The account's envelope as stored (checked to parse): for moving it elsewhere."""
        _, doc = self._load(account)
        return encode(doc)

    def write_raw(self, account: str, data: bytes, *, replace: bool = False) -> None:
        """Store an envelope from elsewhere as it is (every slot kept); it must parse."""
        doc = decode(data, self.backend.where(account))
        if doc.account != account:
            raise CorruptTokenFile(self.backend.where(account), f"it holds {doc.account!r}")
        with self.backend.writing(account):
            self.backend.write(account, data, REPLACE if replace else None)
        self._invalidate(account)

    # --- unlocking ----------------------------------------------------------------------

    def _opened(self, path: Where, doc: TokenDocument, data_key: bytes, label: str) -> Unlocked:
        if not same_key_id(make_key_id(data_key), doc.key_id):
            raise CorruptTokenFile(path, "its key_id does not match its data key", opened=True)
        payload = decrypt_payload(doc, data_key)
        if payload is None:
            raise CorruptTokenFile(
                path, "the payload or its metadata was altered (authentication failed)",
                opened=True,
            )
        return Unlocked(doc.account, payload, doc.meta, doc.key_id, label, data_key)

    def _file_salt(self, doc: TokenDocument) -> bytes | None:
        return shared_salt(doc.slots, self.scrypt)

    def _pay_for_absent(self, account: str, secret: bytes, derive: bool) -> None:
        """The cost of trying a password where there is no file to try it on: one derivation
        at the store's cost, remembered like a wrong password, so that a missing or unreadable
        file costs what a wrong password costs (first try and repeats alike)."""
        fingerprint = b"absent;" + account.encode("utf-8", "surrogatepass")
        if self._keys.known_wrong(fingerprint, secret):
            return
        if not derive:
            raise DerivationNeeded(account)
        slot_module.scrypt_derive(secret, self._absent_salt, self.scrypt)
        self._keys.wrong(fingerprint, secret)

    def pay_for_absent(self, account: str, password: Secret, *, derive: bool = True) -> None:
        """What ``unlock`` costs for an account without a file (an unconfigured name)."""
        self._pay_for_absent(account, password_bytes(password), derive)

    def unlock(self, account: str, password: Secret, *, derive: bool = True) -> Unlocked:
        """Open the record with a local password: cached keys first, then one scrypt run per
        distinct slot salt (one for a record whose slots share the salt).

        ``derive=False``: never run scrypt; raise ``DerivationNeeded`` where it would be needed.
        A missing or unreadable record costs a derivation too before its error is raised.
        """
        secret = password_bytes(password)
        try:
            path, doc = self._load(account, stale_ok=True)
        except (TokenFileMissing, CorruptTokenFile):
            self._pay_for_absent(account, secret, derive)
            raise
        slots = [slot for slot in doc.slots if slot.kind == KIND_PASSWORD]
        if not slots:
            self._pay_for_absent(account, secret, derive)
            raise WrongPassword(f"the token file of account {account!r} has no password slot")
        file_salt = self._file_salt(doc)
        groups: dict[tuple[bytes, int, int, int], list[SlotRecord]] = {}
        for slot in sorted(slots, key=lambda s: s.salt != file_salt or s.scrypt != self.scrypt):
            groups.setdefault(slot_cache_key(slot), []).append(slot)

        def opened(key: tuple[bytes, int, int, int], derived: bytes) -> Unlocked | None:
            for slot in groups[key]:
                try:
                    data_key = open_slot(derived, slot, account)
                except BrokenSlot as exc:
                    raise CorruptTokenFile(path, str(exc), opened=True) from None
                if data_key is not None:
                    result = self._opened(path, doc, data_key, slot.label)
                    stale = (slot.pk is None or slot.scrypt != self.scrypt
                             or slot.salt != file_salt)
                    return dataclasses.replace(result, stale_slot=stale)
            return None

        for key in groups:
            cached = self._keys.cached(key, secret)
            if cached is not None and (result := opened(key, cached)) is not None:
                return result
        fingerprint = slots_fingerprint(doc.account, doc.slots)
        if self._keys.known_wrong(fingerprint, secret):
            raise WrongPassword(f"wrong password for account {account!r}")
        if not derive:
            raise DerivationNeeded(account)
        for key in groups:
            derived = self._keys.derive(key, secret)
            if (result := opened(key, derived)) is not None:
                self._keys.remember(key, secret, derived)
                return result
        self._keys.wrong(fingerprint, secret)
        raise WrongPassword(f"wrong password for account {account!r}")

    def unlock_with_service_key(self, account: str, key: bytes) -> Unlocked:
        key = check_service_key(key)
        path, doc = self._load(account, stale_ok=True)
        slots = [slot for slot in doc.slots if slot.kind == KIND_KEYFILE]
        if not slots:
            raise WrongPassword(f"the token file of account {account!r} has no keyfile slot")
        for slot in slots:
            data_key = open_keyfile_slot(slot, key, account)
            if data_key is not None:
                return self._opened(path, doc, data_key, slot.label)
        raise WrongPassword(f"the service key does not open the token file of account {account!r}")

    # --- refreshing ---------------------------------------------------------------------

    def refresh_lock(self, account: str,
                     timeout: float | None = None) -> AbstractContextManager[None]:
        """Hold the account's refresh lock (other threads, processes and, with PostgreSQL,
        machines wait). Not granted within ``timeout`` (default ``lock_timeout``): raises
        ``LockTimeout`` or ``StoreUnavailable``. Re-read with ``reload`` once it is held."""
        return self.backend.refresh_lock(account, self.lock_timeout if timeout is None else timeout)

    def reload(self, unlocked: Unlocked) -> Unlocked:
        """The account's current record, opened with the data key ``unlocked`` holds (no
        password needed); ``FileReplaced`` if a new login replaced the data key."""
        self._check_unlocked(unlocked)
        path, doc = self._load(unlocked.account)
        if not same_key_id(doc.key_id, unlocked.key_id):
            raise FileReplaced(unlocked.account, path)
        return self._opened(path, doc, unlocked.data_key, unlocked.slot_label)

    # --- writing ------------------------------------------------------------------------

    def _rewrite(self, account: str, change: Change, *, key_id: str | None) -> TokenDocument:
        """Re-read, check the key_id, apply ``change``, write if the record is unchanged since
        the read (else read and apply again)."""
        where = self.backend.where(account)
        with self.backend.writing(account):
            for _ in range(CAS_ATTEMPTS):
                version, doc = self._load_versioned(account)
                if key_id is not None and not same_key_id(doc.key_id, key_id):
                    raise FileReplaced(account, where)
                new = change(where, doc)
                if new is None:
                    return doc
                try:
                    written = self.backend.write(account, encode(new), version)
                except VersionConflict:
                    continue
                self._remember(account, written, new)
                return new
        raise StoreUnavailable(str(where), "the record kept changing under this write")

    def create(
        self,
        account: str,
        payload: bytes,
        meta: Meta,
        *,
        password: Secret | None,
        label: str = "default",
        service_key: bytes | None = None,
        replace: bool = False,
    ) -> Unlocked:
        """Write a new record: new data key, a password slot ``label`` and/or a keyfile slot.

        The keyfile slot is labelled ``service``. Without ``replace`` an existing record (even
        a corrupt one) is left alone and ``TokenFileExists`` is raised.
        """
        where = self.backend.where(account)
        if password is None and service_key is None:
            raise ValueError("create needs a password, a service key, or both")
        if not isinstance(payload, bytes):
            raise TypeError("the payload is bytes")
        if not replace and self.exists(account):  # fail before paying scrypt; rechecked below
            raise TokenFileExists(account, where)
        data_key = os.urandom(KEY_SIZE)
        key_id = make_key_id(data_key)
        now = time.time()
        slots, remembered = self._first_slots(account, data_key, now, password, label, service_key)
        meta = dataclasses.replace(meta, updated_at=now)
        nonce, ciphertext = encrypt_payload(data_key, account, key_id, meta, payload)
        sealed = None if remembered is None else seal_anchor(
            remembered[3], data_key, account, key_id)
        doc = TokenDocument(account, key_id, meta, tuple(slots), nonce, ciphertext, sealed)
        with self.backend.writing(account):
            written = self.backend.write(account, encode(doc), REPLACE if replace else None)
        self._remember(account, written, doc)
        if remembered is not None:
            slot, secret, wrapping_key, _ = remembered
            self._keys.remember(slot_cache_key(slot), secret, wrapping_key)
        return Unlocked(account, payload, meta, key_id, slots[0].label, data_key)

    def _first_slots(
        self, account: str, data_key: bytes, now: float, password: Secret | None, label: str,
        service_key: bytes | None,
    ) -> tuple[list[SlotRecord], tuple[SlotRecord, bytes, bytes, bytes] | None]:
        """The slots of a new record and, with a password, (its slot, the password, its
        password key, the new anchor)."""
        slots: list[SlotRecord] = []
        remembered: tuple[SlotRecord, bytes, bytes, bytes] | None = None
        if password is not None:
            secret = password_bytes(password)
            if not secret:
                raise ValueError("a slot password must not be empty")
            salt, anchor = os.urandom(SALT_SIZE), new_anchor()
            wrapping_key = slot_module.scrypt_derive(secret, salt, self.scrypt)
            slot = new_pk_slot(slot_label(label), wrapping_key, salt, self.scrypt, anchor,
                               data_key, account, now)
            slots.append(slot)
            remembered = (slot, secret, wrapping_key, anchor)
        if service_key is not None:
            if password is not None and label == "service":
                raise SlotError("label 'service' is taken by the keyfile slot; choose another")
            slots.append(
                new_keyfile_slot("service", check_service_key(service_key), data_key, account, now)
            )
        return slots, remembered

    @staticmethod
    def _check_unlocked(unlocked: Unlocked) -> None:
        if not isinstance(unlocked, Unlocked):
            raise TypeError("expected an Unlocked from this store")
        if not same_key_id(make_key_id(unlocked.data_key), unlocked.key_id):
            raise ValueError("Unlocked.key_id does not belong to Unlocked.data_key")

    def save(self, unlocked: Unlocked, payload: bytes, meta: Meta) -> Unlocked:
        """Re-encrypt ``payload`` and ``meta`` under the same data key, keeping current slots."""
        self._check_unlocked(unlocked)
        if not isinstance(payload, bytes):
            raise TypeError("the payload is bytes")
        meta = dataclasses.replace(meta, updated_at=time.time())
        nonce, ciphertext = encrypt_payload(
            unlocked.data_key, unlocked.account, unlocked.key_id, meta, payload
        )

        def change(path: Where, doc: TokenDocument) -> TokenDocument:
            return dataclasses.replace(
                doc, meta=meta, payload_nonce=nonce, payload_ciphertext=ciphertext
            )

        self._rewrite(unlocked.account, change, key_id=unlocked.key_id)
        return dataclasses.replace(unlocked, payload=payload, meta=meta)

    def set_meta(self, unlocked: Unlocked, meta: Meta) -> Unlocked:
        """Change the metadata only; the payload is the record's current one, not a stale copy."""
        self._check_unlocked(unlocked)
        meta = dataclasses.replace(meta, updated_at=time.time())
        current: list[bytes] = []

        def change(path: Where, doc: TokenDocument) -> TokenDocument:
            payload = decrypt_payload(doc, unlocked.data_key)
            if payload is None:
                raise CorruptTokenFile(path, "the payload or its metadata was altered")
            current[:] = [payload]
            nonce, ciphertext = encrypt_payload(
                unlocked.data_key, unlocked.account, unlocked.key_id, meta, payload
            )
            return dataclasses.replace(
                doc, meta=meta, payload_nonce=nonce, payload_ciphertext=ciphertext
            )

        self._rewrite(unlocked.account, change, key_id=unlocked.key_id)
        return dataclasses.replace(unlocked, payload=current[0], meta=meta)

    def delete(self, account: str) -> bool:
        """Remove the account's record; True if there was one. A file's lock files stay."""
        try:
            _, doc = self._load(account)
        except (TokenFileMissing, CorruptTokenFile):
            doc = None
        existed = self.backend.delete(account)
        self._invalidate(account)
        if doc is not None:
            for slot in doc.slots:
                self._keys.forget(slot)
        return existed
