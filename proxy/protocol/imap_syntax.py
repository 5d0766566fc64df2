"""IMAP syntax pieces for the pre-auth machines: lines, tags, atoms, quoted strings, literals.

Pure functions and a small reader over one command (its line segments and the literals
between them). Bad syntax raises ``ImapSyntaxError`` with a sentence fit for a ``BAD`` reply;
the text never echoes the peer's bytes (they may be a password).

Leniency, on purpose (legacy clients): a bare LF ends a line like CRLF, runs of spaces
separate arguments like one space, and 8-bit bytes are accepted in atoms as well as in
quoted strings and literals (RFC 9051 allows UTF-8 in quoted strings only).
"""

from __future__ import annotations

from dataclasses import dataclass

CRLF = b"\r\n"

# RFC 3501/9051 atom-specials: "(" ")" "{" SP CTL list-wildcards quoted-specials resp-specials.
_ATOM_SPECIALS = frozenset(b'(){ %*"\\]') | frozenset(range(0x20)) | {0x7F}
_QUOTED_SPECIALS = frozenset(b'"\\')
_MAX_DIGITS = 19  # a literal size with more digits is "too big" without int() on it


class ImapSyntaxError(ValueError):
    """The peer's command does not parse; the message is the text of the ``BAD`` reply."""


class LineTooLong(Exception):
    """The line being read is longer than its cap (the caller picks the reply)."""


def take_line(buf: bytearray, limit: int) -> bytes | None:
    """Remove and return the first line of ``buf`` without its line end.

    Returns None if no complete line is buffered yet; raises ``LineTooLong`` once the line
    (with its line end) is known to be longer than ``limit`` bytes.
    """
    end = buf.find(b"\n", 0, max(limit, 0))
    if end < 0:
        if len(buf) >= limit:
            raise LineTooLong
        return None
    line = bytes(buf[:end])
    del buf[: end + 1]
    return line[:-1] if line.endswith(b"\r") else line


def is_atom_char(byte: int) -> bool:
    """ATOM-CHAR, plus 8-bit bytes (lenient)."""
    return byte not in _ATOM_SPECIALS


def valid_tag(tag: bytes) -> bool:
    """RFC 3501 ``tag``: 1*<any ASTRING-CHAR except "+">, 7-bit only."""
    return bool(tag) and all(
        b < 0x80 and b != ord("+") and (is_atom_char(b) or b == ord("]")) for b in tag
    )


@dataclass(frozen=True)
class LiteralMarker:
    """A ``{n}`` / ``{n+}`` announcement at the end of a command line."""

    size: int  # larger than any cap when the number has too many digits
    synchronising: bool
    start: int  # index of "{" in the line


def literal_at_end(line: bytes) -> LiteralMarker | None:
    """The literal announced at the end of ``line`` (no line end), if any.

    A ``{`` inside a quoted string does not start a literal.
    """
    if not line.endswith(b"}"):
        return None
    start = line.rfind(b"{")
    if start < 0:
        return None
    body = line[start + 1 : -1]
    synchronising = not body.endswith(b"+")
    digits = body if synchronising else body[:-1]
    if not digits or not digits.isdigit():
        return None
    if _inside_quotes(line, start):
        return None
    size = int(digits) if len(digits) <= _MAX_DIGITS else 10**_MAX_DIGITS
    return LiteralMarker(size, synchronising, start)


def _inside_quotes(line: bytes, end: int) -> bool:
    quoted = False
    i = 0
    while i < end:
        c = line[i]
        if quoted and c == ord("\\"):
            i += 2
            continue
        if c == ord('"'):
            quoted = not quoted
        i += 1
    return quoted


