"""Graph's answers, token errors and network failures as SMTP replies, decided once, here.

Each refusal is a ``GraphFailure`` carrying the reply the client gets: an enhanced status code
(RFC 3463) and a sentence with Graph's own error code, so the log and the client say the same.
"""

from __future__ import annotations

import ssl
from typing import Any

from proxy.auth.errors import TokenError
from proxy.server.smtp_sink import FAILURE_STATUS, Reply
from proxy.text import one_line, untrusted_certificate

THROTTLED = frozenset({429, 503, 504})
DEFAULT_RETRY = 60  # seconds, when a throttling answer names none
class GraphFailure(Exception):
    """A submission that did not succeed; ``reply`` is the client's answer, ``result`` the
    log's and metric's word for it."""

    def __init__(self, reply: Reply, result: str) -> None:
        super().__init__(str(reply))
        self.reply, self.result = reply, result


def _fail(code: int, status: str, text: str, result: str) -> GraphFailure:
    return GraphFailure(Reply(code, f"{status} {one_line(text)}"), result)


def retry_after(headers: Any) -> int:
    value = str(headers.get("retry-after", "") or "").strip()
    return int(value) if value.isdigit() else DEFAULT_RETRY


def from_answer(status: int, body: Any, headers: Any, mailbox: str) -> GraphFailure:
    """Graph refused a request (any status but 2xx)."""
    error = body.get("error") if isinstance(body, dict) else None
    error = error if isinstance(error, dict) else {}
    code = str(error.get("code") or f"HTTP {status}")
    message = str(error.get("message") or "")
    said = f"Graph said {code}: {message}" if message else f"Graph said {code}"
    if status in THROTTLED:
        return _fail(451, "4.7.0", f"{said}; retry after {retry_after(headers)} s",
                     "throttled")
    if code in ("ErrorInvalidRecipients", "ErrorInvalidUser") and status != 404:
        return _fail(550, "5.1.1", said, "recipient_refused")
    if code == "ErrorSendAsDenied":
        return _fail(550, "5.7.1", f"{said} (an administrator must grant {mailbox} Send As "
                                   "or Send on Behalf for this From address, or send as "
                                   f"{mailbox})", "send_as_denied")
    if status == 403 or code == "ErrorAccessDenied":
        return _fail(550, "5.7.1", f"{said} (an administrator must grant the app registration "
                                   "Microsoft Graph Mail.Send, and Mail.ReadWrite for large "
                                   "messages, with admin consent; application permissions "
                                   f"must include {mailbox} in the application's access "
                                   "policy or RBAC scope)", "access_denied")
    if status == 413 or "SizeExceeded" in code or "TooLarge" in code:
        return _fail(552, "5.3.4", f"{said} (the message is too large for Graph)",
                     "too_large")
    if status == 401:
        return _fail(535, "5.7.8", f"{said} (Graph refused the access token for {mailbox})",
                     "token_refused")
    if status >= 500:
        return _fail(451, "4.3.0", f"{said}; try again later", "graph_error")
    return _fail(554, "5.6.0", f"{said} (Graph did not accept the message)", "refused")


def from_token_error(exc: TokenError) -> GraphFailure:
    code, status = FAILURE_STATUS[exc.failure]
    return _fail(code, status, exc.user_text if code == 535 else
                 f"No Graph token for {exc.account}: {exc.detail}", exc.result)


def from_network(exc: BaseException, host: str) -> GraphFailure:
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = untrusted_certificate(host, exc)
    elif isinstance(exc, TimeoutError):
        why = f"Graph at {host} did not answer in time"
    else:
        why = f"Graph at {host} cannot be reached ({type(exc).__name__}: {exc})"
    return _fail(451, "4.4.1", f"{why}; try again later", "unreachable")


def problem(text: str) -> GraphFailure:
    """The message itself cannot be submitted (a damaged MIME structure)."""
    return _fail(554, "5.6.0", text, "bad_message")
