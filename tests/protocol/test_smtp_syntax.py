"""proxy.protocol.smtp_syntax: SMTP command lines, MAIL/RCPT paths and parameters, strictly.

The property tests check two things: the parsers are total (any text gives a result or a
``Refused``, never an exception), and whatever they accept is a well-formed RFC 5321 path,
judged by ``well_formed`` below, written separately from the parser (no shared regexes).
"""

from __future__ import annotations

import ipaddress
import string

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from proxy.protocol.smtp_syntax import (
    EMPTY_LINE,
    BadPath,
    Mail,
    Path,
    Rcpt,
    Refused,
    command_line,
    line_too_long,
    parse_mail,
    parse_path,
    parse_rcpt,
    split_command,
    unknown_command,
)

ENHANCED = r"[245]\.\d{1,3}\.\d{1,3}"


def mail(arg: str | None, *, extended: bool = True, utf8: bool = True,
         size_limit: int | None = 1000, local_part_limit: int = 0) -> Mail | Refused:
    return parse_mail(arg, extended=extended, utf8=utf8, size_limit=size_limit,
                      local_part_limit=local_part_limit)


def refused(result: object) -> tuple[int, str]:
    assert isinstance(result, Refused), result
    return result.code, result.status


# --- command lines --------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, expected", [
    (b"NOOP\r\n", b"NOOP"),
    (b"MAIL FROM:<a@b> SIZE=1\r\n", b"MAIL FROM:<a@b> SIZE=1"),
    (b"EHLO h\xc3\xa9\r\n", b"EHLO h\xc3\xa9"),
    (b"NOOP\n", "bare LF"),
    (b"NOOP", "bare LF"),
    (b"NOOP\r\r\n", "bare CR"),
    (b"MAIL FROM:<a@b>\rRCPT TO:<c@d>\r\n", "bare CR"),
    (b"NOOP\x00\r\n", "NUL byte"),
    (b"MAIL FROM:<a\x01@b>\r\n", "control character"),
    (b"MAIL FROM:<a@b>\tSIZE=1\r\n", "control character"),
    (b"NOOP\x7f\r\n", "control character"),
    (b"\r\n", "empty"),
    (b"   \r\n", "empty"),
])
def test_command_line(raw: bytes, expected: bytes | str) -> None:
    result = command_line(raw)
    if isinstance(expected, bytes):
        assert result == expected
    else:
        assert isinstance(result, Refused) and (result.code, result.status) == (500, "5.5.2")
        assert expected in result.text


def test_split_command() -> None:
    assert split_command(b"noop", utf8=True) == ("NOOP", None)
    assert split_command(b"MAIL  FROM:<a@b>  ", utf8=True) == ("MAIL", "FROM:<a@b>")
    assert split_command(b"RCPT TO:<j\xc3\xbcrgen@b>", utf8=True) == ("RCPT", "TO:<jürgen@b>")
    assert refused(split_command(b"RCPT TO:<j\xc3\xbcrgen@b>", utf8=False)) == (500, "5.5.2")
    assert refused(split_command(b"EHLO \xff\xfe", utf8=True)) == (500, "5.5.2")
    assert refused(split_command(b"\xffNOOP", utf8=True)) == (500, "5.5.2")
    assert str(unknown_command("FROB")) == "500 5.5.2 Command not recognized: FROB"
    assert "\x00" not in str(unknown_command("A\x00" + "B" * 100))
    assert refused(line_too_long("AUTH", 512)) == (500, "5.5.6")
    assert refused(line_too_long("MAIL", 548)) == (500, "5.5.2")


# --- paths, MAIL and RCPT -------------------------------------------------------------------------


@pytest.mark.parametrize("arg, sender, options", [
    ("FROM:<alice@contoso.example>", "alice@contoso.example", ()),
    ("from: <alice@contoso.example>", "alice@contoso.example", ()),
    ("FROM:<>", "<>", ()),
    ("FROM:<a.b+tag@sub.contoso.example> size=0012 body=8bitmime SMTPUTF8 ",
     "a.b+tag@sub.contoso.example", ("SIZE=12", "BODY=8BITMIME", "SMTPUTF8")),
    ('FROM:<"john smith\\"x>@y"@contoso.example>', '"john smith\\"x>@y"@contoso.example', ()),
    ("FROM:<a@[192.0.2.1]>", "a@[192.0.2.1]", ()),
    ("FROM:<a@[IPv6:2001:db8::1]>", "a@[IPv6:2001:db8::1]", ()),
    ("FROM:<a@[ipv6:::ffff:192.0.2.1]>", "a@[ipv6:::ffff:192.0.2.1]", ()),
    ("FROM:<@relay.example,@b.example:alice@contoso.example>", "alice@contoso.example", ()),
    ("FROM:<jürgen@bücher.example> SMTPUTF8", "jürgen@bücher.example", ("SMTPUTF8",)),
    ("FROM:<a@b>   BODY=7bit", "a@b", ("BODY=7BIT",)),
])
def test_mail_accepts(arg: str, sender: str, options: tuple[str, ...]) -> None:
    assert mail(arg) == Mail(sender, options, "SMTPUTF8" in options)


