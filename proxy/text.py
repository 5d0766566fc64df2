"""Text hygiene, in one place: what the proxy puts into a reply line, a log value or a message
of its own, and how it names an address. No I/O.

A reply line or log value must never carry a character that ends or forges a line (CR, LF,
other controls, Unicode line and paragraph separators, bidi controls): ``one_line`` turns them
into spaces and folds runs of white space; ``word`` keeps a single token (a user name, an
address) recognisable by replacing them with ``?``.
"""
from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only for a type: the sans-I/O machines use this module, and ssl imports socket
    import ssl

REPLY_TEXT_LIMIT = 400


def one_line(text: str, limit: int = REPLY_TEXT_LIMIT) -> str:
    """``text`` as one printable line: control and format characters become spaces, runs of
    white space fold into one, and the result is capped at ``limit`` characters."""
    if not text.isprintable():
        text = "".join(c if c.isprintable() else " " for c in text)
    return " ".join(text.split())[:limit]


def word(text: str, limit: int = 320) -> str:
    """``text`` as one token: every non-printable or white-space character becomes ``?``."""
    return "".join(c if c.isprintable() and not c.isspace() else "?" for c in text)[:limit]


def joined_lines(text: str, limit: int = 300) -> str:
    """A multi-line reply from a peer as one line, its lines joined by `` / ``."""
    return one_line(" / ".join(line.strip() for line in text.splitlines()), limit)


def decode_utf8(data: bytes) -> str | None:
    """``data`` as UTF-8 text, or None when it is not valid UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def host_port(host: str, port: int) -> str:
    """``host:port``, with an IPv6 literal in brackets (``[::1]:993``)."""
    try:
        if isinstance(ipaddress.ip_address(host.strip("[]")), ipaddress.IPv6Address):
            return f"[{host.strip('[]')}]:{port}"
    except ValueError:
        pass
    return f"{host}:{port}"


def untrusted_certificate(host: str, exc: ssl.SSLCertVerificationError) -> str:
    """Why an upstream's certificate was refused, in the words every upstream path uses."""
    return f"TLS certificate of {host} not trusted: {exc.verify_message}"


__all__ = ["REPLY_TEXT_LIMIT", "decode_utf8", "host_port", "joined_lines", "one_line",
           "untrusted_certificate", "word"]
