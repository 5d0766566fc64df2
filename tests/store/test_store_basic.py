"""TokenStore round trips, modes, file names, secrecy on disk, slots, FileReplaced, touch_slot."""

from __future__ import annotations

import base64
import dataclasses
import os
import re
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.secret import Secret
from proxy.store import (
    CorruptTokenFile,
    FileReplaced,
    Meta,
    SlotError,
    TokenFileExists,
    TokenFileMissing,
    TokenStore,
    Unlocked,
    WrongPassword,
)
from proxy.store import store as store_mod
from proxy.store.backend import FileBackend
from tests.store.storetools import (
    ACCOUNT,
    FAST_N,
    META,
    PASSWORD,
    PAYLOAD,
    SERVICE_KEY,
    doctor,
    split_file,
)

NAME_RE = re.compile(r"[A-Za-z0-9_@+][A-Za-z0-9._@+-]*-[0-9a-f]{16}\.tokens")


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# --- round trips --------------------------------------------------------------------------


def test_create_then_unlock_in_a_fresh_instance(store: TokenStore, state_dir: Path) -> None:
    created = store.create(ACCOUNT, PAYLOAD, META, password=PASSWORD)
    other = TokenStore(state_dir, scrypt_n=FAST_N)
    opened = other.unlock(ACCOUNT, Secret(PASSWORD.reveal()))
    assert opened.payload == PAYLOAD
    assert opened.account == ACCOUNT
    assert opened.key_id == created.key_id
    assert opened.slot_label == "default"
    assert opened.data_key == created.data_key
    assert opened.meta == created.meta
    assert opened.meta.identity == META.identity
    assert opened.meta.updated_at > 0  # stamped by the store


def test_info_and_accounts_need_no_secret(store: TokenStore, created: Unlocked) -> None:
    info = store.info(ACCOUNT)
    assert info.account == ACCOUNT
    assert info.path == store.path(ACCOUNT)
    assert info.meta == created.meta
    assert [(s.label, s.kind, s.last_used_at) for s in info.slots] == [
        ("default", "password", None)
    ]
    assert store.accounts() == [ACCOUNT]
    assert store.exists(ACCOUNT)
    assert not store.exists("bob@example.com")


def test_missing_file(store: TokenStore) -> None:
    with pytest.raises(TokenFileMissing) as excinfo:
        store.unlock("nobody@example.com", PASSWORD)
    assert "xoauth2-proxy login nobody@example.com" in str(excinfo.value)
    with pytest.raises(TokenFileMissing):
        store.info("nobody@example.com")
    with pytest.raises(TokenFileMissing):
        store.remove_slot("nobody@example.com", "default")
    assert store.delete("nobody@example.com") is False


def test_modes(store: TokenStore, state_dir: Path, created: Unlocked) -> None:
    assert mode(state_dir) == 0o700
    for name in os.listdir(state_dir):
        assert mode(state_dir / name) == 0o600, name
    store.save(created, b"new", META)
    assert mode(store.path(ACCOUNT)) == 0o600


def test_modes_with_a_lax_umask(state_dir: Path) -> None:
    old = os.umask(0)
    try:
        store = TokenStore(state_dir, scrypt_n=FAST_N)
        store.create(ACCOUNT, PAYLOAD, META, password=PASSWORD)
    finally:
        os.umask(old)
    assert mode(state_dir) == 0o700
    for name in os.listdir(state_dir):
        assert mode(state_dir / name) == 0o600, name


def test_file_holds_no_secret(store: TokenStore) -> None:
    password = "Pässwörd-hunter2-Secret"
    unlocked = store.create(
        ACCOUNT, PAYLOAD, META, password=Secret(password), service_key=SERVICE_KEY
    )
    raw = store.path(ACCOUNT).read_bytes()
    forbidden = [
        PAYLOAD,
        b"REFRESH-TOKEN",
        base64.b64encode(PAYLOAD),
        password.encode(),
        password.encode("latin-1"),
        b"hunter2",
        SERVICE_KEY,
        base64.b64encode(SERVICE_KEY),
        SERVICE_KEY.hex().encode(),
        unlocked.data_key,
        base64.b64encode(unlocked.data_key),
        unlocked.data_key.hex().encode(),
    ]
    for secret in forbidden:
        assert secret not in raw, secret


def test_unlocked_repr_hides_secrets(created: Unlocked) -> None:
    text = repr(created)
    assert "REFRESH" not in text
    assert "data_key" not in text and "payload" not in text
    assert created.key_id in text


