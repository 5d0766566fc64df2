"""The upstream half of the SMTP proxy: one aiosmtplib session per client, the SMTP
``MessageSink``.

``UpstreamSession.open`` (through ``SmtpOpener``, the login pipeline's opener) connects
(implicit TLS, or STARTTLS; always verified), says EHLO and logs in with SASL XOAUTH2.
Afterwards ``mail``/``rcpt``/``data``/``reset`` forward one command line each and
``write``/``end`` stream a message after the ``354``; each returns the upstream's reply as it
came (``Reply``), whatever its code.

aiosmtplib knows XOAUTH2 but raises on every non-2xx reply of its high-level methods, and its
DATA rewrites bare CR/LF and holds the whole message; so only ``execute_command`` and the
protocol's ``write`` / ``read_response`` are used, and the message goes out byte for byte as
the client sent it (still dot-stuffed: the upstream un-stuffs it).

Library exceptions are translated here, once (STYLE 10): ``UpstreamUnavailable`` (cannot
connect, finish TLS or EHLO: try later), the ``UpstreamRejected`` verdict (the server did not
accept the login; its reply classified by ``login_reply.smtp_reply`` as an authentication
failure, a temporary failure or another refusal), ``SinkLost`` (the session broke after
login: closed, reset, timed out, or an unreadable reply).
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import time
from collections.abc import Iterator, Sequence

import aiosmtplib
from aiosmtplib.protocol import SMTPProtocol

from proxy import logs, metrics, tlspolicy
from proxy.config import Upstream
from proxy.protocol import sasl
from proxy.protocol.events import ReplyKind, UpstreamRejected
from proxy.protocol.login_reply import smtp_reply
from proxy.server.pipeline import UpstreamUnavailable
from proxy.server.smtp_adapter import drain, unclaimed
from proxy.server.smtp_sink import END_TIMEOUT, Reply, SinkLost, queue_id
from proxy.text import host_port, joined_lines, untrusted_certificate

log = logging.getLogger("proxy.smtp")

COMMAND_TIMEOUT = 300.0  # RFC 5321 4.5.3.2: MAIL and RCPT 5 minutes, DATA initiation 2
QUIT_TIMEOUT = 5.0
UPSTREAM_TLS_TIMEOUT = 15.0  # the STARTTLS handshake with the upstream

class _Rejected(Exception):
    """The upstream did not accept the login (``SmtpOpener.open`` returns the verdict)."""

    def __init__(self, verdict: UpstreamRejected) -> None:
        super().__init__(verdict.text)
        self.verdict = verdict


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
        raise SinkLost(f"{up.host} did not answer in time") from None
    except aiosmtplib.SMTPServerDisconnected:
        raise SinkLost(f"{up.host} closed the connection") from None
    except aiosmtplib.SMTPResponseException as exc:  # an unparseable or oversized reply
        raise SinkLost(f"{up.host} sent a bad reply: {joined_lines(exc.message)}") from None
    except (aiosmtplib.SMTPException, ssl.SSLError, OSError, ValueError) as exc:
        raise SinkLost(f"{up.host}: {exc}") from None


class UpstreamSession:
    """A logged-in SMTP session to the upstream, one per client connection: the SMTP
    ``MessageSink``. ``log_fields`` (account, peer) go on its own log lines."""

    def __init__(self, upstream: Upstream, client: aiosmtplib.SMTP) -> None:
        self.upstream = upstream
        self.client = client
        self.size_limit: int | None = _size(client)
        self.log_fields: dict[str, object] = {}

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
        """Send one command line; return the reply whatever its code (raise ``SinkLost``)."""
        self._check_in_step()
        with _session_errors(self.upstream):
            response = await self.client.execute_command(*args, timeout=timeout)
        return Reply(response.code, response.message)

    # --- the MessageSink ------------------------------------------------------------------

    async def mail(self, sender: str, options: Sequence[str]) -> Reply:
        path = b"<>" if sender in ("", "<>") else b"<" + _raw(sender) + b">"  # aiosmtpd: "<>"
        return await self.command(b"MAIL", b"FROM:" + path, *map(_raw, options))

    async def rcpt(self, recipient: str, options: Sequence[str]) -> Reply:
        return await self.command(b"RCPT", b"TO:<" + _raw(recipient) + b">", *map(_raw, options))

    async def data(self) -> Reply:
        return await self.command(b"DATA")

    async def reset(self) -> Reply:
        return await self.command(b"RSET")

    async def write(self, chunk: bytes) -> None:
        """Part of a message after the upstream's ``354``, as the client sent it (dot-stuffed);
        returns once the upstream's transport can take more (raise ``SinkLost``)."""
        with _session_errors(self.upstream):
            self._protocol().write(chunk)
            await drain(self.client)

    async def end(self) -> Reply:
        """The end-of-data line; the upstream's reply to it. An error leaves the session out
        of step, so it is closed."""
        with _session_errors(self.upstream):
            try:
                protocol = self._protocol()
                # write and read_response back to back: the reply cannot arrive unclaimed
                protocol.write(b".\r\n")
                response = await protocol.read_response(timeout=END_TIMEOUT)
            except BaseException:
                self.client.close()
                raise
        if response.code == 421:
            self.client.close()
        elif unclaimed(self.client):
            # More than one reply to one end of data: the upstream read something else as
            # commands. Its first reply answers the message; the session is done.
            logs.event(log, logging.WARNING, "upstream_out_of_step", protocol="smtp",
                       **self.log_fields,
                       reason=f"{self.upstream.host} sent more than one reply to the end of a "
                              "message; its session is closed and the next message opens a "
                              "new one")
            self.client.close()
        return Reply(response.code, response.message)

    async def abort(self) -> None:
        """Drop the session: the upstream never sees an end of data."""
        self.drop()

    async def close(self) -> None:
        await self.quit()

    # --- the session ----------------------------------------------------------------------

    def _check_in_step(self) -> None:
        if unclaimed(self.client):
            self.client.close()
            raise SinkLost(f"{self.upstream.host} sent a reply to no command; the session "
                           "was out of step and is closed")

    def _protocol(self) -> SMTPProtocol:
        protocol = self.client.protocol
        if protocol is None:
            raise SinkLost(f"{self.upstream.host} closed the connection")
        return protocol

    async def noop(self) -> Reply:
        return await self.command(b"NOOP")

    async def quit(self) -> Reply | None:
        """QUIT politely (briefly) and close; None when the upstream did not answer."""
        try:
            if self.client.is_connected:
                return await self.command(b"QUIT", timeout=QUIT_TIMEOUT)
            return None
        except SinkLost:
            return None
        finally:
            self.drop()

    def drop(self) -> None:
        """Close the connection at once."""
        self.client.close()


def _raw(text: str) -> bytes:
    """aiosmtpd decoded the command with surrogateescape (SMTPUTF8): the bytes again."""
    return text.encode("utf-8", "surrogateescape")


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


__all__ = ["COMMAND_TIMEOUT", "Reply", "SmtpOpener", "UpstreamSession", "queue_id"]
