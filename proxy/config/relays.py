"""Config section ``[[relay]]``: devices that send through an SMTP listener as an account,
by source address (``proxy.server.smtp_relay`` applies the rules)."""

from __future__ import annotations

import re

from proxy.config.model import Account, Listener, RelayRule
from proxy.config.reader import Table


def read_relays(top: Table, listeners: dict[str, Listener],
                accounts: dict[str, Account]) -> tuple[RelayRule, ...]:
    relays: list[RelayRule] = []
    for i, t in enumerate(top.array("relay")):
        rule = _read_relay(i, t, listeners, accounts)
        if any(r.name == rule.name for r in relays):
            raise top.fail(f"relay[{i}].name", f"{rule.name!r} is used by another relay rule")
        relays.append(rule)
    return tuple(relays)


_RULE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_ADDRESS = re.compile(r"[^@\s<>]+@[^@\s<>.][^@\s<>]*")
_SENDER = re.compile(r"<>|[^@\s<>]*@[^@\s<>.][^@\s<>]*")  # an address, @domain or <>

def _relay_senders(t: Table) -> tuple[str, ...]:
    values = t.get("allowed_senders", list)
    if not values:
        raise t.fail("allowed_senders", "must list the senders devices may use")
    for value in values:
        if not isinstance(value, str) or not _SENDER.fullmatch(value):
            raise t.fail("allowed_senders", f"{value!r} is not an address, an @domain or \"<>\" "
                                            "(the null sender)")
    return tuple(v.lower() for v in values)


def _read_relay(index: int, t: Table, listeners: dict[str, Listener],
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
    sources = t.networks("sources")
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

