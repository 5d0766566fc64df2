"""What the fake Graph does with a message: no Twisted, no I/O.

A MIME ``sendMail`` is delivered byte for byte, less its ``Bcc`` header lines (Exchange strips
them from the copies it delivers; the Sent Items copy keeps them). A draft (Graph's JSON message
resource plus its attachments) is rendered as MIME with the standard ``email`` package when it
is sent: ``From``, ``To``, ``Cc``, ``Reply-To``, ``Subject``, ``Message-ID``, a fresh ``Date``,
the custom ``internetMessageHeaders``, one body (text or HTML), inline attachments with their
content ids under ``multipart/related``, other attachments under ``multipart/mixed``.
"""

from __future__ import annotations

import email.utils
import uuid
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from email.policy import SMTP
from typing import Any


class GraphError(Exception):
    """An answer in Graph's error shape: HTTP status, ``code`` and ``message``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


@dataclass
class Attachment:
    name: str
    content_type: str
    data: bytes
    is_inline: bool = False
    content_id: str | None = None


@dataclass
class Draft:
    id: str
    owner: str  # the mailbox (lower case)
    message: dict[str, Any]
    attachments: list[Attachment] = field(default_factory=list)


def split_header(raw: bytes) -> tuple[bytes, bytes]:
    """(header block with its final line end, the rest from the blank line on)."""
    for blank in (b"\r\n\r\n", b"\n\n"):
        at = raw.find(blank)
        if at >= 0:
            cut = at + len(blank) // 2
            return raw[:cut], raw[cut:]
    return raw, b""


def without_bcc(raw: bytes) -> bytes:
    """``raw`` with its ``Bcc:`` header fields (and their folded lines) removed."""
    head, rest = split_header(raw)
    lines = head.splitlines(keepends=True)
    kept: list[bytes] = []
    dropping = False
    for line in lines:
        if line[:1] in (b" ", b"\t") and dropping:
            continue
        dropping = line[:4].lower() == b"bcc:"
        if not dropping:
            kept.append(line)
    return b"".join(kept) + rest


def mime_parties(raw: bytes) -> tuple[str | None, list[str]]:
    """(the From address, every To/Cc/Bcc address) of a MIME message."""
    headers = BytesHeaderParser(policy=SMTP).parsebytes(raw)
    sender = email.utils.parseaddr(str(headers.get("from", "")))[1] or None
    fields = [str(v) for name in ("to", "cc", "bcc") for v in headers.get_all(name, [])]
    return sender, unique(a for _, a in email.utils.getaddresses(fields) if a)


def unique(addresses: Any) -> list[str]:
    return list(dict.fromkeys(a.strip().lower() for a in addresses if a.strip()))


def _addresses(message: dict[str, Any], key: str) -> list[tuple[str, str]]:
    out = []
    for item in message.get(key) or []:
        box = (item or {}).get("emailAddress") or {}
        if box.get("address"):
            out.append((str(box.get("name") or ""), str(box["address"])))
    return out


def draft_parties(message: dict[str, Any]) -> tuple[str | None, list[str]]:
    sender = _addresses({"f": [message["from"]]}, "f") if message.get("from") else []
    everyone = [a for key in ("toRecipients", "ccRecipients", "bccRecipients")
                for _, a in _addresses(message, key)]
    return (sender[0][1] if sender else None), unique(everyone)


def render(draft: Draft, mailbox: str) -> tuple[bytes, list[str]]:
    """The MIME message a draft becomes when it is sent, and its recipients."""
    message = draft.message
    mime = EmailMessage(policy=SMTP)
    sender = _addresses({"f": [message["from"]]}, "f") if message.get("from") else []
    mime["From"] = email.utils.formataddr(sender[0] if sender else ("", mailbox))
    for key, header in (("toRecipients", "To"), ("ccRecipients", "Cc"), ("replyTo", "Reply-To")):
        people = _addresses(message, key)
        if people:
            mime[header] = ", ".join(email.utils.formataddr(p) for p in people)
    mime["Subject"] = str(message.get("subject") or "")
    mime["Date"] = email.utils.formatdate(localtime=True)
    mime["Message-ID"] = str(message.get("internetMessageId")
                             or f"<{uuid.uuid4().hex}@demo.outlook.example>")
    for item in message.get("internetMessageHeaders") or []:
        mime[str(item["name"])] = str(item["value"])
    body = message.get("body") or {}
    subtype = "html" if str(body.get("contentType", "text")).lower() == "html" else "plain"
    mime.set_content(str(body.get("content") or ""), subtype=subtype)
    for part in draft.attachments:
        maintype, _, sub = part.content_type.partition("/")
        args: dict[str, Any] = {"maintype": maintype or "application",
                                "subtype": sub or "octet-stream", "filename": part.name}
        if part.is_inline and part.content_id:
            mime.add_related(part.data, cid=f"<{part.content_id.strip('<>')}>", **args)
        else:
            mime.add_attachment(part.data, **args)
    _, recipients = draft_parties(message)
    return mime.as_bytes(), recipients


def check_send_as(sender: str | None, mailbox: str, app_only: bool,
                  send_as: dict[str, list[str]]) -> None:
    """The From must be the mailbox or one it may send as (app-only tokens: any)."""
    if sender is None or app_only or sender.lower() == mailbox.lower():
        return
    allowed = {a.lower() for a in send_as.get(mailbox.lower(), [])}
    if sender.lower() not in allowed:
        raise GraphError(403, "ErrorSendAsDenied", "The user account which was used to submit "
                         "this request does not have the right to send mail on behalf of the "
                         "specified sending account., Cannot submit message.")


def check_recipients(recipients: list[str]) -> None:
    if not recipients:
        raise GraphError(400, "ErrorInvalidRecipients",
                         "At least one recipient is not valid., A message can't be sent "
                         "because it contains no recipients.")
    for address in recipients:
        local, at, domain = address.rpartition("@")
        if not at or not local or not domain or local.startswith("reject"):
            raise GraphError(400, "ErrorInvalidRecipients",
                             f"At least one recipient is not valid., Recipient '{address}' is "
                             "not resolved. All recipients must be resolved before a message "
                             "can be submitted.")
