"""Regression: closing a TLS endpoint twice must not break its end-of-stream callback.

Python 3.11's ``_SSLProtocolTransport.close()`` called a second time drops its protocol, and
``get_extra_info`` then raises AttributeError. The session closes both endpoints in its
``finally`` after the relay may already have closed them; when the peer's close_notify then
completed the TLS shutdown, ``Endpoint.eof_received`` asked the dead transport for
``sslcontext`` and asyncio logged "Error calling eof_received()". Found by the reset tests in
``test_hostile_input.py`` (about one run in four).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from proxy.demo import certs
from proxy.server.endpoint import Endpoint
from tests.hardening.conftest import Trouble, client_context, server_context


async def test_double_close_then_close_notify(tmp_path: Path, trouble: Trouble) -> None:
    paths = certs.generate(tmp_path / "certs")
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[Endpoint] = loop.create_future()
    server = await loop.create_server(lambda: Endpoint(on_connect=accepted.set_result),
                                      "127.0.0.1", 0, ssl=server_context(paths))
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_context(paths), server_hostname="127.0.0.1")
        endpoint = await asyncio.wait_for(accepted, 10)
        endpoint.close()
        endpoint.close()  # as Session.run's finally does after the relay closed it
        async with asyncio.timeout(10):
            assert await reader.read() == b""  # the server's close_notify
        writer.close()  # our close_notify completes the server's TLS shutdown
        await asyncio.wait_for(endpoint.wait_closed(), 10)
        assert endpoint.is_closed
    finally:
        server.close()
    trouble.check()


def test_close_is_idempotent() -> None:
    class Transport(asyncio.Transport):
        closes = 0

        def close(self) -> None:
            self.closes += 1

        def is_closing(self) -> bool:
            return self.closes > 0

    endpoint = Endpoint()
    transport = Transport()
    endpoint.transport = transport
    endpoint.close()
    endpoint.close()
    assert transport.closes == 1
