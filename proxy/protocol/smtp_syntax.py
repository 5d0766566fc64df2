"""SMTP command syntax as the proxy checks it: command-line framing, MAIL/RCPT paths and their
parameters (RFC 5321 4.1.1-4.1.2 and 2.3.8, RFC 6531 UTF-8, RFC 1870 SIZE, RFC 6152 8BITMIME).

Pure and total: every input gives a result or a ``Refused`` (a reply with an enhanced status
code, RFC 3463, and a sentence that says what is wrong); nothing raises on the peer's input.
Replies never echo the peer's bytes except a command or parameter keyword (ASCII letters,
digits and ``-``, shortened).

Strict where it matters, because what is accepted here is sent upstream: a command line ends
with CR LF and holds no other control character; a path is in angle brackets and is a whole
RFC 5321 Mailbox (``<>`` only for MAIL, ``<Postmaster>`` only for RCPT), a domain literal is an
IPv4 address or ``IPv6:`` and an IPv6 address; parameters are ``KEYWORD[=value]``; nothing is
repaired. Lenient as servers customarily are, where nothing of it reaches the upstream: spaces
after ``FROM:``/``TO:``, runs of spaces between parameters, trailing spaces, keywords in any
case. A source route (``<@a,@b:user@c>``) is accepted and dropped (RFC 5321 4.1.1.3 and C).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Refused:
    """A reply that refuses the command: ``str()`` is the reply line."""

    code: int
    status: str  # the enhanced status code, e.g. "5.5.2"
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.status} {self.text}"


@dataclass(frozen=True)
class Path:
    """A parsed path: ``mailbox`` as sent (``""`` for ``<>``, ``Postmaster`` for ``<Postmaster>``),
    and what followed the closing ``>`` (the parameters, with their leading space)."""

    mailbox: str
    rest: str


@dataclass(frozen=True)
class BadPath:
    reason: str


@dataclass(frozen=True)
class Mail:
    sender: str  # the mailbox; "<>" for the null reverse-path (aiosmtpd's convention)
    options: tuple[str, ...]  # canonical: SIZE=n, BODY=7BIT|8BITMIME, SMTPUTF8
    smtputf8: bool


@dataclass(frozen=True)
class Rcpt:
    recipient: str


# --- command lines ------------------------------------------------------------------------------

_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
_CONTROL_TEXT = {
    0x0D: "bare CR in the command line; end each line with CR LF",
    0x0A: "bare LF; end each command line with CR LF",
    0x00: "NUL byte in the command line",
}
EMPTY_LINE = Refused(500, "5.5.2", "Syntax error: empty command line")
LINE_TOO_LONG = Refused(500, "5.5.2", "Line too long")
AUTH_LINE_TOO_LONG = Refused(500, "5.5.6", "Authentication exchange line is too long")
TOO_MANY_UNKNOWN = Refused(502, "5.5.1", "Too many unrecognized commands, goodbye.")


def command_line(raw: bytes) -> bytes | Refused:
    """A line as read (through its LF) without its CR LF, or why it is refused."""
    if not raw.endswith(b"\r\n"):
        return Refused(500, "5.5.2", "Syntax error: " + _CONTROL_TEXT[0x0A])
    line = raw[:-2]
    control = _CONTROL.search(line)
    if control is not None:
        what = _CONTROL_TEXT.get(line[control.start()], "control character in the command line")
        return Refused(500, "5.5.2", "Syntax error: " + what)
    return line if line.strip(b" ") else EMPTY_LINE


def split_command(line: bytes, *, utf8: bool) -> tuple[str, str | None] | Refused:
    """The verb (upper case) and its argument (None if there is none) of a framed line.
    Arguments are UTF-8 where SMTPUTF8 is offered (``utf8``), ASCII otherwise."""
    verb, _, arg = line.partition(b" ")
    if not verb.isascii():
        return Refused(500, "5.5.2", "Syntax error: the command name must be ASCII")
    arg = arg.strip(b" ")
    if not arg:
        return verb.decode("ascii").upper(), None
    if not utf8 and not arg.isascii():
        return Refused(500, "5.5.2", "Syntax error: 8-bit characters are not allowed here")
    try:
        return verb.decode("ascii").upper(), arg.decode("utf-8")
    except UnicodeDecodeError:
        return Refused(500, "5.5.2", "Syntax error: the command line is not valid UTF-8")


def unknown_command(verb: str) -> Refused:
    return Refused(500, "5.5.2", f"Command not recognized: {_shown(verb)}" if verb
                   else "Syntax error: a command line starts with the command name")


def line_too_long(verb: str, limit: int) -> Refused:
    if verb == "AUTH":
        return AUTH_LINE_TOO_LONG
    return Refused(500, "5.5.2", f"Line too long: a {_shown(verb)} command line may have at most "
                                 f"{limit} characters")


def _shown(word: str) -> str:
    """A peer's keyword for a reply: letters, digits and '-' only, at most 20 characters."""
    kept = "".join(c if c.isascii() and (c.isalnum() or c == "-") else "?" for c in word[:20])
    return kept + ("..." if len(word) > 20 else "")


