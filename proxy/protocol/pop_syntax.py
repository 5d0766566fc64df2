"""POP3 lines and replies, for both POP3 machines (RFC 1939, 2449, 5034); no I/O.

``Lines`` splits CRLF lines with a cap; ``reply`` builds a ``+OK``/``-ERR`` line the proxy
sends; ``reply_status`` and ``reply_text`` read a server's reply line; ``preview`` quotes a peer's
line in a message of our own.
"""

from __future__ import annotations

from proxy.text import one_line

MAX_REPLY = 512  # RFC 2449 section 4: a response line is at most 512 octets with its CRLF
MAX_AUTH_LINE = 255  # RFC 5034 section 4: longer AUTH lines must use the continuation form


class LineTooLong(Exception):
    """A line (or the unterminated tail of the buffer) exceeds the cap."""


class Lines:
    """A bounded CRLF line splitter; bare LF is accepted as a line end too."""

    def __init__(self, max_line: int) -> None:
        if max_line < 16:
            raise ValueError("max_line must be at least 16")
        self.max_line = max_line
        self._buf = bytearray()
        self._scanned = 0  # bytes already known to hold no LF

    def __len__(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> None:
        self._buf += data

    def pop(self) -> bytes | None:
        """The next line without its line end, None if incomplete; raises ``LineTooLong``."""
        limit = self.max_line + 2  # the line, its CR and its LF
        idx = self._buf.find(b"\n", self._scanned, limit)
        if idx < 0:
            self._scanned = min(len(self._buf), limit)
            if len(self._buf) >= limit:
                raise LineTooLong
            return None
        line = bytes(self._buf[:idx])
        del self._buf[: idx + 1]
        self._scanned = 0
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > self.max_line:
            raise LineTooLong
        return line

    def take(self) -> bytes:
        """Everything still buffered (the buffer is emptied)."""
        rest = bytes(self._buf)
        self.clear()
        return rest

    def clear(self) -> None:
        self._buf.clear()
        self._scanned = 0


def reply(status: str, text: str = "") -> bytes:
    """``+OK``/``-ERR`` plus sanitised text, cut (at a character boundary) to fit 512 octets."""
    head = status.encode("ascii")
    body = one_line(text, MAX_REPLY).encode("utf-8")
    room = MAX_REPLY - len(head) - 3  # the space and the CRLF
    if len(body) > room:
        body = body[:room].decode("utf-8", "ignore").rstrip().encode("utf-8")
    return head + (b" " + body if body else b"") + b"\r\n"


def preview(line: bytes) -> str:
    """A short printable excerpt of a peer's line, for ``UpstreamBroken`` texts."""
    text = one_line(line[:80].decode("utf-8", "replace"))
    return repr(text + ("…" if len(line) > 80 else ""))


def reply_status(line: bytes) -> str | None:
    """``"+OK"``, ``"-ERR"`` or ``"+"`` (a SASL continuation) for a reply line, else None."""
    head = line.split(b" ", 1)[0].upper()
    if head in (b"+OK", b"-ERR", b"+"):
        return head.decode("ascii")
    return None


def reply_text(line: bytes) -> str:
    """The text after a reply's status word, verbatim but for CR (never a line break)."""
    _, _, rest = line.partition(b" ")
    return rest.decode("utf-8", "replace").replace("\r", " ")


def has_controls(text: str) -> bool:
    """Does ``text`` hold a C0 control or DEL (which a user name must not)?"""
    return any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)
