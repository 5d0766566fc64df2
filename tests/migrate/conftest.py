"""The real email-oauth2-proxy, installed once per test session into a virtualenv of its own."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.migrate.peer import install


@pytest.fixture(scope="session")
def emailproxy_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    python, why = install(tmp_path_factory.mktemp("emailproxy-venv"))
    if python is None:
        pytest.skip(why)
    return python
