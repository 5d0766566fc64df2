"""The state directory: created 0700, refused when shared or owned by someone else."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from proxy.store import InsecureStateDir, TokenStore
from tests.store.storetools import FAST_N


def test_missing_directory_is_created_0700(tmp_path: Path) -> None:
    state = tmp_path / "deep" / "state"
    TokenStore(state, scrypt_n=FAST_N)
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700


def test_existing_private_directory_is_accepted(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chmod(state, 0o700)
    assert TokenStore(state, scrypt_n=FAST_N).state_dir == state


@pytest.mark.parametrize("bad_mode", [0o750, 0o705, 0o770, 0o755, 0o701, 0o710, 0o777])
def test_shared_directory_is_refused(tmp_path: Path, bad_mode: int) -> None:
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(state, bad_mode)
    with pytest.raises(InsecureStateDir) as excinfo:
        TokenStore(state, scrypt_n=FAST_N)
    message = str(excinfo.value)
    assert str(state) in message
    assert f"chmod 700 {state}" in message
    assert f"{bad_mode:04o}" in message
    assert stat.S_IMODE(os.stat(state).st_mode) == bad_mode  # not "fixed" behind our back


def test_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give the directory away")
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chown(state, 65534, 65534)
    with pytest.raises(InsecureStateDir) as excinfo:
        TokenStore(state, scrypt_n=FAST_N)
    assert "owned by uid 65534" in str(excinfo.value)
    assert str(state) in str(excinfo.value)


def test_a_file_is_not_a_state_directory(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.write_text("")
    with pytest.raises(InsecureStateDir, match="not a directory"):
        TokenStore(state, scrypt_n=FAST_N)


def test_symlinked_state_dir_is_refused(tmp_path: Path) -> None:
    """Whoever can change the link could point the daemon at token files of their choice."""
    target = tmp_path / "private"
    target.mkdir(mode=0o700)
    os.chmod(target, 0o700)
    link = tmp_path / "state"
    link.symlink_to(target)
    with pytest.raises(InsecureStateDir) as excinfo:
        TokenStore(link, scrypt_n=FAST_N)
    assert "symbolic link" in str(excinfo.value) and str(target) in str(excinfo.value)


@pytest.mark.parametrize("parent_mode", [0o777, 0o775, 0o757])
def test_state_dir_under_a_writable_parent_is_refused(tmp_path: Path, parent_mode: int) -> None:
    """Others who can write the parent can rename the state directory away and put their own
    in its place."""
    parent = tmp_path / "shared"
    parent.mkdir()
    state = parent / "state"
    state.mkdir(mode=0o700)
    os.chmod(state, 0o700)
    os.chmod(parent, parent_mode)
    with pytest.raises(InsecureStateDir) as excinfo:
        TokenStore(state, scrypt_n=FAST_N)
    assert f"chmod go-w {parent}" in str(excinfo.value)


def test_sticky_shared_parent_is_accepted(tmp_path: Path) -> None:
    parent = tmp_path / "tmp-like"
    parent.mkdir()
    os.chmod(parent, 0o1777)  # noqa: S103 - a /tmp-like parent is the point
    state = parent / "state"
    assert TokenStore(state, scrypt_n=FAST_N).state_dir == state
