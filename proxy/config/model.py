"""The configuration's model: frozen dataclasses that a loaded config is made of, and
``ConfigError``. No reading here (``proxy.config.reader`` and the section modules do that)."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from proxy import systemd, tlspolicy
from proxy.config.store import StoreSettings
from proxy.graph import settings as graph_settings
from proxy.text import host_port

if TYPE_CHECKING:  # their modules read their sections with proxy.config.reader
    from proxy.admin_web.config import AdminSettings
    from proxy.notify.config import NotifyTarget
from proxy.runtime import Runtime

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
        return host_port(self.host, self.port)

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
    reauthorise_in_band: bool = True  # a refused refresh token answers logins with a device code

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
    runtime: Runtime = Runtime()  # workers, event_loop (proxy.runtime)
    store: StoreSettings = StoreSettings()
    notify: tuple[NotifyTarget, ...] = ()  # proxy.notify.config
    admin: AdminSettings | None = None  # proxy.admin_web.config
    graph: graph_settings.GraphConfig = field(default_factory=graph_settings.GraphConfig)

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
        seen.update(dict.fromkeys(self.graph.login_scopes(account.flow)))
        return tuple(seen)

    def secret_files(self) -> list[tuple[str, Path]]:
        """Every secret the config reads from a file, with the setting that names it."""
        files = [(f"providers.{p.name}.client_secret_file", p.client_secret_file)
                 for p in self.providers.values() if p.client_secret_file is not None]
        files += [(f'accounts."{a.name}".service_key_file', a.service_key_file)
                  for a in self.accounts.values() if a.service_key_file is not None]
        return files