def test_wrong_password_ten_times_leaves_the_file_identical(
    store: TokenStore, state_dir: Path, created: Unlocked
) -> None:
    path = store.path(ACCOUNT)
    before = path.read_bytes()
    st_before = os.stat(path)
    listing = sorted(os.listdir(state_dir))
    for attempt in range(10):
        with pytest.raises(WrongPassword):
            store.unlock(ACCOUNT, Secret(f"wrong-{attempt % 3}"))
    assert path.read_bytes() == before
    st_after = os.stat(path)
    assert (st_after.st_ino, st_after.st_mtime_ns) == (st_before.st_ino, st_before.st_mtime_ns)
    assert sorted(os.listdir(state_dir)) == listing


def test_create_refuses_an_existing_file(store: TokenStore, created: Unlocked) -> None:
    before = store.path(ACCOUNT).read_bytes()
    with pytest.raises(TokenFileExists):
        store.create(ACCOUNT, b"other", META, password=Secret("other"))
    assert store.path(ACCOUNT).read_bytes() == before


def test_create_needs_a_secret(store: TokenStore) -> None:
    with pytest.raises(ValueError):
        store.create(ACCOUNT, PAYLOAD, META, password=None)
    with pytest.raises(ValueError):
        store.create(ACCOUNT, PAYLOAD, META, password=Secret(""))
    with pytest.raises(TypeError):
        store.create(ACCOUNT, PAYLOAD, META, password="plain str")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        store.create(ACCOUNT, PAYLOAD, META, password=None, service_key=b"short")
    assert not store.exists(ACCOUNT)


def test_replace_keeps_nothing_of_the_old_file(store: TokenStore, created: Unlocked) -> None:
    store.add_password_slot(created, "scanner", Secret("scanner-pw"))
    new = store.create(ACCOUNT, b"fresh", META, password=Secret("new-pw"), replace=True)
    assert new.key_id != created.key_id
    assert [s.label for s in store.info(ACCOUNT).slots] == ["default"]
    for old in (PASSWORD, Secret("scanner-pw")):
        with pytest.raises(WrongPassword):
            store.unlock(ACCOUNT, old)
    assert store.unlock(ACCOUNT, Secret("new-pw")).payload == b"fresh"


def test_service_key_only(store: TokenStore, state_dir: Path) -> None:
    created = store.create(ACCOUNT, PAYLOAD, META, password=None, service_key=SERVICE_KEY)
    assert created.slot_label == "service"
    other = TokenStore(state_dir, scrypt_n=FAST_N)
    assert other.unlock_with_service_key(ACCOUNT, SERVICE_KEY).payload == PAYLOAD
    with pytest.raises(WrongPassword):
        other.unlock_with_service_key(ACCOUNT, bytes(32))
    with pytest.raises(WrongPassword, match="no password slot"):
        other.unlock(ACCOUNT, PASSWORD)


def test_password_and_service_key(store: TokenStore) -> None:
    store.create(ACCOUNT, PAYLOAD, META, password=PASSWORD, service_key=SERVICE_KEY)
    assert [(s.label, s.kind) for s in store.info(ACCOUNT).slots] == [
        ("default", "password"),
        ("service", "keyfile"),
    ]
    by_key = store.unlock_with_service_key(ACCOUNT, SERVICE_KEY)
    by_password = store.unlock(ACCOUNT, PASSWORD)
    assert by_key.payload == by_password.payload == PAYLOAD
    assert by_key.slot_label == "service"
    with pytest.raises(SlotError):
        store.create(
            "bob@example.com",
            PAYLOAD,
            META,
            password=PASSWORD,
            label="service",
            service_key=SERVICE_KEY,
        )


def test_password_is_nfc_normalised(store: TokenStore) -> None:
    store.create(ACCOUNT, PAYLOAD, META, password=Secret("caf\u00e9"))
    assert store.unlock(ACCOUNT, Secret("cafe\u0301")).payload == PAYLOAD


# --- save / set_meta / FileReplaced ------------------------------------------------------


