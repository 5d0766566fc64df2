"""Relay rules on an SMTP listener: devices that cannot log in, and fleets sharing a mailbox.

A listener named by ``[[relay]]`` rules (``proxy.config.RelayRule``) decides at MAIL FROM:

- **Unauthenticated session**: the first rule whose ``sources`` hold the peer address decides.
  None does: ``550 5.7.1 Relaying from ADDR is not allowed by the proxy's rules``. It wants a
  password (``require_password``): ``530 5.7.0``. Else the sender must be in the rule's
  ``allowed_senders`` (``550 5.7.1 Sender S is not allowed for relay rule R``), and the
  session goes upstream as the rule's account with a token the *service key* unlocks
  (``TokenService.service_token``), refreshed unattended. A token or upstream that is not
  available now is a ``451``: a device or MTA keeps the message and retries.
- **Authenticated session** (AUTH with a local password, as on any listener): unchanged,
  unless a ``require_password`` rule matches both the peer and the logged-in account; then
  that rule's sender list and ``force_sender`` apply.

``force_sender`` replaces the envelope sender sent upstream; the message (its From header
included) is never touched. Every outcome is counted in
``xoauth2_proxy_relay_messages_total{rule,result}`` and logged without content.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from proxy import logs, metrics
from proxy.auth.errors import AuthConfigError, TokenError, UnknownAccount, WrongPassword
from proxy.auth.service import TokenService
from proxy.config import RelayRule
from proxy.protocol.events import Failure
from proxy.server.connection import Connection
from proxy.server.limits import peer_address
from proxy.server.pipeline import Denied, Pipeline, ServiceToken
from proxy.server.smtp_upstream import SmtpOpener, UpstreamSession
from proxy.text import word

log = logging.getLogger("proxy.smtp")

NO_RULE = "(none)"  # the metric label of a source no rule allows (rule names cannot hold "(")


class RelayRefused(Exception):
    """The proxy refuses (or cannot now serve) a MAIL FROM; ``reply`` is the SMTP reply."""

    def __init__(self, reply: str, result: str, reason: str) -> None:
        super().__init__(reason)
        self.reply, self.result, self.reason = reply, result, reason


def rule_for(rules: tuple[RelayRule, ...], host: str,
             account: str | None) -> RelayRule | None:
    """The rule for a session from ``host``: unauthenticated (``account`` None), the first
    whose sources hold it; logged in as ``account``, the first password rule for that account
    whose sources hold it."""
    peer = peer_address(host)
    if peer is None:
        return None
    for rule in rules:
        if not rule.matches(peer):
            continue
        if account is None:
            return rule
        if rule.require_password and rule.account == account:
            return rule
    return None


def seed_metrics(rules: tuple[RelayRule, ...]) -> None:
    """Every label set the rules can produce, at zero (see ``metrics.prepare``)."""
    if rules:
        metrics.RELAY_MESSAGES.labels(NO_RULE, "refused")
    for rule in rules:
        for result in metrics.RELAY_RESULTS:
            metrics.RELAY_MESSAGES.labels(rule.name, result)


def source_refused(host: str) -> RelayRefused:
    shown = peer_address(host) or word(host)
    return RelayRefused(f"550 5.7.1 Relaying from {shown} is not allowed by the proxy's rules",
                        "refused", "source not allowed by any relay rule")


def check_sender(rule: RelayRule, sender: str) -> str:
    """The envelope sender to send upstream for ``sender``, or ``RelayRefused``."""
    if not rule.allows_sender(sender):
        shown = "<>" if sender in ("", "<>") else word(sender)
        raise RelayRefused(f"550 5.7.1 Sender {shown} is not allowed for relay rule {rule.name}",
                           "refused", "sender not allowed")
    return rule.force_sender or sender


async def open_service_session(tokens: TokenService, opener: SmtpOpener,
                               rule: RelayRule) -> UpstreamSession:
    """Log in upstream as the rule's account with a token its service key unlocks, through
    the login pipeline (a token refused as an authentication failure is replaced once, any
    other refusal is final). Raises ``RelayRefused`` with a ``451`` (``451 4.3.5`` for what an
    administrator must fix)."""
    verdict = await Pipeline(tokens, ServiceToken(tokens, rule.account, "smtp"), opener,
                             attempt=None, permission="SMTP AUTH").run()
    if isinstance(verdict, Denied):
        raise relay_refusal(verdict, rule, opener.host)
    return verdict.upstream


def relay_refusal(denied: Denied, rule: RelayRule, host: str) -> RelayRefused:
    """A device's login that did not happen, as the relay words it: always a ``451``, so the
    device or MTA keeps the message and retries."""
    exc = denied.error
    if isinstance(exc, WrongPassword | UnknownAccount | AuthConfigError):
        return RelayRefused(f"451 4.3.5 The proxy is not configured correctly for relay rule "
                            f"{rule.name}; contact the administrator",
                            "unavailable", _service_problem(exc))
    if exc is not None:  # AuthorisationNeeded included: its text says what to run
        return RelayRefused(f"451 4.7.0 {exc.user_text}", "unavailable", exc.detail)
    if denied.kind is not None:
        status = "451 4.3.5" if denied.failure is Failure.CONTACT_ADMIN else "451 4.7.0"
        return RelayRefused(f"{status} {denied.text} (relay rule {rule.name})", "unavailable",
                            f"upstream refused the login ({denied.kind.value}): "
                            f"{denied.reason}")
    return RelayRefused(f"451 4.4.1 The mail server {host} cannot be reached right now; try "
                        "again later", "unavailable", denied.reason)


def _service_problem(exc: TokenError) -> str:
    if isinstance(exc, WrongPassword):
        return (f"the service key does not open the token file; run `xoauth2-proxy passwd "
                f"{exc.account} --service-key`")
    return exc.detail or type(exc).__name__


def count(rule: RelayRule | None, result: str) -> None:
    metrics.RELAY_MESSAGES.labels(rule.name if rule is not None else NO_RULE, result).inc()


def log_refusal(peer: str, rule: RelayRule | None, sender: str, refused: RelayRefused,
                listener: str) -> None:
    count(rule, refused.result)
    logs.event(log, logging.WARNING, "relay_refused", protocol="smtp", listener=listener,
               rule=rule.name if rule is not None else None,
               account=rule.account if rule is not None else None, peer=peer,
               sender=sender or "<>", result=refused.result, reason=refused.reason,
               reply=refused.reply[:300])


@dataclass(frozen=True)
class Decision:
    """What the rules say about a MAIL FROM: the envelope sender to send upstream, and the
    rule that decided (None: a logged-in session no rule applies to, unchanged)."""

    sender: str
    rule: RelayRule | None = None


class RelayRules:
    """One listener's ``[[relay]]`` rules, as the SMTP front consults them at MAIL FROM."""

    def __init__(self, listener: str, rules: tuple[RelayRule, ...]) -> None:
        self.listener, self.rules = listener, rules

    def __bool__(self) -> bool:
        return bool(self.rules)

    def decide(self, peer: Connection, account: str | None, sender: str) -> Decision:
        """The decision for ``sender`` from ``peer``, logged in as ``account`` (None: not
        logged in; the rule's account then goes upstream with its service key). Raises
        ``RelayRefused`` (logged and counted)."""
        rule = rule_for(self.rules, peer.peer_host, account)
        if rule is None and account is not None:
            return Decision(sender)
        try:
            if rule is None:
                raise source_refused(peer.peer_host)
            if rule.require_password and account is None:
                raise RelayRefused(f"530 5.7.0 Authentication required: relay rule {rule.name} "
                                   "needs the device's password", "refused", "no AUTH")
            return Decision(check_sender(rule, sender), rule)
        except RelayRefused as refused:
            self.refused(peer, rule, sender, refused)
            raise

    def refused(self, peer: Connection, rule: RelayRule | None, sender: str,
                refused: RelayRefused) -> None:
        log_refusal(peer.peer, rule, sender, refused, self.listener)


__all__ = ["NO_RULE", "Decision", "RelayRefused", "RelayRules", "check_sender", "count",
           "log_refusal", "open_service_session", "relay_refusal", "rule_for", "seed_metrics",
           "source_refused"]
