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
_DOT = ord(".")
_BREAK = (ord("\r"), ord("\n"))

BareLineEnding = Literal["LF", "CR"]


class DataScanner:
    """Feed the bytes after ``354`` in chunks; ``feed`` says what to send upstream and, at the
    end of the message, which bytes come after it.

    What is passed on is always message content: the end-of-data line's ``.CRLF`` never is,
    so a chunk may end in the middle of it (``CR``, ``CRLF``, ``CRLF .``, ``CRLF . CR``, at any
    byte) and the end is still found once, in the chunk that completes it. The last bytes of a
    chunk that could begin that ``.CRLF`` (a dot at the start of a line, with or without its
    CR) or whose meaning the next byte decides (a CR: part of CR LF, or bare) are held back
    until the next chunk. The CR LF before the dot is the message's last line break, so it is
    passed on either way.

    ``size`` counts the bytes passed on so far; once the end is found, the message's size as
    sent upstream (stuffed), without the final ``.CRLF``. ``bare`` is set (and nothing more is
    passed on) when the message has a bare line ending and the scanner does not normalise.
    """

    def __init__(self, *, normalise: bool = False) -> None:
        self.normalise = normalise
        self.size = 0
        self.bare: BareLineEnding | None = None
        self._tail = b"\r\n"  # the last bytes passed on; first, the DATA command's line break
        self._held = b""  # the last chunk's undecided end (see the class)

    def feed(self, chunk: bytes) -> tuple[bytes, bytes | None]:
        """(the bytes to send upstream now, None) while the message goes on; at its end, (its
        last bytes, without the end-of-data line's ``.CRLF``, what came after that line).
        After a refused bare line ending: always ``(b"", None)``."""
        if self.bare is not None:
            return b"", None
        data = self._held + chunk if self._held else chunk
        self._held = b""
        end = self._end(data)
        checked = data[:end] if end != -1 else data[:len(data) - self._undecided(data)]
        crlf = checked.count(b"\r\n")
        if checked.count(b"\n") != crlf or checked.count(b"\r") != crlf:
            if not self.normalise:
                first = _BARE.search(checked)
                self.bare = "CR" if first is not None and first.group() == b"\r" else "LF"
                return b"", None
            return self._normalised(data)
        if end == -1:
            self._held = data[len(checked):]
            return self._pass(checked), None
        return self._pass(data[:end - 3]), data[end:]

    def _undecided(self, data: bytes) -> int:
        """How many of the last bytes of ``data`` wait for the next chunk: a CR at the end,
        and before it a dot that begins a line (the line breaks ``data`` holds are CR LF, or
        normalised to it, or are bare and refused whatever follows)."""
        keep = 1 if data.endswith(b"\r") else 0
        dot = len(data) - keep - 1
        if dot >= 0 and data[dot] == _DOT:
            before = data[dot - 1] if dot else self._tail[-1]
            if before in _BREAK:
                keep += 1
        return keep

    def _end(self, data: bytes) -> int:
        """The offset in ``data`` just past the end-of-data line, or -1. What was passed on
        never holds the line's dot, so the line has at least its ``.CRLF`` in ``data``."""
        tail = self._tail
        at = (tail + data[:_KEEP]).find(END_OF_DATA)  # a marker straddling the chunk boundary
        if at != -1:
            return at + len(END_OF_DATA) - len(tail)
        match = _END_OF_DATA.search(data)
        return -1 if match is None else match.end()

    def _pass(self, data: bytes) -> bytes:
        """Count and remember what goes upstream."""
        self.size += len(data)
        if data:
            self._tail = (self._tail + data[-_KEEP:])[-_KEEP:]
        return data

    def _normalised(self, data: bytes) -> tuple[bytes, bytes | None]:
        """``data`` with every line ending made CR LF; the end found in what the upstream sees,
        and the bytes after it taken from ``data`` as the client sent them."""
        cr = 1 if data.endswith(b"\r") else 0  # its LF may be the next chunk's first byte
        lines = _LINE_END.sub(b"\r\n", data[:len(data) - cr])
        end = self._end(lines)
        if end == -1:
            dot = 1 if self._undecided(lines) else 0  # a dot beginning the last line
            self._held = data[len(data) - cr - dot:]
            return self._pass(lines[:len(lines) - dot]), None
        # Each CR LF in ``lines`` stands for one line ending in ``data``, in order.
        breaks = lines.count(b"\r\n", 0, end)
        last = next(itertools.islice(_LINE_END.finditer(data, 0, len(data) - cr),
                                     breaks - 1, None))
        return self._pass(lines[:end - 3]), data[last.end():]


__all__ = ["DataScanner", "END_OF_DATA", "BareLineEnding"]
