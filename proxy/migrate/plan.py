"""What an email-oauth2-proxy config becomes here: providers, upstreams, listeners, accounts.

Pure mapping, no I/O beyond what ``peer_config`` read: one provider per distinct identity
platform application (authority, tenant, client id), one upstream per distinct server, one
listener per local port (the port clients already use, with its TLS choice), one account per
account section that xoauth2-proxy can serve. A section it cannot serve gets a reason that says
what to do instead; so does a setting that does not carry over.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from proxy.config import DEFAULT_APP_SCOPE, DEFAULT_SCOPES, PROTOCOLS, Address, Flow, Protocol
from proxy.migrate.peer_config import PeerAccount, PeerConfig, PeerServer

RESERVED_SCOPES = frozenset({"offline_access", "openid", "profile", "email"})
PERMISSIONS: dict[Protocol, str] = {"imap": "/imap.accessasuser.all",
                                    "pop": "/pop.accessasuser.all", "smtp": "/smtp.send"}
_NAME = re.compile(r"[^a-z0-9]+")


@dataclass(frozen=True)
class ProviderKey:
    authority: str
    tenant: str
    client_id: str
    scopes: tuple[tuple[str, ...], ...]  # per protocol, in PROTOCOLS order
    app_scope: str


@dataclass
class AccountPlan:
    peer: PeerAccount
    provider: str | None = None
    flow: Flow | None = None
    skip: str | None = None  # why the account is not configured at all, and what to do

    @property
    def name(self) -> str:
        return self.peer.name.lower()


@dataclass
class Plan:
    providers: dict[str, ProviderKey] = field(default_factory=dict)
    upstreams: dict[str, dict[str, Any]] = field(default_factory=dict)
    listeners: list[dict[str, Any]] = field(default_factory=list)
    accounts: list[AccountPlan] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # settings that changed or did not carry over

    def configured(self) -> list[AccountPlan]:
        return [a for a in self.accounts if a.skip is None]

    def document(self, state_dir: Path, ca_file: Path | None,
                 secret_files: dict[str, Path]) -> dict[str, Any]:
        """The config as a TOML-ready document."""
        providers: dict[str, Any] = {}
        for name, key in self.providers.items():
            table: dict[str, Any] = {"authority": key.authority, "tenant": key.tenant,
                                     "client_id": key.client_id}
            if ca_file is not None:
                table["ca_file"] = str(ca_file)
            if name in secret_files:
                table["client_secret_file"] = str(secret_files[name])
            if key.app_scope != DEFAULT_APP_SCOPE:
                table["app_scope"] = key.app_scope
            scopes = dict(zip(PROTOCOLS, key.scopes, strict=True))
            if any(scopes[p] != DEFAULT_SCOPES[p] for p in PROTOCOLS):
                table["scopes"] = {p: list(s) for p, s in scopes.items()}
            providers[name] = table
        upstreams = {name: dict(u, **({"ca_file": str(ca_file)} if ca_file else {}))
                     for name, u in self.upstreams.items()}
        accounts = {a.name: {"provider": a.provider, "flow": a.flow} for a in self.configured()}
        return {"state_dir": str(state_dir), "providers": providers, "upstreams": upstreams,
                "listeners": self.listeners, "accounts": accounts}


def microsoft_endpoint(token_url: str | None) -> tuple[str, str] | str:
    """(authority, tenant) of a Microsoft identity platform v2.0 token endpoint, else why not."""
    if not token_url:
        return "it has no token_url"
    parts = urlsplit(token_url.strip())
    segments = [s for s in parts.path.split("/") if s]
    if parts.scheme == "https" and parts.hostname and len(segments) == 4 \
            and [s.lower() for s in segments[1:]] == ["oauth2", "v2.0", "token"]:
        return f"https://{parts.netloc}", segments[0]
    if parts.scheme == "https" and len(segments) == 3 and [s.lower() for s in segments[1:]] \
            == ["oauth2", "token"]:
        return ("its token_url is the identity platform's v1.0 endpoint, which xoauth2-proxy "
                "does not use: move it to https://login.microsoftonline.com/TENANT/oauth2/v2.0/"
                "token and run `xoauth2-proxy login` for it")
    return (f"it is not a Microsoft 365 account (token_url {token_url.strip()}); xoauth2-proxy "
            "serves Microsoft 365 only: keep email-oauth2-proxy running for it")


def scopes_of(account: PeerAccount) -> tuple[tuple[tuple[str, ...], ...], str]:
    """Per-protocol delegated scopes and the app-only scope from ``oauth2_scope``.

    email-oauth2-proxy asks for one token with all its scopes and uses it for every protocol;
    here each protocol gets the scope that names its permission, or else all of them."""
    requested = [s for s in (account.get("oauth2_scope") or "").split()
                 if s.lower() not in RESERVED_SCOPES]
    per_protocol = []
    for protocol in PROTOCOLS:
        own = tuple(s for s in requested if s.lower().endswith(PERMISSIONS[protocol]))
        per_protocol.append(own or tuple(requested) or DEFAULT_SCOPES[protocol])
    defaults = [s for s in requested if s.lower().endswith("/.default")]
    return tuple(per_protocol), (defaults[0] if len(defaults) == 1 else DEFAULT_APP_SCOPE)


def _flow(account: PeerAccount) -> Flow | str:
    """Our flow for the account, or why it cannot be served."""
    if account.get("jwt_certificate_path") or account.get("jwt_key_path"):
        return ("it signs in with a certificate (jwt_certificate_path), which xoauth2-proxy "
                "does not support: use a client secret (client_secret_file) instead")
    if account.get("oauth2_resource"):
        return ("it uses oauth2_resource, a non-standard setting xoauth2-proxy does not "
                "support")
    flow = (account.get("oauth2_flow") or "").strip().lower()
    if flow == "client_credentials":
        if not (account.get("client_secret") or account.get("client_secret_encrypted")):
            return ("it is an app-only (client_credentials) account without a client secret "
                    "in the config; add it by hand as in config/app-only.toml")
        return "client_credentials"
    if flow == "password":
        return ("it uses the resource owner password flow (oauth2_flow = password), which "
                "xoauth2-proxy does not support: authorise it with `xoauth2-proxy login` "
                "(device code) after the import")
    if flow == "service_account":
        return "it is a Google service account; xoauth2-proxy serves Microsoft 365 only"
    if not account.get("permission_url"):
        return "it has no permission_url and no oauth2_flow this proxy knows"
    return "device_code" if flow == "device" else "auth_code"


def _provider_name(key: ProviderKey, taken: dict[str, ProviderKey]) -> str:
    for name, existing in taken.items():
        if existing == key:
            return name
    base = _NAME.sub("-", key.tenant.lower()).strip("-") or "m365"
    name, n = base, 2
    while name in taken:
        name, n = f"{base}-{n}", n + 1
    return name


def _accounts(peer: PeerConfig, plan: Plan, only: set[str] | None) -> None:
    for account in peer.accounts:
        if only is not None and account.name.lower() not in only:
            continue
        item = AccountPlan(account)
        plan.accounts.append(item)
        endpoint = microsoft_endpoint(account.get("token_url"))
        if isinstance(endpoint, str):
            item.skip = endpoint
            continue
        flow = _flow(account)
        if flow not in ("device_code", "auth_code", "client_credentials"):
            item.skip = flow
            continue
        client_id = account.get("client_id")
        if client_id is None:
            item.skip = "it has no client_id"
            continue
        per_protocol, app_scope = scopes_of(account)
        key = ProviderKey(endpoint[0], endpoint[1], client_id.strip(), per_protocol, app_scope)
        item.provider = _provider_name(key, plan.providers)
        plan.providers[item.provider] = key
        item.flow = flow  # type: ignore[assignment]


def _listen(server: PeerServer, tls: str, plan: Plan) -> str:
    host = server.local_address.strip("[]") or "::"
    if tls == "none" and not Address(host, server.local_port).is_loopback:
        plan.notes.append(
            f"[{server.section}]: email-oauth2-proxy listened on {host or 'every address'} "
            "without TLS; here it listens on 127.0.0.1, because passwords would cross the "
            "network in clear. For clients on other machines give the listener tls with "
            "cert_file and key_file (or set allow_insecure_non_loopback = true)")
        host = "127.0.0.1"
    return str(Address(host, server.local_port))


def _servers(peer: PeerConfig, plan: Plan) -> None:
    by_server: dict[tuple[str, str, int, str], str] = {}
    for server in peer.servers:
        if server.server_address is None or server.server_port is None:
            plan.notes.append(f"[{server.section}] has no server_address or server_port; "
                              "email-oauth2-proxy refuses it too, so it is left out")
            continue
        upstream_tls = "starttls" if server.server_starttls else "implicit"
        ident = (server.protocol, server.server_address, server.server_port, upstream_tls)
        name = by_server.get(ident)
        if name is None:
            name = server.protocol if server.protocol not in plan.upstreams else \
                _NAME.sub("-", f"{server.protocol}-{server.server_address}-{server.server_port}"
                          .lower())
            by_server[ident] = name
            plan.upstreams[name] = {"protocol": server.protocol, "host": server.server_address,
                                    "port": server.server_port, "tls": upstream_tls}
        listener: dict[str, Any] = {"name": server.section.lower(), "protocol": server.protocol}
        tls = "none"
        if server.local_certificate_path and server.local_key_path:
            tls = "starttls" if server.local_starttls else "implicit"
            listener.update(tls=tls, cert_file=str(server.local_certificate_path),
                            key_file=str(server.local_key_path))
        elif server.local_certificate_path or server.local_key_path:
            plan.notes.append(f"[{server.section}] names only one of local_certificate_path "
                              "and local_key_path; its listener here has no TLS")
        listener["listen"] = _listen(server, tls, plan)
        listener["upstream"] = name
        plan.listeners.append(listener)


def build(peer: PeerConfig, only: set[str] | None = None) -> Plan:
    plan = Plan()
    _servers(peer, plan)
    _accounts(peer, plan, only)
    for section in peer.catch_all:
        plan.notes.append(
            f"[{section}] is a catch-all account; xoauth2-proxy configures each account by "
            "name: users who signed in through it are imported one by one, others need an "
            "[accounts.\"NAME\"] table and `xoauth2-proxy login NAME`")
    if not peer.servers:
        plan.notes.append("no [IMAP-port], [POP-port] or [SMTP-port] sections: the config "
                          "has no listeners; add them as in config/microsoft365.toml")
    return plan
