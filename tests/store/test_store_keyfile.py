"""Service key files: generate (raw, 0600, no overwrite) and read (clear errors, warnings)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from proxy.store import KeyFileError, generate_key_file, read_key_file


def test_generate_then_read(tmp_path: Path) -> None:
    path = tmp_path / "service.key"
    generate_key_file(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    key = read_key_file(path)
    assert len(key) == 32
    assert key == path.read_bytes()
    other = tmp_path / "other.key"
    generate_key_file(other)
    assert read_key_file(other) != key


def test_generate_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "service.key"
    path.write_bytes(b"precious" * 8)
    with pytest.raises(KeyFileError, match="already exists"):
        generate_key_file(path)
    assert path.read_bytes() == b"precious" * 8


def test_missing_key_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.key"
    with pytest.raises(KeyFileError) as excinfo:
        read_key_file(path)
    assert str(path) in str(excinfo.value)
    assert "head -c 32 /dev/urandom" in str(excinfo.value)


@pytest.mark.parametrize("size", [0, 1, 31])
def test_short_key_file(tmp_path: Path, size: int) -> None:
    path = tmp_path / "short.key"
    path.write_bytes(b"k" * size)
    os.chmod(path, 0o600)
    with pytest.raises(KeyFileError, match=f"holds {size} bytes"):
        read_key_file(path)


def test_content_is_the_key_byte_for_byte(tmp_path: Path) -> None:
    path = tmp_path / "k"
    path.write_bytes(b"x" * 40 + b"\n")
    os.chmod(path, 0o600)
    assert read_key_file(path) == b"x" * 40 + b"\n"


def test_oversized_and_non_regular(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(b"x" * 5000)
    with pytest.raises(KeyFileError, match="5000 bytes"):
        read_key_file(big)
    with pytest.raises(KeyFileError, match="not a regular file"):
        read_key_file(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(KeyFileError, match="not a regular file"):
        read_key_file(fifo)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_key_file_others_can_read_is_refused(tmp_path: Path, mode: int) -> None:
    """The service key opens the tokens alone: a copy others can read is refused, not warned
    about."""
    path = tmp_path / "service.key"
    path.write_bytes(os.urandom(32))
    os.chmod(path, mode)
    with pytest.raises(KeyFileError) as excinfo:
        read_key_file(path)
    assert f"chmod 600 {path}" in str(excinfo.value) and f"{mode:04o}" in str(excinfo.value)
