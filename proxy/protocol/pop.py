"""POP3 before authentication, as two sans-I/O machines (RFC 1939, 2449, 2595, 3206, 5034, 7628).

``PopClientSide`` plays a POP3 server to the legacy client until it has credentials (CAPA,
USER/PASS, AUTH PLAIN, STLS, QUIT) and hands them to the driver as ``Authenticate``.
``PopUpstreamSide`` plays a POP3 client to the real server and logs in with SASL XOAUTH2.
After login both sides are relayed as bytes by the driver; these machines are done.

Both take bytes (``b""`` = the peer closed) and return commands from ``proxy.protocol.events``.
Peer input never raises: it gets a ``-ERR`` (client side) or ``UpstreamBroken`` (upstream
side); the upstream's answer to the login is classified by ``login_reply.pop_reply``.
``ProtocolMisuse`` is raised only when the driver calls a method out of turn. Every line is
capped (``max_line``) and nothing is buffered without bound.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from proxy.protocol.events import (
    Authenticate,
    CloseConnection,
    Failure,
    ProtocolMisuse,
    ReplyKind,
    SendToClient,
    SendToServer,
    StartClientTLS,
    StartRelay,
    StartServerTLS,
    UpstreamBroken,
    UpstreamLoggedIn,
    UpstreamRejected,
)
from proxy.protocol.login_reply import pop_reply
from proxy.protocol.sasl import SaslError, decode_plain, xoauth2_b64, xoauth2_error
from proxy.secret import Secret

ClientCommand = SendToClient | StartClientTLS | Authenticate | StartRelay | CloseConnection
UpstreamCommand = (
    SendToServer | StartServerTLS | UpstreamLoggedIn | UpstreamRejected | UpstreamBroken
)

MAX_REPLY = 512  # RFC 2449 section 4: a response line is at most 512 octets with its CRLF
MAX_AUTH_LINE = 255  # RFC 5034 section 4: longer AUTH lines must use the continuation form


class _LineTooLong(Exception):
    """A line (or the unterminated tail of the buffer) exceeds the cap."""


class _Lines:
    """A bounded CRLF line splitter; bare LF is accepted as a line end too."""

    def __init__(self, max_line: int) -> None:
        if max_line < 16:
            raise ValueError("max_line must be at least 16")
        self.max_line = max_line
        self._buf = bytearray()
        self._scanned = 0  # bytes already known to hold no LF

    def __len__(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> None:
        self._buf += data

    def pop(self) -> bytes | None:
        """The next line without its line end, None if incomplete; raises ``_LineTooLong``."""
        limit = self.max_line + 2  # the line, its CR and its LF
        idx = self._buf.find(b"\n", self._scanned, limit)
        if idx < 0:
            self._scanned = min(len(self._buf), limit)
            if len(self._buf) >= limit:
                raise _LineTooLong
            return None
        line = bytes(self._buf[:idx])
        del self._buf[: idx + 1]
        self._scanned = 0
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > self.max_line:
            raise _LineTooLong
        return line

    def take(self) -> bytes:
        """Everything still buffered (the buffer is emptied)."""
        rest = bytes(self._buf)
        self.clear()
        return rest

    def clear(self) -> None:
        self._buf.clear()
        self._scanned = 0


def _clean(text: str) -> str:
    """One line of printable text: controls and line separators become single spaces."""
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())


def _reply(status: str, text: str = "") -> bytes:
    """``+OK``/``-ERR`` plus sanitised text, cut (at a character boundary) to fit 512 octets."""
    head = status.encode("ascii")
    body = _clean(text).encode("utf-8")
    room = MAX_REPLY - len(head) - 3  # the space and the CRLF
    if len(body) > room:
        body = body[:room].decode("utf-8", "ignore").rstrip().encode("utf-8")
    return head + (b" " + body if body else b"") + b"\r\n"


def _preview(line: bytes) -> str:
    """A short printable excerpt of a peer's line, for ``UpstreamBroken`` texts."""
    text = _clean(line[:80].decode("utf-8", "replace"))
    return repr(text + ("…" if len(line) > 80 else ""))


