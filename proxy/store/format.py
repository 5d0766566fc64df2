"""The token file format, versions 1 and 2: layout, strict parser, serializer and payload crypto.

A token file is two ASCII lines::

    {"format":"xoauth2-proxy-tokens","version":2,"account":...,...}\\n
    sha256:<64 lowercase hex digits of SHA-256 over the first line's bytes, newline excluded>\\n

The checksum is not security (anyone can recompute it); it tells a damaged or truncated file
(``CorruptTokenFile``) apart from a wrong password (``WrongPassword``), which would otherwise
look the same to AES-GCM. The first line is one JSON object (no NaN/Infinity, no duplicate keys,
no unknown keys; bytes as standard base64 with padding)::

    format    "xoauth2-proxy-tokens"                  (anything else: not our file)
    version   1 or 2                                  (anything else: unsupported version)
    account   the account name, exactly as configured (must match the name asked for)
    key_id    24 hex digits: HMAC-SHA256(data_key, "xoauth2-proxy key id v1")[:12];
              names the data key without revealing it; a new login makes a new one
    meta      clear, readable without a secret; authenticated (see payload AAD):
                identity                 signed-in user name or null
                flow                     "device_code", "auth_code", "client_credentials", ...
                access_token_expires_at  epoch seconds or null
                refresh_token_present    true/false
                needs_reauth             null or a short reason ("AADSTS50173: ...")
                updated_at               epoch seconds of the last payload or meta write
                resources                (only when known) list of "outlook", "graph"
    slots     list, 1..32 entries, each wrapping the same data key:
                label         [A-Za-z0-9][A-Za-z0-9._@+-]{0,63}, unique in the file
                kind          "password" or "keyfile" (at most one keyfile slot)
                created_at    epoch seconds
                last_used_at  epoch seconds or null (display only, updated at most hourly)
                kdf           password: {"name":"scrypt","salt":16 bytes,"n":..,"r":..,"p":..}
                              keyfile:  {"name":"hkdf-sha256","salt":16 bytes}
                public_key    (public-key password slots only, version 2) 32 bytes, X25519
                private_key   (idem) {"nonce": 12 bytes, "ciphertext": 80 bytes =
                              AES-256-GCM(password slot wrapping key, nonce,
                                          X25519 private key || anchor, private-key AAD)}
                ephemeral_key (idem) 32 bytes, the X25519 public key of the last wrap
                nonce         12 bytes
                wrapped_key   48 bytes = AES-256-GCM(wrapping key, nonce, data_key, slot AAD)
    anchor    (version 2 only, required there) {"nonce": 12 bytes, "ciphertext": 48 bytes =
              AES-256-GCM(data_key, nonce, the file's anchor, anchor AAD)}
    payload   {"nonce": 12 bytes, "ciphertext": AES-256-GCM(data_key, nonce, cache, payload AAD)}

A file is written as version 2 exactly when it has an anchor (from its first public-key
slot on), else as version 1, so a file an older release can read stays readable by it until it
holds something that release cannot use; a version 1 file holds no public-key slot. An older
release refuses a version 2 file as an unsupported version.

Keys and associated data (AAD); ``P(x)`` is x prefixed by its 4-byte big-endian length:

- data key: 32 random bytes per login (``create``) and per ``rotate``; never in the clear.
- password slot wrapping key: scrypt(UTF-8 of the NFC-normalised password, salt, n, r, p),
  32 bytes. Defaults n=2**17, r=8, p=1; accepted when reading: n a power of two in
  [2**10, 2**20], r in [1, 16], p in [1, 16], 128*n*r <= 1 GiB. An old-form password slot
  (no public_key) wraps the data key under it directly; a public-key slot seals its private key
  under it, so its wrapping key is the public-key wrap below.
- public-key wrap: an ephemeral X25519 key pair, ECDH with the slot's public key, then
  HKDF-SHA256(ikm = shared secret || anchor, no salt, info = P("xoauth2-proxy
  public-key slot v2") P(account) P(label) P(ephemeral public key) P(slot public key)), 32 bytes.
  Re-wrapping a slot to a new data key needs its public key and the anchor, not its
  password (``rotate``); opening it needs the password.
- anchor: the file's 32 random bytes, kept across rotations. Without it nobody can wrap a
  data key of their choosing to a slot's public key, so write access to the file alone cannot
  plant a data key that device passwords open; whoever once opened the file knows it.
- keyfile slot wrapping key: HKDF-SHA256(service key, salt, info "xoauth2-proxy keyfile slot v1").
- slot AAD:        P("xoauth2-proxy-tokens") P("1") P("slot") P(account) P(kind) P(label)
- private-key AAD: P("xoauth2-proxy-tokens") P("1") P("slot private key") P(account) P(kind)
                   P(label) P(public_key)
- anchor AAD:      P("xoauth2-proxy-tokens") P("1") P("anchor") P(account) P(key_id)
- payload AAD:     P("xoauth2-proxy-tokens") P("1") P("payload") P(account) P(key_id)
                   P(canonical meta: JSON with sorted keys, no spaces, ASCII, floats as repr)

The "1" in every AAD names the AAD scheme, not the file version: version 2 keeps it, so a
version 1 file's slots and payload open unchanged once it becomes version 2. The payload, the
account name, the key_id and the metadata are authenticated by the data key: unlocking a file
whose meta was edited fails with ``CorruptTokenFile``. A slot's label and kind are authenticated,
a public key by the private-key AAD (and checked against the private key it decrypts to).
Slot timestamps are display data and are not authenticated. Which slot a password opens is told
by a GCM tag alone (the slot's wrapped_key, or for a public-key slot its private_key); a
public-key slot whose private key opens but whose wrap does not is ``CorruptTokenFile``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import re
import struct
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from proxy.store.errors import CorruptTokenFile
from proxy.store.records import (
    KEY_SIZE,
    KIND_KEYFILE,
    KIND_PASSWORD,
    NONCE_SIZE,
    PUBLIC_KEY_SIZE,
    SALT_SIZE,
    SCRYPT_MAX_MEMORY,
    SCRYPT_N_MAX,
    SCRYPT_N_MIN,
    SEALED_PRIVATE_SIZE,
    WRAPPED_SIZE,
    Meta,
    ScryptParams,
    SealedKeyPair,
    SlotInfo,
    SlotRecord,
    TokenDocument,
    _finite,
    b64,
    check_label,
)

__all__ = [
    "KEY_SIZE", "KIND_KEYFILE", "KIND_PASSWORD", "MAGIC", "MAX_FILE_SIZE", "MAX_SLOTS",
    "NONCE_SIZE", "PUBLIC_KEY_SIZE", "SALT_SIZE", "SCRYPT_MAX_MEMORY", "SCRYPT_N_MAX",
    "SCRYPT_N_MIN", "SEALED_PRIVATE_SIZE", "VERSION", "VERSIONS", "WRAPPED_SIZE", "Meta",
    "ScryptParams", "SealedKeyPair", "SlotInfo", "SlotRecord", "TokenDocument", "check_label",
    "decode", "decrypt_payload", "encode", "encrypt_payload", "make_key_id", "payload_aad",
    "private_key_aad", "slot_aad", "anchor_aad",
]

MAGIC = "xoauth2-proxy-tokens"
VERSION = 2  # the newest version this code writes (only for files with an anchor)
VERSIONS = (1, 2)
MAX_FILE_SIZE = 16 * 1024 * 1024
MAX_SLOTS = 32

_KEY_ID_RE = re.compile(r"[0-9a-f]{24}")
_CHECKSUM_RE = re.compile(rb"sha256:([0-9a-f]{64})")
_KEY_ID_INFO = b"xoauth2-proxy key id v1"


# --- AAD, key id and payload encryption -------------------------------------------------


def _aad(*parts: bytes) -> bytes:
    return b"".join(struct.pack(">I", len(part)) + part for part in parts)


_AAD_HEAD = (MAGIC.encode(), b"1")  # the AAD scheme; unchanged by format version 2


def slot_aad(account: str, kind: str, label: str) -> bytes:
    return _aad(*_AAD_HEAD, b"slot", account.encode(), kind.encode(), label.encode())


def private_key_aad(account: str, kind: str, label: str, public_key: bytes) -> bytes:
    return _aad(*_AAD_HEAD, b"slot private key", account.encode(), kind.encode(), label.encode(),
                public_key)


def anchor_aad(account: str, key_id: str) -> bytes:
    return _aad(*_AAD_HEAD, b"anchor", account.encode(), key_id.encode())


def payload_aad(account: str, key_id: str, meta: Meta) -> bytes:
    return _aad(*_AAD_HEAD, b"payload", account.encode(), key_id.encode(), meta.canonical())


def make_key_id(data_key: bytes) -> str:
    """Non-secret name of a data key: truncated HMAC of a constant under it."""
    return hmac.new(data_key, _KEY_ID_INFO, hashlib.sha256).hexdigest()[:24]


def encrypt_payload(
    data_key: bytes, account: str, key_id: str, meta: Meta, payload: bytes
) -> tuple[bytes, bytes]:
    nonce = os.urandom(NONCE_SIZE)
    return nonce, AESGCM(data_key).encrypt(nonce, payload, payload_aad(account, key_id, meta))


def decrypt_payload(doc: TokenDocument, data_key: bytes) -> bytes | None:
    """The plaintext payload, or None if the tag does not verify."""
    try:
        aad = payload_aad(doc.account, doc.key_id, doc.meta)
        return AESGCM(data_key).decrypt(doc.payload_nonce, doc.payload_ciphertext, aad)
    except InvalidTag:
        return None


# --- serialization ----------------------------------------------------------------------


def encode(doc: TokenDocument) -> bytes:
    """Serialize ``doc`` into the two-line file format."""
    body = {
        "format": MAGIC,
        "version": 1 if doc.anchor is None else VERSION,
        "account": doc.account,
        "key_id": doc.key_id,
        "meta": doc.meta.to_json(),
        "slots": [slot.to_json() for slot in doc.slots],
        "payload": {
            "nonce": b64(doc.payload_nonce),
            "ciphertext": b64(doc.payload_ciphertext),
        },
    }
    if doc.anchor is not None:
        nonce, sealed = doc.anchor
        body["anchor"] = {"nonce": b64(nonce), "ciphertext": b64(sealed)}
    line = json.dumps(body, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()
    return line + b"\nsha256:" + hashlib.sha256(line).hexdigest().encode() + b"\n"


class _Bad(Exception):
    """Internal: the parser's reason for rejecting a file."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _Bad(f"duplicate key {key!r}")
        result[key] = value
    return result


