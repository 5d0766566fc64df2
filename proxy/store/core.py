"""``TokenStore``: one encrypted token file per account, unlocked by a password or a service key.

The file format is described in ``proxy.store.format``; locking and atomic writes in
``proxy.store.atomic``; slots and the derived-key cache in ``proxy.store.slots``.

File names and the values handed out are in ``proxy.store.names``.

Concurrency: readers (``info``, ``unlock``) take no lock, because writers replace files
atomically. Every read-modify-write (``save``, slot changes, ``touch_slot``, ``create``,
``delete``) holds the account's flock and re-reads the file under it, so a slot added by the CLI
survives a ``save`` from the daemon, and a ``save`` after a new login fails with ``FileReplaced``
instead of writing the old data key over the new one. The key cache and the parsed-file cache are
guarded by locks; ``TokenStore`` methods may be called from several threads at once.

Argument errors raise ``TypeError``/``ValueError`` (a non-``Secret`` password, an empty password,
a service key shorter than 32 bytes, an invalid account name); a malformed slot label raises
``SlotError`` so that the CLI reports it like a duplicate label.
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from proxy.secret import Secret
from proxy.store import slots as slot_module
from proxy.store.atomic import (
    StatKey,
    atomic_write,
    ensure_state_dir,
    file_lock,
    read_regular,
    remove_stale_temps,
    unlink_durably,
)
from proxy.store.errors import (
    CorruptTokenFile,
    DerivationNeeded,
    FileReplaced,
    SlotError,
    TokenFileExists,
    TokenFileMissing,
    WrongPassword,
)
from proxy.store.format import (
    KEY_SIZE,
    KIND_KEYFILE,
    KIND_PASSWORD,
    MAX_FILE_SIZE,
    MAX_SLOTS,
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
from proxy.store.names import (
    LOCK_SUFFIX,
    SUFFIX,
    FileInfo,
    Unlocked,
    check_account,
    default_scrypt_n,
    file_stem,
)
from proxy.store.slots import (
    PasswordKeyCache,
    cache_key,
    check_service_key,
    new_keyfile_slot,
    new_password_slot,
    open_keyfile_slot,
    password_bytes,
    rewrap_all,
    shared_salt,
    slot_cache_key,
    slots_fingerprint,
    unwrap,
)

log = logging.getLogger("proxy.store")

TOUCH_INTERVAL = 3600.0


def _same_key_id(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def _slot_label(label: str) -> str:
    try:
        return check_label(label)
    except ValueError as exc:
        raise SlotError(str(exc)) from None


class TokenStore:
    """Encrypted per-account token files in one state directory (see the module docstring)."""

    def __init__(
        self, state_dir: Path, *, scrypt_n: int | None = None, scrypt_r: int = 8, scrypt_p: int = 1
    ) -> None:
        self.state_dir = ensure_state_dir(Path(state_dir))
        n = default_scrypt_n() if scrypt_n is None else scrypt_n
        self.scrypt = ScryptParams(n, scrypt_r, scrypt_p)
        self._absent_salt = os.urandom(SALT_SIZE)
        self._keys = PasswordKeyCache()
        self._lock = threading.Lock()
        self._docs: dict[Path, tuple[StatKey, TokenDocument]] = {}
        self._touched: dict[tuple[str, str, str], float] = {}

    # --- paths and reading --------------------------------------------------------------

    def path(self, account: str) -> Path:
        return self.state_dir / (file_stem(check_account(account)) + SUFFIX)

    def _lock_path(self, path: Path) -> Path:
        return path.with_suffix(LOCK_SUFFIX)

    def exists(self, account: str) -> bool:
        return os.path.lexists(self.path(account))

    def _invalidate(self, path: Path) -> None:
        with self._lock:
            self._docs.pop(path, None)

    def _read_path(self, path: Path) -> TokenDocument:
        """Parse ``path``, reusing the last parse if the file is unchanged.

        Raises FileNotFoundError or ``CorruptTokenFile``.
        """
        with self._lock:
            cached = self._docs.get(path)
        try:
            key, data = read_regular(path, MAX_FILE_SIZE, cached[0] if cached else None)
        except FileNotFoundError:
            self._invalidate(path)
            raise
        except OSError as exc:
            self._invalidate(path)
            raise CorruptTokenFile(path, f"it cannot be read ({exc.strerror})") from None
        if data is None:
            assert cached is not None
            return cached[1]
        doc = decode(data, path)
        with self._lock:
            self._docs[path] = (key, doc)
        return doc

    def _load(self, account: str) -> tuple[Path, TokenDocument]:
        path = self.path(account)
        try:
            doc = self._read_path(path)
        except FileNotFoundError:
            raise TokenFileMissing(account, path) from None
        if doc.account != account:
            raise CorruptTokenFile(path, f"it belongs to account {doc.account!r}, not {account!r}")
        return path, doc

    def info(self, account: str) -> FileInfo:
        path, doc = self._load(account)
        return FileInfo(account, path, doc.meta, tuple(slot.info() for slot in doc.slots))

    def accounts(self) -> list[str]:
        """Accounts with a readable file; unreadable or misnamed files are logged and skipped."""
        found = []
        for name in sorted(os.listdir(self.state_dir)):
            if name.startswith(".") or not name.endswith(SUFFIX):
                continue
            path = self.state_dir / name
            try:
                doc = self._read_path(path)
                expected = self.path(doc.account)
            except FileNotFoundError:
                continue
            except (CorruptTokenFile, ValueError) as exc:
                log.warning("skipping token file %s: %s", path, exc)
                continue
            if expected != path:
                log.warning(
                    "skipping token file %s: it holds account %r, whose file is %s",
                    path,
                    doc.account,
                    expected.name,
                )
                continue
            found.append(doc.account)
        return sorted(found)

    # --- unlocking ----------------------------------------------------------------------

    def _opened(self, path: Path, doc: TokenDocument, data_key: bytes, label: str) -> Unlocked:
        if not _same_key_id(make_key_id(data_key), doc.key_id):
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
        """Open the file with a local password: cached keys first, then one scrypt run per
        distinct slot salt (one for a file whose slots share the salt).

        ``derive=False``: never run scrypt; raise ``DerivationNeeded`` where it would be needed.
        A missing or unreadable file costs a derivation too before its error is raised.
        """
        secret = password_bytes(password)
        try:
            path, doc = self._load(account)
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
                data_key = unwrap(derived, slot, account)
                if data_key is not None:
                    result = self._opened(path, doc, data_key, slot.label)
                    stale = slot.scrypt != self.scrypt or slot.salt != file_salt
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

    def upgrade_slot(self, unlocked: Unlocked, password: Secret) -> bool:
        """Move the slot ``password`` opened to the file's shared salt and this store's cost
        (one derivation, one write); True if the file was rewritten. A file changed meanwhile
        is left alone (the next login tries again)."""
        self._check_unlocked(unlocked)
        secret = password_bytes(password)
        _, doc = self._load(unlocked.account)
        salt = self._file_salt(doc) or os.urandom(SALT_SIZE)
        key = cache_key(salt, self.scrypt)
        wrapping_key = self._keys.derive(key, secret)

        done: list[bool] = []

        def change(path: Path, doc: TokenDocument) -> TokenDocument | None:
            current = doc.slot(unlocked.slot_label)
            if current is None or current.kind != KIND_PASSWORD:
                return None
            if (self._file_salt(doc) or salt) != salt:
                return None
            if current.salt == salt and current.scrypt == self.scrypt:
                return None
            fresh, _ = new_password_slot(current.label, secret, self.scrypt, unlocked.data_key,
                                         unlocked.account, current.created_at, salt=salt,
                                         wrapping_key=wrapping_key)
            fresh = dataclasses.replace(fresh, last_used_at=current.last_used_at)
            done.append(True)
            return dataclasses.replace(
                doc, slots=tuple(fresh if s is current else s for s in doc.slots))

        self._rewrite(unlocked.account, change, key_id=unlocked.key_id)
        if done:
            self._keys.remember(key, secret, wrapping_key)
        return bool(done)

    def unlock_with_service_key(self, account: str, key: bytes) -> Unlocked:
        key = check_service_key(key)
        path, doc = self._load(account)
        slots = [slot for slot in doc.slots if slot.kind == KIND_KEYFILE]
        if not slots:
            raise WrongPassword(f"the token file of account {account!r} has no keyfile slot")
        for slot in slots:
            data_key = open_keyfile_slot(slot, key, account)
            if data_key is not None:
                return self._opened(path, doc, data_key, slot.label)
        raise WrongPassword(f"the service key does not open the token file of account {account!r}")

    # --- writing ------------------------------------------------------------------------

    def _rewrite(
        self,
        account: str,
        change: Callable[[Path, TokenDocument], TokenDocument | None],
        *,
        key_id: str | None,
    ) -> TokenDocument:
        """Under the account's lock: re-read, check the key_id, apply ``change``, write."""
        path = self.path(account)
        with file_lock(self._lock_path(path), path):
            remove_stale_temps(path)
            _, doc = self._load(account)
            if key_id is not None and not _same_key_id(doc.key_id, key_id):
                raise FileReplaced(account, path)
            new = change(path, doc)
            if new is None:
                return doc
            try:
                atomic_write(path, encode(new))
            finally:
                self._invalidate(path)
            return new

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
        """Write a new file: new data key, a password slot ``label`` and/or a keyfile slot.

        The keyfile slot is labelled ``service``. Without ``replace`` an existing file (even a
        corrupt one) is left alone and ``TokenFileExists`` is raised.
        """
        path = self.path(account)
        if password is None and service_key is None:
            raise ValueError("create needs a password, a service key, or both")
        if not isinstance(payload, bytes):
            raise TypeError("the payload is bytes")
        if not replace and os.path.lexists(path):  # fail before paying scrypt; rechecked below
            raise TokenFileExists(account, path)
        data_key = os.urandom(KEY_SIZE)
        key_id = make_key_id(data_key)
        now = time.time()
        slots: list[SlotRecord] = []
        remembered: tuple[SlotRecord, bytes, bytes] | None = None
        if password is not None:
            secret = password_bytes(password)
            if not secret:
                raise ValueError("a slot password must not be empty")
            slot, wrapping_key = new_password_slot(
                _slot_label(label), secret, self.scrypt, data_key, account, now
            )
            slots.append(slot)
            remembered = (slot, secret, wrapping_key)
        if service_key is not None:
            if password is not None and label == "service":
                raise SlotError("label 'service' is taken by the keyfile slot; choose another")
            slots.append(
                new_keyfile_slot("service", check_service_key(service_key), data_key, account, now)
            )
        meta = dataclasses.replace(meta, updated_at=now)
        nonce, ciphertext = encrypt_payload(data_key, account, key_id, meta, payload)
        doc = TokenDocument(account, key_id, meta, tuple(slots), nonce, ciphertext)
        with file_lock(self._lock_path(path), path):
            remove_stale_temps(path)
            if not replace and os.path.lexists(path):
                raise TokenFileExists(account, path)
            try:
                atomic_write(path, encode(doc))
            finally:
                self._invalidate(path)
        if remembered is not None:
            slot, secret, wrapping_key = remembered
            self._keys.remember(slot_cache_key(slot), secret, wrapping_key)
        return Unlocked(account, payload, meta, key_id, slots[0].label, data_key)

    @staticmethod
    def _check_unlocked(unlocked: Unlocked) -> None:
        if not isinstance(unlocked, Unlocked):
            raise TypeError("expected an Unlocked from this store")
        if not _same_key_id(make_key_id(unlocked.data_key), unlocked.key_id):
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

        def change(path: Path, doc: TokenDocument) -> TokenDocument:
            return dataclasses.replace(
                doc, meta=meta, payload_nonce=nonce, payload_ciphertext=ciphertext
            )

        self._rewrite(unlocked.account, change, key_id=unlocked.key_id)
        return dataclasses.replace(unlocked, payload=payload, meta=meta)

    def set_meta(self, unlocked: Unlocked, meta: Meta) -> Unlocked:
        """Change the metadata only; the payload is the file's current one, not a stale copy."""
        self._check_unlocked(unlocked)
        meta = dataclasses.replace(meta, updated_at=time.time())
        current: list[bytes] = []

        def change(path: Path, doc: TokenDocument) -> TokenDocument:
            payload = decrypt_payload(doc, unlocked.data_key)
            if payload is None:
                raise CorruptTokenFile(path, "the payload or its metadata was altered")
            current.append(payload)
            nonce, ciphertext = encrypt_payload(
                unlocked.data_key, unlocked.account, unlocked.key_id, meta, payload
            )
            return dataclasses.replace(
                doc, meta=meta, payload_nonce=nonce, payload_ciphertext=ciphertext
            )

        self._rewrite(unlocked.account, change, key_id=unlocked.key_id)
        return dataclasses.replace(unlocked, payload=current[0], meta=meta)

    # --- slots --------------------------------------------------------------------------

    def _precheck_new_slot(self, unlocked: Unlocked, label: str) -> TokenDocument:
        """Fail before paying scrypt; the same checks run again under the lock."""
        path, doc = self._load(unlocked.account)
        if not _same_key_id(doc.key_id, unlocked.key_id):
            raise FileReplaced(unlocked.account, path)
        self._check_slot_room(path, doc, label)
        return doc

    @staticmethod
    def _check_slot_room(path: Path, doc: TokenDocument, label: str) -> None:
        if doc.slot(label) is not None:
            raise SlotError(f"a slot labelled {label!r} already exists in {path}")
        if len(doc.slots) >= MAX_SLOTS:
            raise SlotError(f"{path} already has {MAX_SLOTS} slots; remove one first")

    def add_password_slot(self, unlocked: Unlocked, label: str, password: Secret) -> None:
        self._check_unlocked(unlocked)
        _slot_label(label)
        if label == "service":  # tools find the service key's slot by this label
            raise SlotError("label 'service' is kept for the service key slot; choose another")
        secret = password_bytes(password)
        if not secret:
            raise ValueError("a slot password must not be empty")
        doc = self._precheck_new_slot(unlocked, label)
        salt = self._file_salt(doc)
        slot, wrapping_key = new_password_slot(
            label, secret, self.scrypt, unlocked.data_key, unlocked.account, time.time(),
            salt=salt,
            wrapping_key=None if salt is None else self._keys.derive(
                cache_key(salt, self.scrypt), secret),
        )

        def change(path: Path, doc: TokenDocument) -> TokenDocument:
            self._check_slot_room(path, doc, label)
            if (self._file_salt(doc) or slot.salt) != slot.salt:
                raise SlotError(f"{path} changed meanwhile; run the command again")
            return dataclasses.replace(doc, slots=(*doc.slots, slot))

        self._rewrite(unlocked.account, change, key_id=unlocked.key_id)
        self._keys.remember(slot_cache_key(slot), secret, wrapping_key)

    def add_service_key_slot(self, unlocked: Unlocked, key: bytes, label: str = "service") -> None:
        """Add the (single) keyfile slot; remove an existing one first to rotate the key."""
        self._check_unlocked(unlocked)
        _slot_label(label)
        key = check_service_key(key)
        slot = new_keyfile_slot(label, key, unlocked.data_key, unlocked.account, time.time())

        def change(path: Path, doc: TokenDocument) -> TokenDocument:
            self._check_slot_room(path, doc, label)
            for other in doc.slots:
                if other.kind == KIND_KEYFILE:
                    raise SlotError(
                        f"{path} already has a keyfile slot ({other.label!r}); remove it first"
                    )
            return dataclasses.replace(doc, slots=(*doc.slots, slot))

        self._rewrite(unlocked.account, change, key_id=unlocked.key_id)

    def remove_slot(self, account: str, label: str) -> None:
        """Remove a slot by label; access to the file is the authority. Never the last slot."""
        removed: list[SlotRecord] = []

        def change(path: Path, doc: TokenDocument) -> TokenDocument:
            slot = doc.slot(label)
            if slot is None:
                labels = ", ".join(repr(other.label) for other in doc.slots)
                raise SlotError(f"no slot labelled {label!r} in {path} (slots: {labels})")
            if len(doc.slots) == 1:
                raise SlotError(
                    f"{label!r} is the last slot of {path}; add another slot first, "
                    "or delete the account's tokens (logout)"
                )
            removed.append(slot)
            return dataclasses.replace(
                doc, slots=tuple(other for other in doc.slots if other.label != label)
            )

        self._rewrite(account, change, key_id=None)
        self._keys.forget(removed[0])

    def rotate(
        self,
        unlocked: Unlocked,
        password: Secret,
        *,
        generate: Callable[[], Secret],
        service_key: bytes | None = None,
    ) -> tuple[Unlocked, dict[str, Secret]]:
        """Replace the data key: the payload is encrypted under a new one and every slot is
        written anew, so no copy of the old file opens the new one with any old secret.

        The slot ``password`` opened keeps that password; every other password slot gets a new
        one from ``generate`` (returned by label: a slot's old wrapping key cannot be derived
        without its password, and keeping it would let a revoked password's old file copy open
        the new key); a keyfile slot is re-wrapped with ``service_key``, which must open it.
        """
        self._check_unlocked(unlocked)
        keep = password_bytes(password)
        path, doc = self._load(unlocked.account)
        if not _same_key_id(doc.key_id, unlocked.key_id):
            raise FileReplaced(unlocked.account, path)
        kept = doc.slot(unlocked.slot_label)
        if kept is None or kept.kind != KIND_PASSWORD:
            raise SlotError(f"{path} changed meanwhile; run the command again")
        try:
            data_key, slots, issued, remembered = rewrap_all(
                doc.slots, doc.account, kept.label, keep, self.scrypt, generate, service_key)
        except ValueError as exc:
            raise SlotError(f"{path}: {exc}") from None
        key_id = make_key_id(data_key)
        labels = [slot.label for slot in doc.slots]
        now = time.time()

        def change(path: Path, current: TokenDocument) -> TokenDocument:
            if [slot.label for slot in current.slots] != labels:
                raise SlotError(f"the slots of {path} changed meanwhile; run the command again")
            payload = decrypt_payload(current, unlocked.data_key)
            if payload is None:
                raise CorruptTokenFile(path, "the payload or its metadata was altered")
            meta = dataclasses.replace(current.meta, updated_at=now)
            nonce, ciphertext = encrypt_payload(data_key, doc.account, key_id, meta, payload)
            return TokenDocument(doc.account, key_id, meta, tuple(slots), nonce, ciphertext)

        new = self._rewrite(unlocked.account, change, key_id=unlocked.key_id)
        for slot in doc.slots:
            self._keys.forget(slot)
        for fresh, secret, wrapping_key in remembered:
            self._keys.remember(slot_cache_key(fresh), secret, wrapping_key)
        opened = self._opened(path, new, data_key, kept.label)
        return opened, issued

    def touch_slot(self, unlocked: Unlocked) -> None:
        """Record that ``unlocked.slot_label`` was used; writes at most once an hour per slot.

        A slot removed meanwhile is ignored; a replaced file raises ``FileReplaced``.
        """
        now = time.time()
        seen = (unlocked.account, unlocked.key_id, unlocked.slot_label)
        with self._lock:
            last = self._touched.get(seen)
            if last is not None and 0 <= now - last < TOUCH_INTERVAL:
                return
            self._touched[seen] = now
        path, doc = self._load(unlocked.account)
        if not _same_key_id(doc.key_id, unlocked.key_id):
            raise FileReplaced(unlocked.account, path)
        slot = doc.slot(unlocked.slot_label)
        if slot is None or self._recent(slot, now):
            return

        def change(path: Path, doc: TokenDocument) -> TokenDocument | None:
            current = doc.slot(unlocked.slot_label)
            if current is None or self._recent(current, now):
                return None
            touched = dataclasses.replace(current, last_used_at=now)
            return dataclasses.replace(
                doc, slots=tuple(touched if s is current else s for s in doc.slots)
            )

        self._rewrite(unlocked.account, change, key_id=unlocked.key_id)

    @staticmethod
    def _recent(slot: SlotRecord, now: float) -> bool:
        last = slot.last_used_at
        return last is not None and 0 <= now - last < TOUCH_INTERVAL

    def delete(self, account: str) -> bool:
        """Remove the account's token file; True if there was one. The lock file stays."""
        path = self.path(account)
        try:
            _, doc = self._load(account)
        except (TokenFileMissing, CorruptTokenFile):
            doc = None
        with file_lock(self._lock_path(path), path):
            remove_stale_temps(path)
            existed = unlink_durably(path)
        self._invalidate(path)
        if doc is not None:
            for slot in doc.slots:
                self._keys.forget(slot)
        return existed
