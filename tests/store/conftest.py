"""Fixtures for the token store tests: a fast store, a created file, scrypt counting."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.store import TokenStore, Unlocked
from proxy.store import slots as slots_mod
from tests.store.storetools import ACCOUNT, FAST_N, META, PASSWORD, PAYLOAD, ScryptCounter


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def store(state_dir: Path) -> TokenStore:
    return TokenStore(state_dir, scrypt_n=FAST_N)


@pytest.fixture
def created(store: TokenStore) -> Unlocked:
    return store.create(ACCOUNT, PAYLOAD, META, password=PASSWORD)


@pytest.fixture
def scrypt_calls(monkeypatch: pytest.MonkeyPatch) -> ScryptCounter:
    counter = ScryptCounter(slots_mod.scrypt_derive)
    monkeypatch.setattr(slots_mod, "scrypt_derive", counter)
    return counter