# --- paths -------------------------------------------------------------------------------------

# UTF8-non-ascii (RFC 6531) less the C1 controls; surrogates never come from strict UTF-8.
_U = "\u00a0-\ud7ff\ue000-\U0010ffff"
_ATOM = rf"[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~{_U}-]+"
_DOT_STRING = re.compile(rf"{_ATOM}(?:\.{_ATOM})*")
_QUOTED = re.compile(rf'"(?:[\x20\x21\x23-\x5b\x5d-\x7e{_U}]|\\[\x20-\x7e])*"')
_LET_DIG = rf"[A-Za-z0-9{_U}]"
_LABEL = rf"{_LET_DIG}(?:[A-Za-z0-9{_U}-]{{0,61}}{_LET_DIG})?"
_DOMAIN_TEXT = rf"{_LABEL}(?:\.{_LABEL})*"
_DOMAIN = re.compile(_DOMAIN_TEXT)
_ROUTE = re.compile(rf"@{_DOMAIN_TEXT}(?:,@{_DOMAIN_TEXT})*")
_IPV4 = re.compile(r"(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})")
_IPV6 = re.compile(r"[0-9A-Fa-f:.]{2,45}")
_MAX_DOMAIN = 255


def parse_path(text: str, *, local_part_limit: int = 0) -> Path | BadPath:
    """``<mailbox>`` at the start of ``text`` (after ``FROM:``/``TO:`` and spaces)."""
    if not text.startswith("<"):
        return BadPath("the address must be in angle brackets, like <name@example.com>")
    if not text.isprintable():  # C1 controls, line separators, bidi and other format controls
        return BadPath("the address or its parameters hold control or invisible formatting "
                       "characters")
    end = _closing_bracket(text)
    if end == -2:
        return BadPath('a quoted local part is not closed with "')
    if end < 0:
        return BadPath("the closing > is missing")
    inner, rest = text[1:end], text[end + 1:]
    mailbox, problem = inner, None
    if inner.startswith("@"):  # a source route: accepted, and dropped
        route, colon, mailbox = inner.partition(":")
        if not colon or not _ROUTE.fullmatch(route):
            problem = "the source route before the address is not valid"
    if problem is None and inner and inner.lower() != "postmaster":
        problem = _mailbox_problem(mailbox, local_part_limit)
    if problem is None and rest and rest[0] != " ":
        problem = "a space must separate the address from the parameters"
    return BadPath(problem) if problem else Path(mailbox, rest)


def _closing_bracket(text: str) -> int:
    """Where the path's ``>`` is: -1 if nowhere, -2 if a quoted local part is left open."""
    end = text.find(">")
    if text.find('"', 0, end if end >= 0 else len(text)) < 0:
        return end
    quoted, i, n = False, 1, len(text)  # a quoted local part may hold ">": read it
    while i < n:
        c = text[i]
        if quoted and c == "\\":
            i += 1
        elif c == '"':
            quoted = not quoted
        elif c == ">" and not quoted:
            return i
        i += 1
    return -2 if quoted else -1


def _mailbox_problem(mailbox: str, local_part_limit: int) -> str | None:
    if mailbox.startswith('"'):
        quoted = _QUOTED.match(mailbox)
        if quoted is None:
            return "the quoted local part is not valid"
        local, at, domain = mailbox[:quoted.end()], mailbox[quoted.end():quoted.end() + 1], \
            mailbox[quoted.end() + 1:]
        if at != "@":
            return "the address has no @domain"
    else:
        local, at, domain = mailbox.partition("@")
        if not at:
            return "the address has no @domain"
        if not local:
            return "the address has nothing before @"
        if not _DOT_STRING.fullmatch(local):
            return ("the part before @ is not valid (special characters need quotes, and dots "
                    "may not start, end or double)")
    if local_part_limit and len(local) > local_part_limit:
        return f"the part before @ is longer than {local_part_limit} characters"
    return _domain_problem(domain)


