"""Every Prometheus metric the proxy exports, in one place.

Names start ``xoauth2_proxy_``. Label sets are small and fixed (protocol, listener, result,
direction); account names appear only on the per-account token series, and only when
``[metrics] per_account_labels = true`` — otherwise those series aggregate over the accounts
(the soonest expiry, the number of accounts needing re-authorisation) and carry no label.
Counting on the relay path is one ``Counter.inc`` per chunk read, never per byte or line.

Exported (``_total``/``_seconds`` suffixes as in the exposition):

- ``build_info{version,python}``; ``ready`` (1 while every listener accepts);
  ``config_reloads_total{result}``, ``config_last_reload_successful``,
  ``config_last_reload_success_timestamp_seconds``;
- ``connections_total{protocol,listener}``, ``connections_active{protocol,listener}``;
- ``tls_handshakes_total{listener,version}``: client TLS handshakes (implicit and STARTTLS) by
  negotiated version (``"1.0"`` … ``"1.3"``), so operators see which devices still use old TLS;
- ``logins_total{protocol,result}`` (``LOGIN_RESULTS``);
- ``upstream_connect_seconds{protocol}``, ``upstream_login_seconds{protocol}`` (histograms);
- ``token_refreshes_total{result}``, ``token_refresh_seconds`` (histogram),
  ``token_file_write_errors_total``;
- ``accounts_needing_reauthorisation``; ``account_needs_reauthorisation{account}`` (opt-in);
- ``access_token_expiry_seconds`` and ``refresh_token_expiry_seconds`` (where known):
  ``{account}`` per account when opted in, else one label-free series, the minimum;
- ``relayed_bytes_total{protocol,direction}`` (``client_to_upstream``/``upstream_to_client``);
- ``smtp_messages_total{result}``, ``smtp_recipients_total{result}``;
- ``relay_messages_total{rule,result}`` (``RELAY_RESULTS``; ``rule="(none)"``: a source that
  no ``[[relay]]`` rule allows);
- ``process_*`` from prometheus_client's process collector (start time, memory, fds).
"""

from __future__ import annotations

import platform
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy import __version__

if TYPE_CHECKING:
    from proxy.store import TokenStore

REGISTRY = CollectorRegistry(auto_describe=True)

LOGIN_RESULTS = ("ok", "bad_password", "unknown_account", "authorisation_needed",
                 "provider_unavailable", "upstream_rejected", "upstream_unavailable", "throttled",
                 "config_error", "store_unavailable")
REFRESH_RESULTS = ("ok", "authorisation_needed", "provider_unavailable", "config_error",
                   "store_unavailable")
DIRECTIONS = ("client_to_upstream", "upstream_to_client")
SMTP_MESSAGE_RESULTS = ("accepted", "deferred", "rejected")
SMTP_RECIPIENT_RESULTS = ("accepted", "rejected")

BUILD = Info("xoauth2_proxy_build", "Version of the running proxy.", registry=REGISTRY)
BUILD.info({"version": __version__, "python": platform.python_version()})
ProcessCollector(registry=REGISTRY)


def _counter(name: str, help_: str, labels: Sequence[str] = ()) -> Counter:
    return Counter(f"xoauth2_proxy_{name}", help_, labels, registry=REGISTRY)


def _gauge(name: str, help_: str, labels: Sequence[str] = (), *,
           multiprocess_mode: Literal["all", "livemin", "livesum"] = "all") -> Gauge:
    return Gauge(f"xoauth2_proxy_{name}", help_, labels, registry=REGISTRY,
                 multiprocess_mode=multiprocess_mode)


def _histogram(name: str, help_: str, labels: Sequence[str] = (), *,
               buckets: Sequence[float]) -> Histogram:
    return Histogram(f"xoauth2_proxy_{name}", help_, labels, registry=REGISTRY, buckets=buckets)


# Gauges' multiprocess modes (workers = N, see proxy.supervisor): "livemin" where every live
# worker must agree (ready, the last reload's outcome and time), "livesum" for counts.
LISTENERS_READY = _gauge("ready", "1 while every listener accepts connections.",
                         multiprocess_mode="livemin")