def test_save_and_set_meta(store: TokenStore, state_dir: Path, created: Unlocked) -> None:
    meta2 = dataclasses.replace(META, needs_reauth="AADSTS50173: the grant has expired")
    saved = store.save(created, b"payload-2", meta2)
    assert saved.payload == b"payload-2"
    assert saved.meta.needs_reauth == meta2.needs_reauth
    fresh = TokenStore(state_dir, scrypt_n=FAST_N).unlock(ACCOUNT, PASSWORD)
    assert fresh.payload == b"payload-2"
    assert fresh.meta == saved.meta
    # set_meta keeps the file's current payload, even from a stale Unlocked
    store.save(saved, b"payload-3", META)
    meta3 = dataclasses.replace(META, refresh_token_present=False)
    result = store.set_meta(created, meta3)
    assert result.payload == b"payload-3"
    opened = store.unlock(ACCOUNT, PASSWORD)
    assert opened.payload == b"payload-3"
    assert opened.meta.refresh_token_present is False
    assert store.info(ACCOUNT).meta == opened.meta


def test_save_keeps_slots_added_by_another_writer(
    store: TokenStore, state_dir: Path, created: Unlocked
) -> None:
    cli = TokenStore(state_dir, scrypt_n=FAST_N)
    cli_unlocked = cli.unlock(ACCOUNT, PASSWORD)
    cli.add_password_slot(cli_unlocked, "scanner-2nd-floor", Secret("scanner"))
    store.save(created, b"refreshed", META)  # the daemon's stale view has one slot
    labels = [s.label for s in store.info(ACCOUNT).slots]
    assert labels == ["default", "scanner-2nd-floor"]
    opened = store.unlock(ACCOUNT, Secret("scanner"))
    assert opened.payload == b"refreshed"
    assert opened.slot_label == "scanner-2nd-floor"
    # ...and a slot removed by the other writer stays removed
    cli.remove_slot(ACCOUNT, "scanner-2nd-floor")
    store.save(created, b"again", META)
    assert [s.label for s in store.info(ACCOUNT).slots] == ["default"]


def test_file_replaced_after_a_new_login(
    store: TokenStore, state_dir: Path, created: Unlocked
) -> None:
    cli = TokenStore(state_dir, scrypt_n=FAST_N)
    cli.create(ACCOUNT, b"new login", META, password=PASSWORD, replace=True)
    after = store.path(ACCOUNT).read_bytes()
    with pytest.raises(FileReplaced):
        store.save(created, b"stale", META)
    with pytest.raises(FileReplaced):
        store.set_meta(created, META)
    with pytest.raises(FileReplaced):
        store.add_password_slot(created, "late", Secret("late"))
    with pytest.raises(FileReplaced):
        store.add_service_key_slot(created, SERVICE_KEY)
    with pytest.raises(FileReplaced):
        store.touch_slot(created)
    assert store.path(ACCOUNT).read_bytes() == after
    assert store.unlock(ACCOUNT, PASSWORD).payload == b"new login"


def test_save_after_delete(store: TokenStore, created: Unlocked) -> None:
    assert store.delete(ACCOUNT) is True
    assert not store.exists(ACCOUNT)
    assert store.accounts() == []
    with pytest.raises(TokenFileMissing):
        store.save(created, b"x", META)
    assert not store.exists(ACCOUNT)


def test_save_rejects_a_forged_unlocked(store: TokenStore, created: Unlocked) -> None:
    forged = dataclasses.replace(created, data_key=bytes(32))
    with pytest.raises(ValueError):
        store.save(forged, b"x", META)


def test_reader_sees_a_same_size_rewrite(
    store: TokenStore, state_dir: Path, created: Unlocked
) -> None:
    reader = TokenStore(state_dir, scrypt_n=FAST_N)
    assert reader.unlock(ACCOUNT, PASSWORD).payload == PAYLOAD
    same_size = PAYLOAD.replace(b"0123", b"4567")
    store.save(created, same_size, META)
    assert reader.unlock(ACCOUNT, PASSWORD).payload == same_size


def test_tampered_meta_is_display_only(store: TokenStore, created: Unlocked) -> None:
    def change(body: dict) -> None:
        body["meta"]["identity"] = "mallory@example.com"

    doctor(store.path(ACCOUNT), change)
    assert store.info(ACCOUNT).meta.identity == "mallory@example.com"
    with pytest.raises(CorruptTokenFile, match="altered"):
        store.unlock(ACCOUNT, PASSWORD)


def test_swapped_slot_labels_do_not_open(store: TokenStore, created: Unlocked) -> None:
    store.add_password_slot(created, "second", Secret("second"))

    def swap(body: dict) -> None:
        first, second = body["slots"]
        first["label"], second["label"] = second["label"], first["label"]

    doctor(store.path(ACCOUNT), swap)
    fresh = TokenStore(store.state_dir, scrypt_n=FAST_N)
    with pytest.raises(WrongPassword):
        fresh.unlock(ACCOUNT, PASSWORD)


