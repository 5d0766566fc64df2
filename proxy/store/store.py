"""``TokenStore``: one encrypted envelope per account (a file, or a PostgreSQL row), unlocked
by a password or a service key, with key slots added, removed and rotated here.

Reading, unlocking, writing and the refresh lock are in ``proxy.store.core`` (its docstring has
the concurrency rules); the format is ``proxy.store.format``; backends are
``proxy.store.backend`` (files) and ``proxy.store.pg`` (PostgreSQL); slots and the derived-key
cache are ``proxy.store.slots``; names and the values handed out are ``proxy.store.names``.

Argument errors raise ``TypeError``/``ValueError`` (a non-``Secret`` password, an empty password,
a service key shorter than 32 bytes, an invalid account name); a malformed slot label raises
``SlotError`` so that the CLI reports it like a duplicate label.
"""

from __future__ import annotations

import dataclasses
import hmac
import os
import time
from collections.abc import Callable

from proxy.secret import Secret
from proxy.store.core import WRITER_LOCK_WAIT, StoreCore, Where, same_key_id, slot_label
from proxy.store.errors import CorruptTokenFile, FileReplaced, SlotError, WrongPassword
from proxy.store.format import (
    KIND_KEYFILE,
    KIND_PASSWORD,
    MAX_SLOTS,
    SALT_SIZE,
    SlotRecord,
    TokenDocument,
    decrypt_payload,
    encrypt_payload,
    make_key_id,
)
from proxy.store.names import FileInfo, Unlocked
from proxy.store.pkslot import (
    BrokenSlot,
    new_anchor,
    new_pk_slot,
    open_anchor,
    seal_anchor,
)
from proxy.store.slots import (
    cache_key,
    check_service_key,
    new_keyfile_slot,
    open_slot,
    password_bytes,
    rewrap_all,
    slot_cache_key,
)

TOUCH_INTERVAL = 3600.0

__all__ = ["FileInfo", "TokenStore", "Unlocked"]