def _reject_constant(name: str) -> None:
    raise _Bad(f"non-finite number {name}")


def _load_json(line: bytes) -> Any:
    try:
        return json.loads(
            line.decode("ascii"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_reject_constant,
        )
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise _Bad("not valid JSON") from exc


def _fields(value: Any, what: str, keys: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Bad(f"{what} is not an object")
    if set(value) != set(keys):
        missing = sorted(set(keys) - set(value))
        extra = sorted(set(value) - set(keys))
        raise _Bad(f"{what} has missing keys {missing} or unknown keys {extra}")
    return value


def _bytes(value: Any, what: str, size: int | None = None) -> bytes:
    if not isinstance(value, str):
        raise _Bad(f"{what} is not a base64 string")
    try:
        data = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError) as exc:
        raise _Bad(f"{what} is not valid base64") from exc
    if size is not None and len(data) != size:
        raise _Bad(f"{what} has {len(data)} bytes, expected {size}")
    return data


_SLOT_KEYS = ("label", "kind", "created_at", "last_used_at", "kdf", "nonce", "wrapped_key")
_PK_KEYS = ("public_key", "private_key", "ephemeral_key")


def _parse_kdf(raw: dict[str, Any], what: str) -> ScryptParams | None:
    kind = raw["kind"]
    if kind == KIND_PASSWORD:
        kdf = _fields(raw["kdf"], f"{what} kdf", ("name", "salt", "n", "r", "p"))
        if kdf["name"] != "scrypt":
            raise _Bad(f"{what}: password slot kdf must be scrypt")
        try:
            return ScryptParams(kdf["n"], kdf["r"], kdf["p"])
        except (TypeError, ValueError) as exc:
            raise _Bad(f"{what}: {exc}") from exc
    if kind == KIND_KEYFILE:
        kdf = _fields(raw["kdf"], f"{what} kdf", ("name", "salt"))
        if kdf["name"] != "hkdf-sha256":
            raise _Bad(f"{what}: keyfile slot kdf must be hkdf-sha256")
        return None
    raise _Bad(f"{what}: unknown kind {kind!r}")


def _parse_key_pair(raw: dict[str, Any], what: str) -> SealedKeyPair:
    if raw["kind"] != KIND_PASSWORD:
        raise _Bad(f"{what}: only a password slot has a key pair")
    sealed = _fields(raw["private_key"], f"{what} private_key", ("nonce", "ciphertext"))
    return SealedKeyPair(
        public_key=_bytes(raw["public_key"], f"{what} public_key", PUBLIC_KEY_SIZE),
        private_nonce=_bytes(sealed["nonce"], f"{what} private_key nonce", NONCE_SIZE),
        private_sealed=_bytes(sealed["ciphertext"], f"{what} private_key ciphertext",
                              SEALED_PRIVATE_SIZE),
        ephemeral_key=_bytes(raw["ephemeral_key"], f"{what} ephemeral_key", PUBLIC_KEY_SIZE),
    )


def _parse_slot(value: Any, index: int, version: int) -> SlotRecord:
    what = f"slot {index}"
    public = version >= 2 and isinstance(value, dict) and "public_key" in value
    raw = _fields(value, what, _SLOT_KEYS + _PK_KEYS if public else _SLOT_KEYS)
    try:
        label = check_label(raw["label"])
        created_at = _finite(raw["created_at"], "created_at")
        last_used_at = _finite(raw["last_used_at"], "last_used_at", optional=True)
    except (TypeError, ValueError) as exc:
        raise _Bad(f"{what}: {exc}") from exc
    assert created_at is not None
    scrypt = _parse_kdf(raw, what)
    return SlotRecord(
        label=label,
        kind=raw["kind"],
        created_at=created_at,
        last_used_at=last_used_at,
        salt=_bytes(raw["kdf"]["salt"], f"{what} salt", SALT_SIZE),
        scrypt=scrypt,
        nonce=_bytes(raw["nonce"], f"{what} nonce", NONCE_SIZE),
        wrapped_key=_bytes(raw["wrapped_key"], f"{what} wrapped_key", WRAPPED_SIZE),
        pk=_parse_key_pair(raw, what) if public else None,
    )


_BODY_KEYS = ("format", "version", "account", "key_id", "meta", "slots", "payload")


def _parse_body(body: dict[str, Any]) -> TokenDocument:
    version = body["version"]
    raw = _fields(body, "file", _BODY_KEYS + (("anchor",) if version >= 2 else ()))
    account = raw["account"]
    if not isinstance(account, str) or not account:
        raise _Bad("account is not a non-empty string")
    key_id = raw["key_id"]
    if not isinstance(key_id, str) or not _KEY_ID_RE.fullmatch(key_id):
        raise _Bad("key_id is not 24 hex digits")
    written = isinstance(raw["meta"], dict) and "resources" in raw["meta"]  # only when known
    meta_raw = _fields(raw["meta"], "meta", tuple(
        k for k in Meta.__dataclass_fields__ if k != "resources" or written))
    try:
        meta = Meta(**meta_raw)
    except (TypeError, ValueError) as exc:
        raise _Bad(f"meta: {exc}") from exc
    slots_raw = raw["slots"]
    if not isinstance(slots_raw, list) or not 1 <= len(slots_raw) <= MAX_SLOTS:
        raise _Bad(f"slots must be a list of 1 to {MAX_SLOTS} entries")
    slots = tuple(_parse_slot(value, index, version) for index, value in enumerate(slots_raw))
    labels = [slot.label for slot in slots]
    if len(set(labels)) != len(labels):
        raise _Bad("two slots have the same label")
    if sum(slot.kind == KIND_KEYFILE for slot in slots) > 1:
        raise _Bad("more than one keyfile slot")
    payload = _fields(raw["payload"], "payload", ("nonce", "ciphertext"))
    ciphertext = _bytes(payload["ciphertext"], "payload ciphertext")
    if len(ciphertext) < 16:
        raise _Bad("payload ciphertext is shorter than a GCM tag")
    anchor = None
    if version >= 2:
        sealed = _fields(raw["anchor"], "anchor", ("nonce", "ciphertext"))
        anchor = (_bytes(sealed["nonce"], "anchor nonce", NONCE_SIZE),
                       _bytes(sealed["ciphertext"], "anchor ciphertext", WRAPPED_SIZE))
    return TokenDocument(
        account=account,
        key_id=key_id,
        meta=meta,
        slots=slots,
        payload_nonce=_bytes(payload["nonce"], "payload nonce", NONCE_SIZE),
        payload_ciphertext=ciphertext,
        anchor=anchor,
    )


def _check_header(body: Any) -> None:
    if not isinstance(body, dict) or body.get("format") != MAGIC:
        raise _Bad("not an xoauth2-proxy token file")
    version = body.get("version")
    if type(version) is not int or version not in VERSIONS:
        raise _Bad(f"unsupported format version {version!r} (this proxy reads versions 1 and 2)")


def _header_reason(line: bytes) -> str | None:
    """Why a file whose checksum failed is not ours at all, if its first line says so."""
    try:
        body = _load_json(line)
    except _Bad:
        return None
    try:
        _check_header(body)
    except _Bad as exc:
        return str(exc)
    return None


def decode(data: bytes, path: Path | str) -> TokenDocument:
    """Parse a token file; any defect raises ``CorruptTokenFile(path, reason)``."""
    try:
        return _decode(data)
    except _Bad as exc:
        raise CorruptTokenFile(path, str(exc)) from None


def _decode(data: bytes) -> TokenDocument:
    if not data:
        raise _Bad("the file is empty (truncated?)")
    if len(data) > MAX_FILE_SIZE:
        raise _Bad(f"the file is larger than {MAX_FILE_SIZE} bytes")
    if not data.startswith(b"{"):
        raise _Bad("not an xoauth2-proxy token file")
    line, _, rest = data.partition(b"\n")
    match = _CHECKSUM_RE.fullmatch(rest[:-1]) if rest.endswith(b"\n") else None
    if match is None or not hmac.compare_digest(
        match.group(1), hashlib.sha256(line).hexdigest().encode()
    ):
        header = _header_reason(line)
        if header is not None:
            raise _Bad(header)
        raise _Bad("checksum mismatch: the file is truncated or damaged")
    body = _load_json(line)
    _check_header(body)
    return _parse_body(body)
