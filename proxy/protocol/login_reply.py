"""The upstream's answer to the proxy's XOAUTH2 login, classified once per reply form; no I/O.

Every upstream login ends in one final reply: IMAP's tagged ``OK``/``NO``/``BAD``, POP3's
``+OK``/``-ERR``, SMTP's reply code. ``imap_reply``, ``pop_reply`` and ``smtp_reply`` sort it
into a ``ReplyKind`` (``OK`` / ``AUTH_FAILED`` / ``TEMPORARY`` / ``OTHER``) by its response
code first — RFC 5530 IMAP codes, RFC 2449/3206 POP3 codes, RFC 3463 enhanced status codes
with RFC 4954's AUTH replies — and by its text only when it carries no code. The drivers act on
the kind alone: only ``AUTH_FAILED`` earns a refresh-and-retry.

An RFC 7628 error challenge (Dovecot sends one before its final ``NO``/``-ERR``/``535``) is
answered by the machines; the final reply after it is what is classified here.

``token_sent=False`` is for a refusal that came before the token was sent (an ``AUTHENTICATE``
or ``AUTH XOAUTH2`` without an initial response, refused at once): a refusal that is not
temporary then cannot be about the token, so it is ``OTHER``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from proxy.protocol.events import ReplyKind

OK, AUTH_FAILED, TEMPORARY, OTHER = (
    ReplyKind.OK, ReplyKind.AUTH_FAILED, ReplyKind.TEMPORARY, ReplyKind.OTHER)

SMTP_AUTH_DISABLED = "5.7.139"  # Exchange Online: SMTP AUTH disabled for the tenant or mailbox


@dataclass(frozen=True)
class LoginReply:
    """A classified reply: its ``kind`` and the response code that decided it ("" if none)."""

    kind: ReplyKind
    code: str = ""


# RFC 5530 (and RFC 3501's ALERT, which says nothing about the cause).
_IMAP_CODES: dict[str, ReplyKind] = {
    "AUTHENTICATIONFAILED": AUTH_FAILED,
    "EXPIRED": AUTH_FAILED,  # the credential is no longer valid: a new token is the cure
    "UNAVAILABLE": TEMPORARY,  # Dovecot: its token check (passdb) failed internally
    "SERVERBUG": TEMPORARY,  # the server's own fault: retry later, a new password cannot help
    "INUSE": TEMPORARY,
    "LIMIT": TEMPORARY,
    "AUTHORIZATIONFAILED": OTHER,  # the token is good but may not act as that mailbox
    "PRIVACYREQUIRED": OTHER,  # the server wants TLS: the proxy's upstream settings
    "CONTACTADMIN": OTHER,
    "NOPERM": OTHER,
}

# RFC 3206 and RFC 2449; hierarchical: "SYS/TEMP/anything" is "SYS/TEMP".
_POP_CODES: tuple[tuple[str, ReplyKind], ...] = (
    ("AUTH", AUTH_FAILED),
    ("SYS/TEMP", TEMPORARY),
    ("SYS/PERM", OTHER),
    ("IN-USE", TEMPORARY),  # the maildrop is locked by another session
    ("LOGIN-DELAY", TEMPORARY),  # logged in too recently
)

_IMAP_CODE = re.compile(r"\A\s*\[([^\s\]]+)")
_POP_CODE = re.compile(r"\A\s*\[([^\s\]]+)\]")
_ENHANCED = re.compile(r"\A\s*([245]\.\d{1,3}\.\d{1,3})(?!\S)")
# Only for a reply without a code: the words servers use for "not now".
_TEMPORARY_TEXT = re.compile(r"\btemporar(?:y|ily)\b|\btry (?:again )?later\b", re.IGNORECASE)


def imap_reply(status: str, resp_text: str, *, token_sent: bool = True) -> LoginReply:
    """The tagged reply to ``AUTHENTICATE XOAUTH2``: ``status`` is OK, NO or BAD.

    A NO without a code (or with an unknown one, or ``[ALERT]``) is an authentication failure,
    as Microsoft 365 answers ``NO AUTHENTICATE failed.``; a BAD without a known code is
    ``OTHER`` (the server did not take the command at all)."""
    status = status.upper()
    if status == "OK":
        return LoginReply(OK)
    match = _IMAP_CODE.match(resp_text)
    code = match.group(1).upper() if match else ""
    kind = _IMAP_CODES.get(code)
    if kind is None:
        code = ""
        kind = _by_text(resp_text) if status == "NO" else OTHER
    return _checked(kind, code, token_sent)


def pop_reply(status: str, text: str, *, token_sent: bool = True) -> LoginReply:
    """A reply to ``AUTH XOAUTH2`` or to the token: ``status`` is ``+OK`` or ``-ERR``, ``text``
    what follows it. ``-ERR`` without a known code is an authentication failure."""
    if status.upper() == "+OK":
        return LoginReply(OK)
    match = _POP_CODE.match(text)
    found = match.group(1).upper() if match else ""
    for code, kind in _POP_CODES:
        if found == code or found.startswith(code + "/"):
            return _checked(kind, code, token_sent)
    return _checked(_by_text(text), "", token_sent)


def smtp_reply(code: int, text: str, *, token_sent: bool = True) -> LoginReply:
    """The final reply to ``AUTH XOAUTH2`` (after any ``334`` error challenge was answered).

    2xx is success and 4xx temporary (RFC 4954 ``454 4.7.0``, ``432``, ``421`` …). Of the 5xx,
    ``535`` and enhanced ``5.7.8`` are authentication failures, except Exchange's ``5.7.139``
    (SMTP AUTH disabled for the tenant or mailbox: no token can fix it); every other reply
    (``534 5.7.9``, ``538 5.7.11``, ``530``, ``504`` …, and a stray 1xx/3xx) is ``OTHER``."""
    match = _ENHANCED.match(text)
    enhanced = match.group(1) if match else ""
    if 200 <= code < 300:
        return LoginReply(OK)
    if 400 <= code < 500:
        return _checked(TEMPORARY, enhanced or str(code), token_sent)
    if enhanced == SMTP_AUTH_DISABLED:
        return LoginReply(OTHER, enhanced)
    if code == 535 or enhanced == "5.7.8":
        return _checked(AUTH_FAILED, enhanced or str(code), token_sent)
    return LoginReply(OTHER, enhanced or str(code))


def _by_text(text: str) -> ReplyKind:
    return TEMPORARY if _TEMPORARY_TEXT.search(text) else AUTH_FAILED


def _checked(kind: ReplyKind, code: str, token_sent: bool) -> LoginReply:
    if kind is AUTH_FAILED and not token_sent:
        kind = OTHER
    return LoginReply(kind, code)
