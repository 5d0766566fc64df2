"""proxy.protocol.smtp_data: the end of an SMTP message found chunk by chunk, and the bare line
endings that would let a message smuggle commands past the proxy."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from proxy.protocol.smtp_data import DataScanner


@dataclass(frozen=True)
class Scan:
    """What the scanner made of a stream: the bytes it passed on (never the end-of-data
    line's ``.CRLF``), whether (and where) the message ended, and the bare line ending it
    refused."""
    forwarded: bytes
    end: int | None = None  # offset in the stream just past the end-of-data line
    size: int | None = None
    bare: str | None = None


def scan(stream: bytes, cuts: list[int], *, normalise: bool = False) -> Scan:
    """Feed ``stream`` cut at ``cuts``."""
    scanner, start, forwarded = DataScanner(normalise=normalise), 0, b""
    for cut in sorted({*cuts, len(stream)}):
        chunk = stream[start:cut]
        start = cut
        if not chunk:
            continue
        forward, rest = scanner.feed(chunk)
        forwarded += forward
        if scanner.bare is not None:
            assert (forward, rest) == (b"", None)
            assert scanner.feed(b"more\r\n.\r\n") == (b"", None)  # refused for good
            return Scan(forwarded, bare=scanner.bare)
        if rest is not None:
            after = rest + stream[start:]
            return Scan(forwarded, len(stream) - len(after), scanner.size)
    return Scan(forwarded)


def reference(stream: bytes) -> Scan:
    """A line-by-line reader: lines end with CR LF only; a bare CR or LF before the line
    holding just a dot is refused; a CR at the end of the stream is not decided yet."""
    at = 0
    while True:
        brk = re.compile(rb"[\r\n]").search(stream, at)
        if brk is None:
            return Scan(stream)
        j = brk.start()
        if stream[j] == 13 and brk.end() == len(stream):
            return Scan(stream[:j])
        if stream[j] == 10:
            return Scan(stream[:j], bare="LF")
        if stream[j + 1] != 10:
            return Scan(stream[:j], bare="CR")
        if stream[at:j] == b".":
            return Scan(stream[:at], j + 2, at)
        at = j + 2


def reference_normalised(stream: bytes) -> Scan:
    """A line-by-line reader that takes CR LF, CR and LF as line ends, as the upstream sees
    the normalised message: the first line holding just a dot ends it."""
    at, out = 0, b""
    while True:
        brk = re.compile(rb"\r\n|\r|\n").search(stream, at)
        if brk is None:
            return Scan(out + stream[at:])
        if brk.group() == b"\r" and brk.end() == len(stream):
            return Scan(out + stream[at:brk.start()])
        line = stream[at:brk.start()]
        if line == b".":
            return Scan(out, brk.end(), len(out))
        out += line + b"\r\n"
        at = brk.end()


def prefix_ok(got: Scan, want: Scan) -> bool:
    """An ended message is passed on whole; otherwise what the scanner passed on is a prefix
    of the most it may (it passes on chunks, not lines, and holds back a chunk's last bytes
    while they could begin the end-of-data line or a CR LF)."""
    if want.end is not None:
        return got == want
    return (got.end is None and got.bare == want.bare
            and want.forwarded.startswith(got.forwarded))


@pytest.mark.parametrize("stream, end, size", [
    (b".\r\n", 3, 0),  # empty message: the dot right after the DATA line
    (b".\r\nMAIL FROM:<a@b>\r\n", 3, 0),  # pipelined command after it stays outside
    (b"\r\n.\r\n", 5, 2),
    (b"a\r\n.\r\nQUIT\r\n", 6, 3),
    (b"..\r\n.\r\n", 7, 4),  # a stuffed dot line is content
    (b".x\r\n..\r\n.\r\n", 11, 8),
    (b"a\r\n. \r\n", None, None),
    (b"a\r\n.\r\nbare\nafter the end is not the message's\r", 6, 3),
    (b"", None, None),
])
def test_end_of_data(stream: bytes, end: int | None, size: int | None) -> None:
    for cuts in ([], list(range(len(stream)))):  # whole, and byte by byte
        got = scan(stream, cuts)
        assert (got.end, got.size, got.bare) == (end, size, None)
        assert prefix_ok(got, reference(stream))


# Every way a line-at-LF upstream could see an end of data that the proxy does not.
SMUGGLED = b"MAIL FROM:<ceo@bank.example>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\nforged\r\n"


@pytest.mark.parametrize("marker, kind", [
    (b"\n.\n", "LF"), (b"\r\n.\n", "LF"), (b"\n.\r\n", "LF"), (b"\r.\r", "CR"),
    (b"\r.\r\n", "CR"), (b"\r\n.\r", "CR"), (b"\r\n\x00.\r\n", None),
])
def test_smuggling_markers_are_refused(marker: bytes, kind: str | None) -> None:
    stream = b"Subject: hi\r\n\r\nbody" + marker + SMUGGLED + b".\r\n"
    for cuts in ([], list(range(len(stream))), [len(b"Subject: hi\r\n\r\nbody") + 1]):
        got = scan(stream, cuts)
        if kind is None:  # not a line ending at all: content, ended at the real dot line
            assert got.end == len(stream) and got.bare is None
            continue
        assert got.bare == kind
        assert stream.startswith(got.forwarded) and BARE.search(got.forwarded) is None
        assert b"MAIL FROM" not in got.forwarded


def test_normalised_markers_end_where_the_upstream_would() -> None:
    """Normalising, the proxy ends the message at the dot line the upstream sees, and the
    smuggled lines come back as the client's own commands (which the proxy then checks)."""
    for marker in (b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r"):
        head = b"Subject: hi\r\n\r\nbody"
        stream = head + marker + SMUGGLED
        for cuts in ([], list(range(len(stream)))):
            got = scan(stream, cuts, normalise=True)
            assert got.forwarded == b"Subject: hi\r\n\r\nbody\r\n"
            assert got.end == len(head + marker)
            assert got.size == len(b"Subject: hi\r\n\r\nbody\r\n")


def test_normalise_keeps_crlf_messages_as_sent() -> None:
    stream = b"a\r\nb\r\n..c\r\n.\r\nQUIT\r\n"
    assert scan(stream, [5], normalise=True) == scan(stream, [5])


BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")
PARTS = [b"\r\n", b".", b"\r", b"\n", b"x", b"..", b"\r\n.\r\n", b"\n.\n"]


@given(st.lists(st.sampled_from(PARTS), max_size=30),
       st.lists(st.integers(min_value=0, max_value=200), max_size=10))
@example([b"x", b"\r"], [1])  # a CR at a chunk's end, undecided
@example([b"\r", b"\n", b".", b"\r", b"\n"], [1, 4])
def test_any_cut_finds_what_a_line_reader_finds(parts: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(parts)
    cuts = [c for c in cuts if c < len(stream)]
    assert prefix_ok(scan(stream, cuts), reference(stream))


@given(st.lists(st.sampled_from(PARTS), max_size=30),
       st.lists(st.integers(min_value=0, max_value=200), max_size=10))
@example([b"\n.\n"], [2])  # the dot line's bare LF the first byte of a chunk
@example([b"x", b"\r", b".", b"\r"], [2, 3])
def test_normalised_any_cut_matches_a_lenient_line_reader(parts: list[bytes],
                                                          cuts: list[int]) -> None:
    stream = b"".join(parts)
    cuts = [c for c in cuts if c < len(stream)]
    got = scan(stream, cuts, normalise=True)
    want = reference_normalised(stream)
    assert prefix_ok(got, want)
    assert BARE.search(got.forwarded) is None  # the upstream sees CR LF line ends only


def test_size_counts_a_large_message_across_chunks() -> None:
    body = b"x" * 998 + b"\r\n"
    scanner = DataScanner()
    for _ in range(1000):
        assert scanner.feed(body) == (body, None)
    assert scanner.feed(b".\r\nQUIT\r\n") == (b"", b"QUIT\r\n")
    assert scanner.size == 1000 * len(body)


LINES = [b"", b"x", b"..", b"..x", b". ", b"Subject: hi", b"\x00", b"\xff" * 3, b"-" * 70]


def whole_message(lines: list[bytes]) -> bytes:
    """A dot-stuffed message of ``lines``, its end-of-data line, and a pipelined command."""
    return b"".join(line + b"\r\n" for line in lines) + b".\r\nQUIT\r\n"


@pytest.mark.parametrize("normalise", [False, True])
@given(st.lists(st.sampled_from(LINES), max_size=12),
       st.lists(st.integers(min_value=0, max_value=400), max_size=8))
@example([b"x"], [3])  # "x\r\n." | "\r\n": the dot line's CR LF in the next chunk
@example([b"x"], [4])  # "x\r\n.\r" | "\n"
@example([b"x"], [2])  # "x\r" | "\n.\r\n"
@example([b"x"], [3, 4])
@example([], [1])  # an empty message: "." | "\r\n"
def test_a_message_split_anywhere_is_passed_on_as_unsplit(
        normalise: bool, lines: list[bytes], cuts: list[int]) -> None:
    """Whatever the chunks, the bytes passed on are the message without its end-of-data
    line, the end is found once, at the same place, and the pipelined command is left over;
    at random cuts, and byte by byte."""
    stream = whole_message(lines)
    whole = scan(stream, [], normalise=normalise)
    body = stream[:len(stream) - len(b".\r\nQUIT\r\n")]
    assert whole == Scan(body, len(stream) - len(b"QUIT\r\n"), len(body))
    cuts = [c for c in cuts if c < len(stream)]
    assert scan(stream, cuts, normalise=normalise) == whole
    assert scan(stream, list(range(len(stream))), normalise=normalise) == whole


def test_the_dot_line_split_from_its_line_break_is_not_passed_on() -> None:
    """The review's case: ``<message>CRLF.`` then, later, ``CRLF``. The dot waits; the next
    chunk ends the message, and nothing of the end-of-data line is passed on."""
    scanner = DataScanner()
    assert scanner.feed(b"Subject: x\r\n\r\nhi\r\n.") == (b"Subject: x\r\n\r\nhi\r\n", None)
    assert scanner.feed(b"\r\n") == (b"", b"")
    assert scanner.size == len(b"Subject: x\r\n\r\nhi\r\n")
    scanner = DataScanner()
    assert scanner.feed(b"hi\r\n.\r") == (b"hi\r\n", None)
    assert scanner.feed(b"\nQUIT\r\n") == (b"", b"QUIT\r\n")
