"""Where one client's SMTP transactions go, as the transaction relay sees it.

``MessageSink`` is the only thing the transaction relay (``smtp_transaction``) knows of its
upstream: an upstream SMTP session (``smtp_upstream.UpstreamSession``) is one, a delivery path
that is not SMTP (Microsoft Graph) another. Every method answers with the ``Reply`` the client
is to hear (whatever its code) or raises ``SinkLost``; a ``250`` from ``end`` means the
message was accepted, and nothing else may say so.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from proxy.protocol.events import Failure

END_TIMEOUT = 600.0  # RFC 5321 4.5.3.2.6: 10 minutes for the reply to the final dot

_QUEUE_ID = (
    re.compile(r"queued as\s+([^\s;,\]]+)", re.I),  # Postfix, Exim, Sendmail
    re.compile(r"<([^<>\s]+)>"),  # Microsoft 365: "2.0.0 OK <id@host> [Hostname=…]"
    re.compile(r"^\d\.\d{1,3}\.\d{1,3}\s+(?:ok|queued)\W*\s*([A-Za-z0-9][\w.@-]{5,})", re.I),
)


FAILURE_STATUS: dict[Failure, tuple[int, str]] = {
    # A login or token that failed, as an SMTP client hears it, whichever path it took.
    Failure.BAD_CREDENTIALS: (535, "5.7.8"),
    Failure.AUTHORISATION_NEEDED: (535, "5.7.8"),
    Failure.UPSTREAM_REJECTED: (535, "5.7.8"),
    Failure.UNAVAILABLE: (454, "4.7.0"),
    Failure.THROTTLED: (454, "4.7.0"),
    Failure.CONTACT_ADMIN: (454, "4.3.5"),
}


class SinkLost(Exception):
    """The sink broke (closed, reset, timed out, an unreadable reply); the message says how.
    Nothing of a transaction in progress was delivered."""


@dataclass(frozen=True)
class Reply:
    """One SMTP reply; ``text`` keeps the lines of a multi-line reply separated by LF."""

    code: int
    text: str

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 400

    def wire(self) -> bytes:
        """The reply as it goes to the client (aiosmtpd's ``push`` appends the final CRLF)."""
        lines = [_wire_line(line) for line in self.text.split("\n")]
        head = [b"%d-%s" % (self.code, line) for line in lines[:-1]]
        return b"\r\n".join([*head, b"%d %s" % (self.code, lines[-1])]).rstrip(b" ")

    def __str__(self) -> str:
        return f"{self.code} {' / '.join(self.text.splitlines())}"


def _wire_line(text: str) -> bytes:
    """The bytes a peer sent (decoded with surrogateescape), kept byte for byte — a reply
    passes through unchanged, in any encoding — minus any control byte that could end or
    forge a reply line (``proxy.text.one_line`` is for text of the proxy's own)."""
    data = text.encode("utf-8", "surrogateescape")
    return bytes(b if b >= 0x20 and b != 0x7F else 0x20 for b in data)


def queue_id(text: str) -> str | None:
    """The queue id in a reply to the final dot (M365 ``<id@host>``, Postfix ``queued as X``)."""
    for pattern in _QUEUE_ID:
        match = pattern.search(text)
        if match:
            return match.group(1)[:200]
    return None


class MessageSink(Protocol):
    """Where one client's SMTP transactions go: an upstream SMTP session, or Graph."""

    async def mail(self, sender: str, options: Sequence[str]) -> Reply: ...
    async def rcpt(self, recipient: str, options: Sequence[str]) -> Reply: ...
    async def data(self) -> Reply: ...              # 354 to go on, or the refusal
    async def write(self, chunk: bytes) -> None: ...  # message bytes as the client sent them
                                                      # (dot-stuffed, CRLF), never the final dot
    async def end(self) -> Reply: ...               # after the final dot; 250 only if accepted
    async def abort(self) -> None: ...              # drop the transaction, no end of data
    async def reset(self) -> Reply: ...             # RSET
    async def close(self) -> None: ...


__all__ = ["END_TIMEOUT", "MessageSink", "Reply", "SinkLost", "queue_id"]
