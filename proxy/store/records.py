"""The values a token file holds, as Python objects: metadata, slots, the parsed document.

``proxy.store.format`` (the format's specification, parser and serializer) builds and writes
these; they validate what they can check on their own in ``__post_init__``.
"""

from __future__ import annotations

import base64
import json
import math
import re
from dataclasses import dataclass
from typing import Any

KEY_SIZE = 32
NONCE_SIZE = 12
SALT_SIZE = 16
WRAPPED_SIZE = KEY_SIZE + 16
PUBLIC_KEY_SIZE = 32
SEALED_PRIVATE_SIZE = 2 * KEY_SIZE + 16  # X25519 private key, anchor, GCM tag
KIND_PASSWORD = "password"  # noqa: S105 (a slot kind, not a password)
KIND_KEYFILE = "keyfile"
SCRYPT_N_MIN, SCRYPT_N_MAX = 2**10, 2**20
SCRYPT_MAX_MEMORY = 1 << 30

_LABEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


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
    resources: tuple[str, ...] = ()  # "outlook", "graph": only written when known (old AAD)

    def __post_init__(self) -> None:
        object.__setattr__(self, "resources", tuple(str(_text(r, "resources", 99)) for r in self.resources))
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
        } | ({"resources": list(self.resources)} if self.resources else {})

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
    old_form: bool = False  # a password slot ``rotate`` cannot re-wrap (see ``SlotRecord.pk``)


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
class SealedKeyPair:
    """What a public-key password slot adds (format version 2): an X25519 key pair whose
    private half (with the file's anchor) is sealed under the password's scrypt key, and
    the ephemeral public key the data key was last wrapped with."""

    public_key: bytes
    private_nonce: bytes
    private_sealed: bytes  # AES-256-GCM(scrypt key, private_nonce, private key || anchor)
    ephemeral_key: bytes


@dataclass(frozen=True)
class SlotRecord:
    """One key slot as stored: the data key wrapped under a password- or key-file-derived key,
    or (``pk`` set) to the public key of a password slot."""

    label: str
    kind: str
    created_at: float
    last_used_at: float | None
    salt: bytes
    scrypt: ScryptParams | None  # None for keyfile slots
    nonce: bytes
    wrapped_key: bytes
    pk: SealedKeyPair | None = None  # a password slot of the public-key form

    def info(self) -> SlotInfo:
        return SlotInfo(self.label, self.kind, self.created_at, self.last_used_at,
                        old_form=self.kind == KIND_PASSWORD and self.pk is None)

    def to_json(self) -> dict[str, Any]:
        kdf: dict[str, Any]
        if self.scrypt is not None:
            kdf = {
                "name": "scrypt",
                "salt": b64(self.salt),
                "n": self.scrypt.n,
                "r": self.scrypt.r,
                "p": self.scrypt.p,
            }
        else:
            kdf = {"name": "hkdf-sha256", "salt": b64(self.salt)}
        keys: dict[str, Any] = {}
        if self.pk is not None:
            keys = {
                "public_key": b64(self.pk.public_key),
                "private_key": {"nonce": b64(self.pk.private_nonce),
                                "ciphertext": b64(self.pk.private_sealed)},
                "ephemeral_key": b64(self.pk.ephemeral_key),
            }
        return {
            "label": self.label,
            "kind": self.kind,
            "created_at": self.created_at,
            "last_used_at": self.last_used_at,
            "kdf": kdf,
            **keys,
            "nonce": b64(self.nonce),
            "wrapped_key": b64(self.wrapped_key),
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
    anchor: tuple[bytes, bytes] | None = None  # (nonce, AES-GCM under the data key)

    def slot(self, label: str) -> SlotRecord | None:
        for slot in self.slots:
            if slot.label == label:
                return slot
        return None