# --- slots ---------------------------------------------------------------------------------


def test_second_slot_until_removed(store: TokenStore, state_dir: Path, created: Unlocked) -> None:
    store.add_password_slot(created, "scanner-2nd-floor", Secret("scanner-pw"))
    fresh = TokenStore(state_dir, scrypt_n=FAST_N)
    opened = fresh.unlock(ACCOUNT, Secret("scanner-pw"))
    assert opened.payload == PAYLOAD
    assert opened.slot_label == "scanner-2nd-floor"
    assert opened.key_id == created.key_id
    store.remove_slot(ACCOUNT, "scanner-2nd-floor")
    for instance in (store, fresh, TokenStore(state_dir, scrypt_n=FAST_N)):
        with pytest.raises(WrongPassword):
            instance.unlock(ACCOUNT, Secret("scanner-pw"))
        assert instance.unlock(ACCOUNT, PASSWORD).payload == PAYLOAD


def test_slot_errors(store: TokenStore, created: Unlocked) -> None:
    with pytest.raises(SlotError, match="already exists"):
        store.add_password_slot(created, "default", Secret("x"))
    with pytest.raises(SlotError, match="kept for the service key"):
        store.add_password_slot(created, "service", Secret("x"))
    with pytest.raises(SlotError, match="no slot"):
        store.remove_slot(ACCOUNT, "nope")
    with pytest.raises(SlotError, match="last slot"):
        store.remove_slot(ACCOUNT, "default")
    for bad in ("", "has space", "-dash", "x" * 65, "a/b", "..", "é"):
        with pytest.raises(SlotError):
            store.add_password_slot(created, bad, Secret("x"))
    with pytest.raises(ValueError):
        store.add_password_slot(created, "empty", Secret(""))
    store.add_service_key_slot(created, SERVICE_KEY)
    with pytest.raises(SlotError, match="keyfile slot"):
        store.add_service_key_slot(created, bytes(32), label="service-2")
    with pytest.raises(ValueError):
        store.add_service_key_slot(created, b"too short", label="service-3")
    assert [s.label for s in store.info(ACCOUNT).slots] == ["default", "service"]


def test_remove_keyfile_slot_and_rotate(store: TokenStore, created: Unlocked) -> None:
    store.add_service_key_slot(created, SERVICE_KEY)
    assert store.unlock_with_service_key(ACCOUNT, SERVICE_KEY).payload == PAYLOAD
    store.remove_slot(ACCOUNT, "service")
    with pytest.raises(WrongPassword):
        store.unlock_with_service_key(ACCOUNT, SERVICE_KEY)
    new_key = os.urandom(48)
    store.add_service_key_slot(created, new_key, label="service")
    assert store.unlock_with_service_key(ACCOUNT, new_key).payload == PAYLOAD


def test_removing_the_password_slot_leaves_the_service_slot(store: TokenStore) -> None:
    store.create(ACCOUNT, PAYLOAD, META, password=PASSWORD, service_key=SERVICE_KEY)
    store.remove_slot(ACCOUNT, "default")
    with pytest.raises(WrongPassword):
        store.unlock(ACCOUNT, PASSWORD)
    with pytest.raises(SlotError, match="last slot"):
        store.remove_slot(ACCOUNT, "service")
    assert store.unlock_with_service_key(ACCOUNT, SERVICE_KEY).payload == PAYLOAD