@pytest.mark.parametrize("arg, code, status, words", [
    (None, 501, "5.5.4", "Syntax: MAIL FROM:<address>"),
    ("TO:<a@b>", 501, "5.5.4", "Syntax"),
    ("FROM:", 501, "5.5.4", "Syntax"),
    ("FROM:<", 501, "5.1.7", "closing >"),
    ("FROM:<@", 501, "5.1.7", "closing >"),
    ("FROM:<@>", 501, "5.1.7", "source route"),
    ('FROM:<"', 501, "5.1.7", "quoted local part is not closed"),
    ('FROM:<"a@b>', 501, "5.1.7", "quoted local part is not closed"),
    ("FROM:<a@[1.2.3", 501, "5.1.7", "closing >"),
    ("FROM:<a@[1.2.3>", 501, "5.1.7", "not closed with ]"),
    ("FROM:<a@[1.2.3]>", 501, "5.1.7", "address literal"),
    ("FROM:<a@[1.2.3.256]>", 501, "5.1.7", "IPv4"),
    ("FROM:<a@[IPv6:1.2.3.4]>", 501, "5.1.7", "IPv6"),
    ("FROM:<a@[IPv6:fe80::1%eth0]>", 501, "5.1.7", "IPv6"),
    ("FROM:<a@[tag:x]>", 501, "5.1.7", "address literal"),
    ("FROM:<a>", 501, "5.1.7", "no @domain"),
    ("FROM:<Postmaster>", 501, "5.1.7", "no @domain"),
    ("FROM:<a", 501, "5.1.7", "closing >"),
    ("FROM:a@b", 501, "5.1.7", "angle brackets"),
    ("FROM:<<a@b>>", 501, "5.1.7", "before @"),
    ("FROM:<a@b>x", 501, "5.1.7", "space must separate"),
    ("FROM:<a..b@c>", 501, "5.1.7", "before @"),
    ("FROM:<.a@c>", 501, "5.1.7", "before @"),
    ("FROM:<a b@c>", 501, "5.1.7", "before @"),
    ("FROM:<@c>", 501, "5.1.7", "source route"),
    ("FROM:<a@>", 501, "5.1.7", "nothing after @"),
    ("FROM:<a@-b.example>", 501, "5.1.7", "domain"),
    ("FROM:<a@b..example>", 501, "5.1.7", "domain"),
    ("FROM:<a@b_c.example>", 501, "5.1.7", "domain"),
    ("FROM:<a@" + "x" * 64 + ".example>", 501, "5.1.7", "domain"),
    ('FROM:<"a\\\x80"@b>', 501, "5.1.7", "control or invisible"),
    ("FROM:<a\u2028b@c.example>", 501, "5.1.7", "control or invisible"),  # line separator
    ("FROM:<ceo@bank.example\u202e>", 501, "5.1.7", "control or invisible"),  # bidi override
    ("FROM:<a\x85@c.example>", 501, "5.1.7", "control or invisible"),  # C1 NEL
    ("FROM:<a@b> X=\u2029", 501, "5.1.7", "control or invisible"),
    ("FROM:<a@b> SIZE=abc", 501, "5.5.4", "SIZE"),
    ("FROM:<a@b> SIZE", 501, "5.5.4", "SIZE"),
    ("FROM:<a@b> SIZE=" + "9" * 21, 501, "5.5.4", "SIZE"),
    ("FROM:<a@b> SIZE=1001", 552, "5.3.4", "1000 bytes"),
    ("FROM:<a@b> BODY=BINARYMIME", 501, "5.5.4", "BODY"),
    ("FROM:<a@b> SMTPUTF8=yes", 501, "5.5.4", "SMTPUTF8"),
    ("FROM:<a@b> SIZE=1 SIZE=2", 501, "5.5.4", "twice"),
    ("FROM:<a@b> =x", 501, "5.5.4", "KEYWORD"),
    ("FROM:<a@b> X=", 501, "5.5.4", "KEYWORD"),
    ("FROM:<a@b> X=a=b", 501, "5.5.4", "KEYWORD"),
    ("FROM:<a@b> (comment)", 501, "5.5.4", "KEYWORD"),
    ("FROM:<a@b> RET=HDRS", 555, "5.5.4", "Unsupported parameter RET"),
    ("FROM:<a@b> AUTH=<>", 555, "5.5.4", "Unsupported parameter AUTH"),
    ("FROM:<a@b> X=\u00e9", 555, "5.5.4", "Unsupported parameter X"),
])
def test_mail_refuses(arg: str | None, code: int, status: str, words: str) -> None:
    result = mail(arg)
    assert isinstance(result, Refused), result
    assert (result.code, result.status) == (code, status)
    assert words in result.text, result.text


