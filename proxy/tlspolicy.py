"""Which TLS a local listener accepts: the lowest version and the cipher list.

Every listener accepts TLS 1.2 and newer with Python's default ciphers unless its config says
otherwise. ``min_tls_version = "1.0"`` or ``"1.1"`` is for old devices that speak nothing newer
(printers, scanners): OpenSSL 3 refuses those versions at its default security level, so such a
listener's context, and only that context, gets ``@SECLEVEL=0`` and cipher suites the old
versions can use (AES-CBC with SHA-1 among them). Upstream contexts are built elsewhere and
never see any of this (``proxy.server.tls``).

No asyncio and no config types here: the config validates with ``check`` and the server builds
its contexts with ``apply``, so both see the same rules.
"""

from __future__ import annotations

import ssl
import warnings

# The values the config accepts, in order, and OpenSSL's versions for them.
VERSIONS: dict[str, ssl.TLSVersion] = {
    "1.0": ssl.TLSVersion.TLSv1,
    "1.1": ssl.TLSVersion.TLSv1_1,
    "1.2": ssl.TLSVersion.TLSv1_2,
    "1.3": ssl.TLSVersion.TLSv1_3,
}
DEFAULT_VERSION = "1.2"
OLD_VERSIONS = frozenset({"1.0", "1.1"})

# What ``SSLObject.version()`` says, as the config spells it (metric labels, log fields).
_WIRE_NAMES = {"TLSv1": "1.0", "TLSv1.1": "1.1", "TLSv1.2": "1.2", "TLSv1.3": "1.3"}

# The cipher list of a listener that accepts TLS 1.0/1.1 and names none: forward-secret suites
# first, then RSA key exchange (what many old devices have), AES only (no RC4, no 3DES),
# authenticated, and at security level 0, without which OpenSSL 3 refuses TLS 1.0 and 1.1.
OLD_DEVICE_CIPHERS = ("ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:ECDHE+AES:DHE+AES:RSA+AESGCM:"
                      "RSA+AES:!aNULL:!eNULL:!MD5:!DSS:!PSK:!SRP")
SECLEVEL_0 = "@SECLEVEL=0"
SECLEVEL_2 = "@SECLEVEL=2"
# Python's own choice for new contexts (TLS 1.2+ listeners that name no ciphers).
PYTHON_CIPHERS: str = getattr(ssl, "_DEFAULT_CIPHERS", None) or (
    "@SECLEVEL=2:ECDH+AESGCM:ECDH+CHACHA20:ECDH+AES:DHE+AES:!aNULL:!eNULL:!aDSS:!SHA1:!AESCCM")


def wire_version(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str | None:
    """The negotiated version as the config spells it ("1.0" … "1.3"); None before a handshake."""
    if ssl_object is None:
        return None
    version = ssl_object.version()
    return _WIRE_NAMES.get(version, version) if version else None


def cipher_list(min_version: str, ciphers: str | None) -> str:
    """The OpenSSL cipher string a listener uses. It always sets the security level (an
    operator's own ``@SECLEVEL`` is kept), so a context given a new policy keeps nothing of the
    old one: 0 with TLS 1.0/1.1 (for this context only), else Python's 2."""
    if ciphers is not None and "@SECLEVEL" in ciphers.upper():
        return ciphers
    if min_version in OLD_VERSIONS:
        return f"{ciphers or OLD_DEVICE_CIPHERS}:{SECLEVEL_0}"
    return f"{SECLEVEL_2}:{ciphers}" if ciphers else PYTHON_CIPHERS


def apply(context: ssl.SSLContext, min_version: str, ciphers: str | None) -> None:
    """Set a server context's lowest version and cipher list (also on a context in use: new
    connections get the new policy). Raises ``ssl.SSLError`` if no cipher can be selected."""
    with warnings.catch_warnings():  # ssl deprecates TLSv1/TLSv1_1 constants: chosen on purpose
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = VERSIONS[min_version]
    context.set_ciphers(cipher_list(min_version, ciphers))


def check(min_version: str, ciphers: str | None) -> str | None:
    """What is wrong with this policy (one sentence), or None. No certificate needed."""
    if min_version not in VERSIONS:
        return f"must be one of {', '.join(repr(v) for v in VERSIONS)} (got {min_version!r})"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        apply(context, min_version, ciphers)
    except ssl.SSLError:
        return (f"OpenSSL selects no cipher from {ciphers!r}; give an OpenSSL cipher string, "
                "e.g. \"ECDHE+AES:RSA+AES\" (see `openssl ciphers -v 'STRING'`)")
    return None
