"""IMAP login to the real server with SASL XOAUTH2, sans-I/O.

``ImapUpstreamSide`` reads the greeting, optionally runs STARTTLS, learns the capabilities,
sends ``AUTHENTICATE XOAUTH2`` (with SASL-IR when offered) and reports the outcome as one of
``UpstreamLoggedIn`` / ``UpstreamRejected`` (classified by ``login_reply.imap_reply``) /
``UpstreamBroken``. Replies may arrive split at any byte or several in one chunk. Server
literals inside untagged responses are skipped by counting, never buffered.

``UpstreamLoggedIn.capabilities`` is the server's list after login: from ``[CAPABILITY …]`` in
its OK or an untagged CAPABILITY before it (Dovecot). Microsoft 365 sends neither; with
``ask_capabilities`` the machine then sends its own ``CAPABILITY`` after the OK and consumes
the reply, so the client never sees it; other untagged responses in between are kept, in
order, at the front of ``server_bytes``.
"""

from __future__ import annotations

import enum
import re

from proxy.protocol.events import (
    ReplyKind,
    SendToServer,
    StartServerTLS,
    UpstreamBroken,
    UpstreamCommand,
    UpstreamLoggedIn,
    UpstreamRejected,
)
from proxy.protocol.imap_syntax import CRLF, LineTooLong, take_line
from proxy.protocol.login_reply import imap_reply
from proxy.protocol.machine import Rules
from proxy.protocol.sasl import xoauth2_b64, xoauth2_error
from proxy.secret import Secret
from proxy.text import one_line

_LITERAL_AT_END = re.compile(rb"\{(\d{1,19})\+?\}\Z")
_CAPABILITY_CODE = re.compile(r"\A\[CAPABILITY ([^\]]*)\]", re.IGNORECASE)


class _State(enum.Enum):
    GREETING = "greeting"  # waiting for "* OK"
    STARTTLS = "starttls"  # STARTTLS sent, waiting for its tagged reply
    TLS = "tls"  # StartServerTLS emitted, waiting for tls_started()
    CAPABILITY = "capability"  # CAPABILITY sent, waiting for its tagged reply
    AUTH_CONTINUE = "auth_continue"  # AUTHENTICATE sent without SASL-IR, waiting for "+"
    AUTH_RESULT = "auth_result"  # response sent, waiting for the tagged reply (or a challenge)
    AUTH_ERROR = "auth_error"  # empty line sent after an RFC 7628 error challenge
    CAPS_AFTER_LOGIN = "caps_after_login"  # logged in; our CAPABILITY sent, awaiting its reply
    LOGGED_IN = "logged_in"  # UpstreamLoggedIn emitted: the machine is finished
    FAILED = "failed"  # UpstreamRejected/UpstreamBroken emitted: input is ignored


# Rule 1: every legal state change, in one place; any state that reads input may also fail.
_S = _State
_RULES: Rules[_State] = Rules(
    moves={
        _S.GREETING: {_S.STARTTLS, _S.CAPABILITY, _S.AUTH_CONTINUE, _S.AUTH_RESULT, _S.FAILED},
        _S.STARTTLS: {_S.TLS, _S.FAILED},
        _S.TLS: {_S.CAPABILITY, _S.FAILED},
        _S.CAPABILITY: {_S.AUTH_CONTINUE, _S.AUTH_RESULT, _S.FAILED},
        _S.AUTH_CONTINUE: {_S.AUTH_RESULT, _S.FAILED},
        _S.AUTH_RESULT: {_S.AUTH_ERROR, _S.LOGGED_IN, _S.CAPS_AFTER_LOGIN, _S.FAILED},
        _S.AUTH_ERROR: {_S.LOGGED_IN, _S.CAPS_AFTER_LOGIN, _S.FAILED},
        _S.CAPS_AFTER_LOGIN: {_S.LOGGED_IN, _S.FAILED},
    },
    calls={
        "receive": set(_State) - {_S.LOGGED_IN},  # after login the driver relays bytes
        "tls_started": {_S.TLS},
    },
)


