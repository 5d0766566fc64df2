"""Fixtures for tests that run the proxy against the demo upstream."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.demo.process import DemoUpstream
from tests.proxyenv import ProxyEnv, start_proxy


@pytest.fixture
async def proxy_env(tmp_path: Path, demo_upstream: DemoUpstream) -> AsyncIterator[ProxyEnv]:
    """The demo upstream, an authorised account (tests.proxyenv.USER/PASSWORD) and a running
    daemon with IMAP, POP3 and SMTP listeners on loopback."""
    env = await start_proxy(tmp_path, demo_upstream)
    yield env
    await env.daemon.stop(grace=1)
