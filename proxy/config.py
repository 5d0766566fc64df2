"""Typed, validated configuration, loaded from TOML.

``load(path)`` returns a frozen ``Config`` or raises ``ConfigError`` whose message is one line
naming the file, the key and what is wrong (the CLI prints it and exits 2). The whole file is
validated at once: cross references (a listener's upstream, an account's provider) are checked
too, so a config that loads is a config that can run.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from proxy import runtime as runtime_mod
from proxy import systemd, tlspolicy
from proxy.store.settings import StoreSettings, read_store

Protocol = Literal["imap", "pop", "smtp"]
PROTOCOLS: tuple[Protocol, ...] = ("imap", "pop", "smtp")
LocalTLS = Literal["none", "starttls", "implicit"]
BareLineEndings = Literal["reject", "normalise"]
UpstreamTLS = Literal["implicit", "starttls"]
Flow = Literal["device_code", "auth_code", "client_credentials"]
FLOWS: tuple[Flow, ...] = ("device_code", "auth_code", "client_credentials")

# Microsoft's documented scopes for IMAP, POP and SMTP AUTH with delegated permissions, and the
# resource's .default scope for app-only access (client credentials).
DEFAULT_SCOPES: dict[Protocol, tuple[str, ...]] = {
    "imap": ("https://outlook.office.com/IMAP.AccessAsUser.All",),
    "pop": ("https://outlook.office.com/POP.AccessAsUser.All",),
    "smtp": ("https://outlook.office.com/SMTP.Send",),
}
DEFAULT_APP_SCOPE = "https://outlook.office365.com/.default"
DEFAULT_CONFIG_PATH = Path("/etc/xoauth2-proxy/config.toml")


class ConfigError(Exception):
    """A config problem, as one line: ``FILE: KEY: what is wrong``."""


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


@dataclass(frozen=True)
class Upstream:
    name: str
    protocol: Protocol
    host: str
    port: int
    tls: UpstreamTLS
    ca_file: Path | None = None  # trust only this CA (tests, private servers); else system CAs
    connect_timeout: float = 15.0
    warm_connections: int = 2  # IMAP/POP3: connections kept connected ahead of logins
    warm_seconds: float = 20.0  # a warm connection unused this long is closed


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Listener:
    name: str
    protocol: Protocol
    listen: Address
    upstream: str
    tls: LocalTLS = "none"
    cert_file: Path | None = None
    key_file: Path | None = None
    allow_insecure_non_loopback: bool = False
    # SMTP: a message with a bare CR or LF is refused (550 5.6.11), or its line ends are made
    # CR LF before they go upstream ("normalise", for devices that send LF only).
    bare_line_endings: BareLineEndings = "reject"
    min_tls_version: str = tlspolicy.DEFAULT_VERSION  # "1.0" … "1.3" (proxy.tlspolicy)
    ciphers: str | None = None  # an OpenSSL cipher string for TLS 1.2 and older
    # Only these sources may connect (empty: any). A listener accepting TLS 1.0/1.1 beyond
    # loopback has them: its own allow_from, or else its [[relay]] rules' sources.
    allow_from: tuple[Network, ...] = ()

    @property
    def old_tls(self) -> bool:
        """Accepts TLS 1.0 or 1.1 (old devices), by the config's explicit choice."""
        return self.min_tls_version in tlspolicy.OLD_VERSIONS

    def admits(self, host: str) -> bool:
        """May a client at ``host`` (an IP address, as the socket reports it) connect?"""
        if not self.allow_from:
            return True
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.allow_from)


@dataclass(frozen=True)
class Provider:
    name: str
    authority: str  # e.g. https://login.microsoftonline.com
    tenant: str  # tenant id or domain; "organizations" for multi-tenant delegated use
    client_id: str
    client_secret_file: Path | None = None
    client_secret_env: str | None = None
    ca_file: Path | None = None  # trust only this CA for the identity platform (tests)
    timeout: float = 10.0
    scopes: dict[Protocol, tuple[str, ...]] = field(default_factory=lambda: dict(DEFAULT_SCOPES))
    app_scope: str = DEFAULT_APP_SCOPE

    @property
    def authority_url(self) -> str:
        return f"{self.authority.rstrip('/')}/{self.tenant}"

    def client_secret(self) -> str | None:
        """Read the client secret from its file or environment variable (None if neither)."""
        if self.client_secret_file is not None:
            try:
                return self.client_secret_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                advice = (systemd.missing_credential(self.client_secret_file)
                          if isinstance(exc, FileNotFoundError) else None)
                raise ConfigError(
                    f"providers.{self.name}.client_secret_file: cannot read "
                    f"{self.client_secret_file}: {exc.strerror}"
                    + (f"; {advice}" if advice else "")
                ) from None
        if self.client_secret_env is not None:
            value = os.environ.get(self.client_secret_env)
            if not value:
                raise ConfigError(
                    f"providers.{self.name}.client_secret_env: environment variable "
                    f"{self.client_secret_env} is not set"
                )
            return value
        return None


