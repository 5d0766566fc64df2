"""The upstream half of the SMTP proxy: one aiosmtplib session per authenticated client.

``UpstreamSession.open`` connects (implicit TLS, or STARTTLS; always verified), says EHLO and
logs in with SASL XOAUTH2. Afterwards ``command`` forwards one SMTP command line (``DATA``
included) and ``write_message``/``end_message`` stream a message after the ``354``; each
returns the upstream's reply as it came (``Reply``), whatever its code.

aiosmtplib knows XOAUTH2 but raises on every non-2xx reply of its high-level methods, and its
DATA rewrites bare CR/LF and holds the whole message; so only ``execute_command`` and the
protocol's ``write`` / ``read_response`` are used, and the message goes out byte for byte as
the client sent it (still dot-stuffed: the upstream un-stuffs it).

Library exceptions are translated here, once (STYLE 10): ``UpstreamUnavailable`` (cannot
connect, finish TLS or EHLO: try later), ``UpstreamRejected`` (the server did not accept the
login; its reply classified by ``login_reply.smtp_reply`` as an authentication failure, a
temporary failure or another refusal), ``UpstreamLost`` (the session broke after login:
closed, reset, timed out, or an unreadable reply).
"""

from __future__ import annotations

import contextlib
import re
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass

import aiosmtplib
from aiosmtplib.protocol import SMTPProtocol

from proxy import metrics, tlspolicy
from proxy.config import Upstream
from proxy.protocol import sasl
from proxy.protocol.events import ReplyKind, UpstreamRejected
from proxy.protocol.login_reply import smtp_reply
from proxy.server.pipeline import UpstreamUnavailable
from proxy.text import host_port, joined_lines, untrusted_certificate

COMMAND_TIMEOUT = 300.0  # RFC 5321 4.5.3.2: MAIL and RCPT 5 minutes, DATA initiation 2
DATA_END_TIMEOUT = 600.0  # RFC 5321 4.5.3.2.6: 10 minutes for the reply to the final dot
QUIT_TIMEOUT = 5.0
UPSTREAM_TLS_TIMEOUT = 15.0  # the STARTTLS handshake with the upstream

_QUEUE_ID = (
    re.compile(r"queued as\s+([^\s;,\]]+)", re.I),  # Postfix, Exim, Sendmail
    re.compile(r"<([^<>\s]+)>"),  # Microsoft 365: "2.0.0 OK <id@host> [Hostname=…]"
    re.compile(r"^\d\.\d{1,3}\.\d{1,3}\s+(?:ok|queued)\W*\s*([A-Za-z0-9][\w.@-]{5,})", re.I),
)


class _Rejected(Exception):
    """The upstream did not accept the login (``SmtpOpener.open`` returns the verdict)."""

    def __init__(self, verdict: UpstreamRejected) -> None:
        super().__init__(verdict.text)
        self.verdict = verdict


class UpstreamLost(Exception):
    """The upstream session broke after login; the message says how."""


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
        lines = [_one_line(line) for line in self.text.split("\n")]
        head = [b"%d-%s" % (self.code, line) for line in lines[:-1]]
        return b"\r\n".join([*head, b"%d %s" % (self.code, lines[-1])]).rstrip(b" ")

    def __str__(self) -> str:
        return f"{self.code} {' / '.join(self.text.splitlines())}"


def _one_line(text: str) -> bytes:
    """The bytes the upstream sent (aiosmtplib decoded them with surrogateescape), minus any
    control character that could end or forge a reply line."""
    data = text.encode("utf-8", "surrogateescape")
    return bytes(b if b >= 0x20 and b != 0x7F else 0x20 for b in data)


def queue_id(text: str) -> str | None:
    """The queue id in a reply to the final dot (M365 ``<id@host>``, Postfix ``queued as X``)."""
    for pattern in _QUEUE_ID:
        match = pattern.search(text)
        if match:
            return match.group(1)[:200]
    return None


