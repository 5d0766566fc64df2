"""Small TLS read buffers for idle connections, large ones for busy connections.

asyncio gives every TLS connection a zero-filled 256 KiB socket read buffer
(``SSLProtocol.max_size``), so 10,000 idle IMAP sessions — each with a TLS upstream — hold
2.5 GiB doing nothing. A smaller ``max_size`` for everyone saves the memory but costs CPU on
busy connections, because the same value sizes the loop that reads decrypted data. So only
the socket buffer changes: it starts at 4 KiB and grows (×4, up to ``max_size``) the first
time a read fills it. A connection that moves data reaches the full size within four reads;
an idle one never grows.

This adjusts two methods of CPython's ``asyncio.sslproto.SSLProtocol`` (the same in 3.11 to
3.13). If that class ever lacks what it relies on, ``install`` leaves it alone.
"""

from __future__ import annotations

from asyncio import sslproto
from typing import Any

START = 4 * 1024
_installed = False


def install() -> bool:
    """Patch once; True if the adaptive buffer is in use."""
    global _installed
    if _installed:
        return True
    cls: Any = getattr(sslproto, "SSLProtocol", None)
    if cls is None or not all(hasattr(cls, name) for name in
                              ("__init__", "get_buffer", "buffer_updated", "max_size")):
        return False
    original_init, original_updated = cls.__init__, cls.buffer_updated

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self._ssl_buffer = bytearray(START)
        self._ssl_buffer_view = memoryview(self._ssl_buffer)

    def get_buffer(self: Any, n: int) -> memoryview:
        return self._ssl_buffer_view

    def buffer_updated(self: Any, nbytes: int) -> None:
        original_updated(self, nbytes)
        size = len(self._ssl_buffer)
        if nbytes >= size and size < self.max_size:  # a full read: this connection is busy
            self._ssl_buffer = bytearray(min(size * 4, self.max_size))
            self._ssl_buffer_view = memoryview(self._ssl_buffer)

    cls.__init__, cls.get_buffer, cls.buffer_updated = __init__, get_buffer, buffer_updated
    _installed = True
    return True
