"""Damaged, truncated, foreign, wrong-version files: ``CorruptTokenFile``, never a crash."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.secret import Secret
from proxy.store import (
    CorruptTokenFile,
    SlotError,
    TokenFileExists,
    TokenStore,
    Unlocked,
    WrongPassword,
)
from proxy.store import slots as slots_mod
from proxy.store.format import ScryptParams, decode, encode, encrypt_payload, make_key_id
from proxy.store.pkslot import open_anchor, rewrap_pk_slot
from tests.store.storetools import (
    ACCOUNT,
    FAST_N,
    META,
    PASSWORD,
    PAYLOAD,
    SERVICE_KEY,
    doctor,
    join_file,
)


def expect_corrupt(store: TokenStore, account: str = ACCOUNT, match: str | None = None) -> None:
    for call in (
        lambda: store.info(account),
        lambda: store.unlock(account, PASSWORD),
        lambda: store.unlock_with_service_key(account, SERVICE_KEY),
        lambda: store.remove_slot(account, "default"),
    ):
        with pytest.raises(CorruptTokenFile, match=match) as excinfo:
            call()
        assert excinfo.value.path == store.path(account)


def test_empty_file(store: TokenStore, created: Unlocked) -> None:
    store.path(ACCOUNT).write_bytes(b"")
    expect_corrupt(store, match="empty")


@pytest.mark.parametrize("keep", [1, 10, 100, -80, -66, -2, -1])
def test_truncated_file(store: TokenStore, created: Unlocked, keep: int) -> None:
    path = store.path(ACCOUNT)
    path.write_bytes(path.read_bytes()[:keep])
    expect_corrupt(store, match="truncated")


def test_flipped_byte(store: TokenStore, created: Unlocked) -> None:
    path = store.path(ACCOUNT)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    expect_corrupt(store, match="damaged")


def test_not_our_format(store: TokenStore, created: Unlocked) -> None:
    path = store.path(ACCOUNT)
    for junk in (
        b"hello world\n",
        b'{"format":"other","version":1}\n',
        b"\x00" * 64,
        join_file({"format": "other", "version": 1}),
    ):
        path.write_bytes(junk)
        expect_corrupt(store, match="not an xoauth2-proxy token file")


@pytest.mark.parametrize("version", [0, 3, "2", 1.5, 2.0, None, True])
def test_wrong_version(store: TokenStore, created: Unlocked, version: Any) -> None:
    def change(body: dict[str, Any]) -> None:
        body["version"] = version

    doctor(store.path(ACCOUNT), change)
    expect_corrupt(store, match="unsupported format version")


def test_future_version_with_another_layout(store: TokenStore, created: Unlocked) -> None:
    store.path(ACCOUNT).write_bytes(b'{"format":"xoauth2-proxy-tokens","version":3,"x":1}\n')
    expect_corrupt(store, match="unsupported format version 3")


def test_a_version_2_file_relabelled_version_1_is_refused(
        store: TokenStore, created: Unlocked) -> None:
    """Version 1 has no anchor and no public-key slot: the strict parser says so."""
    def change(body: dict[str, Any]) -> None:
        assert body["version"] == 2
        body["version"] = 1

    doctor(store.path(ACCOUNT), change)
    expect_corrupt(store, match="unknown keys")


def test_foreign_account(store: TokenStore, created: Unlocked) -> None:
    bob = "bob@example.com"
    shutil.copyfile(store.path(ACCOUNT), store.path(bob))
    expect_corrupt(store, bob, match="belongs to account 'alice@example.com'")


def test_foreign_account_renamed_inside(store: TokenStore, created: Unlocked) -> None:
    """Editing the account field to match is caught by the AAD, not only by the name check."""
    bob = "bob@example.com"

    def change(body: dict[str, Any]) -> None:
        body["account"] = bob

    shutil.copyfile(store.path(ACCOUNT), store.path(bob))
    doctor(store.path(bob), change)
    assert store.info(bob).account == bob  # display data
    with pytest.raises((CorruptTokenFile, WrongPassword)):
        store.unlock(bob, PASSWORD)


def test_corrupt_file_is_never_overwritten_silently(store: TokenStore, created: Unlocked) -> None:
    path = store.path(ACCOUNT)
    path.write_bytes(b"garbage")
    with pytest.raises(TokenFileExists):
        store.create(ACCOUNT, PAYLOAD, META, password=PASSWORD)
    with pytest.raises(CorruptTokenFile):
        store.save(created, b"x", META)
    with pytest.raises(CorruptTokenFile):
        store.add_password_slot(created, "x", Secret("x"))
    assert path.read_bytes() == b"garbage"
    store.create(ACCOUNT, PAYLOAD, META, password=PASSWORD, replace=True)
    assert store.unlock(ACCOUNT, PASSWORD).payload == PAYLOAD


def test_symlink_and_directory_in_place_of_the_file(store: TokenStore, created: Unlocked) -> None:
    path = store.path(ACCOUNT)
    target = store.state_dir / "elsewhere"
    os.replace(path, target)
    path.symlink_to(target)
    expect_corrupt(store, match="cannot be read")
    path.unlink()
    path.mkdir()
    expect_corrupt(store, match="cannot be read")


@pytest.mark.parametrize(
    ("where", "value", "reason"),
    [
        (("slots", 0, "kdf", "n"), 2**30, "scrypt n"),
        (("slots", 0, "kdf", "n"), 1000, "scrypt n"),
        (("slots", 0, "kdf", "r"), 64, "scrypt r"),
        (("slots", 0, "kind"), "magic", "unknown kind"),
        (("slots", 0, "nonce"), "AAAA", "nonce has 3 bytes"),
        (("slots", 0, "wrapped_key"), "not base64!", "base64"),
        (("slots",), [], "slots"),
        (("key_id",), "xyz", "key_id"),
        (("meta", "flow"), "", "meta"),
        (("meta", "updated_at"), "yesterday", "meta"),
        (("payload", "ciphertext"), "", "shorter than a GCM tag"),
    ],
)
def test_bad_fields_with_valid_checksum(
    store: TokenStore, created: Unlocked, where: tuple[Any, ...], value: Any, reason: str
) -> None:
    def change(body: dict[str, Any]) -> None:
        node: Any = body
        for key in where[:-1]:
            node = node[key]
        node[where[-1]] = value

    doctor(store.path(ACCOUNT), change)
    expect_corrupt(store, match=reason)


def test_duplicate_keys_and_nan(store: TokenStore, created: Unlocked) -> None:
    path = store.path(ACCOUNT)
    line = path.read_bytes().split(b"\n")[0]
    for doctored in (
        line[:-1] + b',"account":"x"}',
        line.replace(b'"updated_at":', b'"updated_at":NaN,"x":', 1),
    ):
        path.write_bytes(
            doctored + b"\nsha256:" + hashlib.sha256(doctored).hexdigest().encode() + b"\n"
        )
        expect_corrupt(store)


# --- fuzzing -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def template() -> Iterator[tuple[Path, bytes]]:
    """A state dir holding one valid file (password + service key slots) and its bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state"
        store = TokenStore(state, scrypt_n=FAST_N)
        store.create(ACCOUNT, PAYLOAD, META, password=PASSWORD, service_key=SERVICE_KEY)
        yield state, store.path(ACCOUNT).read_bytes()


