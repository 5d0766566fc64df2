"""SASL pieces shared by the IMAP, POP3 and SMTP paths: PLAIN (RFC 4616), LOGIN, XOAUTH2.

All functions are pure; bad input raises ``SaslError`` with a sentence fit for a reply.
"""

from __future__ import annotations

import base64
import binascii
import json

from proxy.secret import Secret
from proxy.text import decode_utf8, one_line


class SaslError(ValueError):
    """The client's SASL data is malformed; the message says how, without echoing secrets."""


def b64decode_strict(data: bytes | str) -> bytes:
    """Decode standard base64, rejecting stray characters and bad padding."""
    if isinstance(data, str):
        try:
            data = data.encode("ascii")
        except UnicodeEncodeError:
            raise SaslError("invalid base64 (non-ASCII characters)") from None
    data = data.strip(b" \t")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise SaslError("invalid base64") from None


def b64encode(data: bytes | str) -> bytes:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return base64.b64encode(data)


def utf8(data: bytes, what: str) -> str:
    """``data`` as text; ``SaslError`` naming ``what`` when it is not UTF-8 or holds NUL."""
    if b"\0" in data:
        raise SaslError(f"the {what} contains NUL")
    text = decode_utf8(data)
    if text is None:
        raise SaslError(f"the {what} is not valid UTF-8")
    return text


def decode_plain(response: bytes) -> tuple[str, Secret]:
    """Decode a base64 SASL PLAIN response into (user name, password).

    The authorisation identity, if given, must equal the authentication identity: the proxy
    does not let one account act for another.
    """
    raw = b64decode_strict(response)
    parts = raw.split(b"\0")
    if len(parts) != 3:
        raise SaslError("PLAIN response must be authzid NUL authcid NUL password")
    authzid, authcid, password = parts
    if not authcid:
        raise SaslError("PLAIN response has an empty user name")
    if not password:
        raise SaslError("PLAIN response has an empty password")
    user = utf8(authcid, "user name")
    if authzid and utf8(authzid, "authorisation identity") != user:
        raise SaslError("acting for another user (authzid) is not supported")
    return user, Secret(utf8(password, "password"))


def xoauth2_response(user: str, token: str) -> bytes:
    """The raw (not base64) XOAUTH2 initial client response."""
    if any(c in user for c in "\x01\r\n"):
        raise SaslError("user name has control characters")
    if any(c in token for c in "\x01\r\n"):
        raise SaslError("token has control characters")
    return f"user={user}\x01auth=Bearer {token}\x01\x01".encode()


def xoauth2_b64(user: str, token: str) -> bytes:
    return b64encode(xoauth2_response(user, token))


def xoauth2_error(challenge: bytes) -> str:
    """Describe an RFC 7628 error challenge (base64 JSON) sent by a server after a rejection.

    The result is one printable line (no CR/LF): it may end up in a reply to the client.
    """
    try:
        doc = json.loads(b64decode_strict(challenge))
    except (SaslError, ValueError, RecursionError):
        return "the server rejected the token"
    if not isinstance(doc, dict):
        return "the server rejected the token"
    status = one_line(str(doc.get("status", "?")), 40) or "?"
    scope = one_line(str(doc.get("scope") or ""), 200)
    text = f"the server rejected the token (status {status}"
    return text + (f", scope {scope})" if scope else ")")
