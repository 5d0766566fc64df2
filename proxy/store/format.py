"""The token file format, version 1: layout, strict parser, serializer and payload crypto.

A token file is two ASCII lines::

    {"format":"xoauth2-proxy-tokens","version":1,"account":...,...}\\n
    sha256:<64 lowercase hex digits of SHA-256 over the first line's bytes, newline excluded>\\n

The checksum is not security (anyone can recompute it); it tells a damaged or truncated file
(``CorruptTokenFile``) apart from a wrong password (``WrongPassword``), which would otherwise
look the same to AES-GCM. The first line is one JSON object (no NaN/Infinity, no duplicate keys,
no unknown keys; bytes as standard base64 with padding)::

    format    "xoauth2-proxy-tokens"                  (anything else: not our file)
    version   1                                       (anything else: unsupported version)
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
    slots     list, 1..32 entries, each wrapping the same data key:
                label         [A-Za-z0-9][A-Za-z0-9._@+-]{0,63}, unique in the file
                kind          "password" or "keyfile" (at most one keyfile slot)
                created_at    epoch seconds
                last_used_at  epoch seconds or null (display only, updated at most hourly)
                kdf           password: {"name":"scrypt","salt":16 bytes,"n":..,"r":..,"p":..}
                              keyfile:  {"name":"hkdf-sha256","salt":16 bytes}
                nonce         12 bytes
                wrapped_key   48 bytes = AES-256-GCM(wrapping key, nonce, data_key, slot AAD)
    payload   {"nonce": 12 bytes, "ciphertext": AES-256-GCM(data_key, nonce, cache, payload AAD)}

Keys and associated data (AAD); ``P(x)`` is x prefixed by its 4-byte big-endian length:

- data key: 32 random bytes per login (``create``); never written in the clear.
- password slot wrapping key: scrypt(UTF-8 of the NFC-normalised password, salt, n, r, p),
  32 bytes. Defaults n=2**15, r=8, p=1; accepted when reading: n a power of two in
  [2**10, 2**20], r in [1, 16], p in [1, 16], 128*n*r <= 1 GiB.
- keyfile slot wrapping key: HKDF-SHA256(service key, salt, info "xoauth2-proxy keyfile slot v1").
- slot AAD:    P("xoauth2-proxy-tokens") P("1") P("slot") P(account) P(kind) P(label)
- payload AAD: P("xoauth2-proxy-tokens") P("1") P("payload") P(account) P(key_id)
               P(canonical meta: JSON with sorted keys, no spaces, ASCII, floats as Python repr)

So the payload, the account name, the format version, the key_id and the metadata are all
authenticated by the data key: unlocking a file whose meta was edited fails with
``CorruptTokenFile``. Slot timestamps are display data and are not authenticated; a slot's label
and kind are. No field other than the GCM tags can confirm a password.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from proxy.store.errors import CorruptTokenFile

MAGIC = "xoauth2-proxy-tokens"
VERSION = 1
MAX_FILE_SIZE = 16 * 1024 * 1024
MAX_SLOTS = 32
KEY_SIZE = 32
NONCE_SIZE = 12
SALT_SIZE = 16
WRAPPED_SIZE = KEY_SIZE + 16
KIND_PASSWORD = "password"  # noqa: S105 (a slot kind, not a password)
KIND_KEYFILE = "keyfile"
SCRYPT_N_MIN, SCRYPT_N_MAX = 2**10, 2**20
SCRYPT_MAX_MEMORY = 1 << 30

_LABEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")
_KEY_ID_RE = re.compile(r"[0-9a-f]{24}")
_CHECKSUM_RE = re.compile(rb"sha256:([0-9a-f]{64})")
_KEY_ID_INFO = b"xoauth2-proxy key id v1"


def _finite(value: object, what: str, *, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} must be a number{' or None' if optional else ''}")
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"{what} must be finite")
    return result


def _text(value: object, what: str, max_len: int, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str{' or None' if optional else ''}")
    if len(value) > max_len:
        raise ValueError(f"{what} is longer than {max_len} characters")
    return value


@dataclass(frozen=True)
class Meta:
    """Clear, non-secret facts about an account's tokens, shown by ``accounts``/``info``."""

    identity: str | None
    flow: str
    access_token_expires_at: float | None
    refresh_token_present: bool
    needs_reauth: str | None = None
    updated_at: float = 0.0

    def __post_init__(self) -> None:
        _text(self.identity, "identity", 1024, optional=True)
        if not _text(self.flow, "flow", 64):
            raise ValueError("flow must not be empty")
        expires = _finite(self.access_token_expires_at, "access_token_expires_at", optional=True)
        object.__setattr__(self, "access_token_expires_at", expires)
        if not isinstance(self.refresh_token_present, bool):
            raise TypeError("refresh_token_present must be a bool")
        _text(self.needs_reauth, "needs_reauth", 2000, optional=True)
        object.__setattr__(self, "updated_at", _finite(self.updated_at, "updated_at"))

    def to_json(self) -> dict[str, Any]:
        return {
            "identity": self.identity,
            "flow": self.flow,
            "access_token_expires_at": self.access_token_expires_at,
            "refresh_token_present": self.refresh_token_present,
            "needs_reauth": self.needs_reauth,
            "updated_at": self.updated_at,
        }

    def canonical(self) -> bytes:
        """The bytes bound into the payload AAD."""
        return json.dumps(
            self.to_json(),
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=True,
            allow_nan=False,
        ).encode("ascii")


