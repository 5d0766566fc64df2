"""The derived-key cache: scrypt once per password and slot, never a hit for another password."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from proxy.secret import Secret
from proxy.store import TokenStore, Unlocked, WrongPassword
from proxy.store.names import TEST_SCRYPT_N_ENV
from tests.store.storetools import (
    ACCOUNT,
    FAST_N,
    META,
    PASSWORD,
    PAYLOAD,
    ScryptCounter,
    split_file,
)


def test_second_unlock_runs_no_scrypt(state_dir: Path, scrypt_calls: ScryptCounter) -> None:
    TokenStore(state_dir, scrypt_n=FAST_N).create(ACCOUNT, PAYLOAD, META, password=PASSWORD)
    assert scrypt_calls.calls == 1
    daemon = TokenStore(state_dir, scrypt_n=FAST_N)
    assert daemon.unlock(ACCOUNT, PASSWORD).payload == PAYLOAD
    assert scrypt_calls.calls == 2
    for _ in range(5):
        assert daemon.unlock(ACCOUNT, Secret(PASSWORD.reveal())).payload == PAYLOAD
    assert scrypt_calls.calls == 2


def test_creator_needs_no_scrypt_to_unlock(store: TokenStore, scrypt_calls: ScryptCounter) -> None:
    store.create(ACCOUNT, PAYLOAD, META, password=PASSWORD)
    store.unlock(ACCOUNT, PASSWORD)
    assert scrypt_calls.calls == 1


def test_cache_survives_saves(
    store: TokenStore, created: Unlocked, scrypt_calls: ScryptCounter
) -> None:
    for index in range(3):
        created = store.save(created, b"p%d" % index, META)
        assert store.unlock(ACCOUNT, PASSWORD).payload == b"p%d" % index
    assert scrypt_calls.calls == 0


def test_a_changed_password_never_hits_the_cache(
    store: TokenStore, created: Unlocked, scrypt_calls: ScryptCounter
) -> None:
    store.unlock(ACCOUNT, PASSWORD)
    assert scrypt_calls.calls == 0
    # a wrong password pays scrypt and fails
    with pytest.raises(WrongPassword):
        store.unlock(ACCOUNT, Secret(PASSWORD.reveal() + "!"))
    assert scrypt_calls.calls == 1
    # password change: new slot, old slot removed -> old password no longer opens anything
    store.add_password_slot(created, "new", Secret("the new one"))
    store.remove_slot(ACCOUNT, "default")
    calls = scrypt_calls.calls
    with pytest.raises(WrongPassword):
        store.unlock(ACCOUNT, PASSWORD)
    assert scrypt_calls.calls == calls + 1  # tried against the new slot, not cached
    assert store.unlock(ACCOUNT, Secret("the new one")).slot_label == "new"


def test_same_password_new_salt_is_a_miss(
    store: TokenStore, state_dir: Path, created: Unlocked, scrypt_calls: ScryptCounter
) -> None:
    daemon = TokenStore(state_dir, scrypt_n=FAST_N)
    daemon.unlock(ACCOUNT, PASSWORD)
    assert scrypt_calls.calls == 1
    # a new login with the same password writes a new salt
    store.create(ACCOUNT, b"relogin", META, password=PASSWORD, replace=True)
    assert scrypt_calls.calls == 2
    assert daemon.unlock(ACCOUNT, PASSWORD).payload == b"relogin"
    assert scrypt_calls.calls == 3


def test_cost_parameters_are_part_of_the_key(state_dir: Path, scrypt_calls: ScryptCounter) -> None:
    slow = TokenStore(state_dir, scrypt_n=2 * FAST_N)
    slow.create(ACCOUNT, PAYLOAD, META, password=PASSWORD)
    body = split_file(slow.path(ACCOUNT).read_bytes())
    assert body["slots"][0]["kdf"]["n"] == 2 * FAST_N
    fast = TokenStore(state_dir, scrypt_n=FAST_N)
    assert fast.unlock(ACCOUNT, PASSWORD).payload == PAYLOAD  # the slot's n is used
    assert scrypt_calls.calls == 2


def test_repeated_wrong_password_costs_scrypt_once(
    store: TokenStore, created: Unlocked, scrypt_calls: ScryptCounter
) -> None:
    for _ in range(5):
        with pytest.raises(WrongPassword):
            store.unlock(ACCOUNT, Secret("stale password on the printer"))
    assert scrypt_calls.calls == 1
    assert store.unlock(ACCOUNT, PASSWORD).payload == PAYLOAD
    assert scrypt_calls.calls == 1


def test_cached_slot_is_tried_first(
    store: TokenStore, state_dir: Path, created: Unlocked, scrypt_calls: ScryptCounter
) -> None:
    for index in range(3):
        store.add_password_slot(created, f"dev{index}", Secret(f"device-{index}"))
    daemon = TokenStore(state_dir, scrypt_n=FAST_N)
    base = scrypt_calls.calls
    assert daemon.unlock(ACCOUNT, Secret("device-2")).slot_label == "dev2"
    assert scrypt_calls.calls == base + 1  # the slots share one salt: one run tries them all
    assert daemon.unlock(ACCOUNT, Secret("device-2")).slot_label == "dev2"
    assert scrypt_calls.calls == base + 1
    assert daemon.unlock(ACCOUNT, PASSWORD).slot_label == "default"
    assert scrypt_calls.calls == base + 2


def test_concurrent_first_logins_share_one_scrypt(
    state_dir: Path, created: Unlocked, scrypt_calls: ScryptCounter
) -> None:
    daemon = TokenStore(state_dir, scrypt_n=FAST_N)
    start = threading.Barrier(8)
    results: list[bytes] = []
    errors: list[BaseException] = []

    def login() -> None:
        try:
            start.wait()
            results.append(daemon.unlock(ACCOUNT, PASSWORD).payload)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=login) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert results == [PAYLOAD] * 8
    assert scrypt_calls.calls == 1


def test_threads_unlock_and_save_together(store: TokenStore, created: Unlocked) -> None:
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            for round_ in range(20):
                unlocked = store.unlock(ACCOUNT, PASSWORD)
                store.save(unlocked, b"w%d-%d" % (index, round_), META)
                store.touch_slot(unlocked)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert store.unlock(ACCOUNT, PASSWORD).payload.startswith(b"w")


def test_default_cost(tmp_path: Path, scrypt_calls: ScryptCounter,
                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the tests' knob: OWASP's minimum for scrypt (n=2**17, r=8, p=1)."""
    monkeypatch.delenv(TEST_SCRYPT_N_ENV, raising=False)
    state = tmp_path / "state"
    store = TokenStore(state)
    store.create(ACCOUNT, PAYLOAD, META, password=PASSWORD)
    kdf = split_file(store.path(ACCOUNT).read_bytes())["slots"][0]["kdf"]
    assert (kdf["name"], kdf["n"], kdf["r"], kdf["p"]) == ("scrypt", 2**17, 8, 1)
    assert len(kdf["salt"]) == 24  # 16 bytes, base64
    daemon = TokenStore(state)
    assert daemon.unlock(ACCOUNT, PASSWORD).payload == PAYLOAD
    assert daemon.unlock(ACCOUNT, PASSWORD).payload == PAYLOAD
    assert scrypt_calls.calls == 2