def _domain_problem(domain: str) -> str | None:
    if domain.startswith("["):
        if not domain.endswith("]") or len(domain) < 2:
            return "the address literal is not closed with ]"
        return _literal_problem(domain[1:-1])
    if not domain:
        return "the address has nothing after @"
    if len(domain) > _MAX_DOMAIN or not _DOMAIN.fullmatch(domain):
        return "the part after @ is not a valid domain name"
    return None


def _literal_problem(literal: str) -> str | None:
    ipv4 = _IPV4.fullmatch(literal)
    if ipv4 is not None:
        if all(int(part) <= 255 for part in ipv4.groups()):
            return None
        return f"[{literal}] is not a valid IPv4 address"
    tag, colon, address = literal.partition(":")
    if colon and tag.lower() == "ipv6":
        if _IPV6.fullmatch(address) and _is_ipv6(address):
            return None
        return "the [IPv6:...] literal does not hold a valid IPv6 address"
    return "an address literal must be an IPv4 address or IPv6: and an IPv6 address"


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


# --- MAIL and RCPT -------------------------------------------------------------------------------

_PARAM = re.compile(rf"([A-Za-z0-9][A-Za-z0-9-]*)(?:=([\x21-\x3c\x3e-\x7e{_U}]+))?")
_SIZE = re.compile(r"\d{1,20}")
_BODIES = ("7BIT", "8BITMIME")


def parse_mail(arg: str | None, *, extended: bool, utf8: bool, size_limit: int | None,
               local_part_limit: int = 0) -> Mail | Refused:
    """``MAIL`` and its argument: the sender and the parameters to send upstream.

    ``extended``: the session began with EHLO (parameters allowed); ``utf8``: SMTPUTF8 is
    offered; ``size_limit``: the SIZE the proxy advertises (None or 0: no limit)."""
    syntax = Refused(501, "5.5.4", "Syntax: MAIL FROM:<address>"
                                   + (" [parameters]" if extended else ""))
    text = _after_keyword(arg, "FROM:")
    if text is None:
        return syntax
    path = parse_path(text, local_part_limit=local_part_limit)
    if isinstance(path, BadPath):
        return Refused(501, "5.1.7", f"Bad sender address syntax: {path.reason}")
    if path.mailbox and "@" not in path.mailbox:  # <Postmaster> is for RCPT only
        return Refused(501, "5.1.7", "Bad sender address syntax: the address has no @domain")
    params = _params(path.rest, extended, "MAIL FROM:<address>")
    if isinstance(params, Refused):
        return params
    options: list[str] = []
    smtputf8 = False
    for keyword, value in params:
        if keyword == "SIZE":
            if value is None or not _SIZE.fullmatch(value):
                return Refused(501, "5.5.4", "SIZE takes the message size in bytes, like "
                                             "SIZE=12345")
            if size_limit and int(value) > size_limit:
                return Refused(552, "5.3.4", "Message size exceeds fixed maximum message size "
                                             f"of {size_limit} bytes")
            options.append(f"SIZE={int(value)}")
        elif keyword == "BODY":
            body = (value or "").upper()
            if body not in _BODIES:
                return Refused(501, "5.5.4", "BODY must be 7BIT or 8BITMIME")
            options.append(f"BODY={body}")
        elif keyword == "SMTPUTF8" and utf8:
            if value is not None:
                return Refused(501, "5.5.4", "SMTPUTF8 takes no value")
            options.append("SMTPUTF8")
            smtputf8 = True
        else:
            offered = "SIZE, BODY and SMTPUTF8" if utf8 else "SIZE and BODY"
            return Refused(555, "5.5.4", f"Unsupported parameter {_shown(keyword)}: MAIL FROM "
                                         f"takes {offered}")
    return Mail(path.mailbox or "<>", tuple(options), smtputf8)


def parse_rcpt(arg: str | None, *, extended: bool, local_part_limit: int = 0) -> Rcpt | Refused:
    """``RCPT`` and its argument: the recipient (no parameters are offered)."""
    text = _after_keyword(arg, "TO:")
    if text is None:
        return Refused(501, "5.5.4", "Syntax: RCPT TO:<address>")
    path = parse_path(text, local_part_limit=local_part_limit)
    if isinstance(path, BadPath):
        return Refused(501, "5.1.3", f"Bad recipient address syntax: {path.reason}")
    if not path.mailbox:
        return Refused(501, "5.1.3", "Bad recipient address syntax: <> is a sender only")
    params = _params(path.rest, extended, "RCPT TO:<address>")
    if isinstance(params, Refused):
        return params
    if params:
        return Refused(555, "5.5.4", f"Unsupported parameter {_shown(params[0][0])}: RCPT TO "
                                     "takes no parameters here")
    return Rcpt(path.mailbox)


