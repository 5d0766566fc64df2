"""Every Prometheus metric the proxy exports, in one place.

Names start ``xoauth2_proxy_``. Label sets are small and fixed (protocol, listener, result,
reason, direction); account names appear only on the per-account token gauges, and only when
``[metrics] per_account_labels = true`` (otherwise those gauges aggregate: the worst account).
Counting on the relay path is per chunk read, never per byte or line.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from proxy import __version__

REGISTRY = CollectorRegistry(auto_describe=True)

LOGIN_RESULTS = ("ok", "bad_password", "unknown_account", "authorisation_needed",
                 "provider_unavailable", "upstream_rejected", "upstream_unavailable", "throttled",
                 "config_error")

BUILD = Info("xoauth2_proxy_build", "Version of the running proxy.", registry=REGISTRY)
BUILD.info({"version": __version__})

CONNECTIONS = Counter("xoauth2_proxy_connections_total", "Client connections accepted.",
                      ["protocol", "listener"], registry=REGISTRY)
CONNECTIONS_ACTIVE = Gauge("xoauth2_proxy_connections_active", "Client connections open now.",
                           ["protocol", "listener"], registry=REGISTRY)
LOGINS = Counter("xoauth2_proxy_logins_total", "Client logins by outcome.",
                 ["protocol", "result"], registry=REGISTRY)
UPSTREAM_CONNECT_SECONDS = Histogram(
    "xoauth2_proxy_upstream_connect_seconds", "Time to connect to the upstream, TLS included.",
    ["protocol"], registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
UPSTREAM_LOGIN_SECONDS = Histogram(
    "xoauth2_proxy_upstream_login_seconds", "Time from client credentials to upstream login OK.",
    ["protocol"], registry=REGISTRY,
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
TOKEN_REFRESHES = Counter("xoauth2_proxy_token_refreshes_total",
                          "Token requests to the identity platform by outcome.", ["result"],
                          registry=REGISTRY)
TOKEN_REFRESH_SECONDS = Histogram("xoauth2_proxy_token_refresh_seconds",
                                  "Latency of token requests to the identity platform.",
                                  registry=REGISTRY,
                                  buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
TOKEN_FILE_WRITE_ERRORS = Counter("xoauth2_proxy_token_file_write_errors_total",
                                  "Token files that could not be written (serving from memory).",
                                  registry=REGISTRY)
ACCOUNTS_NEEDING_REAUTH = Gauge("xoauth2_proxy_accounts_needing_reauthorisation",
                                "Accounts whose refresh token was refused (run `login`).",
                                registry=REGISTRY)
ACCOUNT_NEEDS_REAUTH = Gauge("xoauth2_proxy_account_needs_reauthorisation",
                             "1 if this account must be authorised again.", ["account"],
                             registry=REGISTRY)
ACCESS_TOKEN_EXPIRY = Gauge("xoauth2_proxy_access_token_expiry_seconds",
                            "Seconds until the account's current access token expires.",
                            ["account"], registry=REGISTRY)
BYTES_RELAYED = Counter("xoauth2_proxy_relayed_bytes_total", "Bytes relayed after login.",
                        ["protocol", "direction"], registry=REGISTRY)
SMTP_MESSAGES = Counter("xoauth2_proxy_smtp_messages_total", "SMTP messages by outcome.",
                        ["result"], registry=REGISTRY)
SMTP_RECIPIENTS = Counter("xoauth2_proxy_smtp_recipients_total", "SMTP recipients by outcome.",
                          ["result"], registry=REGISTRY)
LISTENERS_READY = Gauge("xoauth2_proxy_ready", "1 while every listener accepts connections.",
                        registry=REGISTRY)