@st.composite
def damaged(draw: st.DrawFn, original: bytes) -> bytes:
    kind = draw(st.sampled_from(["flip", "truncate", "append", "splice"]))
    data = bytearray(original)
    if kind == "flip":
        for _ in range(draw(st.integers(1, 4))):
            index = draw(st.integers(0, len(data) - 1))
            data[index] ^= draw(st.integers(1, 255))
    elif kind == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif kind == "append":
        data += draw(st.binary(min_size=1, max_size=20))
    else:
        start = draw(st.integers(0, len(data) - 1))
        data[start : start + draw(st.integers(1, 20))] = draw(st.binary(max_size=20))
    result = bytes(data)
    if result == original:
        data.append(0)
        result = bytes(data)
    return result


FUZZ = settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@FUZZ
@given(data=st.data())
def test_fuzz_damage_is_always_corrupt(template: tuple[Path, bytes], data: st.DataObject) -> None:
    state, original = template
    damaged_bytes = data.draw(damaged(original))
    store = TokenStore(state, scrypt_n=FAST_N)
    store.path(ACCOUNT).write_bytes(damaged_bytes)
    try:
        for call in (
            lambda: store.info(ACCOUNT),
            lambda: store.unlock(ACCOUNT, PASSWORD),
            lambda: store.unlock_with_service_key(ACCOUNT, SERVICE_KEY),
        ):
            with pytest.raises(CorruptTokenFile):
                call()
        assert store.accounts() == []
    finally:
        store.path(ACCOUNT).write_bytes(original)


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=30)
    | st.sampled_from(
        [
            "password",
            "keyfile",
            "scrypt",
            "hkdf-sha256",
            "AAAAAAAAAAAAAAAAAAAAAA==",
            ACCOUNT,
            "default",
        ]
    ),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=6,
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _paths(value, (*prefix, index))
    return found


