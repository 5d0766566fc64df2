"""A spooled message as Graph gets it: the copy's header (recipients made the envelope's) and
its MIME structure found by offsets in the file, without reading the bodies into memory.

``recipients_header`` rewrites only what must change: ``To``/``Cc`` addresses that are not
envelope recipients are dropped (a field left empty goes), ``Bcc`` fields are replaced by one
naming the envelope recipients that ``To``/``Cc`` do not; an unchanged field keeps its bytes.
``leaves`` walks ``multipart/*`` by boundary with chunked reads and parses each part's header
with the standard ``email`` package; ``decoded`` streams one part's body through its
Content-Transfer-Encoding. No I/O other than reads of the given file; blocking (worker thread).
"""

from __future__ import annotations

import base64
import binascii
import email.utils
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from email.policy import default
from typing import BinaryIO

MAX_HEADER = 1024 * 1024  # a message or part header larger than this is refused
MAX_DEPTH = 20  # nested multiparts
BLOCK = 1024 * 1024


class MessageProblem(Exception):
    """The spooled message cannot be submitted as it is; the text says why."""


def read_header(f: BinaryIO, start: int = 0, limit: int = MAX_HEADER) -> tuple[bytes, int]:
    """(the header block up to and including its blank line, the body offset)."""
    f.seek(start)
    data = f.read(limit)
    if data.startswith(b"\r\n"):
        return b"", start + 2
    end = data.find(b"\r\n\r\n")
    if end < 0:
        if len(data) < limit:
            return data, start + len(data)  # a header and no body
        raise MessageProblem("the message header is over 1 MiB or has no blank line after it")
    return data[:end + 4], start + end + 4


def _fields(header: bytes) -> list[bytes]:
    """The header's fields, each with its folded lines and final CR LF."""
    fields: list[bytes] = []
    for line in header.split(b"\r\n")[:-2] if header.endswith(b"\r\n\r\n") else \
            header.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line + b"\r\n"
        elif line:
            fields.append(line + b"\r\n")
    return fields


def _name(field: bytes) -> bytes:
    return field.split(b":", 1)[0].strip().lower()


def _addresses(field: bytes) -> tuple[list[tuple[str, str]], bool]:
    """The (name, address) pairs of an address field, and whether the parse can be trusted:
    it cannot when the value has more ``@`` than addresses came out (a parser that gives up on
    a malformed list, as the CVE-2023-27043 fix does, returns none), so the field is rebuilt
    from what was found instead of kept as the client wrote it."""
    value = field.split(b":", 1)[1].decode("utf-8", "surrogateescape")
    pairs = [(n, a) for n, a in email.utils.getaddresses([" ".join(value.split())]) if a]
    return pairs, value.count("@") <= len(pairs)


def _address_list(pairs: list[tuple[str, str]]) -> bytes:
    """``Name <address>, …`` as bytes; a name that cannot be encoded (8-bit bytes that are not
    UTF-8) is left out rather than failing the message."""
    out = []
    for name, address in pairs:
        try:
            out.append(email.utils.formataddr((name, address)).encode("utf-8"))
        except UnicodeError:
            out.append(f"<{address}>".encode("utf-8", "surrogateescape"))
    return b", ".join(out)


def recipients_header(header: bytes, envelope: list[str]) -> tuple[bytes, list[str], list[str],
                                                                       list[str]]:
    """(the copy's header, To, Cc, Bcc addresses): the recipients are exactly ``envelope``."""
    wanted = {a.lower() for a in envelope}
    out: list[bytes] = []
    named: dict[str, list[str]] = {"to": [], "cc": []}
    for field in _fields(header):
        name = _name(field).decode("ascii", "replace")
        if name == "bcc":
            continue
        if name in named:
            people, trusted = _addresses(field)
            kept = [(n, a) for n, a in people if a.lower() in wanted]
            named[name] += [a for _, a in kept]
            if len(kept) != len(people) or not trusted:
                if not kept:
                    continue
                label = field.split(b":", 1)[0]
                field = label + b": " + _address_list(kept) + b"\r\n"
        out.append(field)
    seen = {a.lower() for a in named["to"] + named["cc"]}
    bcc = [a for a in dict.fromkeys(envelope) if a.lower() not in seen]
    if bcc:
        out.append(b"Bcc: " + ", ".join(bcc).encode("utf-8") + b"\r\n")
    return b"".join(out) + b"\r\n", named["to"], named["cc"], bcc