class Reader:
    """Reads the arguments of one command: ``lines[i]`` is followed by ``literals[i]``.

    Each line segment but the last has had its literal announcement removed.
    """

    def __init__(self, lines: list[bytes], literals: list[bytes]) -> None:
        if len(lines) != len(literals) + 1:
            raise ValueError("a command has one line segment more than it has literals")
        self._lines = lines
        self._literals = literals
        self._seg = 0
        self._pos = 0

    @property
    def _line(self) -> bytes:
        return self._lines[self._seg]

    def peek(self) -> int | None:
        """The next byte of the current line segment, or None at its end."""
        return self._line[self._pos] if self._pos < len(self._line) else None

    def at_literal(self) -> bool:
        return self._pos == len(self._line) and self._seg < len(self._literals)

    def at_end(self) -> bool:
        return self._seg == len(self._literals) and self._pos == len(self._line)

    def space(self) -> None:
        """One or more spaces (lenient: RFC says exactly one)."""
        if self.peek() != ord(" "):
            raise ImapSyntaxError("missing argument" if self.at_end() else "expected a space")
        while self.peek() == ord(" "):
            self._pos += 1

    def end(self) -> None:
        """Nothing but trailing spaces may remain."""
        while self.peek() == ord(" "):
            self._pos += 1
        if not self.at_end():
            raise ImapSyntaxError("unexpected extra arguments")

    def tag(self) -> bytes:
        start = self._pos
        while (c := self.peek()) is not None and c != ord(" "):
            self._pos += 1
        tag = self._line[start : self._pos]
        if not valid_tag(tag):
            raise ImapSyntaxError("missing or invalid tag")
        return tag

    def atom(self, *, astring: bool = False) -> bytes:
        start = self._pos
        while (c := self.peek()) is not None and (is_atom_char(c) or (astring and c == ord("]"))):
            self._pos += 1
        if self._pos == start:
            raise ImapSyntaxError("expected an atom")
        return self._line[start : self._pos]

    def quoted(self) -> bytes:
        """A quoted string; only ``\\"`` and ``\\\\`` escapes are allowed."""
        if self.peek() != ord('"'):
            raise ImapSyntaxError("expected a quoted string")
        self._pos += 1
        out = bytearray()
        line = self._line
        while True:
            if self._pos >= len(line):
                raise ImapSyntaxError("unterminated quoted string")
            c = line[self._pos]
            if c == ord('"'):
                self._pos += 1
                return bytes(out)
            if c == ord("\\"):
                nxt = line[self._pos + 1] if self._pos + 1 < len(line) else None
                if nxt is None or nxt not in _QUOTED_SPECIALS:
                    raise ImapSyntaxError("invalid escape in quoted string")
                out.append(nxt)
                self._pos += 2
                continue
            if c in (0, 0x0D, 0x0A):
                raise ImapSyntaxError("invalid character in quoted string")
            out.append(c)
            self._pos += 1

    def literal(self) -> bytes:
        if not self.at_literal():
            raise ImapSyntaxError("expected a literal")
        data = self._literals[self._seg]
        self._seg += 1
        self._pos = 0
        return data

    def string(self) -> bytes:
        """A quoted string or a literal."""
        if self.at_literal():
            return self.literal()
        return self.quoted()

    def astring(self) -> bytes:
        """An atom (``]`` allowed), a quoted string or a literal."""
        if self.at_literal() or self.peek() == ord('"'):
            return self.string()
        return self.atom(astring=True)

    def nstring(self) -> bytes | None:
        """A string or NIL."""
        if self.at_literal() or self.peek() == ord('"'):
            return self.string()
        if self.atom().upper() != b"NIL":
            raise ImapSyntaxError("expected a string or NIL")
        return None

    def id_params(self) -> None:
        """RFC 2971 ``id-params-list``: NIL or ``(`` [string SP nstring *(SP …)] ``)``."""
        if self.peek() != ord("("):
            if self.atom().upper() != b"NIL":
                raise ImapSyntaxError("ID takes NIL or a parenthesised list")
            return
        self._pos += 1
        first = True
        while self.peek() != ord(")"):
            if not first:
                self.space()
            first = False
            self.string()
            self.space()
            self.nstring()
        self._pos += 1