def _fake_costly_scrypt(real: Any) -> Any:
    """Real scrypt for the template's cost; a stand-in KDF for doctored (possibly huge) costs."""

    def derive(password: bytes, salt: bytes, params: ScryptParams) -> bytes:
        if params == ScryptParams(FAST_N, 8, 1):
            return real(password, salt, params)
        return hashlib.sha256(repr((password, salt, params)).encode()).digest()

    return derive


@FUZZ
@given(data=st.data())
def test_fuzz_structure_with_valid_checksum(
    template: tuple[Path, bytes], data: st.DataObject, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Doctored JSON that passes the checksum: corrupt, wrong password, or the right payload."""
    monkeypatch.setattr(slots_mod, "scrypt_derive", _fake_costly_scrypt(slots_mod.scrypt_derive))
    state, original = template
    body = json.loads(original.split(b"\n")[0])
    paths = _paths(body)
    where = data.draw(st.sampled_from(paths))
    action = data.draw(st.sampled_from(["set", "delete", "add"]))
    node: Any = body
    for key in where[:-1]:
        node = node[key]
    if action == "delete" and isinstance(node, dict):
        del node[where[-1]]
    elif action == "add" and isinstance(node, dict):
        node[data.draw(st.text(max_size=8))] = data.draw(JSON_VALUES)
    else:
        node[where[-1]] = data.draw(JSON_VALUES)
    line = json.dumps(body, separators=(",", ":")).encode()
    doctored = line + b"\nsha256:" + hashlib.sha256(line).hexdigest().encode() + b"\n"
    store = TokenStore(state, scrypt_n=FAST_N)
    store.path(ACCOUNT).write_bytes(doctored)
    try:
        try:
            store.info(ACCOUNT)
        except CorruptTokenFile:
            pass
        for call in (
            lambda: store.unlock(ACCOUNT, PASSWORD),
            lambda: store.unlock_with_service_key(ACCOUNT, SERVICE_KEY),
        ):
            try:
                assert call().payload == PAYLOAD
            except (CorruptTokenFile, WrongPassword):
                pass
    finally:
        store.path(ACCOUNT).write_bytes(original)


# --- public-key password slots -----------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _other_public_key() -> bytes:
    return X25519PrivateKey.generate().public_key().public_bytes_raw()


@pytest.mark.parametrize("field", ["public_key", "private_key"])
def test_an_altered_key_pair_opens_nothing(store: TokenStore, created: Unlocked,
                                           field: str) -> None:
    """The public key is in the private key's associated data: changing either makes the
    password open nothing (the tag that tells which slot a password opens fails)."""
    def change(body: dict[str, Any]) -> None:
        slot = body["slots"][0]
        if field == "public_key":
            slot["public_key"] = _b64(_other_public_key())
        else:
            sealed = bytearray(base64.b64decode(slot["private_key"]["ciphertext"]))
            sealed[5] ^= 1
            slot["private_key"]["ciphertext"] = _b64(bytes(sealed))

    doctor(store.path(ACCOUNT), change)
    with pytest.raises(WrongPassword):
        TokenStore(store.state_dir, scrypt_n=FAST_N).unlock(ACCOUNT, PASSWORD)


@pytest.mark.parametrize("ephemeral", [_other_public_key(), bytes(32)], ids=["other", "zero"])
def test_an_altered_ephemeral_key_is_corruption(store: TokenStore, created: Unlocked,
                                                ephemeral: bytes) -> None:
    """The password opens the slot's private key, but the wrap does not verify: corrupt, never
    opened (an all-zero key is a low-order point, refused by X25519)."""
    def change(body: dict[str, Any]) -> None:
        body["slots"][0]["ephemeral_key"] = _b64(ephemeral)

    doctor(store.path(ACCOUNT), change)
    with pytest.raises(CorruptTokenFile, match="does not verify") as info:
        TokenStore(store.state_dir, scrypt_n=FAST_N).unlock(ACCOUNT, PASSWORD)
    assert info.value.opened


def _plant_data_key(path: Path, anchor: bytes) -> bytes:
    """What someone who can write the file (and knows no password) would try: wrap a data key
    of their choosing to the slot's public key, with a payload under it."""
    doc = decode(path.read_bytes(), path)
    slot = doc.slots[0]
    planted = os.urandom(32)
    key_id = make_key_id(planted)
    nonce, ciphertext = encrypt_payload(planted, ACCOUNT, key_id, doc.meta, b"planted tokens")
    forged = rewrap_pk_slot(slot, anchor, planted, ACCOUNT)
    doc = dataclasses.replace(doc, key_id=key_id, slots=(forged,), payload_nonce=nonce,
                              payload_ciphertext=ciphertext)
    path.write_bytes(encode(doc))
    return planted


def test_write_access_alone_cannot_plant_a_data_key(store: TokenStore, created: Unlocked) -> None:
    path = store.path(ACCOUNT)
    original = path.read_bytes()
    _plant_data_key(path, os.urandom(32))  # without the file's anchor
    with pytest.raises(CorruptTokenFile, match="does not verify"):
        TokenStore(store.state_dir, scrypt_n=FAST_N).unlock(ACCOUNT, PASSWORD)
    # The same forgery with the anchor (known to whoever once opened the file) would open:
    # the secret is what stops it.
    path.write_bytes(original)
    secret = open_anchor(decode(original, path), created.data_key)
    assert secret is not None
    planted = _plant_data_key(path, secret)
    opened = TokenStore(store.state_dir, scrypt_n=FAST_N).unlock(ACCOUNT, PASSWORD)
    assert opened.data_key == planted and opened.payload == b"planted tokens"


def test_an_altered_anchor_stops_writers_not_logins(store: TokenStore,
                                                         created: Unlocked) -> None:
    def change(body: dict[str, Any]) -> None:
        body["anchor"]["ciphertext"] = _b64(os.urandom(48))

    doctor(store.path(ACCOUNT), change)
    fresh = TokenStore(store.state_dir, scrypt_n=FAST_N)
    unlocked = fresh.unlock(ACCOUNT, PASSWORD)
    assert unlocked.payload == PAYLOAD
    with pytest.raises(CorruptTokenFile, match="anchor"):
        fresh.add_password_slot(unlocked, "printer", Secret("printer password"))
    with pytest.raises(SlotError, match="anchor"):
        fresh.rotate(unlocked, PASSWORD, generate=lambda: Secret("x" * 20))


@pytest.mark.parametrize("reissue", [False, True])
def test_a_removed_holder_who_can_write_is_shut_out_by_a_reissue(
        store: TokenStore, created: Unlocked, reissue: bool) -> None:
    path = store.path(ACCOUNT)
    store.add_password_slot(created, "printer", Secret("printer password"))
    known = open_anchor(decode(path.read_bytes(), path), created.data_key)  # the printer's
    assert known is not None
    store.remove_slot(ACCOUNT, "printer")
    unlocked = store.unlock(ACCOUNT, PASSWORD)
    store.rotate(unlocked, PASSWORD, generate=lambda: Secret("new device password"),
                 reissue=reissue)
    rotated = path.read_bytes()
    planted = _plant_data_key(path, known)
    if reissue:  # a new anchor: the old one makes no wrap the password opens
        with pytest.raises(CorruptTokenFile, match="does not verify"):
            TokenStore(store.state_dir, scrypt_n=FAST_N).unlock(ACCOUNT, PASSWORD)
        path.write_bytes(rotated)
        assert TokenStore(store.state_dir, scrypt_n=FAST_N).unlock(ACCOUNT, PASSWORD).payload \
            == PAYLOAD
    else:  # --rotate alone keeps the anchor: it shuts out a reader of an old copy, not a writer
        opened = TokenStore(store.state_dir, scrypt_n=FAST_N).unlock(ACCOUNT, PASSWORD)
        assert opened.data_key == planted
