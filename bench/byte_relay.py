"""``python -m bench.byte_relay PORT…``: the floor of any one-hop proxy written in Python.

A plain asyncio TCP relay in a process of its own: one loopback listener per upstream port
on 127.0.0.1, each connection forwarded byte for byte (``data_received`` → ``write``, the
relay path xoauth2-proxy uses after login) with no TLS and no protocol work; the client's TLS
goes through it to the upstream. The direct client through it shows what one extra hop costs
on this machine before a proxy does anything at all. Prints the listening ports, one line.
"""

from __future__ import annotations

import asyncio
import sys


class _Side(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.early: list[bytes] = []  # client bytes before the upstream connection is up

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)
        else:
            self.early.append(data)

    def eof_received(self) -> bool:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


async def _serve(upstream_port: int) -> int:
    loop = asyncio.get_running_loop()

    def accept() -> _Side:
        front = _Side()

        async def connect() -> None:
            try:
                _, back = await loop.create_connection(_Side, "127.0.0.1", upstream_port)
            except OSError:
                if front.transport is not None:
                    front.transport.close()
                return
            back.peer, front.peer = front, back
            assert back.transport is not None
            for data in front.early:
                back.transport.write(data)
            front.early.clear()
        loop.create_task(connect())
        return front

    server = await loop.create_server(accept, "127.0.0.1", 0, backlog=4096)
    return int(server.sockets[0].getsockname()[1])


async def main(ports: list[int]) -> None:
    listening = [await _serve(port) for port in ports]
    print(" ".join(map(str, listening)), flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main([int(p) for p in sys.argv[1:]]))
