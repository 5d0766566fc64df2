"""The admin tests' proxy: ``env`` is ``adminenv.start_admin``'s, stopped afterwards."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.demo.process import DemoUpstream
from tests.admin.adminenv import AdminEnv, start_admin


@pytest.fixture
async def env(tmp_path: Path, demo_upstream: DemoUpstream) -> AsyncIterator[AdminEnv]:
    env = await start_admin(tmp_path, demo_upstream)
    yield env
    await env.proxy.daemon.stop(grace=1)
