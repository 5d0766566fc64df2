"""The text hygiene helpers every reply and log line goes through."""
import ssl

from proxy import text


def test_one_line_removes_line_breaks_and_forging_characters() -> None:
    assert text.one_line("a\r\n250 ok\u2028b\x1b[1m\u202e") == "a 250 ok b [1m"
    assert text.one_line("x" * 500, 10) == "x" * 10


def test_word_keeps_a_token_recognisable() -> None:
    assert text.word("ev il\r\nuser") == "ev?il??user"


def test_joined_lines() -> None:
    assert text.joined_lines("line one\r\n line two\n") == "line one / line two"


def test_decode_utf8() -> None:
    assert text.decode_utf8("é".encode()) == "é"
    assert text.decode_utf8(b"\xff") is None


def test_host_port_brackets_ipv6() -> None:
    assert text.host_port("::1", 993) == "[::1]:993"
    assert text.host_port("[2001:db8::1]", 25) == "[2001:db8::1]:25"
    assert text.host_port("127.0.0.1", 143) == "127.0.0.1:143"
    assert text.host_port("outlook.office365.com", 993) == "outlook.office365.com:993"


def test_untrusted_certificate() -> None:
    exc = ssl.SSLCertVerificationError(1, "verify failed")
    exc.verify_message = "self-signed certificate"
    assert text.untrusted_certificate("h", exc) == "TLS certificate of h not trusted: self-signed certificate"
