"""SMTP AUTH PLAIN and LOGIN on aiosmtpd: the client's credentials read from the command line
and its ``334`` challenges. Every malformed answer gets its own ``501`` here; what the
credentials are worth is the login pipeline's question (``smtp.SmtpFront``)."""

from __future__ import annotations

import base64

from aiosmtpd.smtp import MISSING

from proxy.protocol.sasl import SaslError, b64decode_strict, decode_plain
from proxy.secret import Secret
from proxy.server.smtp_protocol import ProxySMTP
from proxy.text import decode_utf8

Credentials = tuple[str, Secret]

_USERNAME_CHALLENGE = b"VXNlcm5hbWU6"  # "Username:"
_PASSWORD_CHALLENGE = b"UGFzc3dvcmQ6"  # "Password:"


async def read_plain(server: ProxySMTP, args: list[str]) -> Credentials | None:
    """AUTH PLAIN, its response on the command line or after an empty ``334``; None once the
    client has been answered."""
    if len(args) == 1:
        raw = await server.challenge_auth(b"", encode_to_b64=False)  # "334 "
        if raw is MISSING:  # answered already (501 for "*" or bad base64)
            return None
        assert isinstance(raw, bytes)
        response = base64.b64encode(raw)
    else:
        response = args[1].encode("utf-8", "surrogateescape")
    try:
        return decode_plain(response)
    except SaslError as exc:
        await server.push(f"501 5.5.2 {exc}")
        return None


async def read_login(server: ProxySMTP, args: list[str]) -> Credentials | None:
    """AUTH LOGIN: the user name on the command line or after ``334 Username:``, the password
    after ``334 Password:``; None once the client has been answered."""
    try:
        if len(args) == 2:
            raw_user: object = b64decode_strict(args[1].encode("utf-8", "surrogateescape"))
        else:
            raw_user = await server.challenge_auth(_USERNAME_CHALLENGE, encode_to_b64=False)
        if raw_user is MISSING:
            return None
        raw_password = await server.challenge_auth(_PASSWORD_CHALLENGE, encode_to_b64=False)
        if raw_password is MISSING:
            return None
    except SaslError:
        await server.push("501 5.5.2 Can't decode base64")
        return None
    assert isinstance(raw_user, bytes) and isinstance(raw_password, bytes)
    user, password = decode_utf8(raw_user), decode_utf8(raw_password)
    if user is None or password is None:
        await server.push("501 5.5.2 User name and password must be UTF-8")
        return None
    user = user.strip()
    if not user or not password:
        await server.push("501 5.5.2 Empty user name or password")
        return None
    return user, Secret(password)


__all__ = ["Credentials", "read_login", "read_plain"]
