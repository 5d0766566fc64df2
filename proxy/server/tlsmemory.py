"""What asyncio keeps per TLS connection: one shared socket read buffer, no decoded certificate,
a small write backlog.

asyncio gives every TLS connection its own zero-filled 256 KiB socket read buffer
(``SSLProtocol.max_size``), so 10,000 idle IMAP sessions — each with a TLS upstream — would
hold 2.5 GiB doing nothing. The buffer's contents live only from the socket's ``recv_into``
to the ``buffer_updated`` in the same callback, which copies them into OpenSSL's memory BIO
at once: nothing reads it afterwards. So one buffer per thread (an event loop runs in one
thread, one callback at a time) serves every TLS connection of that loop, at the full
``max_size``, which is also what a busy connection reads best with.

asyncio also keeps the peer's certificate, decoded into a dict (``getpeercert()``: ~2 KiB for
a certificate with a few names, much more for a Microsoft 365 certificate and its long list of
names), in every connection's extra info for the life of the connection. It is decoded again
when asked for (``get_extra_info("peercert")``) instead. And its write backlog, a deque (a
624-byte block even when empty, as it is between writes: the memory BIO takes every write
whole), becomes a list, which supports every operation asyncio does on it.

This adjusts three methods of CPython's ``asyncio.sslproto.SSLProtocol`` (the same in 3.11 to
3.13), on selector event loops only (a proactor loop keeps a read buffer across an overlapped
read, so it could not share one); a connection on another loop (uvloop, whose own TLS is not
this class, but where aiosmtpd's STARTTLS builds it) keeps its own buffer. If that class lacks
what it relies on, ``install`` leaves it alone.
"""

from __future__ import annotations

import sys
import threading
from asyncio import selector_events, sslproto
from typing import Any

_METHODS = ("__init__", "get_buffer", "_on_handshake_complete", "_get_extra_info")
_installed = False


class _Shared(threading.local):
    view: memoryview | None = None


_shared = _Shared()


def shared_buffer(size: int) -> memoryview:
    """This thread's read buffer, at least ``size`` bytes."""
    view = _shared.view
    if view is None or len(view) < size:
        view = _shared.view = memoryview(bytearray(size))
    return view


def install() -> bool:
    """Patch once; True if the shared buffer, lazy certificate and small backlog are in use."""
    global _installed
    if _installed:
        return True
    cls: Any = getattr(sslproto, "SSLProtocol", None)
    if (sys.platform == "win32" or cls is None or not hasattr(cls, "max_size")
            or not all(hasattr(cls, name) for name in _METHODS)):
        return False
    original_init, original_complete = cls.__init__, cls._on_handshake_complete
    original_extra = cls._get_extra_info

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self._write_backlog = []  # append, [0], del [0], clear, truth: all a list does too
        if isinstance(self._loop, selector_events.BaseSelectorEventLoop):
            del self._ssl_buffer  # its own buffer: never used
            self._ssl_buffer_view = shared_buffer(self.max_size)
        # else (uvloop, where aiosmtpd's STARTTLS builds this class too): its own buffer

    def get_buffer(self: Any, n: int) -> memoryview:
        # The thread's buffer when this connection was made (a connection stays on the thread
        # of its loop); buffer_updated copies from this same view.
        return self._ssl_buffer_view

    def _on_handshake_complete(self: Any, handshake_exc: BaseException | None) -> None:
        original_complete(self, handshake_exc)
        self._extra.pop("peercert", None)

    def _get_extra_info(self: Any, name: str, default: Any = None) -> Any:
        if name == "peercert":
            ssl_object = self._extra.get("ssl_object")
            if ssl_object is not None:
                try:
                    return ssl_object.getpeercert()
                except ValueError:  # no handshake done: what asyncio would have kept
                    return default
        return original_extra(self, name, default)

    cls.__init__, cls.get_buffer = __init__, get_buffer
    cls._on_handshake_complete, cls._get_extra_info = _on_handshake_complete, _get_extra_info
    _installed = True
    return True