class ImapUpstreamSide:
    """Logs in to the upstream IMAP server as ``user`` with the bearer ``token``.

    ``starttls``: run STARTTLS after the greeting (plain port); ``ask_capabilities``: send
    CAPABILITY after the login if the OK did not report the capabilities; ``max_line`` caps one
    response line (and what is kept for the client while that CAPABILITY is answered). Nothing
    is sent before the greeting arrives.
    """

    def __init__(self, *, user: str, token: Secret, starttls: bool,
                 ask_capabilities: bool = False, max_line: int = 64 * 1024):
        self._response = xoauth2_b64(user, token.reveal())  # raises SaslError for a bad user
        self._starttls = starttls
        self._ask_capabilities = ask_capabilities
        self._max_line = max_line
        self._state = _State.GREETING
        self._buf = bytearray()
        self._caps: list[str] | None = None
        self._tag_number = 0
        self._tag = b""
        self._skip = 0  # bytes of a server literal still to skip
        self._continued = False  # the next line continues an untagged response (after a literal)
        self._error = ""  # RFC 7628 error summary, if the server sent one
        self._caps_after_login: str | None = None  # untagged CAPABILITY after AUTHENTICATE
        self._kept = bytearray()  # bytes for the client that arrived after the login's OK

    @property
    def buffered_bytes(self) -> int:
        """Server bytes held by the machine (never more than ``max_line``, or twice that while
        the CAPABILITY after login is answered)."""
        return len(self._buf) + len(self._kept)

    def receive(self, data: bytes) -> list[UpstreamCommand]:
        """Bytes from the server; ``b""`` means the server closed the connection."""
        _RULES.call("receive", self._state)
        if self._state is _State.FAILED:
            return []
        if not data:
            return self._broken("the server closed the connection during login")
        if self._state is _State.TLS:
            return []  # plaintext after the STARTTLS OK is never trusted
        self._buf += data
        out: list[UpstreamCommand] = []
        while self._state not in (_State.TLS, _State.LOGGED_IN, _State.FAILED):
            if self._skip:
                taken = min(self._skip, len(self._buf))
                if self._state is _State.CAPS_AFTER_LOGIN:
                    self._kept += self._buf[:taken]
                    if len(self._kept) > self._max_line:
                        return out + self._too_much()
                del self._buf[:taken]
                self._skip -= taken
                if self._skip:
                    break
            try:
                line = take_line(self._buf, self._max_line)
            except LineTooLong:
                return out + self._broken(f"the server sent a line over {self._max_line} bytes")
            if line is None:
                break
            out += self._line(line)
            if len(self._kept) > self._max_line:
                return out + self._too_much()
        return out

    def tls_started(self) -> list[UpstreamCommand]:
        """The driver finished the TLS handshake asked for by ``StartServerTLS``."""
        _RULES.call("tls_started", self._state)
        self._buf.clear()
        self._caps = None  # capabilities seen before TLS are not to be trusted
        return self._send_command(b"CAPABILITY", _State.CAPABILITY)

    # --- machinery ------------------------------------------------------------------------

    def _goto(self, state: _State) -> None:
        self._state = _RULES.move(self._state, state)

    def _send_command(self, command: bytes, state: _State) -> list[UpstreamCommand]:
        self._tag_number += 1
        self._tag = b"x%d" % self._tag_number
        self._goto(state)
        return [SendToServer(self._tag + b" " + command + CRLF)]

    def _broken(self, text: str) -> list[UpstreamCommand]:
        self._goto(_State.FAILED)
        self._buf.clear()
        self._kept.clear()
        return [UpstreamBroken(text)]

    def _too_much(self) -> list[UpstreamCommand]:
        return self._broken("the server sent too much after the login")

    def _line(self, line: bytes) -> list[UpstreamCommand]:
        if self._state is _State.CAPS_AFTER_LOGIN:
            return self._after_login(line)
        if self._state is not _State.GREETING and (self._continued or line.startswith(b"* ")):
            return self._untagged(line)
        text = line.decode("utf-8", "replace")
        if self._state is _State.GREETING:
            return self._greeting(text)
        if line.startswith(b"+"):
            return self._continuation(line[2:] if line.startswith(b"+ ") else line[1:])
        tag, _, rest = line.partition(b" ")
        if tag != self._tag:
            return self._broken(f"unexpected reply from the server: {_excerpt(text)}")
        status, _, resp_text = rest.decode("utf-8", "replace").partition(" ")
        status = status.upper()
        if status not in ("OK", "NO", "BAD"):
            return self._broken(f"unexpected reply from the server: {_excerpt(text)}")
        return self._tagged(status, resp_text)

    def _untagged(self, line: bytes) -> list[UpstreamCommand]:
        continued, self._continued = self._continued, False
        literal = _LITERAL_AT_END.search(line)
        if literal:
            self._skip = int(literal.group(1))
            self._continued = True
        if continued:
            return []
        text = line[2:].decode("utf-8", "replace")
        word, _, rest = text.partition(" ")
        word = word.upper()
        if word == "BYE":
            return self._broken(f"the server closed the session: {_excerpt(rest)}")
        if word == "CAPABILITY" and not literal:
            self._caps = rest.split()
            if self._state in (_State.AUTH_RESULT, _State.AUTH_ERROR):
                self._caps_after_login = rest.strip() or None
        elif word in ("OK", "NO", "BAD"):
            self._codes(rest)
        return []

    def _codes(self, resp_text: str) -> None:
        match = _CAPABILITY_CODE.match(resp_text)
        if match:
            self._caps = match.group(1).split()

    def _greeting(self, text: str) -> list[UpstreamCommand]:
        word, _, rest = text[2:].partition(" ") if text.startswith("* ") else ("", "", "")
        word = word.upper()
        if word == "PREAUTH":
            return self._broken("the server sent PREAUTH: it cannot log in as the user")
        if word == "BYE":
            return self._broken(f"the server refused the connection: {_excerpt(rest)}")
        if word != "OK":
            return self._broken(f"unexpected greeting from the server: {_excerpt(text)}")
        if self._starttls:
            return self._send_command(b"STARTTLS", _State.STARTTLS)
        self._codes(rest)
        if self._caps is not None and _has(self._caps, "AUTH=XOAUTH2"):
            return self._authenticate(self._caps)
        # No capabilities in the greeting, or a short list: ask before giving up.
        return self._send_command(b"CAPABILITY", _State.CAPABILITY)

    def _continuation(self, data: bytes) -> list[UpstreamCommand]:
        if self._state is _State.AUTH_CONTINUE:
            self._goto(_State.AUTH_RESULT)
            return [SendToServer(self._response + CRLF)]
        if self._state is _State.AUTH_RESULT:
            # RFC 7628 §3.2.3: an error challenge; answer with an empty response.
            self._error = xoauth2_error(data.strip())
            self._goto(_State.AUTH_ERROR)
            return [SendToServer(CRLF)]
        return self._broken("unexpected continuation request from the server")

    def _tagged(self, status: str, resp_text: str) -> list[UpstreamCommand]:
        state = self._state
        if state is _State.STARTTLS:
            if status != "OK":
                return self._broken(f"the server refused STARTTLS: {_excerpt(resp_text)}")
            self._buf.clear()  # CVE-2011-0411 class: nothing before TLS carries over
            self._goto(_State.TLS)
            return [StartServerTLS()]
        if state is _State.CAPABILITY:
            if status != "OK":
                return self._broken(f"the server refused CAPABILITY: {_excerpt(resp_text)}")
            self._codes(resp_text)
            if self._caps is None:
                return self._broken("the server sent no capabilities")
            if not _has(self._caps, "AUTH=XOAUTH2"):
                offered = _excerpt(" ".join(self._caps))
                return self._broken(f"the server does not offer AUTH=XOAUTH2 (it offers {offered})")
            return self._authenticate(self._caps)
        if state is _State.AUTH_CONTINUE and status == "OK":
            return self._broken("the server accepted AUTHENTICATE without a response")
        # AUTH_CONTINUE, AUTH_RESULT or AUTH_ERROR: the verdict.
        reply = imap_reply(status, resp_text, token_sent=state is not _State.AUTH_CONTINUE)
        if reply.kind is ReplyKind.OK:
            match = _CAPABILITY_CODE.match(resp_text)
            caps = match.group(1) if match else self._caps_after_login
            if caps is None and self._ask_capabilities:
                return self._send_command(b"CAPABILITY", _State.CAPS_AFTER_LOGIN)
            return self._logged_in(caps)
        text = resp_text.strip().replace("\r", " ").replace("\n", " ")
        if self._error:
            text = f"{text}; {self._error}" if text else self._error
        self._goto(_State.FAILED)
        self._buf.clear()
        return [UpstreamRejected(text or "the server rejected the login", reply.kind, reply.code)]

    def _after_login(self, line: bytes) -> list[UpstreamCommand]:
        """A line while our CAPABILITY after login is answered: its untagged CAPABILITY and
        tagged reply are ours, anything else the server sent is kept for the client."""
        continued, self._continued = self._continued, False
        literal = _LITERAL_AT_END.search(line)
        if continued or line.startswith(b"* "):
            if not continued and not literal and line[2:13].upper() == b"CAPABILITY ":
                self._caps_after_login = line[13:].decode("utf-8", "replace").strip() or None
                return []
            if literal:
                self._skip, self._continued = int(literal.group(1)), True
            self._kept += line + CRLF
            return []
        text = line.decode("utf-8", "replace")
        tag, _, rest = text.partition(" ")
        if tag.encode() != self._tag:
            return self._broken(f"unexpected reply from the server: {_excerpt(text)}")
        status, _, resp_text = rest.partition(" ")
        match = _CAPABILITY_CODE.match(resp_text) if status.upper() == "OK" else None
        # NO/BAD to CAPABILITY: still logged in, the list stays unknown.
        return self._logged_in(match.group(1) if match else self._caps_after_login)

    def _logged_in(self, capabilities: str | None) -> list[UpstreamCommand]:
        server_bytes = bytes(self._kept + self._buf)
        self._buf.clear()
        self._kept.clear()
        self._goto(_State.LOGGED_IN)
        return [UpstreamLoggedIn(capabilities, server_bytes)]

    def _authenticate(self, caps: list[str]) -> list[UpstreamCommand]:
        if _has(caps, "SASL-IR"):
            return self._send_command(b"AUTHENTICATE XOAUTH2 " + self._response, _State.AUTH_RESULT)
        return self._send_command(b"AUTHENTICATE XOAUTH2", _State.AUTH_CONTINUE)


def _has(caps: list[str], name: str) -> bool:
    return any(cap.upper() == name for cap in caps)


def _excerpt(text: str, limit: int = 200) -> str:
    return one_line(text, limit) or "(no text)"
