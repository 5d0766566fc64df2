"""POP3 login to the real server with SASL XOAUTH2, sans-I/O (RFC 1939, 2449, 2595, 5034, 7628).

``PopUpstreamSide`` plays a POP3 client to the real server: greeting, STLS if asked, CAPA,
``AUTH XOAUTH2``; the outcome is one of ``UpstreamLoggedIn`` / ``UpstreamRejected``
(classified by ``login_reply.pop_reply``) / ``UpstreamBroken``. Server input never raises;
``ProtocolMisuse`` only when the driver calls out of turn. Every line is capped.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from proxy.protocol.events import (
    ReplyKind,
    SendToServer,
    StartServerTLS,
    UpstreamBroken,
    UpstreamCommand,
    UpstreamLoggedIn,
    UpstreamRejected,
)
from proxy.protocol.login_reply import pop_reply
from proxy.protocol.machine import Rules
from proxy.protocol.pop_syntax import MAX_AUTH_LINE, Lines, LineTooLong, preview, reply_status, reply_text
from proxy.protocol.sasl import xoauth2_b64, xoauth2_error
from proxy.secret import Secret
from proxy.text import one_line


class UpstreamState(enum.Enum):
    GREETING = "greeting"  # waiting for "+OK ..."
    STLS = "stls"  # sent STLS
    TLS_PENDING = "tls_pending"  # StartServerTLS emitted: waiting for tls_started()
    CAPA = "capa"  # sent CAPA: waiting for its status line
    CAPA_LIST = "capa_list"  # reading the capability lines up to "."
    AUTH_CONTINUE = "auth_continue"  # sent "AUTH XOAUTH2": waiting for "+ "
    AUTH_RESULT = "auth_result"  # sent the token: waiting for +OK, -ERR or an error challenge
    AUTH_ERROR = "auth_error"  # answered an RFC 7628 error challenge: waiting for -ERR
    DONE = "done"  # UpstreamLoggedIn emitted: the machine is done
    FAILED = "failed"  # UpstreamRejected/UpstreamBroken emitted: input is ignored


_U = UpstreamState
# Rule 1 for the upstream machine. Any state that reads input may also move to FAILED.
_RULES: Rules[UpstreamState] = Rules(
    moves={
        _U.GREETING: {_U.STLS, _U.CAPA, _U.FAILED},
        _U.STLS: {_U.TLS_PENDING, _U.FAILED},
        _U.TLS_PENDING: {_U.CAPA, _U.FAILED},
        _U.CAPA: {_U.CAPA_LIST, _U.AUTH_CONTINUE, _U.AUTH_RESULT, _U.FAILED},
        _U.CAPA_LIST: {_U.AUTH_CONTINUE, _U.AUTH_RESULT, _U.FAILED},
        _U.AUTH_CONTINUE: {_U.AUTH_RESULT, _U.FAILED},
        _U.AUTH_RESULT: {_U.AUTH_ERROR, _U.DONE, _U.FAILED},
        _U.AUTH_ERROR: {_U.DONE, _U.FAILED},
    },
    calls={
        "receive": set(UpstreamState) - {_U.DONE},  # after login the driver relays bytes
        "tls_started": {_U.TLS_PENDING, _U.FAILED},
    },
)

_MAX_CAPA_LINES = 256

class PopUpstreamSide:
    """Log in to a POP3 server with SASL XOAUTH2 (RFC 5034 profile, RFC 7628 errors).

    Greeting, then ``STLS`` (if ``starttls``), then ``CAPA``, then ``AUTH XOAUTH2``. RFC 5034
    section 4 forbids an initial response that makes the AUTH line longer than 255 octets,
    and a bearer token always does, so by default the token goes on its own line after the
    server's ``+ `` (the form Microsoft documents for POP). ``initial_response=True`` sends it
    on the AUTH line whatever its length (one round trip less; Microsoft 365 and Dovecot
    accept it). There is no fallback from one form to the other: a ``-ERR`` may be a real
    rejection, and retrying would present the token twice.

    The CAPA answer is read but does not gate the attempt: ``-ERR`` or a SASL list without
    XOAUTH2 still leads to ``AUTH XOAUTH2``, and the server's own answer decides.
    """

    def __init__(
        self,
        *,
        user: str,
        token: Secret,
        starttls: bool,
        max_line: int = 8192,
        initial_response: bool = False,
    ) -> None:
        xoauth2_b64(user, "")  # raises SaslError now for a user name the SASL form can't carry
        self.state = UpstreamState.GREETING
        self.capabilities: list[str] = []  # the CAPA lines, for logs
        self.error_detail: str | None = None  # decoded RFC 7628 error challenge, if any
        self._user = user
        self._token = token
        self._starttls = starttls
        self._initial_response = initial_response
        self._lines = Lines(max_line)
        self._handlers: dict[UpstreamState, Callable[[bytes], list[UpstreamCommand]]] = {
            UpstreamState.GREETING: self._state_greeting,
            UpstreamState.STLS: self._state_stls,
            UpstreamState.CAPA: self._state_capa,
            UpstreamState.CAPA_LIST: self._state_capa_list,
            UpstreamState.AUTH_CONTINUE: self._state_auth_continue,
            UpstreamState.AUTH_RESULT: self._state_auth_result,
            UpstreamState.AUTH_ERROR: self._state_auth_error,
        }

    @property
    def buffered_bytes(self) -> int:
        """How many received bytes the machine holds (at most ``max_line`` + 1)."""
        return len(self._lines)

    def receive(self, data: bytes) -> list[UpstreamCommand]:
        """Bytes from the server; ``b""`` means it closed its side."""
        _RULES.call("receive", self.state)
        if self.state is UpstreamState.FAILED:
            return []
        if not data:
            return self._broken(f"the server closed the connection ({self.state.value})")
        if self.state is UpstreamState.TLS_PENDING:
            return self._broken("the server sent data before the TLS handshake")
        self._lines.feed(data)
        out: list[UpstreamCommand] = []
        while self.state in self._handlers:
            try:
                line = self._lines.pop()
            except LineTooLong:
                out += self._broken(f"the server sent a line over {self._lines.max_line} octets")
                break
            if line is None:
                break
            out += self._handlers[self.state](line)
        return out

    def tls_started(self) -> list[UpstreamCommand]:
        """The upstream TLS handshake is done: ask for capabilities again (RFC 2595)."""
        _RULES.call("tls_started", self.state)
        if self.state is UpstreamState.FAILED:
            return []
        self._goto(UpstreamState.CAPA)
        return [SendToServer(b"CAPA\r\n")]

    # --- internals ------------------------------------------------------------------------

    def _goto(self, new: UpstreamState) -> None:
        self.state = _RULES.move(self.state, new)

    def _broken(self, text: str) -> list[UpstreamCommand]:
        self._goto(_U.FAILED)
        self._lines.clear()
        return [UpstreamBroken(text)]

    def _unexpected(self, line: bytes, what: str) -> list[UpstreamCommand]:
        return self._broken(f"unexpected reply to {what}: {preview(line)}")

    def _state_greeting(self, line: bytes) -> list[UpstreamCommand]:
        if reply_status(line) != "+OK":
            return self._unexpected(line, "the connection (greeting)")
        if self._starttls:
            self._goto(UpstreamState.STLS)
            return [SendToServer(b"STLS\r\n")]
        self._goto(UpstreamState.CAPA)
        return [SendToServer(b"CAPA\r\n")]

    def _state_stls(self, line: bytes) -> list[UpstreamCommand]:
        if reply_status(line) == "-ERR":
            return self._broken(f"the server refused STLS: {preview(line)}")
        if reply_status(line) != "+OK":
            return self._unexpected(line, "STLS")
        if len(self._lines):  # plaintext after "+OK" would be read as if it came over TLS
            return self._broken("the server sent data after accepting STLS")
        self._goto(UpstreamState.TLS_PENDING)
        return [StartServerTLS()]

    def _state_capa(self, line: bytes) -> list[UpstreamCommand]:
        status = reply_status(line)
        if status == "+OK":
            self._goto(UpstreamState.CAPA_LIST)
            return []
        if status == "-ERR":  # no CAPA (RFC 1939-only server): try XOAUTH2 anyway
            return self._auth()
        return self._unexpected(line, "CAPA")

    def _state_capa_list(self, line: bytes) -> list[UpstreamCommand]:
        if line == b".":
            return self._auth()
        if len(self.capabilities) >= _MAX_CAPA_LINES:
            return self._broken(f"the server sent over {_MAX_CAPA_LINES} capability lines")
        if line.startswith(b"."):
            line = line[1:]  # dot-stuffing (RFC 1939 section 3)
        text = line.decode("utf-8", "replace")
        self.capabilities.append(one_line(text, len(text)))
        return []

    def _auth(self) -> list[UpstreamCommand]:
        response = xoauth2_b64(self._user, self._token.reveal())
        line = b"AUTH XOAUTH2 " + response + b"\r\n"
        if self._initial_response or len(line) <= MAX_AUTH_LINE:
            self._goto(UpstreamState.AUTH_RESULT)
            return [SendToServer(line)]
        self._goto(UpstreamState.AUTH_CONTINUE)
        return [SendToServer(b"AUTH XOAUTH2\r\n")]

    def _state_auth_continue(self, line: bytes) -> list[UpstreamCommand]:
        status = reply_status(line)
        if status == "+":  # the (empty) server-first challenge: send the response
            self._goto(UpstreamState.AUTH_RESULT)
            response = xoauth2_b64(self._user, self._token.reveal())
            return [SendToServer(response + b"\r\n")]
        if status == "-ERR":  # for instance "unsupported mechanism"
            return self._verdict(status, line, token_sent=False)
        return self._unexpected(line, "AUTH XOAUTH2")

    def _state_auth_result(self, line: bytes) -> list[UpstreamCommand]:
        status = reply_status(line)
        if status == "+":  # RFC 7628 error challenge: acknowledge, then read the -ERR
            self.error_detail = xoauth2_error(reply_text(line).strip().encode("utf-8"))
            self._goto(UpstreamState.AUTH_ERROR)
            return [SendToServer(b"\r\n")]
        return self._final(line)

    def _state_auth_error(self, line: bytes) -> list[UpstreamCommand]:
        return self._final(line)

    def _final(self, line: bytes) -> list[UpstreamCommand]:
        status = reply_status(line)
        if status in ("+OK", "-ERR"):
            return self._verdict(status, line, token_sent=True)
        return self._unexpected(line, "AUTH XOAUTH2")

    def _verdict(self, status: str, line: bytes, *, token_sent: bool) -> list[UpstreamCommand]:
        text = reply_text(line)
        reply = pop_reply(status, text, token_sent=token_sent)
        if reply.kind is ReplyKind.OK:
            self._goto(UpstreamState.DONE)
            return [UpstreamLoggedIn(None, server_bytes=self._lines.take())]
        self._goto(_U.FAILED)
        self._lines.clear()
        return [UpstreamRejected(text, reply.kind, reply.code)]