@contextlib.contextmanager
def _login_errors(up: Upstream) -> Iterator[None]:
    where = host_port(up.host, up.port)
    try:
        yield
    except (UpstreamUnavailable, _Rejected):
        raise
    except ssl.SSLCertVerificationError as exc:
        raise UpstreamUnavailable(untrusted_certificate(up.host, exc)) from None
    except aiosmtplib.SMTPConnectTimeoutError:
        raise UpstreamUnavailable(f"connecting to {where} timed out") from None
    except aiosmtplib.SMTPConnectResponseError as exc:
        raise UpstreamUnavailable(f"{where} refused the session: {exc.code} "
                                  f"{joined_lines(exc.message)}") from None
    except aiosmtplib.SMTPConnectError as exc:
        cause = exc.__cause__
        if isinstance(cause, ssl.SSLCertVerificationError):
            raise UpstreamUnavailable(untrusted_certificate(up.host, cause)) from None
        detail = (cause.strerror if isinstance(cause, OSError) else None) or cause or exc
        raise UpstreamUnavailable(f"cannot connect to {where}: {detail}") from None
    except aiosmtplib.SMTPTimeoutError:
        raise UpstreamUnavailable(f"{where} did not answer in time during login") from None
    except aiosmtplib.SMTPServerDisconnected:
        raise UpstreamUnavailable(f"{where} closed the connection during login") from None
    except aiosmtplib.SMTPResponseException as exc:
        raise UpstreamUnavailable(f"{where} answered {exc.code} {joined_lines(exc.message)} "
                                  "during login") from None
    except (aiosmtplib.SMTPException, ssl.SSLError, OSError) as exc:
        raise UpstreamUnavailable(f"{where}: {exc}") from None


@contextlib.contextmanager
def _session_errors(up: Upstream) -> Iterator[None]:
    try:
        yield
    except aiosmtplib.SMTPTimeoutError:
        raise UpstreamLost(f"{up.host} did not answer in time") from None
    except aiosmtplib.SMTPServerDisconnected:
        raise UpstreamLost(f"{up.host} closed the connection") from None
    except aiosmtplib.SMTPResponseException as exc:  # an unparseable or oversized reply
        raise UpstreamLost(f"{up.host} sent a bad reply: {joined_lines(exc.message)}") from None
    except (aiosmtplib.SMTPException, ssl.SSLError, OSError, ValueError) as exc:
        raise UpstreamLost(f"{up.host}: {exc}") from None


class UpstreamSession:
    """A logged-in SMTP session to the upstream; one per client connection."""

    def __init__(self, upstream: Upstream, client: aiosmtplib.SMTP) -> None:
        self.upstream = upstream
        self.client = client
        self.size_limit: int | None = _size(client)
        self.out_of_step = False  # the upstream answered more than was asked: closed

    @classmethod
    async def open(cls, upstream: Upstream, context: ssl.SSLContext, mailbox: str, token: str,
                   *, local_name: str) -> UpstreamSession | UpstreamRejected:
        """Connect, secure, EHLO and log in; the upstream's refusal, or raise
        ``UpstreamUnavailable``."""
        implicit = upstream.tls == "implicit"
        client = aiosmtplib.SMTP(hostname=upstream.host, port=upstream.port, use_tls=implicit,
                                 start_tls=False, tls_context=context, local_hostname=local_name,
                                 timeout=COMMAND_TIMEOUT)
        started = time.monotonic()
        try:
            with _login_errors(upstream):
                await client.connect(timeout=upstream.connect_timeout)
                if not implicit:
                    await client.ehlo(timeout=upstream.connect_timeout)
                    if not client.supports_extension("starttls"):
                        raise UpstreamUnavailable(f"{host_port(upstream.host, upstream.port)} does "
                                                  "not offer STARTTLS (upstream TLS is required)")
                    await client.starttls(server_hostname=upstream.host,
                                          timeout=UPSTREAM_TLS_TIMEOUT)
                metrics.UPSTREAM_CONNECT_SECONDS.labels("smtp").observe(time.monotonic() - started)
                await client.ehlo(timeout=upstream.connect_timeout)
                await _xoauth2(client, upstream, mailbox, token)
        except _Rejected as exc:
            client.close()
            return exc.verdict
        except BaseException:
            client.close()
            raise
        return cls(upstream, client)

    @property
    def connected(self) -> bool:
        return self.client.is_connected

    @property
    def tls_version(self) -> str | None:
        """The TLS version negotiated with the upstream ("1.2", "1.3")."""
        transport = self.client.transport
        return tlspolicy.wire_version(
            transport.get_extra_info("ssl_object") if transport is not None else None)

    async def command(self, *args: bytes, timeout: float = COMMAND_TIMEOUT) -> Reply:
        """Send one command line; return the reply whatever its code (raise ``UpstreamLost``)."""
        self._check_in_step()
        with _session_errors(self.upstream):
            response = await self.client.execute_command(*args, timeout=timeout)
        return Reply(response.code, response.message)

    async def write_message(self, chunk: bytes) -> None:
        """Part of a message after the upstream's ``354``, as the client sent it (dot-stuffed);
        returns once the upstream's transport can take more (raise ``UpstreamLost``)."""
        with _session_errors(self.upstream):
            protocol = self._protocol()
            protocol.write(chunk)
            await protocol._drain_helper()  # FlowControlMixin's wait while the buffer is full

    async def end_message(self, chunk: bytes) -> Reply:
        """The last part of a message (ending with the end-of-data line); the upstream's reply
        to it. An error leaves the session out of step, so it is closed."""
        with _session_errors(self.upstream):
            try:
                protocol = self._protocol()
                # write and read_response back to back: the reply cannot arrive unclaimed
                protocol.write(chunk)
                response = await protocol.read_response(timeout=DATA_END_TIMEOUT)
            except BaseException:
                self.client.close()
                raise
        if response.code == 421:
            self.client.close()
        elif self._unclaimed():
            # More than one reply to one end of data: the upstream read something else as
            # commands. Its first reply answers the message; the session is done.
            self.out_of_step = True
            self.client.close()
        return Reply(response.code, response.message)

    def _unclaimed(self) -> int:
        """Bytes the upstream sent after the reply just read (aiosmtplib keeps them in its
        protocol's buffer, where the next command would take them for its own reply)."""
        buffer = getattr(self.client.protocol, "_buffer", None)
        return len(buffer) if buffer is not None else 0

    def _check_in_step(self) -> None:
        if self._unclaimed():
            self.out_of_step = True
            self.client.close()
            raise UpstreamLost(f"{self.upstream.host} sent a reply to no command; the session "
                               "was out of step and is closed")

    def _protocol(self) -> SMTPProtocol:
        protocol = self.client.protocol
        if protocol is None:
            raise UpstreamLost(f"{self.upstream.host} closed the connection")
        return protocol

    async def quit(self) -> Reply | None:
        """QUIT politely (briefly) and close; None when the upstream did not answer."""
        try:
            if self.client.is_connected:
                return await self.command(b"QUIT", timeout=QUIT_TIMEOUT)
            return None
        except UpstreamLost:
            return None
        finally:
            self.close()

    def close(self) -> None:
        self.client.close()