def _utf8(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _has_controls(text: str) -> bool:
    return any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)


# --- the client side -----------------------------------------------------------------


class ClientState(enum.Enum):
    GREETING = "greeting"  # greeting() not yet called
    COMMAND = "command"  # AUTHORIZATION state: reading command lines
    AUTH_CONTINUE = "auth_continue"  # sent "+ " for AUTH PLAIN: reading the response line
    AUTHENTICATING = "authenticating"  # Authenticate emitted: buffering until the verdict
    TLS_PENDING = "tls_pending"  # StartClientTLS emitted: waiting for tls_started()
    RELAY = "relay"  # StartRelay emitted: the machine is done
    CLOSED = "closed"  # CloseConnection emitted: input is ignored


# Rule 1 (after h11): every legal move of the client machine, and nowhere else.
_C = ClientState
_CLIENT_MOVES: dict[ClientState, set[ClientState]] = {
    _C.GREETING: {_C.COMMAND},
    _C.COMMAND: {_C.AUTH_CONTINUE, _C.AUTHENTICATING, _C.TLS_PENDING, _C.CLOSED},
    _C.AUTH_CONTINUE: {_C.COMMAND, _C.AUTHENTICATING, _C.CLOSED},
    _C.AUTHENTICATING: {_C.COMMAND, _C.RELAY, _C.CLOSED},
    _C.TLS_PENDING: {_C.COMMAND, _C.CLOSED},
    _C.RELAY: set(),
    _C.CLOSED: set(),
}

# RFC 3206 response codes for the proxy's own refusals.
_FAILURE_CODES: dict[Failure, str] = {
    Failure.BAD_CREDENTIALS: "[AUTH]",
    Failure.AUTHORISATION_NEEDED: "[AUTH]",
    Failure.UPSTREAM_REJECTED: "[AUTH]",
    Failure.UNAVAILABLE: "[SYS/TEMP]",
    Failure.THROTTLED: "[SYS/TEMP]",
    Failure.CONTACT_ADMIN: "[SYS/PERM]",
}

