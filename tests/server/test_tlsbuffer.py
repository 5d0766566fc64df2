"""The adaptive TLS read buffer: small while idle, full size once data flows, bytes intact."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest

from proxy.demo import certs
from proxy.server import tlsbuffer


async def test_buffer_starts_small_and_grows(tmp_path: Path) -> None:
    if type(asyncio.get_running_loop()).__module__.split(".")[0] != "asyncio":
        pytest.skip("tlsbuffer trims asyncio's TLS buffers; uvloop has TLS of its own")
    assert tlsbuffer.install()
    paths = certs.generate(tmp_path)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(paths.cert_file, paths.key_file)
    client_ctx = ssl.create_default_context(cafile=str(paths.ca_file))
    payload = bytes(range(256)) * 8192  # 2 MiB

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(1)
        writer.write(payload)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx,
                                                   server_hostname="127.0.0.1")
    protocol = writer.transport._ssl_protocol  # type: ignore[attr-defined]
    assert len(protocol._ssl_buffer) == tlsbuffer.START  # idle: small
    writer.write(b"x")
    received = await reader.readexactly(len(payload))
    assert received == payload
    assert len(protocol._ssl_buffer) == protocol.max_size  # busy: grown to full size
    writer.close()
    server.close()
    await server.wait_closed()
