"""proxy.protocol.smtp_data: the end of an SMTP message found chunk by chunk."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.protocol.smtp_data import DataScanner


def scan(stream: bytes, cuts: list[int]) -> tuple[int, int] | None:
    """Feed ``stream`` cut at ``cuts``; (absolute end offset, size) or None if no end."""
    scanner, offset, start = DataScanner(), 0, 0
    for cut in sorted({*cuts, len(stream)}):
        chunk = stream[start:cut]
        start = cut
        if not chunk:
            continue
        end = scanner.feed(chunk)
        if end != -1:
            return offset + end, scanner.size
        offset += len(chunk)
    return None


def reference(stream: bytes) -> tuple[int, int] | None:
    """The end as a line-by-line reader finds it: the first line that is exactly ``.``."""
    at = 0
    while True:
        nl = stream.find(b"\r\n", at)
        if nl == -1:
            return None
        if stream[at:nl] == b".":
            return nl + 2, at
        at = nl + 2


@pytest.mark.parametrize("stream, end, size", [
    (b".\r\n", 3, 0),  # empty message: the dot right after the DATA line
    (b".\r\nMAIL FROM:<a@b>\r\n", 3, 0),  # pipelined command after it stays outside
    (b"\r\n.\r\n", 5, 2),
    (b"a\r\n.\r\nQUIT\r\n", 6, 3),
    (b"..\r\n.\r\n", 7, 4),  # a stuffed dot line is content
    (b".x\r\n..\r\n.\r\n", 11, 8),
    (b"a\n.\r\n", None, None),  # bare LF does not end a line
    (b"a\r\n.\n", None, None),
    (b"a\r\n. \r\n", None, None),
    (b"", None, None),
])
def test_end_of_data(stream: bytes, end: int | None, size: int | None) -> None:
    expected = None if end is None else (end, size)
    assert scan(stream, []) == expected
    assert scan(stream, list(range(len(stream)))) == expected  # byte by byte
    assert reference(stream) == expected


@given(st.lists(st.sampled_from([b"\r\n", b".", b"\r", b"\n", b"x", b"..", b"\r\n.\r\n"]),
                max_size=30),
       st.lists(st.integers(min_value=0, max_value=200), max_size=10))
def test_any_cut_finds_what_a_line_reader_finds(parts: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(parts)
    assert scan(stream, [c for c in cuts if c < len(stream)]) == reference(stream)


def test_size_counts_a_large_message_across_chunks() -> None:
    body = b"x" * 998 + b"\r\n"
    scanner = DataScanner()
    for _ in range(1000):
        assert scanner.feed(body) == -1
    assert scanner.feed(b".\r\nQUIT\r\n") == 3
    assert scanner.size == 1000 * len(body)
