"""The tests here run on the loop ``--event-loop`` chooses (CI runs tests/server on asyncio
and on uvloop): make sure they really do, so a uvloop run cannot silently test asyncio."""

from __future__ import annotations

import asyncio

import pytest

from proxy.demo.process import DemoUpstream
from tests.proxyenv import start_proxy


async def test_the_chosen_event_loop_serves(request: pytest.FixtureRequest, tmp_path: object,
                                            demo_upstream: DemoUpstream) -> None:
    chosen = request.config.getoption("--event-loop")
    loop = asyncio.get_running_loop()
    assert type(loop).__module__.split(".")[0] == chosen
    env = await start_proxy(tmp_path, demo_upstream, protocols=("imap",))  # type: ignore[arg-type]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", env.ports["imap"])
        assert (await reader.readline()).startswith(b"* OK")
        writer.close()
    finally:
        await env.daemon.stop(grace=1)
