"""Fixtures for the operations tests: the service manager's notify socket, and proxy child
processes stopped at the end of the test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.ops.util import NotifySocket, ProxyProcess


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    sock = NotifySocket()
    yield sock
    sock.close()


@pytest.fixture
def processes() -> Iterator[list[ProxyProcess]]:
    started: list[ProxyProcess] = []
    yield started
    for proc in started:
        proc.stop()
