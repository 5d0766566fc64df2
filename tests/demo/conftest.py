"""Fixtures for the fake Microsoft 365 mail server tests: the demo CA and a token for ``USER``."""

from __future__ import annotations

import ssl

import pytest

from tests.demo.demotools import IMAP, POP, SMTP, USER


@pytest.fixture
def ctx(demo_upstream) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=demo_upstream.ca_file)


@pytest.fixture
def token(demo_upstream) -> str:
    return demo_upstream.issue_token(USER, [IMAP, POP, SMTP])
