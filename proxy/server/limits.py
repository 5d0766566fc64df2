"""Failed-login throttling and pre-login connection limits, shared by every listener.

Sources are grouped before anything is counted: an IPv4-mapped IPv6 address is its IPv4
address, and IPv6 sources count per /64 (one host usually owns a whole /64).

Throttle, per login attempt:

- *Lockout per (account, source)*: from ``lockout_after`` failures in a row of one account from
  one source, that pair is refused for ``lockout_seconds`` with the "throttled" reply before any
  password is checked (a correct password included, so a lockout is no oracle). A source that
  fails for many accounts is locked out the same way (loopback excepted: on a workstation every
  client is 127.0.0.1). Failures of an account from *other* sources never refuse a source that has
  none: across sources they only lengthen the failure replies (compare Dovecot's auth penalty),
  so a device retrying a revoked password cannot lock a shared mailbox for everyone.
- *One key derivation in flight* per account and per (non-loopback) source
  (``begin_derivation``): a second different password arriving while one is being stretched is
  refused at once with the "throttled" reply, not queued. A login whose key is cached (a warm
  login, or joining the derivation of the same password) needs no claim, so a burst of devices
  with the right password is never refused.
- *The failure is reserved before the password is tried*: claiming the derivation counts it,
  and it is given back when the password was right or the attempt ended without a verdict; so
  the next guess already sees it, even before the first reply is sent.
- *A repeated wrong password counts once*: the last few wrong passwords of each (account, source)
  are remembered as keyed hashes; a device retrying one stale password does not move towards a
  lockout.

The n-th failure is answered after ``failure_delay * 2**(n-1)`` seconds (at least
``MIN_FAILURE_DELAY``, at most ``max_failure_delay``), measured from the start of the attempt, so
every failure before the password is proven takes the same time.

Pre-login limits: connections that have not logged in yet are capped per source and in total;
one more gets the protocol's "busy" reply and is closed.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from proxy.config import Limits
from proxy.notify.events import publish

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_TRACKED = 50_000  # keys remembered at most (oldest forgotten first): bounded memory
MIN_FAILURE_DELAY = 0.05  # seconds; a failure is never answered at once (no timing oracle)
IPV6_GROUP_PREFIX = 64
_WRONG_REMEMBERED = 8  # distinct wrong passwords remembered per (account, source)


@dataclass
class _Record:
    failures: int = 0
    last: float = 0.0
    locked_until: float = 0.0
    wrong: list[bytes] = field(default_factory=list)  # keyed hashes of recent wrong passwords


def peer_address(host: str) -> IPAddress | None:
    """The peer's address as limits and relay rules see it (an IPv4-mapped IPv6 address is
    its IPv4 address; None if ``host`` is not an address)."""
    try:
        address = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_loopback(host: str) -> bool:
    address = peer_address(host)
    return address is not None and address.is_loopback


def source_group(host: str) -> str:
    """The key a source is counted under: its IPv4 address, its IPv6 /64, or ``host`` itself."""
    address = peer_address(host)
    if address is None:
        return host
    if isinstance(address, ipaddress.IPv6Address) and not address.is_loopback:
        return str(ipaddress.IPv6Network((address, IPV6_GROUP_PREFIX), strict=False))
    return str(address)


def account_key(account: str) -> str:
    return account.strip().lower()[:320]


@dataclass
class Reservation:
    """One attempt past the lockout check; its failure is counted once a password is tried
    (``counted``). Settle it exactly once with ``Throttle.failed``, ``Throttle.succeeded`` or
    ``Throttle.release``."""

    account: str
    source: str
    keys: tuple[str, ...]
    counted: bool = False
    settled: bool = False


class Throttle:
    def __init__(self, limits: Limits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.clock = clock
        self._records: OrderedDict[str, _Record] = OrderedDict()
        self._deriving: set[str] = set()
        self._pepper = os.urandom(32)

    # --- keys ---------------------------------------------------------------------------

    def _pair(self, account: str, source: str) -> str:
        return f"pair:{account_key(account)}\0{source_group(source)}"

    def _locking_keys(self, account: str, source: str) -> list[str]:
        """The keys whose lockout refuses this attempt."""
        keys = [self._pair(account, source)]
        if source and not is_loopback(source):
            keys.append(f"source:{source_group(source)}")
        return keys

    def _all_keys(self, account: str, source: str) -> tuple[str, ...]:
        return (*self._locking_keys(account, source), f"account:{account_key(account)}")

    def _get(self, key: str, now: float) -> _Record | None:
        record = self._records.get(key)
        if record is not None and now - record.last > self.limits.forget_after \
                and record.locked_until <= now:
            del self._records[key]
            return None
        if record is not None and 0 < record.locked_until <= now:  # served: start afresh
            record.failures, record.locked_until = 0, 0.0
        return record

    def _record(self, key: str, now: float) -> _Record:
        record = self._get(key, now)
        if record is None:
            record = self._records[key] = _Record()
        self._records.move_to_end(key)
        record.last = now
        while len(self._records) > MAX_TRACKED:
            self._records.popitem(last=False)
        return record

    def password_tag(self, password: str) -> bytes:
        return hmac.new(self._pepper, password.encode("utf-8", "surrogatepass"),
                        hashlib.sha256).digest()

    # --- the gate -----------------------------------------------------------------------

    def locked(self, account: str, source: str) -> float:
        """Seconds of lockout left for this (account, source) (0.0: go ahead)."""
        now = self.clock()
        left = 0.0
        for key in self._locking_keys(account, source):
            record = self._get(key, now)
            if record is not None:
                left = max(left, record.locked_until - now)
                if record.failures >= self.limits.lockout_after:  # reserved, not yet decided
                    left = max(left, 1.0)
        return left

    def reserve(self, account: str, source: str) -> Reservation | float:
        """Admit an attempt (its failure is counted by ``begin_derivation``), or the seconds of
        lockout left."""
        left = self.locked(account, source)
        if left > 0:
            return left
        return Reservation(account, source, self._all_keys(account, source))

    def _count(self, reservation: Reservation) -> None:
        if not reservation.counted:
            reservation.counted = True
            now = self.clock()
            for key in reservation.keys:
                self._record(key, now).failures += 1

    def begin_derivation(self, reservation: Reservation) -> Callable[[], None] | None:
        """Claim the one key derivation in flight for this account and source and count the
        attempt's failure; returns the release function, or None (nothing counted) if another
        derivation holds either, or if the failures counted meanwhile reached a lockout."""
        claims = {f"account:{account_key(reservation.account)}"}
        if reservation.source and not is_loopback(reservation.source):
            claims.add(f"source:{source_group(reservation.source)}")
        if claims & self._deriving or self.locked(reservation.account, reservation.source) > 0:
            return None
        self._deriving |= claims
        self._count(reservation)

        def release() -> None:
            self._deriving -= claims
        return release

    # --- settling -----------------------------------------------------------------------

    def _unreserve(self, reservation: Reservation) -> None:
        assert not reservation.settled, "a reservation is settled once"
        reservation.settled = True
        if not reservation.counted:
            return
        now = self.clock()
        for key in reservation.keys:
            record = self._get(key, now)
            if record is not None and record.failures > 0:
                record.failures -= 1

    def release(self, reservation: Reservation) -> None:
        """The attempt ended without a verdict on the password (unavailable, throttled)."""
        self._unreserve(reservation)

    def succeeded(self, reservation: Reservation) -> None:
        """The password was right: the pair's failures are forgotten (not a running lockout)."""
        self._unreserve(reservation)
        now = self.clock()
        key = self._pair(reservation.account, reservation.source)
        record = self._records.get(key)
        if record is not None and record.locked_until <= now:
            del self._records[key]

    def failed(self, reservation: Reservation, password_tag: bytes | None = None) -> float:
        """The password was wrong: keep the reserved failure (unless this pair already failed
        with this very password) and return the delay its reply must have."""
        now = self.clock()
        pair = self._record(self._pair(reservation.account, reservation.source), now)
        if password_tag is not None and any(hmac.compare_digest(password_tag, known)
                                            for known in pair.wrong):
            self._unreserve(reservation)
            return self._delay(reservation, now)
        self._count(reservation)
        reservation.settled = True
        if password_tag is not None:
            pair.wrong = [*pair.wrong, password_tag][-_WRONG_REMEMBERED:]
        newly_locked = False
        for key in reservation.keys:
            record = self._record(key, now)
            if not key.startswith("account:") and record.failures >= self.limits.lockout_after:
                newly_locked = newly_locked or record.locked_until <= now
                record.locked_until = now + self.limits.lockout_seconds
        if newly_locked:  # an operator event (proxy.notify), once per lockout
            publish("source_locked_out", source=reservation.source, user=reservation.account)
        return self._delay(reservation, now)

    def _delay(self, reservation: Reservation, now: float) -> float:
        worst = 1
        for key in reservation.keys:
            record = self._get(key, now)
            if record is not None:
                worst = max(worst, record.failures)
        delay = min(self.limits.failure_delay * 2 ** (worst - 1), self.limits.max_failure_delay)
        return max(delay, MIN_FAILURE_DELAY)

    # --- plain counting (tests and tools) -------------------------------------------------

    def failure(self, account: str, source: str, password_tag: bytes | None = None) -> float:
        """Record one failed login outright; returns its reply's delay."""
        return self.failed(Reservation(account, source, self._all_keys(account, source)),
                           password_tag)


class PreauthLimiter:
    """Counts connections that have not logged in yet, per source and in total."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.total = 0
        self._per_source: dict[str, int] = {}

    def admit(self, source: str) -> bool:
        if self.total >= self.limits.max_preauth_total:
            return False
        if self._per_source.get(source, 0) >= self.limits.max_preauth_per_source:
            return False
        self.total += 1
        self._per_source[source] = self._per_source.get(source, 0) + 1
        return True

    def release(self, source: str) -> None:
        self.total -= 1
        count = self._per_source.get(source, 0) - 1
        if count > 0:
            self._per_source[source] = count
        else:
            self._per_source.pop(source, None)
