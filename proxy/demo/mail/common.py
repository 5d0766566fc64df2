"""Pieces shared by the fake Microsoft 365 IMAP, POP3 and SMTP servers.

The listener factory (``MailFactory``), XOAUTH2 parsing and checking (with the RFC 7628 error
challenge that Dovecot sends), the Microsoft 365 wording that more than one server uses, and
``send_bytes``: a push producer that writes a large ``bytes`` object in big chunks while
honouring the transport's backpressure, so that a 50 MB FETCH or RETR neither loops per line
nor buffers the whole message twice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, protocol
from twisted.internet.interfaces import IPushProducer
from twisted.python import log
from zope.interface import implementer

from proxy.protocol.sasl import SaslError, b64decode_strict, b64encode

HOSTNAME = "demo.outlook.example"
FRONTEND = "SN4PR0201CA0000.namprd02.prod.outlook.com"
# The text of every XOAUTH2 refusal while ``knobs.xoauth2_temporary_failure`` is set.
TEMPORARY_FAILURE = b"Temporary authentication failure, the token service cannot be reached."

class MailFactory(protocol.ServerFactory):
    """One listener of a fake mail server: what its connections share. ``server`` is the
    protocol class, built with the factory and whether the listener is implicit TLS."""

    noisy = False
    server: Any

    def __init__(self, *, store: Any, validator: Any, knobs: Any, tls: Any,
                 implicit_tls: bool) -> None:
        self.store = store
        self.validator = validator
        self.knobs = knobs
        self.tls = tls
        self.implicit_tls = implicit_tls

    def buildProtocol(self, addr: Any) -> Any:
        return self.server(self, self.implicit_tls)


# The scope named in the RFC 7628 error challenge, per protocol.
SCOPES = {
    "imap": "https://outlook.office.com/IMAP.AccessAsUser.All",
    "pop": "https://outlook.office.com/POP.AccessAsUser.All",
    "smtp": "https://outlook.office.com/SMTP.Send",
}


def parse_xoauth2(raw: bytes) -> tuple[str, str]:
    """Split a decoded XOAUTH2 response ``user=U^Aauth=Bearer T^A^A`` into (user, token)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SaslError("XOAUTH2 response is not UTF-8") from None
    if not text.endswith("\x01\x01"):
        raise SaslError("XOAUTH2 response must end with ^A^A")
    user = token = None
    for field in text[:-2].split("\x01"):
        key, sep, value = field.partition("=")
        if not sep:
            raise SaslError("XOAUTH2 field without '='")
        if key == "user":
            user = value
        elif key == "auth":
            scheme, _, token = value.partition(" ")
            if scheme.lower() != "bearer" or not token:
                raise SaslError("XOAUTH2 auth must be 'Bearer <token>'")
    if not user or token is None:
        raise SaslError("XOAUTH2 response needs user= and auth=")
    return user, token.strip()


@dataclass(frozen=True)
class Login:
    """The verdict on one XOAUTH2 attempt; ``user`` is set even when it failed."""

    ok: bool
    user: str = ""
    app_only: bool = False


def check_xoauth2(validator: Any, b64: bytes, protocol: str) -> defer.Deferred:
    """Decode and validate a base64 XOAUTH2 response; fires with a ``Login``, never fails.

    ``validator.validate(token, user, protocol)`` may return a bool or a Deferred. If the
    validator also has ``app_only(token)``, a true answer marks an application token
    (client-credentials flow), which may send as any address of the tenant.
    """
    try:
        user, token = parse_xoauth2(b64decode_strict(b64))
    except SaslError:
        return defer.succeed(Login(False))

    def verdict(ok: object) -> Login:
        if not ok:
            return Login(False, user)
        app_only = getattr(validator, "app_only", None)
        return Login(True, user, bool(app_only(token)) if callable(app_only) else False)

    def failed(failure: Any) -> Login:
        log.err(failure, "token validator failed")
        return Login(False, user)

    d = defer.maybeDeferred(validator.validate, token, user, protocol)
    return d.addCallback(verdict).addErrback(failed)


def error_challenge(protocol: str) -> bytes:
    """The base64 RFC 7628 error document a server sends instead of failing at once."""
    doc = {"status": "401", "schemes": "bearer", "scope": SCOPES[protocol]}
    return b64encode(json.dumps(doc, separators=(",", ":")))


@implementer(IPushProducer)
class _BytesSender:
    """Streams one bytes object to a consumer; see ``send_bytes``."""

    def __init__(self, consumer: Any, data: bytes, chunk: int) -> None:
        self._consumer = consumer
        self._data = data
        self._chunk = chunk
        self._pos = 0
        self._paused = False
        self._writing = False
        self.done: defer.Deferred | None = defer.Deferred()

    def start(self) -> defer.Deferred:
        done = self.done
        assert done is not None
        self._consumer.registerProducer(self, True)
        self.resumeProducing()
        return done

    def resumeProducing(self) -> None:
        self._paused = False
        if self._writing or self.done is None:
            return
        self._writing = True
        try:
            data, chunk, write = self._data, self._chunk, self._consumer.write
            while not self._paused and self._pos < len(data) and self.done is not None:
                end = self._pos + chunk
                write(data[self._pos : end])
                self._pos = end
        finally:
            self._writing = False
        if self._pos >= len(self._data):
            self._finish()

    def pauseProducing(self) -> None:
        self._paused = True

    def stopProducing(self) -> None:
        self._paused = True
        self._finish()

    def _finish(self) -> None:
        done, self.done = self.done, None
        if done is None:
            return
        consumer, self._consumer, self._data = self._consumer, None, b""
        try:
            consumer.unregisterProducer()
        finally:
            done.callback(None)


def send_bytes(consumer: Any, data: bytes, chunk: int = 512 * 1024) -> defer.Deferred | None:
    """Write ``data`` to ``consumer`` (a transport); small data at once (returns None),
    large data through a streaming producer (returns a Deferred fired when all is written).
    """
    if len(data) <= chunk:
        consumer.write(data)
        return None
    return _BytesSender(consumer, data, chunk).start()