# RFC 5321 caps a command line at 512 octets; RFC 4954 lets AUTH go further, but servers differ
# (Postfix cuts at 2048), and real access tokens are 1.5-3 KB. Longer responses go after a 334.
MAX_INITIAL_RESPONSE_LINE = 510


async def _xoauth2(client: aiosmtplib.SMTP, up: Upstream, mailbox: str, token: str) -> None:
    """AUTH XOAUTH2, with the response on the command line when it fits, else after the empty
    ``334`` challenge. A ``334`` error challenge after the response (RFC 7628, as Gmail and
    Dovecot send) is answered with an empty line to get the final reply; M365 answers ``535``
    at once."""
    b64 = sasl.xoauth2_b64(mailbox, token)
    if len(b"AUTH XOAUTH2 ") + len(b64) <= MAX_INITIAL_RESPONSE_LINE:
        response = await client.execute_command(b"AUTH", b"XOAUTH2", b64,
                                                timeout=up.connect_timeout)
    else:
        response = await client.execute_command(b"AUTH", b"XOAUTH2", timeout=up.connect_timeout)
        if response.code != 334:
            _verdict(response.code, response.message, "", token_sent=False)
            raise UpstreamUnavailable(f"{host_port(up.host, up.port)} accepted AUTH XOAUTH2 "
                                      "without a response")
        response = await client.execute_command(b64, timeout=up.connect_timeout)
    detail = ""
    if response.code == 334:
        detail = f" ({sasl.xoauth2_error(response.message.encode('utf-8', 'surrogateescape'))})"
        response = await client.execute_command(b"", timeout=up.connect_timeout)
    _verdict(response.code, response.message, detail, token_sent=True)


def _verdict(code: int, message: str, detail: str, *, token_sent: bool) -> None:
    """Return on success; otherwise raise ``UpstreamRejected`` with the reply's kind."""
    reply = smtp_reply(code, message, token_sent=token_sent)
    if reply.kind is not ReplyKind.OK:
        raise _Rejected(UpstreamRejected(f"{code} {joined_lines(message)}{detail}", reply.kind,
                                         reply.code))


def _size(client: aiosmtplib.SMTP) -> int | None:
    value = client.esmtp_extensions.get("size", "")
    return int(value) if value.strip().isdigit() and int(value) > 0 else None


class SmtpOpener:
    """How SMTP opens and authenticates its upstream (the login pipeline's ``UpstreamOpener``)."""

    def __init__(self, upstream: Upstream, context: ssl.SSLContext, local_name: str) -> None:
        self.upstream, self.context, self.local_name = upstream, context, local_name

    @property
    def host(self) -> str:
        return self.upstream.host

    async def open(self, mailbox: str, token: str) -> UpstreamSession | UpstreamRejected:
        return await UpstreamSession.open(self.upstream, self.context, mailbox, token,
                                          local_name=self.local_name)

    def tls_version(self, upstream: UpstreamSession) -> str | None:
        return upstream.tls_version


__all__ = ["Reply", "SmtpOpener", "UpstreamSession", "UpstreamLost",
           "queue_id", "COMMAND_TIMEOUT", "DATA_END_TIMEOUT"]
