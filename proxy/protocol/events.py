"""What the sans-I/O machines ask their driver to do, and the verdicts the driver hands back.

Machines take bytes (``receive(data)``; ``b""`` means the peer closed) and return a list of
commands. Commands are imperative (``SendToClient``); the driver carries them out in order.
A machine never raises for bad peer input: it answers with the protocol's own error reply.
``ProtocolMisuse`` is raised only when the driver calls a machine out of turn (a bug).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from proxy.secret import Secret


class ProtocolMisuse(RuntimeError):
    """The driver called a machine in a state where that call is not allowed (a bug, not input)."""


# --- client side: the machine that talks to the legacy client before login ------------------


@dataclass(frozen=True)
class SendToClient:
    data: bytes


@dataclass(frozen=True)
class StartClientTLS:
    """Upgrade the client connection to TLS now; the reply that allows it has been sent.

    Call ``machine.tls_started()`` once the handshake is done (it may return commands)."""


@dataclass(frozen=True)
class Authenticate:
    """The client gave credentials: decide, then call ``login_succeeded`` or ``login_failed``."""

    username: str
    password: Secret = field(repr=False)
    mechanism: str  # "LOGIN", "PLAIN", "USER/PASS" … (for logs and metrics)


@dataclass(frozen=True)
class StartRelay:
    """Login is done: relay bytes both ways from now on.

    ``client_bytes`` are bytes the client already sent after its login command (pipelined);
    they go to the upstream first."""

    client_bytes: bytes = b""


@dataclass(frozen=True)
class CloseConnection:
    """Close the client connection (after sending what was queued)."""

    reason: str = ""


# --- upstream side: the machine that logs in to the real server with XOAUTH2 ------------------


@dataclass(frozen=True)
class SendToServer:
    data: bytes = field(repr=False)  # may carry a bearer token


@dataclass(frozen=True)
class StartServerTLS:
    """Upgrade the upstream connection to TLS now (STARTTLS/STLS accepted).

    Call ``machine.tls_started()`` once the handshake is done."""


@dataclass(frozen=True)
class UpstreamLoggedIn:
    """The upstream accepted the token.

    ``capabilities``: the capability list the upstream announces after login (IMAP: the
    ``[CAPABILITY …]`` of its tagged OK, an untagged CAPABILITY, or the reply to the machine's
    own CAPABILITY after the OK), or None. ``server_bytes``: bytes the upstream sent after the
    login reply (less that CAPABILITY exchange); they go to the client first when relaying
    starts."""

    capabilities: str | None = None
    server_bytes: bytes = b""


class ReplyKind(enum.Enum):
    """What an upstream's final reply to the XOAUTH2 login means (``proxy.protocol.login_reply``
    classifies every reply form into one of these, by its response code before its text).

    Only ``AUTH_FAILED`` earns a refresh-and-retry: a new token can cure nothing else."""

    OK = "ok"  # logged in
    AUTH_FAILED = "auth_failed"  # the token (or the account behind it) was refused
    TEMPORARY = "temporary"  # the server cannot decide now (its token check is down …): try later
    OTHER = "other"  # permanent and not about the token (policy, configuration): an admin acts


@dataclass(frozen=True)
class UpstreamRejected:
    """The upstream did not accept the login. ``text`` is its reply text, verbatim (no CR/LF);
    ``kind`` its classification (never ``OK``); ``code`` the response code it was classified
    by (``UNAVAILABLE``, ``SYS/TEMP``, ``5.7.139``, ``454`` …), empty when it had none."""

    text: str
    kind: ReplyKind
    code: str = ""

    def __post_init__(self) -> None:
        if self.kind is ReplyKind.OK:
            raise ValueError("a rejection cannot be of kind OK")


@dataclass(frozen=True)
class UpstreamBroken:
    """The upstream broke the protocol or closed; ``text`` says how (for logs and the reply)."""

    text: str


ClientCommand = SendToClient | StartClientTLS | Authenticate | StartRelay | CloseConnection
"""What a client-side machine (``ImapClientSide``, ``PopClientSide``) returns."""

UpstreamCommand = SendToServer | StartServerTLS | UpstreamLoggedIn | UpstreamRejected | UpstreamBroken
"""What an upstream machine (``ImapUpstreamSide``, ``PopUpstreamSide``) returns."""


class Failure(enum.Enum):
    """Why the proxy refused a login; each protocol maps it to its own reply form.

    IMAP: ``NO [AUTHENTICATIONFAILED]`` / ``NO [UNAVAILABLE]`` / ``NO [CONTACTADMIN]``;
    POP3: ``-ERR [AUTH]`` / ``-ERR [SYS/TEMP]`` / ``-ERR [SYS/PERM]``; SMTP: 535 5.7.8 / 454 4.7.0.
    """

    BAD_CREDENTIALS = "bad_credentials"  # wrong local password or unknown account
    AUTHORISATION_NEEDED = "authorisation_needed"  # run `xoauth2-proxy login ACCOUNT`
    UPSTREAM_REJECTED = "upstream_rejected"  # the upstream refused a fresh token
    UNAVAILABLE = "unavailable"  # identity platform or upstream unreachable or busy: try later
    THROTTLED = "throttled"  # too many failed logins: try later
    CONTACT_ADMIN = "contact_admin"  # proxy or mailbox misconfigured: an administrator must act
