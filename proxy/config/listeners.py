"""Config sections ``[upstreams.NAME]`` and ``[[listeners]]``: where the proxy listens, and
the server each listener logs in to."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from proxy import tlspolicy
from proxy.config.model import PROTOCOLS, Listener, RelayRule, Upstream
from proxy.config.reader import Table, parse_address


def read_upstreams(top: Table) -> dict[str, Upstream]:
    return {name: _read_upstream(name, t) for name, t in top.subtables("upstreams")}


def read_listeners(top: Table, upstreams: dict[str, Upstream]) -> list[tuple[Listener, Table]]:
    """Every ``[[listeners]]`` table, with the table it was read from (``restrict_old_tls``
    reports against it once the relay rules are known)."""
    relayed = _relayed_listeners(top.data)
    listeners = [(_read_listener(i, t, upstreams, relayed), t)
                 for i, t in enumerate(top.array("listeners"))]
    names = [li.name for li, _ in listeners]
    for i, (li, _) in enumerate(listeners):
        if names.index(li.name) != i:
            raise top.fail(f"listeners[{i}].name", f"{li.name!r} is used by another listener")
    return listeners


def _read_upstream(name: str, t: Table) -> Upstream:
    protocol = t.choice("protocol", PROTOCOLS)
    up = Upstream(
        name=name,
        protocol=protocol,
        host=t.text("host"),
        port=t.port("port"),
        tls=t.choice("tls", ("implicit", "starttls"), "starttls" if protocol == "smtp" else "implicit"),
        ca_file=t.file_path("ca_file", must_exist=True),
        connect_timeout=t.number("connect_timeout", 15.0, 0.1, 300),
        warm_connections=int(t.number("warm_connections", 0 if protocol == "smtp" else 2, 0, 64)),
        warm_seconds=t.number("warm_seconds", 20.0, 1, 600),
    )
    if protocol == "smtp" and up.warm_connections:
        raise t.fail("warm_connections", "applies to IMAP and POP3 upstreams only")
    if "verify" in t.data:
        raise t.fail("verify", "upstream TLS is always verified; to trust a private CA, set ca_file")
    t.done()
    return up


def _read_listener(index: int, t: Table, upstreams: dict[str, Upstream],
                   relayed: frozenset[str] = frozenset()) -> Listener:
    protocol = t.choice("protocol", PROTOCOLS)
    upstream = t.text("upstream")
    if upstream not in upstreams:
        raise t.fail("upstream", f"no [upstreams.{upstream}] is defined")
    if upstreams[upstream].protocol != protocol:
        raise t.fail("upstream", f"upstream {upstream!r} speaks {upstreams[upstream].protocol}, "
                                 f"this listener {protocol}")
    listener = Listener(
        name=t.text("name", f"{protocol}{index}"),
        protocol=protocol,
        listen=parse_address(t.text("listen"), t, "listen"),
        upstream=upstream,
        tls=t.choice("tls", ("none", "starttls", "implicit"), "none"),
        cert_file=t.file_path("cert_file", must_exist=True),
        key_file=t.file_path("key_file", must_exist=True),
        allow_insecure_non_loopback=t.get("allow_insecure_non_loopback", bool, False),
        bare_line_endings=t.choice("bare_line_endings", ("reject", "normalise"), "reject"),
        min_tls_version=_min_tls_version(t),
        ciphers=t.text("ciphers", None),
        allow_from=t.networks("allow_from") if "allow_from" in t.data else (),
    )
    if listener.bare_line_endings != "reject" and protocol != "smtp":
        raise t.fail("bare_line_endings", "applies to SMTP listeners only")
    if listener.tls != "none" and (listener.cert_file is None or listener.key_file is None):
        raise t.fail("cert_file", f"tls = {listener.tls!r} needs cert_file and key_file")
    for key in ("min_tls_version", "ciphers"):
        if key in t.data and listener.tls == "none":
            raise t.fail(key, "applies to a listener with tls = 'starttls' or 'implicit'")
    problem = tlspolicy.check(listener.min_tls_version, listener.ciphers)
    if problem is not None:
        raise t.fail("ciphers", problem)
    # A relay listener's [[relay]] rules are an explicit allow list of sources, and AUTH on it
    # still needs TLS or a loopback peer (or allow_insecure_non_loopback): no password travels
    # in clear, so it may listen beyond loopback without TLS.
    if (listener.tls == "none" and not listener.listen.is_loopback
            and not listener.allow_insecure_non_loopback
            and not (listener.protocol == "smtp" and listener.name in relayed)):
        raise t.fail("listen", f"{listener.listen} is not a loopback address and tls = 'none' would "
                               "send passwords in clear; configure tls, or set "
                               "allow_insecure_non_loopback = true (an smtp listener named by "
                               "a [[relay]] rule may listen without tls)")
    t.done()
    return listener


def _min_tls_version(t: Table) -> str:
    value = t.data.get("min_tls_version", tlspolicy.DEFAULT_VERSION)
    if isinstance(value, float | int) and not isinstance(value, bool):
        raise t.fail("min_tls_version", f'must be a quoted string: min_tls_version = "{value}"')
    return str(t.choice("min_tls_version", tuple(tlspolicy.VERSIONS), tlspolicy.DEFAULT_VERSION))


def restrict_old_tls(listeners: list[tuple[Listener, Table]],
                     relays: tuple[RelayRule, ...]) -> tuple[Listener, ...]:
    """A listener taking TLS 1.0/1.1 beyond loopback must be limited to known sources: its
    allow_from, or else the sources of its [[relay]] rules (which it then enforces)."""
    return tuple(_restrict_old_tls(listener, relays, t) for listener, t in listeners)


def _restrict_old_tls(listener: Listener, relays: tuple[RelayRule, ...], t: Table) -> Listener:
    if not listener.old_tls or listener.listen.is_loopback or listener.allow_from:
        return listener
    sources = tuple(dict.fromkeys(n for r in relays if r.listener == listener.name
                                  for n in r.sources))
    if not sources:
        raise t.fail("min_tls_version", f"TLS {listener.min_tls_version} is allowed only on a "
                                        f"listener restricted to loopback or to source "
                                        f"networks, and {listener.listen} is open to any "
                                        "address: set allow_from = [\"192.0.2.0/24\"] (the "
                                        "devices' networks), or listen on 127.0.0.1")
    return replace(listener, allow_from=sources)


def _relayed_listeners(data: dict[str, Any]) -> frozenset[str]:
    """Listener names that [[relay]] rules name (read before the listeners are validated)."""
    raw = data.get("relay", [])
    if not isinstance(raw, list):
        return frozenset()
    return frozenset(r["listener"] for r in raw
                     if isinstance(r, dict) and isinstance(r.get("listener"), str))

