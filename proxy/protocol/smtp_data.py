"""The end of an SMTP message in a byte stream, found without splitting it into lines, and
the line endings that would let a message smuggle commands past the proxy.

After ``354`` the client sends the message dot-stuffed and ends it with a line holding a single
dot: ``CRLF . CRLF`` (RFC 5321 4.1.1.4 and 4.5.2), where the first CRLF may be the end of the
``DATA`` command line itself (an empty message). The proxy relays the stuffed bytes as they
came, so the upstream un-stuffs them exactly as it would for the client; all it needs to know
is where the message ends, which ``DataScanner`` tells chunk by chunk, with C-speed searches
rather than a Python step per line.

A bare LF or a bare CR (one not part of CR LF) is what SMTP smuggling is made of: an upstream
that takes LF as a line end (Postfix before 3.9 by default, and with ``normalize`` for its own
networks) ends the message at ``LF . LF``, ``CRLF . LF`` or ``LF . CRLF`` and runs what follows
as commands of the proxy's logged-in session, where the proxy ends it only at ``CRLF . CRLF``.
So the two must never disagree: by default a message with a bare line ending is refused before
any of its bytes from there on reach the upstream (``bare`` says which); with ``normalise``
every bare CR or LF becomes CR LF, and the proxy ends the message at the dot line the upstream
would see, so that both read the same lines.
"""

from __future__ import annotations

import itertools
import re
from typing import Literal

END_OF_DATA = b"\r\n.\r\n"
_KEEP = len(END_OF_DATA) - 1
_END_OF_DATA = re.compile(re.escape(END_OF_DATA))  # re's literal search: 1.5x bytes.find here
_LINE_END = re.compile(rb"\r\n|\r|\n")
_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")

BareLineEnding = Literal["LF", "CR"]


class DataScanner:
    """Feed the bytes after ``354`` in chunks; ``feed`` says what to send upstream and, at the
    end of the message, which bytes come after it.

    ``size`` counts the bytes passed on so far; once the end is found, the message's size as
    sent upstream (stuffed), without the final ``.CRLF``. ``bare`` is set (and nothing more is
    passed on) when the message has a bare line ending and the scanner does not normalise.
    """

    def __init__(self, *, normalise: bool = False) -> None:
        self.normalise = normalise
        self.size = 0
        self.bare: BareLineEnding | None = None
        self._tail = b"\r\n"  # the last bytes passed on; first, the DATA command's line break
        self._held = b""  # a CR that ended the last chunk: its LF may be the next chunk's first

    def feed(self, chunk: bytes) -> tuple[bytes, bytes | None]:
        """(the bytes to send upstream now, None) while the message goes on; at its end, (the
        last bytes, ending with the end-of-data line, what came after it). After a refused
        bare line ending: always ``(b"", None)``."""
        if self.bare is not None:
            return b"", None
        data = self._held + chunk
        self._held = b""
        if data.endswith(b"\r"):
            data, self._held = data[:-1], b"\r"
        end = self._end(data)
        body = data if end == -1 else data[:end]
        crlf = body.count(b"\r\n")
        if body.count(b"\n") != crlf or body.count(b"\r") != crlf:
            if not self.normalise:
                first = _BARE.search(body)
                self.bare = "CR" if first is not None and first.group() == b"\r" else "LF"
                return b"", None
            return self._normalised(data)
        forward = self._pass(data, end)
        return forward, None if end == -1 else self._rest(data, end)

    def _end(self, data: bytes) -> int:
        """The offset in ``data`` just past the end-of-data line, or -1."""
        tail = self._tail
        at = (tail + data[:_KEEP]).find(END_OF_DATA)  # a marker straddling the chunk boundary
        if at != -1:
            return at + len(END_OF_DATA) - len(tail)
        match = _END_OF_DATA.search(data)
        return -1 if match is None else match.end()

    def _pass(self, data: bytes, end: int) -> bytes:
        """Count and remember what goes upstream: ``data``, or up to ``end`` if it is not -1."""
        if end == -1:
            self.size += len(data)
            self._tail = (self._tail + data[-_KEEP:])[-_KEEP:]
            return data
        self.size += end - 3  # not the ".CRLF" (which may have come in an earlier chunk)
        return data[:end]

    def _rest(self, data: bytes, at: int) -> bytes:
        held, self._held = self._held, b""
        return data[at:] + held

    def _normalised(self, data: bytes) -> tuple[bytes, bytes | None]:
        """``data`` with every line ending made CR LF; the end found in what the upstream sees,
        and the bytes after it taken from ``data`` as the client sent them."""
        lines = _LINE_END.sub(b"\r\n", data)
        end = self._end(lines)
        if end == -1:
            return self._pass(lines, -1), None
        # Each CR LF in ``lines`` stands for one line ending in ``data``, in order.
        breaks = lines.count(b"\r\n", 0, end)
        last = next(itertools.islice(_LINE_END.finditer(data), breaks - 1, None))
        return self._pass(lines, end), self._rest(data, last.end())


__all__ = ["DataScanner", "END_OF_DATA", "BareLineEnding"]