def test_touch_slot_at_most_hourly(
    store: TokenStore, state_dir: Path, created: Unlocked, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = store.path(ACCOUNT)
    store.touch_slot(created)
    first = store.info(ACCOUNT).slots[0].last_used_at
    assert first is not None
    ino = os.stat(path).st_ino
    store.touch_slot(created)  # in-memory no-op
    TokenStore(state_dir, scrypt_n=FAST_N).touch_slot(created)  # on-disk check, no write
    assert os.stat(path).st_ino == ino
    assert store.info(ACCOUNT).slots[0].last_used_at == first
    monkeypatch.setattr(store_mod, "TOUCH_INTERVAL", 0.0)
    store.touch_slot(created)
    assert os.stat(path).st_ino != ino
    second = store.info(ACCOUNT).slots[0].last_used_at
    assert second is not None and second >= first
    assert store.unlock(ACCOUNT, PASSWORD).payload == PAYLOAD


def test_touch_slot_of_a_removed_slot_is_a_no_op(store: TokenStore, created: Unlocked) -> None:
    store.add_password_slot(created, "scanner", Secret("scanner"))
    scanner = store.unlock(ACCOUNT, Secret("scanner"))
    store.remove_slot(ACCOUNT, "scanner")
    before = store.path(ACCOUNT).read_bytes()
    store.touch_slot(scanner)
    assert store.path(ACCOUNT).read_bytes() == before


# --- file names ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "account",
    [
        "../../etc/passwd",
        "/etc/shadow",
        "a/b",
        "..",
        ".",
        ".hidden",
        "-rf",
        "*?[x]",
        "ü@例え.jp",
        "x" * 320,
        "a\\b",
        "CON",
        "name with spaces",
    ],
)
def test_file_names_stay_inside(store: TokenStore, account: str) -> None:
    path = store.path(account)
    assert path.parent == store.state_dir
    assert NAME_RE.fullmatch(path.name), path.name
    store.create(account, PAYLOAD, META, password=PASSWORD)
    assert store.unlock(account, PASSWORD).payload == PAYLOAD
    assert store.accounts() == [account]
    assert sorted(p.name for p in store.state_dir.iterdir() if p.suffix == ".tokens") == [path.name]


def test_readable_prefix(store: TokenStore) -> None:
    assert store.path("Alice@Example.com").name.startswith("Alice@Example.com-")
    assert store.path("Alice@Example.com") != store.path("alice@example.com")


@pytest.mark.parametrize("account", ["", " lead", "trail ", "new\nline", "nul\x00", "x" * 321])
def test_invalid_account_names(store: TokenStore, account: str) -> None:
    with pytest.raises(ValueError):
        store.path(account)


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=80), st.text(min_size=1, max_size=80))
def test_any_account_name_maps_inside_and_uniquely(a: str, b: str) -> None:
    store = FileBackend.__new__(FileBackend)
    store.state_dir = Path("/nonexistent/state")
    try:
        pa = store.where(a)
    except ValueError:
        return
    assert pa.parent == store.state_dir
    assert NAME_RE.fullmatch(pa.name)
    try:
        pb = store.where(b)
    except ValueError:
        return
    assert (pa == pb) == (a == b)


def test_accounts_skips_foreign_and_corrupt_files(
    store: TokenStore, created: Unlocked, caplog: pytest.LogCaptureFixture
) -> None:
    store.create("bob@example.com", PAYLOAD, META, password=PASSWORD)
    # a copy under a name that is not its own, and a junk file
    (store.state_dir / "copy-0000000000000000.tokens").write_bytes(store.path(ACCOUNT).read_bytes())
    (store.state_dir / "junk-0000000000000000.tokens").write_bytes(b"junk")
    (store.state_dir / "notes.txt").write_text("ignored")
    assert store.accounts() == ["alice@example.com", "bob@example.com"]
    assert "copy-0000000000000000.tokens" in caplog.text
    assert "junk-0000000000000000.tokens" in caplog.text


def test_file_is_documented_json(store: TokenStore, created: Unlocked) -> None:
    data = store.path(ACCOUNT).read_bytes()
    body = split_file(data)
    assert body["format"] == "xoauth2-proxy-tokens"
    assert body["version"] == 2  # it has a public-key slot (and so an anchor)
    assert sorted(body["anchor"]) == ["ciphertext", "nonce"]
    assert body["account"] == ACCOUNT
    assert body["key_id"] == created.key_id
    slot = body["slots"][0]
    assert slot["kdf"]["n"] == FAST_N
    assert sorted(slot) == ["created_at", "ephemeral_key", "kdf", "kind", "label", "last_used_at",
                            "nonce", "private_key", "public_key", "wrapped_key"]
    assert sorted(slot["private_key"]) == ["ciphertext", "nonce"]
    assert data.count(b"\n") == 2 and data.split(b"\n")[1].startswith(b"sha256:")


def test_meta_validation() -> None:
    with pytest.raises(ValueError):
        Meta(None, "", None, False)
    with pytest.raises(TypeError):
        Meta(None, "device_code", "soon", False)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Meta(None, "device_code", float("inf"), False)
    with pytest.raises(TypeError):
        Meta(None, "device_code", None, 1)  # type: ignore[arg-type]
    assert Meta(None, "device_code", 5, False).access_token_expires_at == 5.0