def parse_header(header: bytes) -> EmailMessage:
    parsed = BytesHeaderParser(policy=default).parsebytes(header)
    assert isinstance(parsed, EmailMessage)
    return parsed


@dataclass(frozen=True)
class Leaf:
    headers: EmailMessage
    start: int  # body offset in the file
    end: int  # end of the body (the CR LF before the next delimiter is not part of it)


def _delimiters(f: BinaryIO, boundary: bytes, start: int, end: int) -> Iterator[tuple[int, int,
                                                                                     bool]]:
    """(delimiter start, offset after its line, whether it closes) within [start, end)."""
    needle = b"\r\n--" + boundary
    f.seek(start)
    if f.read(len(needle) - 2) == needle[2:]:
        yield from _delimiter_at(f, start, len(needle) - 2, end)
    position, overlap = start, len(needle) + 4
    while position < end:
        f.seek(position)
        block = f.read(min(BLOCK + overlap, end - position))
        last = len(block) < BLOCK + overlap
        at = block.find(needle)
        while at >= 0 and (last or at < BLOCK):  # the overlap is searched again next time
            yield from _delimiter_at(f, position + at, len(needle), end)
            at = block.find(needle, at + 1)
        if last:
            return
        position += BLOCK


def _delimiter_at(f: BinaryIO, at: int, length: int, end: int) -> Iterator[tuple[int, int, bool]]:
    f.seek(at + length)
    tail = f.read(1000)
    closing = tail.startswith(b"--")
    line_end = tail.find(b"\r\n")
    after = at + length + (line_end + 2 if line_end >= 0 else len(tail))
    if closing or line_end >= 0 and not tail[:line_end].strip(b" \t"):
        yield at, min(after, end), closing


def leaves(f: BinaryIO, headers: EmailMessage, start: int, end: int, depth: int = 0
           ) -> Iterator[Leaf]:
    """The non-multipart parts of the entity whose body is [start, end), in order."""
    boundary = headers.get_boundary() if headers.get_content_maintype() == "multipart" else None
    if boundary is None:
        yield Leaf(headers, start, end)
        return
    if depth > MAX_DEPTH:
        raise MessageProblem("multiparts are nested too deeply")
    marks = list(_delimiters(f, boundary.encode("utf-8", "surrogateescape"), start, end))
    for (_, part_start, closing), (next_at, _, _) in zip(marks, marks[1:], strict=False):
        if closing:
            break
        header, body = read_header(f, part_start, min(MAX_HEADER, next_at - part_start + 2))
        body = min(body, next_at)
        yield from leaves(f, parse_header(header), body, next_at, depth + 1)


def _qp_cut(data: bytes) -> int:
    """Where quoted-printable ``data`` can be decoded up to, the rest waiting for more: after
    its last line end; in a line longer than a block (no line end at all), before the last two
    bytes, or before an ``=`` among them, so that no escape or soft line break is split and
    the carry stays a few bytes however long the line."""
    cut = data.rfind(b"\n") + 1
    if cut == 0:
        cut = max(0, len(data) - 2)
        escape = data.rfind(b"=", max(0, cut - 2), cut)
        cut = escape if escape != -1 else cut
    return cut


def decoded(f: BinaryIO, leaf: Leaf, block: int = BLOCK) -> Iterator[bytes]:
    """The part's body, its Content-Transfer-Encoding undone, in chunks."""
    encoding = str(leaf.headers.get("content-transfer-encoding", "7bit")).strip().lower()
    carry = b""
    position = leaf.start
    while position < leaf.end:
        f.seek(position)
        raw = f.read(min(block, leaf.end - position))
        if not raw:
            break
        position += len(raw)
        if encoding == "base64":
            data = carry + b"".join(raw.split())
            usable = len(data) - len(data) % 4 if position < leaf.end else len(data)
            carry = data[usable:]
            try:
                yield base64.b64decode(data[:usable] + b"=" * (-usable % 4))
            except binascii.Error as exc:
                raise MessageProblem(f"an attachment is not valid base64 ({exc})") from None
        elif encoding == "quoted-printable":
            data = carry + raw
            cut = _qp_cut(data) if position < leaf.end else len(data)
            carry = data[cut:]
            yield binascii.a2b_qp(data[:cut])
        else:
            yield raw
    if carry:
        yield base64.b64decode(carry + b"=" * (-len(carry) % 4)) if encoding == "base64" \
            else binascii.a2b_qp(carry) if encoding == "quoted-printable" else carry