RELOADS = _counter("config_reloads_total", "Configuration reloads (SIGHUP) by outcome.", ["result"])
RELOAD_OK = _gauge(
    "config_last_reload_successful",
    "1 if the last configuration reload succeeded (or none was tried).",
    multiprocess_mode="livemin")
RELOAD_OK.set(1)
RELOAD_TIME = _gauge(
    "config_last_reload_success_timestamp_seconds",
    "When the configuration was last loaded successfully (Unix time).",
    multiprocess_mode="livemin")

CONNECTIONS = _counter("connections_total", "Client connections accepted.",
                       ["protocol", "listener"])
CONNECTIONS_ACTIVE = _gauge("connections_active", "Client connections open now.",
                            ["protocol", "listener"], multiprocess_mode="livesum")
TLS_VERSIONS = ("1.0", "1.1", "1.2", "1.3")
TLS_HANDSHAKES = _counter(
    "tls_handshakes_total",
    "Client TLS handshakes completed, by listener and negotiated version.",
    ["listener", "version"])
LOGINS = _counter("logins_total", "Client logins by outcome.", ["protocol", "result"])
UPSTREAM_CONNECT_SECONDS = _histogram(
    "upstream_connect_seconds",
    "Time to connect to the upstream, TLS included.",
    ["protocol"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
UPSTREAM_LOGIN_SECONDS = _histogram(
    "upstream_login_seconds",
    "Time from client credentials to upstream login OK.",
    ["protocol"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
# hit: a login took a warm connection; miss: none was ready; stale: one the upstream had closed
# (or that broke during the login, which then used a new one); expired: closed unused
WARM_RESULTS = ("hit", "miss", "stale", "expired")
UPSTREAM_WARM = _counter(
    "upstream_warm_connections_total",
    "Warm upstream connections (IMAP/POP3) by what became of them.",
    ["protocol", "result"])
TOKEN_REFRESHES = _counter(
    "token_refreshes_total",
    "Token requests to the identity platform by outcome.",
    ["result"])
TOKEN_REFRESH_SECONDS = _histogram(
    "token_refresh_seconds",
    "Latency of token requests to the identity platform.",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
TOKEN_FILE_WRITE_ERRORS = _counter(
    "token_file_write_errors_total",
    "Token files that could not be written (serving from memory).")
BYTES_RELAYED = _counter("relayed_bytes_total", "Bytes relayed after login.",
                         ["protocol", "direction"])
SMTP_MESSAGES = _counter("smtp_messages_total", "SMTP messages by outcome.", ["result"])
SMTP_RECIPIENTS = _counter("smtp_recipients_total", "SMTP recipients by outcome.", ["result"])
# rule: a [[relay]] rule name from the config, or "(none)" for a source no rule allows
RELAY_RESULTS = ("accepted", "deferred", "rejected", "failed", "refused", "unavailable")
RELAY_MESSAGES = _counter(
    "relay_messages_total",
    "Messages sent under a [[relay]] rule, by rule and outcome.",
    ["rule", "result"])


@dataclass
class _AccountTokens:
    needs_reauth: bool = False
    access_expires_at: float | None = None
    refresh_expires_at: float | None = None


class AccountCollector(Collector):
    """Per-account token facts, exported per account or aggregated (decided at scrape time).

    Holds absolute expiry times, so "seconds until expiry" is always current when scraped.
    Updated from the event loop and from token worker threads, hence the lock.
    """

    def __init__(self) -> None:
        self.per_account_labels = False
        self._lock = threading.Lock()
        self._accounts: dict[str, _AccountTokens] = {}

    def configure(self, *, per_account_labels: bool, accounts: Iterable[str]) -> None:
        """Follow the config: label mode, and forget accounts that are no longer configured."""
        keep = set(accounts)
        with self._lock:
            self.per_account_labels = per_account_labels
            for name in list(self._accounts):
                if name not in keep:
                    del self._accounts[name]
            for name in keep:
                self._accounts.setdefault(name, _AccountTokens())

    def set_needs_reauth(self, account: str, flag: bool) -> None:
        with self._lock:
            self._accounts.setdefault(account, _AccountTokens()).needs_reauth = flag

    def set_expiry(self, account: str, *, access: float | None = None,
                   refresh: float | None = None) -> None:
        """Record absolute expiry times (Unix time); None leaves a value unchanged."""
        with self._lock:
            state = self._accounts.setdefault(account, _AccountTokens())
            if access is not None:
                state.access_expires_at = access
            if refresh is not None:
                state.refresh_expires_at = refresh

    def seed(self, token_store: TokenStore, accounts: Iterable[str]) -> None:
        """Token facts from the store's clear metadata (no password needed): an account needing
        authorisation shows before any client tries it (blocking: a worker thread)."""
        from proxy import store

        for name in accounts:
            try:
                meta = token_store.info(name).meta
            except (store.TokenFileMissing, store.CorruptTokenFile):
                self.set_needs_reauth(name, True)
                continue
            except (store.StoreError, OSError, ValueError):
                continue
            self.set_needs_reauth(name, bool(meta.needs_reauth))
            self.set_expiry(name, access=meta.access_token_expires_at)

    def describe(self) -> list[Metric]:
        return []  # families depend on the label mode; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        now = time.time()
        with self._lock:
            per_account = self.per_account_labels
            items = sorted((name, _AccountTokens(s.needs_reauth, s.access_expires_at,
                                                 s.refresh_expires_at))
                           for name, s in self._accounts.items())
        yield GaugeMetricFamily("xoauth2_proxy_accounts_needing_reauthorisation",
                                "Accounts whose refresh token was refused (run `login`).",
                                value=sum(s.needs_reauth for _, s in items))
        labels = ["account"] if per_account else []
        if per_account:
            flag = GaugeMetricFamily("xoauth2_proxy_account_needs_reauthorisation",
                                     "1 if this account must be authorised again.", labels=labels)
            for name, s in items:
                flag.add_metric([name], int(s.needs_reauth))
            yield flag
        for metric, help_text, attr in (
                ("xoauth2_proxy_access_token_expiry_seconds",
                 "Seconds until the account's newest access token expires (the minimum across "
                 "accounts unless per_account_labels).", "access_expires_at"),
                ("xoauth2_proxy_refresh_token_expiry_seconds",
                 "Seconds until the account's refresh token expires, where the identity platform "
                 "says (the minimum across accounts unless per_account_labels).",
                 "refresh_expires_at")):
            family = GaugeMetricFamily(metric, help_text, labels=labels)
            known = [(name, getattr(s, attr) - now) for name, s in items
                     if getattr(s, attr) is not None]
            if per_account:
                for name, seconds in known:
                    family.add_metric([name], seconds)
            elif known:
                family.add_metric([], min(seconds for _, seconds in known))
            yield family


ACCOUNTS = AccountCollector()
REGISTRY.register(ACCOUNTS)


def prepare(protocols_and_listeners: Iterable[tuple[str, str]], *, per_account_labels: bool,
            accounts: Iterable[str],
            tls_listeners: Iterable[tuple[str, str]] = ()) -> None:
    """Create the label sets the config can produce, at zero, so rates and ratios exist from
    the first scrape (a counter that appears on its first increment hides that increment).
    ``tls_listeners``: (listener, lowest TLS version it accepts) for each TLS listener."""
    ACCOUNTS.configure(per_account_labels=per_account_labels, accounts=accounts)
    for listener, lowest in tls_listeners:
        for version in TLS_VERSIONS[TLS_VERSIONS.index(lowest):]:
            TLS_HANDSHAKES.labels(listener, version)
    protocols = set()
    for protocol, listener in protocols_and_listeners:
        protocols.add(protocol)
        CONNECTIONS.labels(protocol, listener)
        CONNECTIONS_ACTIVE.labels(protocol, listener)
    for protocol in protocols:
        for result in LOGIN_RESULTS:
            LOGINS.labels(protocol, result)
        if protocol != "smtp":  # SMTP relays messages, counted by smtp_messages_total
            for direction in DIRECTIONS:
                BYTES_RELAYED.labels(protocol, direction)
            for result in WARM_RESULTS:
                UPSTREAM_WARM.labels(protocol, result)
    for result in REFRESH_RESULTS:
        TOKEN_REFRESHES.labels(result)
    if "smtp" in protocols:
        for result in SMTP_MESSAGE_RESULTS:
            SMTP_MESSAGES.labels(result)
        for result in SMTP_RECIPIENT_RESULTS:
            SMTP_RECIPIENTS.labels(result)