def test_mail_depends_on_the_session() -> None:
    assert refused(mail("FROM:<a@b> SIZE=1", extended=False)) == (501, "5.5.4")
    assert mail("FROM:<a@b>", extended=False) == Mail("a@b", (), False)
    assert refused(mail("FROM:<a@b> SMTPUTF8", utf8=False)) == (555, "5.5.4")
    assert mail("FROM:<a@b> SIZE=99999999999", size_limit=None) == Mail(
        "a@b", ("SIZE=99999999999",), False)
    assert mail("FROM:<abcd@b>", local_part_limit=4) == Mail("abcd@b", (), False)
    assert refused(mail("FROM:<abcde@b>", local_part_limit=4)) == (501, "5.1.7")


@pytest.mark.parametrize("arg, expected", [
    ("TO:<bob@contoso.example>", Rcpt("bob@contoso.example")),
    ("to: <Bob@Contoso.Example>", Rcpt("Bob@Contoso.Example")),
    ("TO:<Postmaster>", Rcpt("Postmaster")),
    ("TO:<postmaster>", Rcpt("postmaster")),
    ("TO:<@a.example:bob@b.example>", Rcpt("bob@b.example")),
    (None, (501, "5.5.4")),
    ("FROM:<a@b>", (501, "5.5.4")),
    ("TO:<>", (501, "5.1.3")),
    ("TO:<bob", (501, "5.1.3")),
    ("TO:bob@b", (501, "5.1.3")),
    ("TO:<bob@b> NOTIFY=NEVER", (555, "5.5.4")),
    ("TO:<bob@b> NOTIFY=", (501, "5.5.4")),
    ("TO:<@a.example:Postmaster>", (501, "5.1.3")),
    ("TO:<bob@b.example\u2066>", (501, "5.1.3")),  # a bidi isolate
])
def test_rcpt(arg: str | None, expected: Rcpt | tuple[int, str]) -> None:
    result = parse_rcpt(arg, extended=True)
    assert (result if isinstance(expected, Rcpt) else refused(result)) == expected


# --- properties -----------------------------------------------------------------------------------

ATEXT = frozenset(string.ascii_letters + string.digits + "!#$%&'*+/=?^_`{|}~-")


def _utf8_ok(c: str) -> bool:
    return ord(c) >= 0xA0 and not 0xD800 <= ord(c) <= 0xDFFF


def _dot_string(text: str) -> bool:
    return all(atom and all(c in ATEXT or _utf8_ok(c) for c in atom) for atom in text.split("."))


def _quoted_string(text: str) -> bool:
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return False
    body, i = text[1:-1], 0
    while i < len(body):
        c = body[i]
        if c == "\\":
            if i + 1 >= len(body) or not 32 <= ord(body[i + 1]) <= 126:
                return False
            i += 2
            continue
        if c == '"' or not (32 <= ord(c) <= 126 or _utf8_ok(c)):
            return False
        i += 1
    return True


def _domain(text: str) -> bool:
    if not text or len(text) > 255:
        return False
    for label in text.split("."):
        if not 1 <= len(label) <= 63 or label[0] == "-" or label[-1] == "-":
            return False
        if not all((c.isascii() and (c.isalnum() or c == "-")) or _utf8_ok(c) for c in label):
            return False
    return True


def _literal(text: str) -> bool:
    if len(text) < 2 or text[0] != "[" or text[-1] != "]":
        return False
    inner = text[1:-1]
    parts = inner.split(".")
    if len(parts) == 4 and all(p.isascii() and p.isdigit() and len(p) <= 3 and int(p) <= 255
                               for p in parts):
        return True
    if inner[:5].lower() != "ipv6:" or "%" in inner:
        return False
    try:
        ipaddress.IPv6Address(inner[5:])
    except ValueError:
        return False
    return True


def well_formed(mailbox: str) -> bool:
    """RFC 5321 Mailbox (with RFC 6531's UTF-8), or the forms only a path may hold."""
    local, at, domain = mailbox.rpartition("@")  # a domain or literal never holds "@"
    return bool(at) and (_dot_string(local) or _quoted_string(local)) and (
        _domain(domain) or _literal(domain))


