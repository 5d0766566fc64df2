"""Atomic writes: injected disk errors, SIGKILLed writers, stale temp files, concurrent writers."""

from __future__ import annotations

import errno
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from proxy.secret import Secret
from proxy.store import StoreWriteError, TokenStore, Unlocked
from proxy.store import atomic as atomic_mod
from tests.store.storetools import ACCOUNT, FAST_N, META, PASSWORD, PAYLOAD, SERVICE_KEY

REPO = Path(__file__).resolve().parents[2]


class FaultyOs:
    """Stands in for the ``os`` module inside ``proxy.store.atomic``; fails chosen calls."""

    def __init__(self, fail: str, after: int = 0) -> None:
        self._fail = fail
        self._after = after
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def _maybe_fail(self, name: str) -> None:
        if name == self._fail:
            self.calls += 1
            if self.calls > self._after:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def open(self, path: Any, flags: int, mode: int = 0o777) -> int:
        if str(path).endswith(".tmp"):
            self._maybe_fail("open")
        return os.open(path, flags, mode)

    def write(self, fd: int, data: Any) -> int:
        self._maybe_fail("write")
        return os.write(fd, bytes(data[: max(1, len(data) // 3)]))  # short writes

    def fsync(self, fd: int) -> None:
        self._maybe_fail("fsync")
        os.fsync(fd)

    def replace(self, src: Any, dst: Any) -> None:
        self._maybe_fail("replace")
        os.replace(src, dst)


def temp_files(state_dir: Path) -> list[str]:
    return [name for name in os.listdir(state_dir) if name.endswith(".tmp")]


@pytest.mark.parametrize(
    ("fail", "after"), [("open", 0), ("write", 0), ("write", 1), ("fsync", 0), ("replace", 0)]
)
def test_disk_full_keeps_the_old_file(
    store: TokenStore,
    state_dir: Path,
    created: Unlocked,
    monkeypatch: pytest.MonkeyPatch,
    fail: str,
    after: int,
) -> None:
    path = store.path(ACCOUNT)
    before = path.read_bytes()
    faulty = FaultyOs(fail, after)
    monkeypatch.setattr(atomic_mod, "os", faulty)
    with pytest.raises(StoreWriteError) as excinfo:
        store.save(created, b"X" * 100_000, META)
    assert "no space left on device" in str(excinfo.value)
    assert excinfo.value.path == path
    assert faulty.calls > after
    assert path.read_bytes() == before
    assert temp_files(state_dir) == []
    with pytest.raises(StoreWriteError):
        store.add_password_slot(created, "scanner", Secret("scanner"))
    with pytest.raises(StoreWriteError):
        store.create("bob@example.com", PAYLOAD, META, password=PASSWORD)
    assert not store.exists("bob@example.com")
    assert temp_files(state_dir) == []
    monkeypatch.undo()
    # the daemon keeps its Unlocked and saves again once the disk has room
    assert store.unlock(ACCOUNT, PASSWORD).payload == PAYLOAD
    store.save(created, b"later", META)
    assert store.unlock(ACCOUNT, PASSWORD).payload == b"later"


def test_stale_temp_files_are_swept_by_the_next_writer(
    store: TokenStore, state_dir: Path, created: Unlocked
) -> None:
    path = store.path(ACCOUNT)
    stale = state_dir / f".{path.name}.0123456789abcdef.tmp"
    stale.write_bytes(b"half a file")
    unrelated = state_dir / ".other-0000000000000000.tokens.0123456789abcdef.tmp"
    unrelated.write_bytes(b"not ours to sweep")
    assert store.accounts() == [ACCOUNT]
    store.save(created, b"new", META)
    assert not stale.exists()
    assert unrelated.exists()


CHILD = r"""
import re, sys
from pathlib import Path
from proxy.store import Meta, TokenStore
state, key = Path(sys.argv[1]), bytes.fromhex(sys.argv[2])
store = TokenStore(state, scrypt_n=1024)
unlocked = store.unlock_with_service_key("alice@example.com", key)
gen = int(re.match(rb"gen-(\d+);", unlocked.payload).group(1))
meta = Meta(None, "device_code", None, True)
print("ready", flush=True)
while True:
    gen += 1
    unlocked = store.save(unlocked, b"gen-%010d;" % gen * 30000, meta)
"""


def check_generation(payload: bytes) -> int:
    match = re.match(rb"gen-(\d+);", payload)
    assert match is not None
    assert payload == match.group(0) * (len(payload) // len(match.group(0))), "torn payload"
    return int(match.group(1))


@pytest.mark.slow
def test_sigkill_during_writes_leaves_old_or_new(store: TokenStore, state_dir: Path) -> None:
    store.create(ACCOUNT, b"gen-0000000000;", META, password=PASSWORD, service_key=SERVICE_KEY)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rng = random.Random(1234)
    last = 0
    progressed = 0
    for _ in range(12):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(state_dir), SERVICE_KEY.hex()],
            stdout=subprocess.PIPE,
            env=env,
            cwd=REPO,
        )
        try:
            assert child.stdout is not None
            assert child.stdout.readline() == b"ready\n"
            time.sleep(rng.uniform(0.0, 0.08))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        assert child.returncode == -signal.SIGKILL
        opened = TokenStore(state_dir, scrypt_n=FAST_N).unlock(ACCOUNT, PASSWORD)
        generation = check_generation(opened.payload)
        assert generation >= last
        progressed += generation > last
        last = generation
        assert len(temp_files(state_dir)) <= 1
    assert progressed >= 6  # the writer really was interrupted mid-stream, repeatedly
    unlocked = store.unlock(ACCOUNT, PASSWORD)
    store.save(unlocked, b"gen-9999999999;", META)
    assert temp_files(state_dir) == []


def test_concurrent_writers_lose_nothing(store: TokenStore, state_dir: Path) -> None:
    """Threads with separate stores (separate flock fds, like processes) add slots and save."""
    store.create(ACCOUNT, PAYLOAD, META, password=PASSWORD)
    errors: list[BaseException] = []
    stop = threading.Event()

    def adder(index: int) -> None:
        try:
            mine = TokenStore(state_dir, scrypt_n=FAST_N)
            unlocked = mine.unlock(ACCOUNT, PASSWORD)
            for round_ in range(3):
                mine.add_password_slot(unlocked, f"dev-{index}-{round_}", Secret(f"pw{index}"))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def saver() -> None:
        try:
            mine = TokenStore(state_dir, scrypt_n=FAST_N)
            unlocked = mine.unlock(ACCOUNT, PASSWORD)
            count = 0
            while not stop.is_set():
                count += 1
                unlocked = mine.save(unlocked, b"save-%d" % count, META)
                time.sleep(0.002)  # a busy daemon, not a tight loop that starves the others
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=adder, args=(i,)) for i in range(6)]
    saver_thread = threading.Thread(target=saver)
    saver_thread.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stop.set()
    saver_thread.join()
    assert errors == []
    labels = {slot.label for slot in store.info(ACCOUNT).slots}
    assert labels == {"default"} | {f"dev-{i}-{r}" for i in range(6) for r in range(3)}
    assert store.unlock(ACCOUNT, Secret("pw3")).payload.startswith(b"save-")
