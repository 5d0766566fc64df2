"""IMAP before authentication, sans-I/O: the proxy's side towards the legacy client.

``ImapClientSide`` answers CAPABILITY, NOOP, LOGOUT, ID and STARTTLS itself, parses LOGIN and
AUTHENTICATE PLAIN (SASL-IR, quoted strings, synchronising and LITERAL+ literals), and hands
the credentials to its driver as an ``Authenticate`` command. The driver's verdict
(``login_succeeded`` / ``login_failed``) resumes the machine. Every line and literal is capped;
bad input gets an IMAP ``BAD``/``NO`` reply, never an exception.

The capabilities it announces before login are its own (AUTH=PLAIN, SASL-IR, ID, STARTTLS or
LOGINDISABLED as the listener needs) followed by what the upstream offers *after* login, which
the driver passes in (``upstream_capabilities``, learned from earlier logins): clients that read
the list once, before login, then see IDLE, MOVE, UIDPLUS… The upstream's AUTH=, STARTTLS and
LOGINDISABLED are about its own login and are dropped. LITERAL+ is announced while the
upstream's list is unknown or has it (LITERAL- if that is what it has): after login the client's
literals go to the upstream, which must accept them.

``ImapUpstreamSide`` (the XOAUTH2 login to the real server) lives in ``imap_upstream`` and is
re-exported here.
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
from proxy.protocol.imap_capabilities import announced
from proxy.protocol.imap_syntax import (
    CRLF,
    ImapSyntaxError,
    LineTooLong,
    LiteralMarker,
    Reader,
    literal_at_end,
    take_line,
)
from proxy.protocol.imap_upstream import ImapUpstreamSide
from proxy.protocol.machine import Rules
from proxy.protocol.sasl import SaslError, decode_plain, utf8
from proxy.secret import Secret
from proxy.text import one_line

__all__ = ["ImapClientSide", "ImapUpstreamSide"]


_FAILURE_CODES = {
    Failure.BAD_CREDENTIALS: "AUTHENTICATIONFAILED",
    Failure.AUTHORISATION_NEEDED: "AUTHENTICATIONFAILED",
    Failure.UPSTREAM_REJECTED: "AUTHENTICATIONFAILED",
    Failure.UNAVAILABLE: "UNAVAILABLE",
    Failure.THROTTLED: "UNAVAILABLE",
    Failure.CONTACT_ADMIN: "CONTACTADMIN",
}

_TOO_MUCH_PIPELINED = "too much data sent while the login is checked"

# Commands that take no arguments and may carry no literal.
_NO_ARGS = frozenset({"CAPABILITY", "NOOP", "LOGOUT", "STARTTLS"})


class _State(enum.Enum):
    NEW = "new"  # greeting() not called yet
    COMMAND = "command"  # reading a command line (or the rest of one after a literal)
    LITERAL = "literal"  # reading the bytes of an announced literal
    SASL = "sasl"  # sent "+ " for AUTHENTICATE PLAIN, reading the response line
    AUTHENTICATING = "authenticating"  # Authenticate emitted; buffering until the verdict
    TLS = "tls"  # StartClientTLS emitted; input discarded until tls_started()
    RELAY = "relay"  # StartRelay emitted: the machine is finished
    CLOSED = "closed"  # CloseConnection emitted: input is ignored


# Rule 1: every legal state change, in one place; and which driver calls are legal in which
# state (anything else is ProtocolMisuse).
_RULES: Rules[_State] = Rules(
    moves={
        _State.NEW: {_State.COMMAND},
        _State.COMMAND: {_State.LITERAL, _State.SASL, _State.AUTHENTICATING, _State.TLS,
                         _State.CLOSED},
        _State.LITERAL: {_State.COMMAND, _State.CLOSED},
        _State.SASL: {_State.COMMAND, _State.AUTHENTICATING, _State.CLOSED},
        _State.AUTHENTICATING: {_State.COMMAND, _State.RELAY, _State.CLOSED},
        _State.TLS: {_State.COMMAND, _State.CLOSED},
    },
    calls={
        "greeting": {_State.NEW},
        "receive": set(_State) - {_State.NEW, _State.RELAY},
        "tls_started": {_State.TLS},
        "verdict": {_State.AUTHENTICATING, _State.CLOSED},
    },
)


class ImapClientSide:
    """The pre-auth IMAP conversation with one legacy client.

    ``starttls``: STARTTLS is offered (a TLS context exists); ``tls_active``: the connection is
    already TLS (implicit TLS port); ``login_disabled``: plaintext logins are refused until TLS
    is active (LOGINDISABLED). ``max_line`` caps a command's line bytes and ``max_literal`` the
    sum of its literals; bytes pipelined while a login is decided are capped at their sum.
    ``upstream_capabilities``: the upstream's capability list after login (space-separated, as
    learned by the driver), None while unknown; merged into the list announced before login.
    """

    def __init__(
        self,
        *,
        starttls: bool,
        tls_active: bool,
        login_disabled: bool,
        max_line: int = 8192,
        max_literal: int = 64 * 1024,
        greeting: str = "xoauth2-proxy ready",
        upstream_capabilities: str | None = None,
    ) -> None:
        if max_line < 64 or max_literal < 0:
            raise ValueError("max_line must be at least 64 and max_literal not negative")
        self._starttls = starttls
        self._tls_active = tls_active
        self._login_disabled = login_disabled
        self._max_line = max_line
        self._max_literal = max_literal
        self._pending_cap = max_line + max_literal  # bytes pipelined behind a login
        self._greeting_text = one_line(greeting, 300) or "ready"
        self._upstream_caps = upstream_capabilities
        self._state = _State.NEW
        self._buf = bytearray()
        self._login_tag = b""
        self._reset_command()

    # --- driver API -----------------------------------------------------------------------

    @property
    def buffered_bytes(self) -> int:
        """Client bytes held by the machine (never more than ``max_line + max_literal``)."""
        return len(self._buf) + sum(map(len, self._lines)) + sum(map(len, self._literals))

    @property
    def capabilities(self) -> str:
        """The capability list the machine announces now (changes after STARTTLS)."""
        return announced(self._upstream_caps, self._starttls and not self._tls_active,
                          self._plaintext_refused)

    def greeting(self) -> list[ClientCommand]:
        self._check("greeting")
        self._goto(_State.COMMAND)
        return [self._untagged(f"OK [CAPABILITY {self.capabilities}] {self._greeting_text}")]

    def receive(self, data: bytes) -> list[ClientCommand]:
        """Bytes from the client; ``b""`` means the client closed its side."""
        self._check("receive")
        if self._state is _State.CLOSED:
            return []
        if not data:
            return self._close("client closed the connection")
        if self._state is _State.TLS:
            return []  # plaintext after STARTTLS must not reach the TLS session
        self._buf += data
        if self._state is _State.AUTHENTICATING:
            if len(self._buf) > self._pending_cap:
                return self._close_toobig(_TOO_MUCH_PIPELINED)
            return []
        return self._run()

    def tls_started(self) -> list[ClientCommand]:
        """The driver finished the TLS handshake asked for by ``StartClientTLS``."""
        self._check("tls_started")
        self._tls_active = True
        self._buf.clear()
        self._goto(_State.COMMAND)
        return []

    def login_succeeded(self, capabilities: str | None, server_bytes: bytes = b"") -> list[ClientCommand]:
        """The upstream accepted the login: answer the client and start relaying.

        The tagged OK goes first and ``server_bytes`` (the upstream's bytes after its own
        tagged OK) after it: they may end in a partial line, which must not split ours.
        """
        self._check("verdict")
        if self._state is _State.CLOSED:
            return []
        caps = one_line(capabilities or "", 4000)
        code = f"[CAPABILITY {caps}] " if caps and "]" not in caps else ""
        out: list[ClientCommand] = [self._tagged(self._login_tag, f"OK {code}Logged in")]
        if server_bytes:
            out.append(SendToClient(server_bytes))
        out.append(StartRelay(client_bytes=bytes(self._buf)))
        self._buf.clear()
        self._goto(_State.RELAY)
        return out

    def login_failed(self, failure: Failure, text: str) -> list[ClientCommand]:
        """The login was refused: tagged NO with a response code; the client may retry."""
        self._check("verdict")
        if self._state is _State.CLOSED:
            return []
        code = _FAILURE_CODES[failure]
        out: list[ClientCommand] = [self._tagged(self._login_tag, f"NO [{code}] {_reply_text(text)}")]
        self._goto(_State.COMMAND)
        return out + self._run()

    # --- machinery ------------------------------------------------------------------------

    def _check(self, call: str) -> None:
        _RULES.call(call, self._state)

    def _goto(self, state: _State) -> None:
        self._state = _RULES.move(self._state, state)

    @property
    def _plaintext_refused(self) -> bool:
        return self._login_disabled and not self._tls_active

    def _reset_command(self) -> None:
        self._lines: list[bytes] = []
        self._literals: list[bytes] = []
        self._line_bytes = 0
        self._literal_bytes = 0
        self._literal_size = 0
        self._sasl_tag = b""

    def _run(self) -> list[ClientCommand]:
        """Process buffered input until the machine needs more or stops reading."""
        steps: dict[_State, Callable[[], list[ClientCommand] | None]] = {
            _State.COMMAND: self._state_command,
            _State.LITERAL: self._state_literal,
            _State.SASL: self._state_sasl,
        }
        out: list[ClientCommand] = []
        while (step := steps.get(self._state)) is not None:
            cmds = step()
            if cmds is None:
                break
            out += cmds
        return out

    def _state_command(self) -> list[ClientCommand] | None:
        try:
            line = take_line(self._buf, self._max_line - self._line_bytes)
        except LineTooLong:
            return self._close_toobig(f"command line too long (limit {self._max_line} bytes)")
        if line is None:
            return None
        self._line_bytes += len(line) + 2
        marker = literal_at_end(line)
        if marker is None:
            self._lines.append(line)
            return self._dispatch()
        self._lines.append(line[: marker.start])
        return self._announce(marker)

    def _state_literal(self) -> list[ClientCommand] | None:
        if len(self._buf) < self._literal_size:
            return None
        self._literals.append(bytes(self._buf[: self._literal_size]))
        del self._buf[: self._literal_size]
        self._literal_bytes += self._literal_size
        self._goto(_State.COMMAND)
        return []

    def _state_sasl(self) -> list[ClientCommand] | None:
        try:
            line = take_line(self._buf, self._max_line)
        except LineTooLong:
            return self._close_toobig(f"SASL response too long (limit {self._max_line} bytes)")
        if line is None:
            return None
        tag = self._sasl_tag
        self._reset_command()
        if line.strip() == b"*":
            self._goto(_State.COMMAND)
            return [self._tagged(tag, "BAD Authentication cancelled")]
        return self._plain(tag, line)

    def _announce(self, marker: LiteralMarker) -> list[ClientCommand]:
        """A literal was announced at the end of a command line."""
        budget = self._max_literal - self._literal_bytes
        head = self._head()
        if marker.size > budget:
            if marker.synchronising:  # the client waits for "+": refuse, it sends nothing more
                self._reset_command()
                return [self._reply(head, "NO [TOOBIG] Literal too large")]
            # LITERAL+ (RFC 7888 §4): the bytes come anyway. Draining an arbitrary amount
            # before login buys nothing, so refuse and close.
            refused: list[ClientCommand] = [self._reply(head, "BAD [TOOBIG] Literal too large")]
            return refused + self._close("literal too large", bye="Literal too large")
        out: list[ClientCommand] = []
        if marker.synchronising:
            refusal = self._refuse_literal(head)
            if refusal is not None:
                self._reset_command()
                return [refusal]
            out.append(SendToClient(b"+ Ready for literal data" + CRLF))
        self._literal_size = marker.size
        self._goto(_State.LITERAL)
        return out

    def _head(self) -> tuple[bytes, str] | None:
        """Tag and command name of the command being read, or None if the tag is invalid."""
        reader = Reader([self._lines[0]], [])
        try:
            tag = reader.tag()
        except ImapSyntaxError:
            return None
        try:
            reader.space()
            return tag, reader.atom().decode("ascii", "replace").upper()
        except ImapSyntaxError:
            return tag, ""

    def _refuse_literal(self, head: tuple[bytes, str] | None) -> SendToClient | None:
        """Refuse a synchronising literal before "+" when the command cannot succeed."""
        if head is None:
            return self._reply(None, "BAD Missing or invalid tag")
        tag, name = head
        if name == "LOGIN":
            return self._privacy_required(tag) if self._plaintext_refused else None
        if name == "ID":
            return None
        if name in _NO_ARGS or name == "AUTHENTICATE":
            return self._tagged(tag, f"BAD {name} takes no literal")
        return self._not_logged_in(tag)

    def _dispatch(self) -> list[ClientCommand]:
        """A whole command (lines and literals) has been read: answer it."""
        reader = Reader(self._lines, self._literals)
        self._reset_command()
        try:
            tag = reader.tag()
        except ImapSyntaxError:
            return [self._untagged("BAD Missing or invalid tag")]
        handlers: dict[str, Callable[[bytes, Reader], list[ClientCommand]]] = {
            "CAPABILITY": self._cmd_capability,
            "NOOP": self._cmd_noop,
            "LOGOUT": self._cmd_logout,
            "ID": self._cmd_id,
            "STARTTLS": self._cmd_starttls,
            "LOGIN": self._cmd_login,
            "AUTHENTICATE": self._cmd_authenticate,
        }
        try:
            reader.space()
            name = reader.atom().decode("ascii", "replace").upper()
        except ImapSyntaxError:
            return [self._tagged(tag, "BAD Missing or invalid command name")]
        handler = handlers.get(name)
        if handler is None:
            return [self._not_logged_in(tag)]
        try:
            return handler(tag, reader)
        except ImapSyntaxError as exc:
            return [self._tagged(tag, f"BAD {name}: {exc}")]

    # --- commands -------------------------------------------------------------------------

    def _cmd_capability(self, tag: bytes, reader: Reader) -> list[ClientCommand]:
        reader.end()
        return [
            self._untagged(f"CAPABILITY {self.capabilities}"),
            self._tagged(tag, "OK CAPABILITY completed"),
        ]

    def _cmd_noop(self, tag: bytes, reader: Reader) -> list[ClientCommand]:
        reader.end()
        return [self._tagged(tag, "OK NOOP completed")]

    def _cmd_logout(self, tag: bytes, reader: Reader) -> list[ClientCommand]:
        reader.end()
        out = [self._untagged("BYE Logging out"), self._tagged(tag, "OK LOGOUT completed")]
        return out + self._close("client logged out")

    def _cmd_id(self, tag: bytes, reader: Reader) -> list[ClientCommand]:
        reader.space()
        reader.id_params()
        reader.end()
        return [
            self._untagged('ID ("name" "xoauth2-proxy")'),
            self._tagged(tag, "OK ID completed"),
        ]

    def _cmd_starttls(self, tag: bytes, reader: Reader) -> list[ClientCommand]:
        reader.end()
        if self._tls_active:
            return [self._tagged(tag, "BAD TLS is already active")]
        if not self._starttls:
            return [self._tagged(tag, "BAD STARTTLS is not available")]
        # CVE-2011-0411: whatever the client pipelined after STARTTLS is plaintext that an
        # attacker may have injected; it must not be read as if it came over TLS.
        self._buf.clear()
        self._goto(_State.TLS)
        return [self._tagged(tag, "OK Begin TLS negotiation now"), StartClientTLS()]

    def _cmd_login(self, tag: bytes, reader: Reader) -> list[ClientCommand]:
        reader.space()
        user = reader.astring()
        reader.space()
        password = reader.astring()
        reader.end()
        if self._plaintext_refused:
            return [self._privacy_required(tag)]
        try:
            name, secret = utf8(user, "user name"), utf8(password, "password")
        except SaslError as exc:
            return [self._tagged(tag, f"BAD LOGIN: {exc}")]
        if not name or not secret:
            return [self._tagged(tag, "BAD LOGIN: empty user name or password")]
        return self._authenticate(tag, Authenticate(name, Secret(secret), "LOGIN"))

    def _cmd_authenticate(self, tag: bytes, reader: Reader) -> list[ClientCommand]:
        reader.space()
        mechanism = reader.atom().decode("ascii", "replace").upper()
        initial: bytes | None = None
        if reader.peek() == ord(" "):
            reader.space()
            if not reader.at_end():
                initial = reader.atom()
        reader.end()
        if mechanism != "PLAIN":
            return [self._tagged(tag, "NO [CANNOT] Unsupported mechanism; use AUTH=PLAIN")]
        if self._plaintext_refused:
            return [self._privacy_required(tag)]
        if initial is not None:  # SASL-IR (RFC 4959): "=" is an empty initial response
            return self._plain(tag, b"" if initial == b"=" else initial)
        self._sasl_tag = tag
        self._goto(_State.SASL)
        return [SendToClient(b"+ " + CRLF)]

    def _plain(self, tag: bytes, response: bytes) -> list[ClientCommand]:
        try:
            user, password = decode_plain(response)
        except SaslError as exc:
            if self._state is _State.SASL:
                self._goto(_State.COMMAND)
            return [self._tagged(tag, f"BAD AUTHENTICATE: {exc}")]
        return self._authenticate(tag, Authenticate(user, password, "PLAIN"))

    def _authenticate(self, tag: bytes, event: Authenticate) -> list[ClientCommand]:
        if not event.username.isprintable():  # keeps log lines and upstream SASL intact
            reason = "the user name has control characters"
            if self._state is _State.SASL:
                self._goto(_State.COMMAND)
            command = "LOGIN" if event.mechanism == "LOGIN" else "AUTHENTICATE"
            return [self._tagged(tag, f"BAD {command}: {reason}")]
        if len(self._buf) > self._pending_cap:
            return self._close_toobig(_TOO_MUCH_PIPELINED)
        self._login_tag = tag
        self._goto(_State.AUTHENTICATING)
        return [event]

    # --- replies --------------------------------------------------------------------------

    def _privacy_required(self, tag: bytes) -> SendToClient:
        how = "use STARTTLS first" if self._starttls else "connect with TLS"
        return self._tagged(tag, f"NO [PRIVACYREQUIRED] Plaintext login is disabled: {how}")

    def _not_logged_in(self, tag: bytes) -> SendToClient:
        return self._tagged(tag, "BAD Command unknown or not allowed before login; log in first")

    def _reply(self, head: tuple[bytes, str] | None, text: str) -> SendToClient:
        return self._untagged(text) if head is None else self._tagged(head[0], text)

    @staticmethod
    def _tagged(tag: bytes, text: str) -> SendToClient:
        return SendToClient(tag + b" " + text.encode("utf-8") + CRLF)

    @staticmethod
    def _untagged(text: str) -> SendToClient:
        return SendToClient(b"* " + text.encode("utf-8") + CRLF)

    def _close(self, reason: str, *, bye: str | None = None) -> list[ClientCommand]:
        out: list[ClientCommand] = [self._untagged(f"BYE {bye}")] if bye else []
        self._buf.clear()
        self._reset_command()
        self._goto(_State.CLOSED)
        return out + [CloseConnection(reason)]

    def _close_toobig(self, reason: str) -> list[ClientCommand]:
        """RFC 9051 §7.1.5: BYE before closing; TOOBIG (RFC 4469/7889) says why."""
        return self._close(reason, bye=f"[TOOBIG] {reason[0].upper()}{reason[1:]}")


def _reply_text(text: str) -> str:
    """One line of reply text; a leading ``[CODE]`` is dropped (the proxy picks the code)."""
    line = one_line(text, 300)
    if line.startswith("[") and "]" in line:
        line = line[line.index("]") + 1 :].strip()
    return line or "Login failed"
