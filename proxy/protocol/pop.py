"""POP3 before authentication towards the legacy client, sans-I/O (RFC 1939, 2449, 2595, 3206,
5034).

``PopClientSide`` plays a POP3 server to the legacy client until it has credentials (CAPA,
USER/PASS, AUTH PLAIN, STLS, QUIT) and hands them to the driver as ``Authenticate``; the
driver's verdict (``login_succeeded`` / ``login_failed``) resumes it. After login the driver
relays bytes; the machine is done. It takes bytes (``b""`` = the client closed) and returns
``ClientCommand``s. Client input never raises: it gets a ``-ERR``. ``ProtocolMisuse`` is
raised only when the driver calls a method out of turn. Every line is capped (``max_line``)
and nothing is buffered without bound.

``PopUpstreamSide`` (the XOAUTH2 login to the real server) lives in ``pop_upstream`` and is
re-exported here; lines and replies are in ``pop_syntax``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from proxy.protocol.events import (
    Authenticate,
    ClientCommand,
    CloseConnection,
    Failure,
    SendToClient,
    StartClientTLS,
    StartRelay,
)
from proxy.protocol.machine import Rules
from proxy.protocol.pop_syntax import Lines, LineTooLong, has_controls, reply
from proxy.protocol.pop_upstream import PopUpstreamSide
from proxy.protocol.sasl import SaslError, decode_plain
from proxy.secret import Secret
from proxy.text import decode_utf8

__all__ = ["ClientState", "PopClientSide", "PopUpstreamSide"]


class ClientState(enum.Enum):
    GREETING = "greeting"  # greeting() not yet called
    COMMAND = "command"  # AUTHORIZATION state: reading command lines
    AUTH_CONTINUE = "auth_continue"  # sent "+ " for AUTH PLAIN: reading the response line
    AUTHENTICATING = "authenticating"  # Authenticate emitted: buffering until the verdict
    TLS_PENDING = "tls_pending"  # StartClientTLS emitted: waiting for tls_started()
    RELAY = "relay"  # StartRelay emitted: the machine is done
    CLOSED = "closed"  # CloseConnection emitted: input is ignored


# Rule 1 (after h11): every legal move of the client machine, and nowhere else. Staying in
# the same state is always allowed.
_C = ClientState
_MOVES: dict[ClientState, set[ClientState]] = {
    _C.GREETING: {_C.COMMAND},
    _C.COMMAND: {_C.AUTH_CONTINUE, _C.AUTHENTICATING, _C.TLS_PENDING, _C.CLOSED},
    _C.AUTH_CONTINUE: {_C.COMMAND, _C.AUTHENTICATING, _C.CLOSED},
    _C.AUTHENTICATING: {_C.COMMAND, _C.RELAY, _C.CLOSED},
    _C.TLS_PENDING: {_C.COMMAND, _C.CLOSED},
}
_RULES: Rules[ClientState] = Rules(
    moves={state: {state, *_MOVES.get(state, ())} for state in ClientState},
    calls={
        "greeting": {_C.GREETING},
        "receive": set(ClientState) - {_C.GREETING, _C.RELAY},
        "tls_started": {_C.TLS_PENDING, _C.CLOSED},
        "verdict": {_C.AUTHENTICATING, _C.CLOSED},  # login_succeeded, login_failed
    },
)

# RFC 3206 response codes for the proxy's own refusals.
_FAILURE_CODES: dict[Failure, str] = {
    Failure.BAD_CREDENTIALS: "[AUTH]",
    Failure.AUTHORISATION_NEEDED: "[AUTH]",
    Failure.UPSTREAM_REJECTED: "[AUTH]",
    Failure.UNAVAILABLE: "[SYS/TEMP]",
    Failure.THROTTLED: "[SYS/TEMP]",
    Failure.CONTACT_ADMIN: "[SYS/PERM]",
}

_LINE_TOO_LONG = reply("-ERR", "line too long")


class PopClientSide:
    """The POP3 AUTHORIZATION state towards a legacy client, up to a verified login.

    ``login_disabled`` means the connection is plaintext from a non-loopback peer: USER,
    PASS and AUTH PLAIN are then refused with ``-ERR [AUTH]`` (RFC 3206: "an attempt to
    authenticate in violation of policy") and CAPA does not advertise USER or SASL, so a
    well-behaved client upgrades with STLS before it sends a password. ``tls_started()``
    lifts the restriction. USER is refused too, so a client learns before it sends PASS.

    At most one login is in flight: after ``Authenticate`` the client's bytes are kept
    (up to ``max_pending``) until ``login_succeeded`` (they become ``StartRelay.client_bytes``)
    or ``login_failed`` (they are read as commands again).
    """

    def __init__(
        self,
        *,
        starttls: bool,
        tls_active: bool,
        login_disabled: bool,
        max_line: int = 2048,
        greeting: str = "xoauth2-proxy ready",
        max_pending: int = 65536,
    ) -> None:
        self.state = ClientState.GREETING
        self._starttls = starttls
        self._tls_active = tls_active
        self._login_disabled = login_disabled and not tls_active
        self._greeting = greeting
        self._lines = Lines(max_line)
        self._max_pending = max(max_pending, max_line + 2)
        self._user: str | None = None  # from USER, waiting for PASS
        self._handlers: dict[bytes, Callable[[bytes], list[ClientCommand]]] = {
            b"CAPA": self._cmd_capa,
            b"USER": self._cmd_user,
            b"PASS": self._cmd_pass,
            b"AUTH": self._cmd_auth,
            b"STLS": self._cmd_stls,
            b"QUIT": self._cmd_quit,
        }

    # --- the driver's calls ------------------------------------------------------------

    @property
    def buffered_bytes(self) -> int:
        """How many received bytes the machine holds (bounded by the line and pending caps)."""
        return len(self._lines)

    def greeting(self) -> list[ClientCommand]:
        """The ``+OK`` greeting; call once, before ``receive``."""
        _RULES.call("greeting", self.state)
        self._goto(ClientState.COMMAND)
        return [SendToClient(reply("+OK", self._greeting))]

    def receive(self, data: bytes) -> list[ClientCommand]:
        """Bytes from the client; ``b""`` means it closed its side."""
        state = self.state
        _RULES.call("receive", state)
        if state is ClientState.CLOSED:
            return []
        if not data:
            return self._close("client closed the connection")
        if state is ClientState.TLS_PENDING:
            return []  # plaintext after STLS is never acted on (command injection)
        self._lines.feed(data)
        out = self._process()  # nothing while a login is in flight: the bytes are held
        if self.state is ClientState.AUTHENTICATING and len(self._lines) > self._max_pending:
            out.append(SendToClient(reply("-ERR", "[SYS/TEMP] too much data sent during login")))
            out += self._close("client sent too much data during login")
        return out

    def tls_started(self) -> list[ClientCommand]:
        """The client TLS handshake is done; POP3 sends no new greeting (RFC 2595)."""
        _RULES.call("tls_started", self.state)
        if self.state is ClientState.CLOSED:
            return []
        self._tls_active = True
        self._login_disabled = False
        self._goto(ClientState.COMMAND)
        return []

    def login_succeeded(
        self, capabilities: str | None = None, server_bytes: bytes = b""
    ) -> list[ClientCommand]:
        """The login worked upstream: answer ``+OK`` and start relaying.

        ``capabilities`` is ignored (POP3 announces none in its login reply). ``server_bytes``
        (whatever the upstream sent after its own ``+OK``; normally nothing) follow our
        ``+OK``, which stands in for the upstream's, so the client sees them in order.
        """
        _RULES.call("verdict", self.state)
        if self.state is ClientState.CLOSED:
            return []  # the client left (or overran) while the login was in flight
        self._goto(ClientState.RELAY)
        commands: list[ClientCommand] = [SendToClient(reply("+OK", "Logged in."))]
        if server_bytes:
            commands.append(SendToClient(server_bytes))
        commands.append(StartRelay(client_bytes=self._lines.take()))
        return commands

    def login_failed(self, failure: Failure, text: str) -> list[ClientCommand]:
        """Refuse the login with an RFC 3206 code; the client may try again."""
        _RULES.call("verdict", self.state)
        if self.state is ClientState.CLOSED:
            return []
        self._goto(ClientState.COMMAND)
        refusal = SendToClient(reply("-ERR", f"{_FAILURE_CODES[failure]} {text}"))
        return [refusal, *self._process()]  # commands pipelined after the failed login

    # --- internals ------------------------------------------------------------------------

    def _goto(self, new: ClientState) -> None:
        self.state = _RULES.move(self.state, new)

    def _close(self, reason: str) -> list[ClientCommand]:
        self._goto(ClientState.CLOSED)
        self._lines.clear()
        return [CloseConnection(reason)]

    def _process(self) -> list[ClientCommand]:
        """Answer every complete buffered line until a state needs to wait."""
        out: list[ClientCommand] = []
        while self.state in (ClientState.COMMAND, ClientState.AUTH_CONTINUE):
            try:
                line = self._lines.pop()
            except LineTooLong:
                out += [SendToClient(_LINE_TOO_LONG), *self._close("client line too long")]
                break
            if line is None:
                break
            if self.state is ClientState.COMMAND:
                out += self._state_command(line)
            else:
                out += self._state_auth_continue(line)
        return out

    def _state_command(self, line: bytes) -> list[ClientCommand]:
        verb, _, arg = line.partition(b" ")
        handler = self._handlers.get(verb.upper())
        if handler is not None:
            return handler(arg)
        if verb.upper() == b"NOOP":
            return [SendToClient(reply("-ERR", "NOOP is not allowed before login; log in"))]
        return [SendToClient(reply("-ERR", f"Log in first ({self._how_to_log_in()})"))]

    def _state_auth_continue(self, line: bytes) -> list[ClientCommand]:
        if line.strip() == b"*":
            self._goto(ClientState.COMMAND)
            return [SendToClient(reply("-ERR", "Authentication cancelled"))]
        return self._plain(line.strip(b" \t"))

    def _how_to_log_in(self) -> str:
        if not self._login_disabled:
            return "USER/PASS or AUTH PLAIN"
        if self._starttls:
            return "STLS, then USER/PASS or AUTH PLAIN"
        return "connect with TLS, then USER/PASS or AUTH PLAIN"

    def _refuse_plaintext(self) -> list[ClientCommand]:
        self._user = None
        advice = "use STLS first" if self._starttls else "connect with TLS"
        text = f"[AUTH] Plaintext login is not allowed on this connection; {advice}"
        return [SendToClient(reply("-ERR", text))]

    def _cmd_capa(self, arg: bytes) -> list[ClientCommand]:
        if arg.strip():
            return [SendToClient(reply("-ERR", "CAPA takes no arguments"))]
        caps = []
        if not self._login_disabled:
            caps += ["USER", "SASL PLAIN"]
        caps += ["RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        if self._starttls and not self._tls_active:
            caps.append("STLS")
        caps.append("IMPLEMENTATION xoauth2-proxy")
        body = "".join(f"{c}\r\n" for c in caps).encode("ascii")
        return [SendToClient(reply("+OK", "Capability list follows") + body + b".\r\n")]

    def _cmd_user(self, arg: bytes) -> list[ClientCommand]:
        if self._login_disabled:
            return self._refuse_plaintext()
        self._user = None
        name = decode_utf8(arg.strip(b" \t"))
        if not name:
            return [SendToClient(reply("-ERR", "USER needs a user name (UTF-8)"))]
        if has_controls(name):
            return [SendToClient(reply("-ERR", "the user name has control characters"))]
        self._user = name
        return [SendToClient(reply("+OK", "Now send the password with PASS"))]

    def _cmd_pass(self, arg: bytes) -> list[ClientCommand]:
        if self._login_disabled:
            return self._refuse_plaintext()
        user, self._user = self._user, None
        if user is None:
            return [SendToClient(reply("-ERR", "Send USER first"))]
        password = decode_utf8(arg)  # the rest of the line after "PASS ", spaces included
        if not password:
            return [SendToClient(reply("-ERR", "PASS needs a password (UTF-8)"))]
        return self._authenticate(user, Secret(password), "USER/PASS")

    def _cmd_auth(self, arg: bytes) -> list[ClientCommand]:
        args = arg.split()
        if not args:  # list the mechanisms (RFC 1734 practice, kept by many clients)
            mechs = b"" if self._login_disabled else b"PLAIN\r\n"
            return [SendToClient(reply("+OK", "SASL mechanisms follow") + mechs + b".\r\n")]
        if len(args) > 2:
            return [SendToClient(reply("-ERR", "Syntax: AUTH PLAIN [initial-response]"))]
        if args[0].upper() != b"PLAIN":
            return [SendToClient(reply("-ERR", "Unsupported SASL mechanism; use AUTH PLAIN"))]
        if self._login_disabled:
            return self._refuse_plaintext()
        self._user = None
        if len(args) == 2:  # RFC 5034 initial response; "=" is an empty one
            return self._plain(b"" if args[1] == b"=" else args[1])
        self._goto(ClientState.AUTH_CONTINUE)
        return [SendToClient(b"+ \r\n")]

    def _plain(self, response: bytes) -> list[ClientCommand]:
        try:
            user, password = decode_plain(response)
        except SaslError as e:
            self._goto(ClientState.COMMAND)
            return [SendToClient(reply("-ERR", str(e)))]
        if has_controls(user):
            self._goto(ClientState.COMMAND)
            return [SendToClient(reply("-ERR", "the user name has control characters"))]
        return self._authenticate(user, password, "PLAIN")

    def _authenticate(self, user: str, password: Secret, mechanism: str) -> list[ClientCommand]:
        self._goto(ClientState.AUTHENTICATING)
        return [Authenticate(username=user, password=password, mechanism=mechanism)]

    def _cmd_stls(self, arg: bytes) -> list[ClientCommand]:
        if arg.strip():
            return [SendToClient(reply("-ERR", "STLS takes no arguments"))]
        if self._tls_active:
            return [SendToClient(reply("-ERR", "TLS is already active"))]
        if not self._starttls:
            return [SendToClient(reply("-ERR", "STLS is not offered here"))]
        self._user = None  # forget everything learnt in plaintext (RFC 2595 section 4)
        self._lines.clear()  # bytes pipelined after STLS are discarded, never executed
        self._goto(ClientState.TLS_PENDING)
        return [SendToClient(reply("+OK", "Begin TLS negotiation")), StartClientTLS()]

    def _cmd_quit(self, arg: bytes) -> list[ClientCommand]:
        return [SendToClient(reply("+OK", "Bye")), *self._close("client sent QUIT")]


