"""TLS contexts. Upstream TLS is always verified (system CAs, or exactly the configured CA
file) with TLS 1.2 at least; there is no switch to turn verification off."""

from __future__ import annotations

import ssl
from pathlib import Path


def upstream_context(ca_file: Path | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    return context


def server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """The context local clients see; built anew on reload so a renewed certificate is used."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert_file), str(key_file))
    return context