@dataclass(frozen=True)
class Account:
    name: str  # the user name clients log in with (lower case)
    provider: str
    flow: Flow = "device_code"
    upstream_user: str | None = None  # mailbox name upstream, when it differs from `name`
    service_key_file: Path | None = None  # unlocks the token file with no client present

    @property
    def mailbox(self) -> str:
        return self.upstream_user or self.name


@dataclass(frozen=True)
class RelayRule:
    """A ``[[relay]]`` rule: devices at ``sources`` send through ``listener`` as ``account``.

    Without ``require_password`` a matching device sends with no AUTH at all and the account's
    token is unlocked with its service key. With it the device must AUTH as ``account`` (any of
    its local passwords); the rule then restricts and rewrites its senders the same way."""

    name: str
    listener: str
    sources: tuple[Network, ...]
    account: str
    allowed_senders: tuple[str, ...]  # lower case: "user@domain", "@domain", or "<>"
    force_sender: str | None = None  # the envelope sender upstream; the header From is untouched
    require_password: bool = False

    def matches(self, peer: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return any(peer in network for network in self.sources)

    def allows_sender(self, sender: str) -> bool:
        """Is ``sender`` (a reverse-path without brackets; "" or "<>": the null sender) allowed?"""
        if sender in ("", "<>"):
            return "<>" in self.allowed_senders
        address = sender.lower()
        local, at, domain = address.rpartition("@")
        return address in self.allowed_senders or bool(
            at and local and "@" + domain in self.allowed_senders)


@dataclass(frozen=True)
class Limits:
    """Login throttling and pre-login limits (``[limits]``)."""

    failure_delay: float = 1.0  # seconds before the first failure is answered (at least 0.05)
    max_failure_delay: float = 15.0
    lockout_after: int = 10  # failures in a row (per account and source, or per source)
    lockout_seconds: float = 300.0
    forget_after: float = 900.0  # a quiet key starts again from zero
    max_preauth_per_source: int = 1024
    max_preauth_total: int = 8192
    preauth_idle: float = 60.0  # seconds of silence allowed before login
    preauth_total: float = 300.0  # seconds from connect to login


@dataclass(frozen=True)
class Metrics:
    listen: Address | None = None  # where /metrics, /healthz and /readyz are served; off if None
    per_account_labels: bool = False  # account names as labels on the per-account token series
    allow_non_loopback: bool = False  # the endpoint is unauthenticated: loopback unless allowed


@dataclass(frozen=True)
class Config:
    path: Path
    state_dir: Path
    listeners: tuple[Listener, ...]
    upstreams: dict[str, Upstream]
    providers: dict[str, Provider]
    accounts: dict[str, Account]
    metrics: Metrics = Metrics()
    limits: Limits = Limits()
    log_level: str = "info"
    shutdown_grace: float = 30.0
    relays: tuple[RelayRule, ...] = ()
    runtime: runtime_mod.Runtime = runtime_mod.Runtime()  # workers, event_loop
    store: StoreSettings = StoreSettings()

    def relay_rules(self, listener: str) -> tuple[RelayRule, ...]:
        """The ``[[relay]]`` rules of one listener, in file order (the first match decides)."""
        return tuple(rule for rule in self.relays if rule.listener == listener)

    def account(self, name: str) -> Account | None:
        return self.accounts.get(name.strip().lower())

    def scopes(self, account: Account, protocol: Protocol) -> tuple[str, ...]:
        provider = self.providers[account.provider]
        if account.flow == "client_credentials":
            return (provider.app_scope,)
        return provider.scopes[protocol]

    def login_scopes(self, account: Account) -> tuple[str, ...]:
        """Every scope the account's first authorisation asks for (one consent for all)."""
        provider = self.providers[account.provider]
        if account.flow == "client_credentials":
            return (provider.app_scope,)
        seen: dict[str, None] = {}
        for protocol in PROTOCOLS:
            seen.update(dict.fromkeys(provider.scopes[protocol]))
        return tuple(seen)

    def secret_files(self) -> list[tuple[str, Path]]:
        """Every secret the config reads from a file, with the setting that names it."""
        files = [(f"providers.{p.name}.client_secret_file", p.client_secret_file)
                 for p in self.providers.values() if p.client_secret_file is not None]
        files += [(f'accounts."{a.name}".service_key_file', a.service_key_file)
                  for a in self.accounts.values() if a.service_key_file is not None]
        return files


# --- reading -------------------------------------------------------------------------------


class _Table:
    """A TOML table being read: remembers its key path and which keys were used."""

    def __init__(self, data: dict[str, Any], path: str, file: Path) -> None:
        self.data, self.path, self.file = data, path, file
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def fail(self, name: str | None, message: str) -> ConfigError:
        where = self.key(name) if name else (self.path or "(top level)")
        return ConfigError(f"{self.file}: {where}: {message}")

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = ..., *,
            required_hint: str = "") -> Any:
        self.used.add(name)
        if name not in self.data:
            if default is ...:
                typo = difflib.get_close_matches(name, [k for k in self.data if k not in self.used], 1)
                hint = f" (found '{typo[0]}': a typo?)" if typo else (
                    f" ({required_hint})" if required_hint else "")
                raise self.fail(name, "is required" + hint)
            return default
        value = self.data[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            raise self.fail(name, f"must be {_kind_name(kinds)}, not a boolean")
        if not isinstance(value, kinds):
            raise self.fail(name, f"must be {_kind_name(kinds)} (got {value!r})")
        return value

    def text(self, name: str, default: Any = ..., **kw: Any) -> Any:
        value = self.get(name, str, default, **kw)
        if isinstance(value, str) and not value.strip():
            raise self.fail(name, "must not be empty")
        return value

    def choice(self, name: str, choices: tuple[str, ...], default: Any = ...) -> Any:
        value = self.get(name, str, default)
        if value not in choices and value is not default:
            raise self.fail(name, f"must be one of {', '.join(choices)} (got {value!r})")
        return value

    def number(self, name: str, default: float, low: float, high: float) -> float:
        value = float(self.get(name, (int, float), default))
        if not low <= value <= high:
            raise self.fail(name, f"must be between {low:g} and {high:g} (got {value:g})")
        return value

    def port(self, name: str, default: Any = ...) -> int:
        value = self.get(name, int, default)
        if not 1 <= value <= 65535:
            raise self.fail(name, f"must be a port number from 1 to 65535 (got {value})")
        return int(value)

    def path_(self, name: str, *, must_exist: bool = False) -> Path | None:
        value = self.text(name, None)
        if value is None:
            return None
        path = Path(value)
        if not path.is_absolute():
            path = (self.file.parent / path).resolve()
        if must_exist and not path.exists():
            raise self.fail(name, f"file {path} does not exist")
        return path

    def table(self, name: str, *, required: bool = False) -> _Table | None:
        self.used.add(name)
        if name not in self.data:
            if required:
                raise self.fail(name, "is required")
            return None
        value = self.data[name]
        if not isinstance(value, dict):
            raise self.fail(name, "must be a table")
        return _Table(value, self.key(name), self.file)

    def subtables(self, name: str) -> Iterator[tuple[str, _Table]]:
        outer = self.table(name)
        if outer is None:
            return
        for key, value in outer.data.items():
            outer.used.add(key)
            if not isinstance(value, dict):
                raise outer.fail(key, "must be a table")
            yield key, _Table(value, f"{outer.key(_quote(key))}", self.file)

    def done(self) -> None:
        """Reject keys that were never read: a typo must not be ignored silently."""
        for name in self.data:
            if name not in self.used:
                close = difflib.get_close_matches(name, sorted(self.used), n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise self.fail(name, f"unknown key{hint}")


def _quote(key: str) -> str:
    return key if key.replace("-", "").replace("_", "").isalnum() else f'"{key}"'


def _kind_name(kinds: tuple[type, ...]) -> str:
    names = {str: "a string", int: "a whole number", float: "a number", bool: "true or false",
             list: "a list", dict: "a table"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def parse_address(text: str, table: _Table, name: str) -> Address:
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise table.fail(name, f"must be HOST:PORT, e.g. 127.0.0.1:1143 (got {text!r})")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise table.fail(name, f"port must be 0 to 65535 (got {port_text!r})")
    return Address(host, int(port_text))


def _read_upstream(name: str, t: _Table) -> Upstream:
    protocol = t.choice("protocol", PROTOCOLS)
    up = Upstream(
        name=name,
        protocol=protocol,
        host=t.text("host"),
        port=t.port("port"),
        tls=t.choice("tls", ("implicit", "starttls"), "starttls" if protocol == "smtp" else "implicit"),
        ca_file=t.path_("ca_file", must_exist=True),
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


def _read_listener(index: int, t: _Table, upstreams: dict[str, Upstream],
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
        cert_file=t.path_("cert_file", must_exist=True),
        key_file=t.path_("key_file", must_exist=True),
        allow_insecure_non_loopback=t.get("allow_insecure_non_loopback", bool, False),
        bare_line_endings=t.choice("bare_line_endings", ("reject", "normalise"), "reject"),
        min_tls_version=_min_tls_version(t),
        ciphers=t.text("ciphers", None),
        allow_from=_sources(t, "allow_from") if "allow_from" in t.data else (),
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


def _min_tls_version(t: _Table) -> str:
    value = t.data.get("min_tls_version", tlspolicy.DEFAULT_VERSION)
    if isinstance(value, float | int) and not isinstance(value, bool):
        raise t.fail("min_tls_version", f'must be a quoted string: min_tls_version = "{value}"')
    return str(t.choice("min_tls_version", tuple(tlspolicy.VERSIONS), tlspolicy.DEFAULT_VERSION))


def _restrict_old_tls(listener: Listener, relays: list[RelayRule], t: _Table) -> Listener:
    """A listener taking TLS 1.0/1.1 beyond loopback must be limited to known sources: its
    allow_from, or else the sources of its [[relay]] rules (which it then enforces)."""
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


def _read_provider(name: str, t: _Table) -> Provider:
    scopes = dict(DEFAULT_SCOPES)
    scope_table = t.table("scopes")
    if scope_table is not None:
        for protocol in PROTOCOLS:
            values = scope_table.get(protocol, list, None)
            if values is not None:
                if not values or not all(isinstance(v, str) and v for v in values):
                    raise scope_table.fail(protocol, "must be a non-empty list of scope strings")
                scopes[protocol] = tuple(values)
        scope_table.done()
    authority = t.text("authority", "https://login.microsoftonline.com")
    if not authority.startswith("https://"):
        raise t.fail("authority", "must be an https:// URL")
    provider = Provider(
        name=name,
        authority=authority,
        tenant=t.text("tenant", required_hint="your tenant id or domain, or 'organizations'"),
        client_id=t.text("client_id", required_hint="the application (client) id of your app "
                                                    "registration"),
        client_secret_file=t.path_("client_secret_file"),
        client_secret_env=t.text("client_secret_env", None),
        ca_file=t.path_("ca_file", must_exist=True),
        timeout=t.number("timeout", 10.0, 0.5, 120),
        scopes=scopes,
        app_scope=t.text("app_scope", DEFAULT_APP_SCOPE),
    )
    if "client_secret" in t.data:
        raise t.fail("client_secret", "a secret must not be written in the config; use "
                                      "client_secret_file or client_secret_env")
    if provider.client_secret_file and provider.client_secret_env:
        raise t.fail("client_secret_env", "set client_secret_file or client_secret_env, not both")
    t.done()
    return provider


def _read_account(name: str, t: _Table, providers: dict[str, Provider]) -> Account:
    if "@" not in name:
        raise t.fail(None, "account names are the user names clients log in with, "
                           "e.g. [accounts.\"alice@contoso.com\"]")
    provider = t.text("provider", next(iter(providers)) if len(providers) == 1 else ...,
                      required_hint="which [providers.NAME] issues its tokens")
    if provider not in providers:
        raise t.fail("provider", f"no [providers.{provider}] is defined")
    account = Account(
        name=name.lower(),
        provider=provider,
        flow=t.choice("flow", FLOWS, "device_code"),
        upstream_user=t.text("upstream_user", None),
        service_key_file=t.path_("service_key_file"),
    )
    for key, value in ((None, name), ("upstream_user", account.upstream_user)):
        if value is not None and any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
            raise t.fail(key, "must not contain control characters (the name goes into the "
                              "XOAUTH2 login upstream)")
    p = providers[provider]
    if account.flow == "client_credentials" and not (p.client_secret_file or p.client_secret_env):
        raise t.fail("flow", f"client_credentials needs providers.{provider}.client_secret_file or "
                             "client_secret_env")
    t.done()
    return account


_RULE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_ADDRESS = re.compile(r"[^@\s<>]+@[^@\s<>.][^@\s<>]*")
_SENDER = re.compile(r"<>|[^@\s<>]*@[^@\s<>.][^@\s<>]*")  # an address, @domain or <>


def _sources(t: _Table, key: str = "sources") -> tuple[Network, ...]:
    networks, values = [], t.get(key, list)
    if not values:
        raise t.fail(key, "must list the devices' addresses or networks")
    for value in values:
        try:
            network = ipaddress.ip_network(value.strip(), strict=True)
        except (AttributeError, ValueError) as exc:
            loose = (ipaddress.ip_network(value.strip(), strict=False)
                     if isinstance(exc, ValueError) and "host bits" in str(exc) else None)
            raise t.fail(key, f"{value!r} is not an address or CIDR network" + (
                f"; did you mean {loose}?" if loose else ", e.g. \"192.0.2.0/24\"")) from None
        if network.prefixlen == 0:
            what = " (an open relay)" if key == "sources" else ""
            raise t.fail(key, f"{value!r} matches every address{what}; list the devices' "
                              "addresses or networks")
        networks.append(network)
    return tuple(networks)


def _relay_senders(t: _Table) -> tuple[str, ...]:
    values = t.get("allowed_senders", list)
    if not values:
        raise t.fail("allowed_senders", "must list the senders devices may use")
    for value in values:
        if not isinstance(value, str) or not _SENDER.fullmatch(value):
            raise t.fail("allowed_senders", f"{value!r} is not an address, an @domain or \"<>\" "
                                            "(the null sender)")
    return tuple(v.lower() for v in values)


def _read_relay(index: int, t: _Table, listeners: dict[str, Listener],
                accounts: dict[str, Account]) -> RelayRule:
    name = t.text("name", f"relay{index}")
    if not _RULE_NAME.fullmatch(name):
        raise t.fail("name", f"must be letters, digits, '.', '_' or '-' (got {name!r}); it is a "
                             "metric label and appears in replies")
    listener_name = t.text("listener")
    listener = listeners.get(listener_name)
    if listener is None:
        known = ", ".join(sorted(n for n, li in listeners.items() if li.protocol == "smtp"))
        raise t.fail("listener", f"no listener is named {listener_name!r} "
                                 f"(smtp listeners: {known or 'none'})")
    if listener.protocol != "smtp":
        raise t.fail("listener", f"listener {listener_name!r} speaks {listener.protocol}; "
                                 "relay rules need an smtp listener")
    sources = _sources(t)
    account_name = t.text("account").strip().lower()
    account = accounts.get(account_name)
    if account is None:
        raise t.fail("account", f"no [accounts.\"{account_name}\"] is defined")
    require_password = t.get("require_password", bool, False)
    if not require_password and account.service_key_file is None:
        raise t.fail("account", f"account {account_name} has no service_key_file: devices "
                                "that send without a password need it to unlock the token "
                                "file (or set require_password = true)")
    senders = _relay_senders(t)
    force_sender = t.text("force_sender", None)
    if force_sender is not None and _ADDRESS.fullmatch(force_sender) is None:
        raise t.fail("force_sender", f"must be an address, e.g. scanner@contoso.com "
                                     f"(got {force_sender!r})")
    if (require_password and listener.tls == "none" and not listener.allow_insecure_non_loopback
            and not all(n.is_loopback for n in sources)):
        raise t.fail("require_password", f"listener {listener_name!r} has tls = 'none', and "
                                         "passwords are not taken in clear from beyond "
                                         "loopback: give the listener tls = 'starttls' (or "
                                         "set allow_insecure_non_loopback = true on it)")
    t.done()
    return RelayRule(name=name, listener=listener_name, sources=sources, account=account_name,
                     allowed_senders=senders, force_sender=force_sender,
                     require_password=require_password)


def _relayed_listeners(data: dict[str, Any]) -> frozenset[str]:
    """Listener names that [[relay]] rules name (read before the listeners are validated)."""
    raw = data.get("relay", [])
    if not isinstance(raw, list):
        return frozenset()
    return frozenset(r["listener"] for r in raw
                     if isinstance(r, dict) and isinstance(r.get("listener"), str))


def parse(data: dict[str, Any], file: Path) -> Config:
    """Validate a decoded TOML document (``file`` is used in messages and for relative paths)."""
    top = _Table(data, "", file)
    state_dir = top.path_("state_dir") or Path("/var/lib/xoauth2-proxy")
    log_level = top.choice("log_level", ("debug", "info", "warning", "error"), "info")
    shutdown_grace = top.number("shutdown_grace", 30.0, 0, 3600)
    runtime = runtime_mod.read(top)

    upstreams = {name: _read_upstream(name, t) for name, t in top.subtables("upstreams")}
    providers = {name: _read_provider(name, t) for name, t in top.subtables("providers")}
    if not providers:
        raise top.fail("providers", "at least one [providers.NAME] table is required")
    accounts: dict[str, Account] = {}
    for name, t in top.subtables("accounts"):
        account = _read_account(name, t, providers)
        if account.name in accounts:
            raise t.fail(None, "defined twice (account names are not case-sensitive)")
        accounts[account.name] = account

    top.used.add("listeners")
    raw_listeners = data.get("listeners", [])
    if not isinstance(raw_listeners, list):
        raise top.fail("listeners", "must be an array of tables: [[listeners]]")
    listeners, relayed = [], _relayed_listeners(data)
    for i, item in enumerate(raw_listeners):
        if not isinstance(item, dict):
            raise top.fail("listeners", "must be an array of tables: [[listeners]]")
        listeners.append(_read_listener(i, _Table(item, f"listeners[{i}]", file), upstreams,
                                        relayed))
    names = [li.name for li in listeners]
    for i, li in enumerate(listeners):
        if names.index(li.name) != i:
            raise top.fail(f"listeners[{i}].name", f"{li.name!r} is used by another listener")

    top.used.add("relay")
    raw_relays = data.get("relay", [])
    if not isinstance(raw_relays, list) or not all(isinstance(r, dict) for r in raw_relays):
        raise top.fail("relay", "must be an array of tables: [[relay]]")
    relays: list[RelayRule] = []
    for i, item in enumerate(raw_relays):
        rule = _read_relay(i, _Table(item, f"relay[{i}]", file), {li.name: li for li in listeners},
                           accounts)
        if any(r.name == rule.name for r in relays):
            raise top.fail(f"relay[{i}].name", f"{rule.name!r} is used by another relay rule")
        relays.append(rule)
    for i, li in enumerate(listeners):
        listeners[i] = _restrict_old_tls(li, relays, _Table(raw_listeners[i], f"listeners[{i}]",
                                                            file))

    metrics = Metrics()
    mt = top.table("metrics")
    if mt is not None:
        listen = mt.text("listen", None)
        metrics = Metrics(
            listen=parse_address(listen, mt, "listen") if listen else None,
            per_account_labels=mt.get("per_account_labels", bool, False),
            allow_non_loopback=mt.get("allow_non_loopback", bool, False),
        )
        if (metrics.listen is not None and not metrics.listen.is_loopback
                and not metrics.allow_non_loopback):
            raise mt.fail("listen", f"{metrics.listen} is not a loopback address and the metrics "
                                    "endpoint has no authentication; listen on 127.0.0.1 or ::1 "
                                    "(scrape through a tunnel or a local agent), or set "
                                    "allow_non_loopback = true")
        mt.done()
    limits = Limits()
    lt = top.table("limits")
    if lt is not None:
        limits = Limits(
            failure_delay=lt.number("failure_delay", limits.failure_delay, 0, 60),
            max_failure_delay=lt.number("max_failure_delay", limits.max_failure_delay, 0, 600),
            lockout_after=int(lt.number("lockout_after", limits.lockout_after, 1, 10_000)),
            lockout_seconds=lt.number("lockout_seconds", limits.lockout_seconds, 0, 86_400),
            forget_after=lt.number("forget_after", limits.forget_after, 1, 86_400),
            max_preauth_per_source=int(lt.number("max_preauth_per_source",
                                                 limits.max_preauth_per_source, 1, 1_000_000)),
            max_preauth_total=int(lt.number("max_preauth_total", limits.max_preauth_total, 1,
                                            1_000_000)),
            preauth_idle=lt.number("preauth_idle", limits.preauth_idle, 0.1, 3600),
            preauth_total=lt.number("preauth_total", limits.preauth_total, 0.1, 86_400),
        )
        lt.done()
    store = read_store(top.table("store"))
    top.done()
    return Config(path=file, state_dir=state_dir, store=store, listeners=tuple(listeners), upstreams=upstreams,
                  providers=providers, accounts=accounts, metrics=metrics, limits=limits, log_level=log_level,
                  shutdown_grace=shutdown_grace, relays=tuple(relays), runtime=runtime)


def load(path: Path | str) -> Config:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: TOML syntax error: {exc}") from None
    return parse(data, path.resolve())
