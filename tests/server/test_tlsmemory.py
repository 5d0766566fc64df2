"""What asyncio keeps per TLS connection: one read buffer shared by all connections of a loop
(bytes intact when several read at once, and written through the list backlog), no decoded
certificate kept, yet still given."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest

from proxy.demo import certs
from proxy.server import tlsmemory


@pytest.fixture
def contexts(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    if type(asyncio.get_event_loop_policy()).__module__.split(".")[0] != "asyncio":
        pytest.skip("tlsmemory adjusts asyncio's TLS; uvloop has TLS of its own")
    assert tlsmemory.install()
    paths = certs.generate(tmp_path)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(paths.cert_file, paths.key_file)
    return server_ctx, ssl.create_default_context(cafile=str(paths.ca_file))


async def test_connections_share_one_read_buffer_and_bytes_stay_intact(
        contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_ctx, client_ctx = contexts
    payloads = [bytes([i]) * 7 + bytes(range(256)) * 8192 for i in range(3)]  # 2 MiB each

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = (await reader.readexactly(1))[0]
        writer.write(payloads[index])
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    streams = [await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx,
                                             server_hostname="127.0.0.1") for _ in payloads]
    protocols = [w.transport._ssl_protocol for _, w in streams]  # type: ignore[attr-defined]
    assert not any(hasattr(p, "_ssl_buffer") for p in protocols)
    assert all(type(p._write_backlog) is list for p in protocols)
    views = {id(p._ssl_buffer_view.obj) for p in protocols}
    assert len(views) == 1  # one buffer for all three
    assert len(protocols[0]._ssl_buffer_view) >= protocols[0].max_size
    for i, (_, writer) in enumerate(streams):
        writer.write(bytes([i]))
    received = await asyncio.gather(*(r.readexactly(len(payloads[0])) for r, _ in streams))
    assert received == payloads  # read in turns through the one buffer, each intact
    for _, writer in streams:
        writer.close()
    server.close()
    await server.wait_closed()


async def test_peer_certificate_decoded_when_asked_not_kept(
        contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_ctx, client_ctx = contexts
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx,
                                              server_hostname="127.0.0.1")
    protocol = writer.transport._ssl_protocol  # type: ignore[attr-defined]
    assert "peercert" not in protocol._extra
    peercert = writer.get_extra_info("peercert")
    assert peercert == writer.get_extra_info("ssl_object").getpeercert()
    assert ("IP Address", "127.0.0.1") in peercert["subjectAltName"]
    writer.close()
    server.close()
    await server.wait_closed()
