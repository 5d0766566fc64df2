"""The fake Microsoft 365 mail servers (IMAP4rev1, POP3, ESMTP submission) on Twisted.

``start_mail_servers`` opens six listeners on port 0 of ``host``: implicit-TLS and
STARTTLS variants of each protocol. All of them accept only SASL XOAUTH2 with a token that
``validator.validate(token, user, protocol)`` approves, answer failures with Microsoft
365's texts, and share one in-memory ``MailStore``: a message submitted over SMTP is at
once in the recipients' INBOX for IMAP and POP3, byte for byte.
"""

from __future__ import annotations

from typing import Any

from .imap import IMAPFactory
from .pop import POPFactory
from .smtp import SMTPFactory
from .store import MailStore

__all__ = ["MailStore", "start_mail_servers"]

_LISTENERS = (
    # name, factory class, implicit TLS
    ("imaps", IMAPFactory, True),
    ("imap", IMAPFactory, False),
    ("pop3s", POPFactory, True),
    ("pop3", POPFactory, False),
    ("submission", SMTPFactory, False),
    ("smtps", SMTPFactory, True),
)


def start_mail_servers(reactor: Any, *, host: str, tls: Any, validator: Any,
                       store: MailStore, knobs: Any) -> dict[str, int]:
    """Listen on port 0 of ``host`` for each protocol; return {name: port number}.

    ``tls`` is a ``twisted.internet.ssl.CertificateOptions`` with the server certificate
    (used for implicit TLS and for STARTTLS/STLS); ``knobs`` is read on every request.
    """
    ports: dict[str, int] = {}
    for name, factory_class, implicit in _LISTENERS:
        factory = factory_class(store=store, validator=validator, knobs=knobs, tls=tls,
                                implicit_tls=implicit)
        if implicit:
            port = reactor.listenSSL(0, factory, tls, interface=host)
        else:
            port = reactor.listenTCP(0, factory, interface=host)
        ports[name] = port.getHost().port
    return ports
