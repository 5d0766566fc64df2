"""A spooled message prepared for Graph: the copy's header (``mime.recipients_header``), and for
the draft path its Graph JSON message and the parts that become attachments.

Kept from the original: subject, From, Sender, Reply-To, To/Cc/Bcc (the envelope's), Message-ID,
X- headers; the Date as ``X-Original-Date`` (Graph dates a message when it sends it); one body
(HTML if the message has it, else text: Graph keeps one body and writes the text alternative
itself); inline parts with their content ids and other parts as attachments with their names
and types. Blocking file reads: call it in a worker thread.
"""

from __future__ import annotations

import email.utils
import mimetypes
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy.graph import mime

MAX_BODY = 4 * 1024 * 1024  # a text or HTML part larger than this goes as an attachment
MAX_X_HEADERS = 20
_SKIPPED_X = ("x-original-date",)


@dataclass(frozen=True)
class Prepared:
    """The copy submitted: ``header`` then the spool file's bytes from ``body_offset``."""

    path: Path
    header: bytes
    body_offset: int
    file_size: int
    to: list[str]
    cc: list[str]
    bcc: list[str]

    @property
    def size(self) -> int:
        return len(self.header) + self.file_size - self.body_offset


@dataclass(frozen=True)
class Part:
    leaf: mime.Leaf
    name: str
    content_type: str
    inline: bool
    content_id: str | None


@dataclass
class Draft:
    message: dict[str, Any]
    parts: list[Part] = field(default_factory=list)


def prepare(path: Path, envelope: list[str]) -> Prepared:
    with open(path, "rb") as f:
        header, body = mime.read_header(f)
        size = os.fstat(f.fileno()).st_size
    copy, to, cc, bcc = mime.recipients_header(header, envelope)
    return Prepared(path, copy, body, size, to, cc, bcc)


def _people(addresses: list[tuple[str, str]]) -> list[dict[str, Any]]:
    return [{"emailAddress": {"address": a, **({"name": n} if n else {})}}
            for n, a in addresses if a]


def _parsed(values: list[str]) -> list[tuple[str, str]]:
    return [(n, a) for n, a in email.utils.getaddresses(values) if a]


def draft(prepared: Prepared) -> Draft:
    """The Graph message (JSON) and its attachment parts."""
    headers = mime.parse_header(prepared.header)
    message: dict[str, Any] = {"subject": str(headers.get("subject", "") or "")}
    for key, name in (("from", "from"), ("sender", "sender")):
        people = _parsed([str(v) for v in headers.get_all(key, [])])
        if people:
            message[name] = _people(people[:1])[0]
    reply_to = _parsed([str(v) for v in headers.get_all("reply-to", [])])
    named = {a.lower(): n for n, a in _parsed(
        [str(v) for k in ("to", "cc") for v in headers.get_all(k, [])])}
    for key, addresses in (("toRecipients", prepared.to), ("ccRecipients", prepared.cc),
                           ("bccRecipients", prepared.bcc)):
        if addresses:
            message[key] = _people([(named.get(a.lower(), ""), a) for a in addresses])
    if reply_to:
        message["replyTo"] = _people(reply_to)
    if headers.get("message-id"):
        message["internetMessageId"] = str(headers["message-id"]).strip()
    extra = [{"name": k, "value": " ".join(str(v).split())} for k, v in headers.items()
             if k.lower().startswith("x-") and k.lower() not in _SKIPPED_X][:MAX_X_HEADERS - 1]
    if headers.get("date"):
        extra.insert(0, {"name": "X-Original-Date", "value": str(headers["date"])})
    if extra:
        message["internetMessageHeaders"] = extra
    result = Draft(message)
    with open(prepared.path, "rb") as f:
        _bodies_and_parts(f, headers, prepared, result)
    return result


def _bodies_and_parts(f: Any, headers: Any, prepared: Prepared, result: Draft) -> None:
    bodies: dict[str, str] = {}
    for number, leaf in enumerate(mime.leaves(f, headers, prepared.body_offset,
                                              prepared.file_size), start=1):
        kind = leaf.headers.get_content_type()
        disposition = leaf.headers.get_content_disposition()
        filename = leaf.headers.get_filename()
        subtype = {"text/plain": "text", "text/html": "html"}.get(kind)
        if (subtype and subtype not in bodies and disposition != "attachment" and not filename
                and leaf.end - leaf.start <= MAX_BODY):
            charset = leaf.headers.get_content_charset() or "utf-8"
            data = b"".join(mime.decoded(f, leaf))
            try:
                bodies[subtype] = data.decode(charset, "replace")
            except LookupError:
                bodies[subtype] = data.decode("utf-8", "replace")
            continue
        cid = str(leaf.headers.get("content-id", "") or "").strip().strip("<>") or None
        name = filename or f"part{number}{mimetypes.guess_extension(kind) or '.bin'}"
        result.parts.append(Part(leaf, name, kind, bool(cid),
                                 cid))
    kind = "html" if "html" in bodies else "text"
    result.message["body"] = {"contentType": kind, "content": bodies.get(kind, "")}