def _after_keyword(arg: str | None, keyword: str) -> str | None:
    """What follows ``FROM:``/``TO:`` (any case, spaces after it allowed), or None."""
    if arg is None or arg[:len(keyword)].upper() != keyword:
        return None
    text = arg[len(keyword):].lstrip(" ")
    return text or None


def _params(rest: str, extended: bool, usage: str) -> list[tuple[str, str | None]] | Refused:
    words = rest.split(" ")
    params: list[tuple[str, str | None]] = []
    seen: set[str] = set()
    for word in words:
        if not word:
            continue
        if not extended:
            return Refused(501, "5.5.4", f"Syntax: {usage} (parameters need EHLO, not HELO)")
        param = _PARAM.fullmatch(word)
        if param is None:
            return Refused(501, "5.5.4", "Syntax error in the parameters: each is KEYWORD or "
                                         "KEYWORD=value, separated by spaces")
        keyword = param.group(1).upper()
        if keyword in seen:
            return Refused(501, "5.5.4", f"Parameter {_shown(keyword)} given twice")
        seen.add(keyword)
        params.append((keyword, param.group(2)))
    return params


HELP = {  # the commands HELP lists, with their syntax
    "AUTH": "AUTH mechanism [initial-response]", "DATA": "DATA", "EHLO": "EHLO hostname",
    "HELO": "HELO hostname", "HELP": "HELP [command]", "MAIL": "MAIL FROM:<address> [parameters]",
    "NOOP": "NOOP", "QUIT": "QUIT", "RCPT": "RCPT TO:<address>", "RSET": "RSET",
    "STARTTLS": "STARTTLS", "VRFY": "VRFY address",
}
# What aiosmtpd still says itself (HELO, EHLO, QUIT, RSET, STARTTLS, AUTH, EXPN), reworded with
# an enhanced status code. Anything else of its own at 4xx/5xx without one gets X.0.0.
_AIOSMTPD_REPLIES = {
    "503 Error: send HELO first": "503 5.5.1 Send EHLO or HELO first",
    "503 Error: send EHLO first": "503 5.5.1 Send EHLO first",
    "501 Syntax: HELO hostname": "501 5.5.4 Syntax: HELO hostname",
    "501 Syntax: EHLO hostname": "501 5.5.4 Syntax: EHLO hostname",
    "501 Syntax: QUIT": "501 5.5.4 Syntax: QUIT takes no arguments",
    "501 Syntax: RSET": "501 5.5.4 Syntax: RSET takes no arguments",
    "501 Syntax: STARTTLS": "501 5.5.4 Syntax: STARTTLS takes no arguments",
    "454 TLS not available": "502 5.5.1 STARTTLS is not offered on this port",
    "220 Ready to start TLS": "220 2.0.0 Ready to start TLS",
    "500 Error: command 'AUTH' not recognized": "503 5.5.1 AUTH needs EHLO, not HELO",
    "503 Already authenticated": "503 5.5.1 Already authenticated",
    "501 Not enough value": "501 5.5.4 Syntax: AUTH mechanism [initial-response]",
    "501 Too many values": "501 5.5.4 Syntax: AUTH mechanism [initial-response]",
    "502 EXPN not implemented": "502 5.5.1 EXPN is not implemented",
    "250 OK": "250 2.0.0 OK",
    "221 Bye": "221 2.0.0 Bye",
}
_HAS_STATUS = re.compile(r"\d{3}[ -][245]\.\d{1,3}\.\d{1,3}(?: |$)")


def aiosmtpd_reply(status: str) -> str:
    """A reply aiosmtpd words itself, reworded, or given an enhanced status code."""
    reworded = _AIOSMTPD_REPLIES.get(status)
    if reworded is not None:
        return reworded
    if status[:1] in ("4", "5") and not _HAS_STATUS.match(status):
        return f"{status[:3]} {status[0]}.0.0{status[3:]}"
    return status


__all__ = ["Refused", "Path", "BadPath", "Mail", "Rcpt", "command_line", "split_command",
           "unknown_command", "line_too_long", "parse_path", "parse_mail", "parse_rcpt",
           "EMPTY_LINE", "LINE_TOO_LONG", "AUTH_LINE_TOO_LONG", "TOO_MANY_UNKNOWN", "HELP",
           "aiosmtpd_reply"]