@dataclass(frozen=True)
class SlotInfo:
    """What ``info`` shows about a key slot; nothing secret."""

    label: str
    kind: str  # "password" | "keyfile"
    created_at: float
    last_used_at: float | None


@dataclass(frozen=True)
class ScryptParams:
    """Cost parameters of a password slot, checked against the limits in the docstring."""

    n: int
    r: int = 8
    p: int = 1

    def __post_init__(self) -> None:
        for name in ("n", "r", "p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"scrypt {name} must be an int")
        if not SCRYPT_N_MIN <= self.n <= SCRYPT_N_MAX or self.n & (self.n - 1):
            raise ValueError(f"scrypt n must be a power of two in [2**10, 2**20], not {self.n}")
        if not 1 <= self.r <= 16 or not 1 <= self.p <= 16:
            raise ValueError("scrypt r and p must be in [1, 16]")
        if 128 * self.n * self.r > SCRYPT_MAX_MEMORY:
            raise ValueError("scrypt parameters need more than 1 GiB of memory")


def check_label(label: object) -> str:
    """Return ``label`` if it is a valid slot label, else raise ValueError."""
    if not isinstance(label, str) or not _LABEL_RE.fullmatch(label):
        raise ValueError(
            f"invalid slot label {label!r}: use 1-64 of A-Z a-z 0-9 . _ @ + - "
            "starting with a letter or digit"
        )
    return label


@dataclass(frozen=True)
class SlotRecord:
    """One key slot as stored: the data key wrapped under a password- or key-file-derived key."""

    label: str
    kind: str
    created_at: float
    last_used_at: float | None
    salt: bytes
    scrypt: ScryptParams | None  # None for keyfile slots
    nonce: bytes
    wrapped_key: bytes

    def info(self) -> SlotInfo:
        return SlotInfo(self.label, self.kind, self.created_at, self.last_used_at)

    def to_json(self) -> dict[str, Any]:
        kdf: dict[str, Any]
        if self.scrypt is not None:
            kdf = {
                "name": "scrypt",
                "salt": _b64(self.salt),
                "n": self.scrypt.n,
                "r": self.scrypt.r,
                "p": self.scrypt.p,
            }
        else:
            kdf = {"name": "hkdf-sha256", "salt": _b64(self.salt)}
        return {
            "label": self.label,
            "kind": self.kind,
            "created_at": self.created_at,
            "last_used_at": self.last_used_at,
            "kdf": kdf,
            "nonce": _b64(self.nonce),
            "wrapped_key": _b64(self.wrapped_key),
        }


@dataclass(frozen=True)
class TokenDocument:
    """A parsed token file; everything in it is public or encrypted."""

    account: str
    key_id: str
    meta: Meta
    slots: tuple[SlotRecord, ...]
    payload_nonce: bytes
    payload_ciphertext: bytes

    def slot(self, label: str) -> SlotRecord | None:
        for slot in self.slots:
            if slot.label == label:
                return slot
        return None


# --- AAD, key id and payload encryption -------------------------------------------------


def _aad(*parts: bytes) -> bytes:
    return b"".join(struct.pack(">I", len(part)) + part for part in parts)


_AAD_HEAD = (MAGIC.encode(), str(VERSION).encode())


def slot_aad(account: str, kind: str, label: str) -> bytes:
    return _aad(*_AAD_HEAD, b"slot", account.encode(), kind.encode(), label.encode())


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


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def encode(doc: TokenDocument) -> bytes:
    """Serialize ``doc`` into the two-line file format."""
    body = {
        "format": MAGIC,
        "version": VERSION,
        "account": doc.account,
        "key_id": doc.key_id,
        "meta": doc.meta.to_json(),
        "slots": [slot.to_json() for slot in doc.slots],
        "payload": {
            "nonce": _b64(doc.payload_nonce),
            "ciphertext": _b64(doc.payload_ciphertext),
        },
    }
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


def _parse_slot(value: Any, index: int) -> SlotRecord:
    what = f"slot {index}"
    raw = _fields(
        value, what, ("label", "kind", "created_at", "last_used_at", "kdf", "nonce", "wrapped_key")
    )
    try:
        label = check_label(raw["label"])
        created_at = _finite(raw["created_at"], "created_at")
        last_used_at = _finite(raw["last_used_at"], "last_used_at", optional=True)
    except (TypeError, ValueError) as exc:
        raise _Bad(f"{what}: {exc}") from exc
    assert created_at is not None
    kind = raw["kind"]
    scrypt: ScryptParams | None
    if kind == KIND_PASSWORD:
        kdf = _fields(raw["kdf"], f"{what} kdf", ("name", "salt", "n", "r", "p"))
        if kdf["name"] != "scrypt":
            raise _Bad(f"{what}: password slot kdf must be scrypt")
        try:
            scrypt = ScryptParams(kdf["n"], kdf["r"], kdf["p"])
        except (TypeError, ValueError) as exc:
            raise _Bad(f"{what}: {exc}") from exc
    elif kind == KIND_KEYFILE:
        kdf = _fields(raw["kdf"], f"{what} kdf", ("name", "salt"))
        if kdf["name"] != "hkdf-sha256":
            raise _Bad(f"{what}: keyfile slot kdf must be hkdf-sha256")
        scrypt = None
    else:
        raise _Bad(f"{what}: unknown kind {kind!r}")
    return SlotRecord(
        label=label,
        kind=kind,
        created_at=created_at,
        last_used_at=last_used_at,
        salt=_bytes(kdf["salt"], f"{what} salt", SALT_SIZE),
        scrypt=scrypt,
        nonce=_bytes(raw["nonce"], f"{what} nonce", NONCE_SIZE),
        wrapped_key=_bytes(raw["wrapped_key"], f"{what} wrapped_key", WRAPPED_SIZE),
    )


def _parse_body(body: dict[str, Any]) -> TokenDocument:
    raw = _fields(
        body, "file", ("format", "version", "account", "key_id", "meta", "slots", "payload")
    )
    account = raw["account"]
    if not isinstance(account, str) or not account:
        raise _Bad("account is not a non-empty string")
    key_id = raw["key_id"]
    if not isinstance(key_id, str) or not _KEY_ID_RE.fullmatch(key_id):
        raise _Bad("key_id is not 24 hex digits")
    meta_raw = _fields(raw["meta"], "meta", tuple(Meta.__dataclass_fields__))
    try:
        meta = Meta(**meta_raw)
    except (TypeError, ValueError) as exc:
        raise _Bad(f"meta: {exc}") from exc
    slots_raw = raw["slots"]
    if not isinstance(slots_raw, list) or not 1 <= len(slots_raw) <= MAX_SLOTS:
        raise _Bad(f"slots must be a list of 1 to {MAX_SLOTS} entries")
    slots = tuple(_parse_slot(value, index) for index, value in enumerate(slots_raw))
    labels = [slot.label for slot in slots]
    if len(set(labels)) != len(labels):
        raise _Bad("two slots have the same label")
    if sum(slot.kind == KIND_KEYFILE for slot in slots) > 1:
        raise _Bad("more than one keyfile slot")
    payload = _fields(raw["payload"], "payload", ("nonce", "ciphertext"))
    ciphertext = _bytes(payload["ciphertext"], "payload ciphertext")
    if len(ciphertext) < 16:
        raise _Bad("payload ciphertext is shorter than a GCM tag")
    return TokenDocument(
        account=account,
        key_id=key_id,
        meta=meta,
        slots=slots,
        payload_nonce=_bytes(payload["nonce"], "payload nonce", NONCE_SIZE),
        payload_ciphertext=ciphertext,
    )


def _check_header(body: Any) -> None:
    if not isinstance(body, dict) or body.get("format") != MAGIC:
        raise _Bad("not an xoauth2-proxy token file")
    version = body.get("version")
    if type(version) is not int or version != VERSION:
        raise _Bad(f"unsupported format version {version!r} (this proxy reads version {VERSION})")


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
