"""TLS contexts, and what the proxy records of each client handshake.

Upstream TLS is always verified (system CAs, or exactly the configured CA file) with TLS 1.2
at least; there is no switch to turn verification off, and no listener setting reaches it.
A listener's context follows its own ``min_tls_version`` and ``ciphers`` (``proxy.tlspolicy``):
lowering them for old devices weakens that listener's context alone.

Every client handshake (implicit TLS and STARTTLS) is counted by listener and version
(``tls_handshakes_total``). One below TLS 1.2 also logs a warning with the peer, version and
cipher, at most once per ``OLD_TLS_LOG_INTERVAL`` per listener and source address (with the
number of handshakes not logged since), so a printer polling every minute does not flood the
journal.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections import OrderedDict
from pathlib import Path

from proxy import logs, metrics, tlspolicy
from proxy.config import Listener

log = logging.getLogger("proxy.tls")

OLD_TLS_LOG_INTERVAL = 3600.0  # seconds between warnings for one listener and source
_MAX_TRACKED = 4096  # (listener, source) pairs remembered at most, oldest forgotten first


def upstream_context(ca_file: Path | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    return context


def server_context(listener: Listener) -> ssl.SSLContext:
    """The context local clients of ``listener`` see; built anew on reload so a renewed
    certificate is used."""
    assert listener.cert_file is not None and listener.key_file is not None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tlspolicy.apply(context, listener.min_tls_version, listener.ciphers)
    context.load_cert_chain(str(listener.cert_file), str(listener.key_file))
    return context


def apply_policy(context: ssl.SSLContext, listener: Listener) -> None:
    """Give a context already in use (an implicit-TLS server's) the listener's new policy."""
    tlspolicy.apply(context, listener.min_tls_version, listener.ciphers)


class OldTlsWarnings:
    """Rate-limited warnings for handshakes below TLS 1.2."""

    def __init__(self) -> None:
        self.interval = OLD_TLS_LOG_INTERVAL
        self._last: OrderedDict[tuple[str, str], tuple[float, int]] = OrderedDict()

    def handshake(self, listener: str, host: str, peer: str, version: str,
                  cipher: str | None) -> None:
        key, now = (listener, host), time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last[0] < self.interval:
            self._last[key] = (last[0], last[1] + 1)
            return
        self._last[key] = (now, 0)
        self._last.move_to_end(key)
        while len(self._last) > _MAX_TRACKED:
            self._last.popitem(last=False)
        logs.event(log, logging.WARNING, "old_tls_handshake", listener=listener, peer=peer,
                   tls=version, cipher=cipher, not_logged=last[1] if last and last[1] else None,
                   risk="TLS below 1.2 is weak; keep this device on a trusted network and "
                        "replace it when you can")


OLD_TLS_WARNINGS = OldTlsWarnings()


def handshake_done(listener: Listener, ssl_object: ssl.SSLObject | None, peer: str,
                   host: str) -> str | None:
    """Count a completed client handshake (and warn if it is below TLS 1.2); the version."""
    version = tlspolicy.wire_version(ssl_object)
    if version is None or ssl_object is None:
        return None
    metrics.TLS_HANDSHAKES.labels(listener.name, version).inc()
    if version in tlspolicy.OLD_VERSIONS:
        cipher = ssl_object.cipher()
        OLD_TLS_WARNINGS.handshake(listener.name, host, peer, version,
                                   cipher[0] if cipher else None)
    return version