FRAGMENTS = ["<", ">", "@", '"', "\\", "[", "]", ":", ",", ".", " ", "a", "B", "0", "-", "é",
             "\x00", "\r", "\t", "\x85", "\udcff", "IPv6:", "::1", "1.2.3.4", "256", "x" * 70,
             "alice", "contoso.example", "SIZE=", "BODY=8BITMIME", "SMTPUTF8", "=", "(c)"]
PATHISH = st.lists(st.sampled_from(FRAGMENTS), max_size=14).map("".join)
ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=60)  # surrogates included
ATOMS = st.from_regex(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]{1,8}", fullmatch=True)
LABELS = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9-]{0,10}[A-Za-z0-9])?", fullmatch=True)
VALID_MAILBOX = st.builds(
    lambda local, domain: f"{local}@{domain}",
    st.lists(ATOMS, min_size=1, max_size=3).map(".".join)
    | st.from_regex(r'"([ !#-\[\]-~]|\\[ -~]){0,10}"', fullmatch=True),
    st.lists(LABELS, min_size=1, max_size=4).map(".".join)
    | st.ip_addresses(v=4).map(lambda a: f"[{a}]")
    | st.ip_addresses(v=6).map(lambda a: f"[IPv6:{a}]"))


@given(PATHISH | ANY_TEXT, st.sampled_from([0, 4]))
@example("<", 0)
@example("<@", 0)
@example('<"', 0)
@example("<a@[1.2.3", 0)
@example("<a", 0)
def test_parse_path_is_total_and_accepts_only_well_formed_paths(text: str, limit: int) -> None:
    result = parse_path(text, local_part_limit=limit)
    assert isinstance(result, Path | BadPath)
    if isinstance(result, BadPath):
        assert result.reason.isprintable()
        return
    mailbox = result.mailbox
    assert mailbox == "" or mailbox.lower() == "postmaster" or well_formed(mailbox), mailbox
    if limit and mailbox:
        assert len(mailbox.rpartition("@")[0]) <= limit or mailbox.lower() == "postmaster"
    assert result.rest == "" or result.rest.startswith(" ")
    assert parse_path(f"<{mailbox}>", local_part_limit=limit) == Path(mailbox, "")


@given(PATHISH | ANY_TEXT, st.booleans(), st.booleans())
@example("FROM:<", True, True)
@example("FROM:<@", True, True)
@example('FROM:<"', True, True)
@example("FROM:<a@[1.2.3", True, True)
@example("FROM:<a", True, True)
def test_mail_and_rcpt_are_total(text: str, extended: bool, utf8: bool) -> None:
    for result in (mail(text, extended=extended, utf8=utf8),
                   mail("FROM:" + text, extended=extended, utf8=utf8),
                   parse_rcpt(text, extended=extended), parse_rcpt("TO:" + text, extended=extended)):
        if isinstance(result, Refused):
            assert 500 <= result.code < 600 and result.status.startswith("5.")
            str(result).encode("ascii")  # a reply line the proxy can always send
            assert result.text.isprintable()
        elif isinstance(result, Mail):
            assert result.sender == "<>" or well_formed(result.sender)
            assert all(o in ("SMTPUTF8", "BODY=7BIT", "BODY=8BITMIME") or o.startswith("SIZE=")
                       for o in result.options)
            path = "<>" if result.sender == "<>" else f"<{result.sender}>"
            again = mail(f"FROM:{path} " + " ".join(result.options), size_limit=None)
            assert again == result
        else:
            assert isinstance(result, Rcpt)
            assert result.recipient.lower() == "postmaster" or well_formed(result.recipient)


@given(VALID_MAILBOX)
def test_well_formed_mailboxes_are_accepted(mailbox: str) -> None:
    assert well_formed(mailbox)
    assert mail(f"FROM:<{mailbox}>") == Mail(mailbox, (), False)
    assert parse_rcpt(f"TO:<{mailbox}>", extended=True) == Rcpt(mailbox)


@given(st.binary(max_size=80))
def test_command_lines_are_total(raw: bytes) -> None:
    for data in (raw, raw + b"\r\n"):
        line = command_line(data)
        if isinstance(line, Refused):
            assert line.code == 500 and line.status == "5.5.2"
            continue
        assert data == line + b"\r\n" and b"\r" not in line and b"\n" not in line
        assert line.strip(b" ")
        split = split_command(line, utf8=True)
        assert isinstance(split, Refused) or split[0] == split[0].upper()
    assert command_line(b"\r\n") is EMPTY_LINE
