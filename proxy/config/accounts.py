"""Config sections ``[providers.NAME]`` (the identity platform and the app registration) and
``[accounts."USER"]`` (who may log in, and how their tokens are obtained)."""

from __future__ import annotations

from proxy.config.model import DEFAULT_APP_SCOPE, DEFAULT_SCOPES, FLOWS, PROTOCOLS, Account, Provider
from proxy.config.reader import Table


def read_providers(top: Table) -> dict[str, Provider]:
    providers = {name: _read_provider(name, t) for name, t in top.subtables("providers")}
    if not providers:
        raise top.fail("providers", "at least one [providers.NAME] table is required")
    return providers


def read_accounts(top: Table, providers: dict[str, Provider]) -> dict[str, Account]:
    accounts: dict[str, Account] = {}
    for name, t in top.subtables("accounts"):
        account = _read_account(name, t, providers)
        if account.name in accounts:
            raise t.fail(None, "defined twice (account names are not case-sensitive)")
        accounts[account.name] = account
    return accounts


def _read_provider(name: str, t: Table) -> Provider:
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
        client_secret_file=t.file_path("client_secret_file"),
        client_secret_env=t.text("client_secret_env", None),
        ca_file=t.file_path("ca_file", must_exist=True),
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


def _read_account(name: str, t: Table, providers: dict[str, Provider]) -> Account:
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
        service_key_file=t.file_path("service_key_file"),
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