class TokenStore(StoreCore):
    """Encrypted per-account envelopes with key slots (see the module docstring)."""

    def upgrade_slot(self, unlocked: Unlocked, password: Secret) -> bool:
        """Rewrite the slot ``password`` opened in the public-key form, at the file's shared
        salt and this store's cost (one derivation, one write), if it is not so already; True
        if the file was rewritten. A file changed meanwhile is left alone (the next login
        tries again)."""
        self._check_unlocked(unlocked)
        secret = password_bytes(password)
        _, doc = self._load(unlocked.account)
        salt = self._file_salt(doc) or os.urandom(SALT_SIZE)
        key = cache_key(salt, self.scrypt)
        wrapping_key = self._keys.derive(key, secret)

        done: list[bool] = []

        def change(path: Where, doc: TokenDocument) -> TokenDocument | None:
            current = doc.slot(unlocked.slot_label)
            if current is None or current.kind != KIND_PASSWORD:
                return None
            if (self._file_salt(doc) or salt) != salt:
                return None
            if current.pk is not None and current.salt == salt and current.scrypt == self.scrypt:
                return None
            if not self._opens(current, secret, unlocked):  # replaced meanwhile
                return None
            doc, anchor = self._with_anchor(path, doc, unlocked)
            fresh = new_pk_slot(current.label, wrapping_key, salt, self.scrypt, anchor,
                                unlocked.data_key, unlocked.account, current.created_at)
            fresh = dataclasses.replace(fresh, last_used_at=current.last_used_at)
            done.append(True)
            return dataclasses.replace(
                doc, slots=tuple(fresh if s is current else s for s in doc.slots))

        self._rewrite(unlocked.account, change, key_id=unlocked.key_id)
        if done:
            self._keys.remember(key, secret, wrapping_key)
        return bool(done)


    # --- slots --------------------------------------------------------------------------

    @staticmethod
    def _with_anchor(path: Where, doc: TokenDocument,
                          unlocked: Unlocked) -> tuple[TokenDocument, bytes]:
        """``doc`` with an anchor (a new one sealed under the data key if it had none) and
        that secret; ``unlocked`` holds ``doc``'s data key (the caller checked the key_id)."""
        if doc.anchor is None:
            secret = new_anchor()
            sealed = seal_anchor(secret, unlocked.data_key, doc.account, doc.key_id)
            return dataclasses.replace(doc, anchor=sealed), secret
        opened = open_anchor(doc, unlocked.data_key)
        if opened is None:
            raise CorruptTokenFile(path, "its anchor does not open with its data key",
                                   opened=True)
        return doc, opened

    def _opens(self, slot: SlotRecord, secret: bytes, unlocked: Unlocked) -> bool:
        """Whether ``secret`` (whose key ``unlock`` cached) still opens ``slot`` to the data key
        of ``unlocked``; no derivation."""
        derived = self._keys.cached(slot_cache_key(slot), secret)
        try:
            opened = None if derived is None else open_slot(derived, slot, unlocked.account)
        except BrokenSlot:
            return False
        return opened is not None and hmac.compare_digest(opened, unlocked.data_key)

    def _precheck_new_slot(self, unlocked: Unlocked, label: str) -> TokenDocument:
        """Fail before paying scrypt; the same checks run again under the lock."""
        path, doc = self._load(unlocked.account)
        if not same_key_id(doc.key_id, unlocked.key_id):
            raise FileReplaced(unlocked.account, path)
        self._check_slot_room(path, doc, label)
        return doc

    @staticmethod
    def _check_slot_room(path: Where, doc: TokenDocument, label: str) -> None:
        if doc.slot(label) is not None:
            raise SlotError(f"a slot labelled {label!r} already exists in {path}")
        if len(doc.slots) >= MAX_SLOTS:
            raise SlotError(f"{path} already has {MAX_SLOTS} slots; remove one first")

    def add_password_slot(self, unlocked: Unlocked, label: str, password: Secret) -> None:
        self._check_unlocked(unlocked)
        slot_label(label)
        if label == "service":  # tools find the service key's slot by this label
            raise SlotError("label 'service' is kept for the service key slot; choose another")
        secret = password_bytes(password)
        if not secret:
            raise ValueError("a slot password must not be empty")
        doc = self._precheck_new_slot(unlocked, label)
        salt = self._file_salt(doc) or os.urandom(SALT_SIZE)
        wrapping_key = self._keys.derive(cache_key(salt, self.scrypt), secret)
        now = time.time()

        def change(path: Where, doc: TokenDocument) -> TokenDocument:
            self._check_slot_room(path, doc, label)
            if (self._file_salt(doc) or salt) != salt:
                raise SlotError(f"{path} changed meanwhile; run the command again")
            doc, anchor = self._with_anchor(path, doc, unlocked)
            slot = new_pk_slot(label, wrapping_key, salt, self.scrypt, anchor,
                               unlocked.data_key, unlocked.account, now)
            return dataclasses.replace(doc, slots=(*doc.slots, slot))

        self._rewrite(unlocked.account, change, key_id=unlocked.key_id)
        self._keys.remember(cache_key(salt, self.scrypt), secret, wrapping_key)

    def add_service_key_slot(self, unlocked: Unlocked, key: bytes, label: str = "service") -> None:
        """Add the (single) keyfile slot; remove an existing one first to rotate the key."""
        self._check_unlocked(unlocked)
        slot_label(label)
        key = check_service_key(key)
        slot = new_keyfile_slot(label, key, unlocked.data_key, unlocked.account, time.time())

        def change(path: Where, doc: TokenDocument) -> TokenDocument:
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

        def change(path: Where, doc: TokenDocument) -> TokenDocument:
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
        reissue: bool = False,
    ) -> tuple[Unlocked, dict[str, Secret]]:
        """Replace the data key: the payload is encrypted under a new one and every slot is
        re-wrapped to it, so no copy of the old file opens the new one with any old secret.

        Every public-key password slot is re-wrapped to its own public key and keeps its
        password; the slot ``password`` opened is written anew in that form; a keyfile slot is
        re-wrapped with ``service_key``, which must open it. An old-form password slot (never
        opened since this release) gets a new password from ``generate``: those are returned
        by label (usually none). ``reissue``: every other password slot gets a new password
        (and key pair) and the file a new anchor, for a removed password whose holder may be
        able to write the file (``slots.rewrap_all``).
        """
        self._check_unlocked(unlocked)
        return self._rotate(unlocked, password, generate, service_key, reissue)

    def _rotate(self, unlocked: Unlocked, password: Secret, generate: Callable[[], Secret],
                service_key: bytes | None, reissue: bool) -> tuple[Unlocked, dict[str, Secret]]:
        keep = password_bytes(password)
        path, doc = self._load(unlocked.account)
        if not same_key_id(doc.key_id, unlocked.key_id):
            raise FileReplaced(unlocked.account, path)
        kept = self._typed_slot(path, doc, unlocked, keep)
        salt = self._file_salt(doc) or os.urandom(SALT_SIZE)
        key = cache_key(salt, self.scrypt)
        kept_key = self._keys.derive(key, keep)
        try:
            made = rewrap_all(doc, unlocked.data_key, (kept.label, keep, salt, kept_key),
                              self.scrypt, generate, service_key, reissue)
        except ValueError as exc:
            raise SlotError(f"{path}: {exc}") from None
        key_id = make_key_id(made.data_key)
        sealed = seal_anchor(made.anchor, made.data_key, doc.account, key_id)
        now = time.time()

        def change(path: Where, current: TokenDocument) -> TokenDocument:
            if _untimed(current.slots) != _untimed(doc.slots):
                raise SlotError(f"the slots of {path} changed meanwhile; run the command again")
            payload = decrypt_payload(current, unlocked.data_key)
            if payload is None:
                raise CorruptTokenFile(path, "the payload or its metadata was altered")
            meta = dataclasses.replace(current.meta, updated_at=now)
            nonce, ciphertext = encrypt_payload(made.data_key, doc.account, key_id, meta, payload)
            return TokenDocument(doc.account, key_id, meta, tuple(made.slots), nonce, ciphertext,
                                 sealed)

        # Under the refresh lock: a refresh in flight saves its rotated token first, and
        # ``change`` re-encrypts what is there then (the slow key derivations are done).
        with self.refresh_lock(unlocked.account, WRITER_LOCK_WAIT):
            new = self._rewrite(unlocked.account, change, key_id=unlocked.key_id)
        kept_salts = {slot_cache_key(s) for s in made.slots if s.kind == KIND_PASSWORD}
        for slot in doc.slots:
            if slot.kind == KIND_PASSWORD and slot_cache_key(slot) not in kept_salts:
                self._keys.forget(slot)
        for fresh, secret, wrapping_key in made.remembered:
            self._keys.remember(slot_cache_key(fresh), secret, wrapping_key)
        return self._opened(path, new, made.data_key, kept.label), made.issued

    def _typed_slot(self, path: Where, doc: TokenDocument, unlocked: Unlocked,
                    secret: bytes) -> SlotRecord:
        """The slot ``unlocked`` was opened with, checked to open with ``secret``."""
        slot = doc.slot(unlocked.slot_label)
        if slot is None or slot.kind != KIND_PASSWORD:
            raise SlotError(f"{path} changed meanwhile; run the command again")
        try:
            opens = open_slot(self._keys.derive(slot_cache_key(slot), secret), slot, doc.account)
        except BrokenSlot as exc:
            raise CorruptTokenFile(path, str(exc), opened=True) from None
        if opens is None or not hmac.compare_digest(opens, unlocked.data_key):
            raise WrongPassword(f"that password does not open slot {slot.label!r}")
        return slot

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
        if not same_key_id(doc.key_id, unlocked.key_id):
            raise FileReplaced(unlocked.account, path)
        slot = doc.slot(unlocked.slot_label)
        if slot is None or self._recent(slot, now):
            return

        def change(path: Where, doc: TokenDocument) -> TokenDocument | None:
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


def _untimed(slots: tuple[SlotRecord, ...]) -> list[SlotRecord]:
    """Slots without their display timestamps (which ``touch_slot`` may change meanwhile)."""
    return [dataclasses.replace(slot, last_used_at=None) for slot in slots]
