"""Public-key password slots (format version 2): the data key is wrapped to a slot's X25519
public key, and the slot's private key is sealed under its password's scrypt key.

So a slot can be re-wrapped to a new data key without its password (``TokenStore.rotate``
keeps every device's password), while opening it still needs the password: scrypt (one run per
guess for all slots sharing the file's salt) opens the sealed private key, whose GCM tag alone
tells which slot a password opens; ECDH with the wrap's ephemeral public key and HKDF then give
the key that unwraps the data key. The HKDF input includes the file's *anchor* (sealed in
each slot with the private key, and under the data key in the file), so write access to the
file alone cannot wrap a data key of its choosing to a slot. The layout and the associated data
are specified in ``proxy.store.format``.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from proxy.store.format import (
    KEY_SIZE,
    KIND_PASSWORD,
    NONCE_SIZE,
    ScryptParams,
    SealedKeyPair,
    SlotRecord,
    TokenDocument,
    anchor_aad,
    private_key_aad,
    slot_aad,
)

_WRAP_INFO = b"xoauth2-proxy public-key slot v2"


class BrokenSlot(ValueError):
    """A slot's private key opened but its wrap does not: the slot was altered."""


def _lp(*parts: bytes) -> bytes:
    return b"".join(len(part).to_bytes(4, "big") + part for part in parts)


def _wrap_key(shared: bytes, anchor: bytes, account: str, label: str, ephemeral: bytes,
              public: bytes) -> bytes:
    info = _lp(_WRAP_INFO, account.encode(), label.encode(), ephemeral, public)
    return HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=None, info=info).derive(
        shared + anchor)


def new_anchor() -> bytes:
    return os.urandom(KEY_SIZE)


def seal_anchor(anchor: bytes, data_key: bytes, account: str,
                     key_id: str) -> tuple[bytes, bytes]:
    """The file's ``anchor`` field: the anchor under the data key."""
    nonce = os.urandom(NONCE_SIZE)
    return nonce, AESGCM(data_key).encrypt(nonce, anchor, anchor_aad(account, key_id))


def open_anchor(doc: TokenDocument, data_key: bytes) -> bytes | None:
    """The file's anchor; None if it has none or it does not open with ``data_key``."""
    if doc.anchor is None:
        return None
    nonce, sealed = doc.anchor
    try:
        return AESGCM(data_key).decrypt(nonce, sealed, anchor_aad(doc.account, doc.key_id))
    except InvalidTag:
        return None


def _wrap_to(public: bytes, anchor: bytes, data_key: bytes, account: str,
             label: str) -> tuple[bytes, bytes, bytes]:
    """(ephemeral public key, nonce, wrapped data key) for the slot with key ``public``."""
    ephemeral = X25519PrivateKey.generate()
    ephemeral_public = ephemeral.public_key().public_bytes_raw()
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(public))
    key = _wrap_key(shared, anchor, account, label, ephemeral_public, public)
    nonce = os.urandom(NONCE_SIZE)
    wrapped = AESGCM(key).encrypt(nonce, data_key, slot_aad(account, KIND_PASSWORD, label))
    return ephemeral_public, nonce, wrapped


def new_pk_slot(label: str, wrapping_key: bytes, salt: bytes, params: ScryptParams,
                anchor: bytes, data_key: bytes, account: str, now: float) -> SlotRecord:
    """A public-key password slot: a new key pair, its private key (and the anchor)
    sealed under ``wrapping_key`` (the password's scrypt key at ``salt``/``params``), the
    data key wrapped to its public key."""
    private = X25519PrivateKey.generate()
    public = private.public_key().public_bytes_raw()
    private_nonce = os.urandom(NONCE_SIZE)
    sealed = AESGCM(wrapping_key).encrypt(
        private_nonce, private.private_bytes_raw() + anchor,
        private_key_aad(account, KIND_PASSWORD, label, public))
    ephemeral, nonce, wrapped = _wrap_to(public, anchor, data_key, account, label)
    pair = SealedKeyPair(public, private_nonce, sealed, ephemeral)
    return SlotRecord(label, KIND_PASSWORD, now, None, salt, params, nonce, wrapped, pair)


def rewrap_pk_slot(slot: SlotRecord, anchor: bytes, data_key: bytes,
                   account: str) -> SlotRecord:
    """``slot`` wrapping ``data_key`` instead (a fresh ephemeral key; no password needed)."""
    assert slot.pk is not None
    ephemeral, nonce, wrapped = _wrap_to(slot.pk.public_key, anchor, data_key, account,
                                         slot.label)
    pair = SealedKeyPair(slot.pk.public_key, slot.pk.private_nonce, slot.pk.private_sealed,
                         ephemeral)
    return SlotRecord(slot.label, slot.kind, slot.created_at, slot.last_used_at, slot.salt,
                      slot.scrypt, nonce, wrapped, pair)


def open_pk_slot(wrapping_key: bytes, slot: SlotRecord, account: str) -> bytes | None:
    """The data key, or None if ``wrapping_key`` does not open the slot's private key;
    ``BrokenSlot`` if it does and the rest of the slot does not verify."""
    pair = slot.pk
    assert pair is not None
    try:
        opened = AESGCM(wrapping_key).decrypt(
            pair.private_nonce, pair.private_sealed,
            private_key_aad(account, slot.kind, slot.label, pair.public_key))
    except InvalidTag:
        return None
    private = X25519PrivateKey.from_private_bytes(opened[:KEY_SIZE])
    if private.public_key().public_bytes_raw() != pair.public_key:
        raise BrokenSlot(f"slot {slot.label!r}: its public key is not its private key's")
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(pair.ephemeral_key))
        key = _wrap_key(shared, opened[KEY_SIZE:], account, slot.label, pair.ephemeral_key,
                        pair.public_key)
        return AESGCM(key).decrypt(slot.nonce, slot.wrapped_key,
                                   slot_aad(account, slot.kind, slot.label))
    except (InvalidTag, ValueError):  # ValueError: a low-order ephemeral key
        raise BrokenSlot(f"slot {slot.label!r}: its password opens it but its wrapped key "
                         "does not verify (altered)") from None