_LINE_TOO_LONG = _reply("-ERR", "line too long")


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
        self._lines = _Lines(max_line)
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
    def buffered(self) -> int:
        """How many received bytes the machine holds (bounded by the line and pending caps)."""
        return len(self._lines)

    def greeting(self) -> list[ClientCommand]:
        """The ``+OK`` greeting; call once, before ``receive``."""
        if self.state is not ClientState.GREETING:
            raise ProtocolMisuse("greeting() called twice")
        self._goto(ClientState.COMMAND)
        return [SendToClient(_reply("+OK", self._greeting))]

    def receive(self, data: bytes) -> list[ClientCommand]:
        """Bytes from the client; ``b""`` means it closed its side."""
        state = self.state
        if state in (ClientState.GREETING, ClientState.RELAY):
            raise ProtocolMisuse(f"receive() in state {state.value}")
        if state is ClientState.CLOSED:
            return []
        if not data:
            return self._close("client closed the connection")
        if state is ClientState.TLS_PENDING:
            return []  # plaintext after STLS is never acted on (command injection)
        self._lines.feed(data)
        out = self._process()  # nothing while a login is in flight: the bytes are held
        if self.state is ClientState.AUTHENTICATING and len(self._lines) > self._max_pending:
            out.append(SendToClient(_reply("-ERR", "[SYS/TEMP] too much data sent during login")))
            out += self._close("client sent too much data during login")
        return out

    def tls_started(self) -> list[ClientCommand]:
        """The client TLS handshake is done; POP3 sends no new greeting (RFC 2595)."""
        if self.state is ClientState.CLOSED:
            return []
        if self.state is not ClientState.TLS_PENDING:
            raise ProtocolMisuse(f"tls_started() in state {self.state.value}")
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
        if self.state is ClientState.CLOSED:
            return []  # the client left (or overran) while the login was in flight
        if self.state is not ClientState.AUTHENTICATING:
            raise ProtocolMisuse(f"login_succeeded() in state {self.state.value}")
        self._goto(ClientState.RELAY)
        commands: list[ClientCommand] = [SendToClient(_reply("+OK", "Logged in."))]
        if server_bytes:
            commands.append(SendToClient(server_bytes))
        commands.append(StartRelay(client_bytes=self._lines.take()))
        return commands

    def login_failed(self, failure: Failure, text: str) -> list[ClientCommand]:
        """Refuse the login with an RFC 3206 code; the client may try again."""
        if self.state is ClientState.CLOSED:
            return []
        if self.state is not ClientState.AUTHENTICATING:
            raise ProtocolMisuse(f"login_failed() in state {self.state.value}")
        self._goto(ClientState.COMMAND)
        reply = SendToClient(_reply("-ERR", f"{_FAILURE_CODES[failure]} {text}"))
        return [reply, *self._process()]  # commands pipelined after the failed login

    # --- internals ------------------------------------------------------------------------

    def _goto(self, new: ClientState) -> None:
        if new is not self.state and new not in _CLIENT_MOVES[self.state]:
            raise ProtocolMisuse(f"{self.state.value} -> {new.value} is not allowed")
        self.state = new

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
            except _LineTooLong:
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
            return [SendToClient(_reply("-ERR", "NOOP is not allowed before login; log in"))]
        return [SendToClient(_reply("-ERR", f"Log in first ({self._how_to_log_in()})"))]

    def _state_auth_continue(self, line: bytes) -> list[ClientCommand]:
        if line.strip() == b"*":
            self._goto(ClientState.COMMAND)
            return [SendToClient(_reply("-ERR", "Authentication cancelled"))]
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
        return [SendToClient(_reply("-ERR", text))]

    def _cmd_capa(self, arg: bytes) -> list[ClientCommand]:
        if arg.strip():
            return [SendToClient(_reply("-ERR", "CAPA takes no arguments"))]
        caps = []
        if not self._login_disabled:
            caps += ["USER", "SASL PLAIN"]
        caps += ["RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        if self._starttls and not self._tls_active:
            caps.append("STLS")
        caps.append("IMPLEMENTATION xoauth2-proxy")
        body = "".join(f"{c}\r\n" for c in caps).encode("ascii")
        return [SendToClient(_reply("+OK", "Capability list follows") + body + b".\r\n")]

    def _cmd_user(self, arg: bytes) -> list[ClientCommand]:
        if self._login_disabled:
            return self._refuse_plaintext()
        self._user = None
        name = _utf8(arg.strip(b" \t"))
        if not name:
            return [SendToClient(_reply("-ERR", "USER needs a user name (UTF-8)"))]
        if _has_controls(name):
            return [SendToClient(_reply("-ERR", "the user name has control characters"))]
        self._user = name
        return [SendToClient(_reply("+OK", "Now send the password with PASS"))]

    def _cmd_pass(self, arg: bytes) -> list[ClientCommand]:
        if self._login_disabled:
            return self._refuse_plaintext()
        user, self._user = self._user, None
        if user is None:
            return [SendToClient(_reply("-ERR", "Send USER first"))]
        password = _utf8(arg)  # the rest of the line after "PASS ", spaces included
        if not password:
            return [SendToClient(_reply("-ERR", "PASS needs a password (UTF-8)"))]
        return self._authenticate(user, Secret(password), "USER/PASS")

    def _cmd_auth(self, arg: bytes) -> list[ClientCommand]:
        args = arg.split()
        if not args:  # list the mechanisms (RFC 1734 practice, kept by many clients)
            mechs = b"" if self._login_disabled else b"PLAIN\r\n"
            return [SendToClient(_reply("+OK", "SASL mechanisms follow") + mechs + b".\r\n")]
        if len(args) > 2:
            return [SendToClient(_reply("-ERR", "Syntax: AUTH PLAIN [initial-response]"))]
        if args[0].upper() != b"PLAIN":
            return [SendToClient(_reply("-ERR", "Unsupported SASL mechanism; use AUTH PLAIN"))]
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
            return [SendToClient(_reply("-ERR", str(e)))]
        if _has_controls(user):
            self._goto(ClientState.COMMAND)
            return [SendToClient(_reply("-ERR", "the user name has control characters"))]
        return self._authenticate(user, password, "PLAIN")

    def _authenticate(self, user: str, password: Secret, mechanism: str) -> list[ClientCommand]:
        self._goto(ClientState.AUTHENTICATING)
        return [Authenticate(username=user, password=password, mechanism=mechanism)]

    def _cmd_stls(self, arg: bytes) -> list[ClientCommand]:
        if arg.strip():
            return [SendToClient(_reply("-ERR", "STLS takes no arguments"))]
        if self._tls_active:
            return [SendToClient(_reply("-ERR", "TLS is already active"))]
        if not self._starttls:
            return [SendToClient(_reply("-ERR", "STLS is not offered here"))]
        self._user = None  # forget everything learnt in plaintext (RFC 2595 section 4)
        self._lines.clear()  # bytes pipelined after STLS are discarded, never executed
        self._goto(ClientState.TLS_PENDING)
        return [SendToClient(_reply("+OK", "Begin TLS negotiation")), StartClientTLS()]

    def _cmd_quit(self, arg: bytes) -> list[ClientCommand]:
        return [SendToClient(_reply("+OK", "Bye")), *self._close("client sent QUIT")]


# --- the upstream side ---------------------------------------------------------------


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
_UPSTREAM_MOVES: dict[UpstreamState, set[UpstreamState]] = {
    _U.GREETING: {_U.STLS, _U.CAPA, _U.FAILED},
    _U.STLS: {_U.TLS_PENDING, _U.FAILED},
    _U.TLS_PENDING: {_U.CAPA, _U.FAILED},
    _U.CAPA: {_U.CAPA_LIST, _U.AUTH_CONTINUE, _U.AUTH_RESULT, _U.FAILED},
    _U.CAPA_LIST: {_U.AUTH_CONTINUE, _U.AUTH_RESULT, _U.FAILED},
    _U.AUTH_CONTINUE: {_U.AUTH_RESULT, _U.FAILED},
    _U.AUTH_RESULT: {_U.AUTH_ERROR, _U.DONE, _U.FAILED},
    _U.AUTH_ERROR: {_U.DONE, _U.FAILED},
    _U.DONE: set(),
    _U.FAILED: set(),
}

_MAX_CAPA_LINES = 256


def _status(line: bytes) -> str | None:
    """``"+OK"``, ``"-ERR"`` or ``"+"`` (a SASL continuation) for a reply line, else None."""
    head = line.split(b" ", 1)[0].upper()
    if head in (b"+OK", b"-ERR", b"+"):
        return head.decode("ascii")
    return None


def _text(line: bytes) -> str:
    """The text after a reply's status word, verbatim but for CR (never a line break)."""
    _, _, rest = line.partition(b" ")
    return rest.decode("utf-8", "replace").replace("\r", " ")


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
        self._lines = _Lines(max_line)
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
    def buffered(self) -> int:
        """How many received bytes the machine holds (at most ``max_line`` + 1)."""
        return len(self._lines)

    def receive(self, data: bytes) -> list[UpstreamCommand]:
        """Bytes from the server; ``b""`` means it closed its side."""
        if self.state is UpstreamState.DONE:
            raise ProtocolMisuse("receive() after UpstreamLoggedIn: relay the bytes instead")
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
            except _LineTooLong:
                out += self._broken(f"the server sent a line over {self._lines.max_line} octets")
                break
            if line is None:
                break
            out += self._handlers[self.state](line)
        return out

    def tls_started(self) -> list[UpstreamCommand]:
        """The upstream TLS handshake is done: ask for capabilities again (RFC 2595)."""
        if self.state is UpstreamState.FAILED:
            return []
        if self.state is not UpstreamState.TLS_PENDING:
            raise ProtocolMisuse(f"tls_started() in state {self.state.value}")
        self._goto(UpstreamState.CAPA)
        return [SendToServer(b"CAPA\r\n")]

    # --- internals ------------------------------------------------------------------------

    def _goto(self, new: UpstreamState) -> None:
        if new not in _UPSTREAM_MOVES[self.state]:
            raise ProtocolMisuse(f"{self.state.value} -> {new.value} is not allowed")
        self.state = new

    def _broken(self, text: str) -> list[UpstreamCommand]:
        self._goto(_U.FAILED)
        self._lines.clear()
        return [UpstreamBroken(text)]

    def _unexpected(self, line: bytes, what: str) -> list[UpstreamCommand]:
        return self._broken(f"unexpected reply to {what}: {_preview(line)}")

    def _state_greeting(self, line: bytes) -> list[UpstreamCommand]:
        if _status(line) != "+OK":
            return self._unexpected(line, "the connection (greeting)")
        if self._starttls:
            self._goto(UpstreamState.STLS)
            return [SendToServer(b"STLS\r\n")]
        self._goto(UpstreamState.CAPA)
        return [SendToServer(b"CAPA\r\n")]

    def _state_stls(self, line: bytes) -> list[UpstreamCommand]:
        if _status(line) == "-ERR":
            return self._broken(f"the server refused STLS: {_preview(line)}")
        if _status(line) != "+OK":
            return self._unexpected(line, "STLS")
        if len(self._lines):  # plaintext after "+OK" would be read as if it came over TLS
            return self._broken("the server sent data after accepting STLS")
        self._goto(UpstreamState.TLS_PENDING)
        return [StartServerTLS()]

    def _state_capa(self, line: bytes) -> list[UpstreamCommand]:
        status = _status(line)
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
        self.capabilities.append(_clean(line.decode("utf-8", "replace")))
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
        status = _status(line)
        if status == "+":  # the (empty) server-first challenge: send the response
            self._goto(UpstreamState.AUTH_RESULT)
            response = xoauth2_b64(self._user, self._token.reveal())
            return [SendToServer(response + b"\r\n")]
        if status == "-ERR":  # for instance "unsupported mechanism"
            return self._verdict(status, line, token_sent=False)
        return self._unexpected(line, "AUTH XOAUTH2")

    def _state_auth_result(self, line: bytes) -> list[UpstreamCommand]:
        status = _status(line)
        if status == "+":  # RFC 7628 error challenge: acknowledge, then read the -ERR
            self.error_detail = xoauth2_error(_text(line).strip().encode("utf-8"))
            self._goto(UpstreamState.AUTH_ERROR)
            return [SendToServer(b"\r\n")]
        return self._final(line)

    def _state_auth_error(self, line: bytes) -> list[UpstreamCommand]:
        return self._final(line)

    def _final(self, line: bytes) -> list[UpstreamCommand]:
        status = _status(line)
        if status in ("+OK", "-ERR"):
            return self._verdict(status, line, token_sent=True)
        return self._unexpected(line, "AUTH XOAUTH2")

    def _verdict(self, status: str, line: bytes, *, token_sent: bool) -> list[UpstreamCommand]:
        text = _text(line)
        reply = pop_reply(status, text, token_sent=token_sent)
        if reply.kind is ReplyKind.OK:
            self._goto(UpstreamState.DONE)
            return [UpstreamLoggedIn(None, server_bytes=self._lines.take())]
        self._goto(_U.FAILED)
        self._lines.clear()
        return [UpstreamRejected(text, reply.kind, reply.code)]
