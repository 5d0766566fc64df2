"""Password slots share the file's salt (a guess costs one derivation), older files (version 1,
old-form slots) open and are upgraded, and ``rotate`` replaces the data key so that a revoked
password's old file copy opens nothing current while every other device keeps its password."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from proxy.secret import Secret
from proxy.store import SlotError, TokenFileMissing, TokenStore, WrongPassword
from proxy.store.format import (
    KEY_SIZE,
    ScryptParams,
    TokenDocument,
    decode,
    decrypt_payload,
    encode,
    encrypt_payload,
    make_key_id,
)
from proxy.store.slots import new_password_slot, unwrap
from tests.store.storetools import (
    ACCOUNT,
    FAST_N,
    META,
    PASSWORD,
    PAYLOAD,
    SERVICE_KEY,
    ScryptCounter,
    split_file,
)

DEVICES = [f"printer{i}" for i in range(5)]


def device_password(label: str) -> Secret:
    return Secret(f"password of {label}")


def write_legacy_file(store: TokenStore, cost: int) -> None:
    """A file as written before slots shared a salt: every slot with its own salt (the
    lower-level API the store used then), at ``cost``."""
    data_key = os.urandom(KEY_SIZE)
    key_id = make_key_id(data_key)
    now = time.time()
    params = ScryptParams(cost)
    slots = [new_password_slot("default", b"correct horse battery staple", params, data_key,
                               ACCOUNT, now)[0]]
    for label in DEVICES:
        slots.append(new_password_slot(label, device_password(label).reveal().encode(), params,
                                       data_key, ACCOUNT, now)[0])
    nonce, ciphertext = encrypt_payload(data_key, ACCOUNT, key_id, META, PAYLOAD)
    doc = TokenDocument(ACCOUNT, key_id, META, tuple(slots), nonce, ciphertext)
    store.path(ACCOUNT).write_bytes(encode(doc))
    os.chmod(store.path(ACCOUNT), 0o600)


def test_a_wrong_guess_costs_one_derivation_however_many_device_passwords(
        store: TokenStore, state_dir: Path, scrypt_calls: ScryptCounter) -> None:
    created = store.create(ACCOUNT, PAYLOAD, META, password=PASSWORD)
    for label in DEVICES:
        store.add_password_slot(created, label, device_password(label))
    salts = {slot["kdf"]["salt"] for slot in split_file(store.path(ACCOUNT).read_bytes())["slots"]}
    assert len(salts) == 1
    daemon = TokenStore(state_dir, scrypt_n=FAST_N)
    before = scrypt_calls.calls
    with pytest.raises(WrongPassword):
        daemon.unlock(ACCOUNT, Secret("a guess"))
    assert scrypt_calls.calls == before + 1  # not one per slot (six here)
    assert daemon.unlock(ACCOUNT, device_password("printer3")).slot_label == "printer3"
    assert scrypt_calls.calls == before + 2


def test_legacy_file_opens_and_its_slots_are_upgraded_when_used(
        state_dir: Path, scrypt_calls: ScryptCounter) -> None:
    old = TokenStore(state_dir, scrypt_n=FAST_N)
    write_legacy_file(old, FAST_N)
    assert split_file(old.path(ACCOUNT).read_bytes())["version"] == 1
    assert all(slot.old_form for slot in old.info(ACCOUNT).slots)
    daemon = TokenStore(state_dir, scrypt_n=2 * FAST_N)  # a higher cost than the file's
    for label in ["default", *DEVICES]:
        password = PASSWORD if label == "default" else device_password(label)
        unlocked = daemon.unlock(ACCOUNT, password)
        assert unlocked.payload == PAYLOAD and unlocked.stale_slot
        assert daemon.upgrade_slot(unlocked, password)
        again = TokenStore(state_dir, scrypt_n=2 * FAST_N).unlock(ACCOUNT, password)
        assert again.slot_label == label and not again.stale_slot
    body = split_file(daemon.path(ACCOUNT).read_bytes())
    assert body["version"] == 2 and all("public_key" in slot for slot in body["slots"])
    assert not any(slot.old_form for slot in daemon.info(ACCOUNT).slots)
    kdfs = [slot["kdf"] for slot in body["slots"]]
    assert {kdf["n"] for kdf in kdfs} == {2 * FAST_N}
    assert len({kdf["salt"] for kdf in kdfs}) == 1
    fresh = TokenStore(state_dir, scrypt_n=2 * FAST_N)
    before = scrypt_calls.calls
    with pytest.raises(WrongPassword):
        fresh.unlock(ACCOUNT, Secret("a guess"))
    assert scrypt_calls.calls == before + 1


def test_a_missing_file_costs_a_derivation_like_a_wrong_password(
        store: TokenStore, scrypt_calls: ScryptCounter) -> None:
    with pytest.raises(TokenFileMissing):
        store.unlock(ACCOUNT, PASSWORD)
    assert scrypt_calls.calls == 1
    with pytest.raises(TokenFileMissing):
        store.unlock(ACCOUNT, PASSWORD)  # a repeat costs nothing, as a repeated wrong one
    assert scrypt_calls.calls == 1
    store.pay_for_absent("nobody@example.com", PASSWORD)
    assert scrypt_calls.calls == 2


def no_password(label: str = "") -> Secret:
    raise AssertionError("rotate generated a password")


def test_rotate_keeps_every_device_password_and_locks_out_an_old_copy(
        store: TokenStore, state_dir: Path, tmp_path: Path, scrypt_calls: ScryptCounter) -> None:
    created = store.create(ACCOUNT, PAYLOAD, META, password=PASSWORD, service_key=SERVICE_KEY)
    for label in DEVICES:
        store.add_password_slot(created, label, device_password(label))
    copy = tmp_path / "copy"
    copy.mkdir(mode=0o700)
    shutil.copy2(store.path(ACCOUNT), copy / store.path(ACCOUNT).name)  # the thief's copy
    store.remove_slot(ACCOUNT, "printer0")
    unlocked = store.unlock(ACCOUNT, device_password("printer2"))  # any device's password
    rotated, new_passwords = store.rotate(unlocked, device_password("printer2"),
                                          generate=no_password, service_key=SERVICE_KEY)
    assert new_passwords == {}
    assert rotated.key_id != unlocked.key_id and rotated.payload == PAYLOAD
    current = TokenStore(state_dir, scrypt_n=FAST_N)
    assert current.unlock(ACCOUNT, PASSWORD).key_id == rotated.key_id
    for label in DEVICES[1:]:
        opened = current.unlock(ACCOUNT, device_password(label))
        assert (opened.slot_label, opened.key_id) == (label, rotated.key_id)
    assert current.unlock_with_service_key(ACCOUNT, SERVICE_KEY).key_id == rotated.key_id
    with pytest.raises(WrongPassword):
        current.unlock(ACCOUNT, device_password("printer0"))
    # The revoked password opens the old copy's data key, which opens nothing current.
    thief = TokenStore(copy, scrypt_n=FAST_N)
    old_key = thief.unlock(ACCOUNT, device_password("printer0")).data_key
    assert old_key == unlocked.data_key != rotated.data_key
    doc = decode(current.path(ACCOUNT).read_bytes(), current.path(ACCOUNT))
    assert doc.key_id == rotated.key_id and decrypt_payload(doc, old_key) is None
    assert all(unwrap(old_key, slot, ACCOUNT) is None for slot in doc.slots)
    # Each other remaining slot kept its key pair and was wrapped anew (printer2's was made anew).
    before = decode((copy / store.path(ACCOUNT).name).read_bytes(), copy)
    for label in ["default", "printer1", "printer3", "printer4"]:
        old_pair, new_pair = before.slot(label).pk, doc.slot(label).pk  # type: ignore[union-attr]
        assert old_pair is not None and new_pair is not None
        assert new_pair.public_key == old_pair.public_key
        assert new_pair.ephemeral_key != old_pair.ephemeral_key
    calls = scrypt_calls.calls
    with pytest.raises(WrongPassword):
        TokenStore(state_dir, scrypt_n=FAST_N).unlock(ACCOUNT, Secret("a guess"))
    assert scrypt_calls.calls == calls + 1


def test_rotate_gives_a_new_password_only_to_old_form_slots_never_used_since(
        state_dir: Path) -> None:
    write_legacy_file(TokenStore(state_dir, scrypt_n=FAST_N), FAST_N)
    daemon = TokenStore(state_dir, scrypt_n=FAST_N)
    used = daemon.unlock(ACCOUNT, device_password("printer1"))  # a login converts its slot
    assert used.stale_slot and daemon.upgrade_slot(used, device_password("printer1"))
    unlocked = daemon.unlock(ACCOUNT, PASSWORD)  # still old-form: rotate converts it
    assert unlocked.stale_slot
    issued = iter(Secret(f"new secret {i}") for i in range(10))
    rotated, new_passwords = daemon.rotate(unlocked, PASSWORD, generate=lambda: next(issued))
    assert sorted(new_passwords) == ["printer0", "printer2", "printer3", "printer4"]
    current = TokenStore(state_dir, scrypt_n=FAST_N)
    kept = current.unlock(ACCOUNT, PASSWORD)
    assert kept.key_id == rotated.key_id and not kept.stale_slot
    assert current.unlock(ACCOUNT, device_password("printer1")).slot_label == "printer1"
    for label, password in new_passwords.items():
        assert current.unlock(ACCOUNT, password).slot_label == label
        with pytest.raises(WrongPassword):
            current.unlock(ACCOUNT, device_password(label))
    body = split_file(current.path(ACCOUNT).read_bytes())
    assert body["version"] == 2 and all("public_key" in slot for slot in body["slots"])
    assert len({slot["kdf"]["salt"] for slot in body["slots"]}) == 1


def test_concurrent_first_logins_convert_every_old_form_slot(state_dir: Path) -> None:
    """Devices logging in at once to a version 1 file, each through its own store (as separate
    processes): every slot ends in the public-key form and every password still opens."""
    write_legacy_file(TokenStore(state_dir, scrypt_n=FAST_N), FAST_N)
    start = threading.Barrier(len(DEVICES))
    errors: list[BaseException] = []

    def login(label: str) -> None:
        try:
            daemon = TokenStore(state_dir, scrypt_n=FAST_N)
            start.wait(timeout=30)
            for _ in range(20):  # a write that lost to another slot's conversion is retried
                unlocked = daemon.unlock(ACCOUNT, device_password(label))
                if not unlocked.stale_slot:
                    return
                daemon.upgrade_slot(unlocked, device_password(label))
            raise AssertionError(f"{label} was never converted")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=login, args=(label,)) for label in DEVICES]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    fresh = TokenStore(state_dir, scrypt_n=FAST_N)
    for label in DEVICES:
        opened = fresh.unlock(ACCOUNT, device_password(label))
        assert opened.slot_label == label and opened.payload == PAYLOAD
    old_form = [slot.label for slot in fresh.info(ACCOUNT).slots if slot.old_form]
    assert old_form == ["default"]  # the one nobody used
    assert fresh.unlock(ACCOUNT, PASSWORD).stale_slot


def test_rotate_needs_the_service_key_for_a_keyfile_slot(store: TokenStore) -> None:
    created = store.create(ACCOUNT, PAYLOAD, META, password=PASSWORD, service_key=SERVICE_KEY)
    with pytest.raises(SlotError, match="service_key_file"):
        store.rotate(created, PASSWORD, generate=lambda: Secret("x" * 20))
    with pytest.raises(SlotError, match="does not open"):
        store.rotate(created, PASSWORD, generate=lambda: Secret("x" * 20),
                     service_key=bytes(32))
    assert store.unlock(ACCOUNT, PASSWORD).key_id == created.key_id  # nothing written
