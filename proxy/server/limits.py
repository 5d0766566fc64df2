"""Failed-login throttling and pre-login connection limits, shared by every listener.

Throttle: failures are counted per account and per source address (loopback sources are
counted per account only: on a workstation every client is 127.0.0.1, and one mistyped password
must not lock out the others). The n-th failure in a row is answered after an exponentially
growing delay; from ``lockout_after`` failures the account or source is locked out for
``lockout_seconds``, during which every login for it is refused with the "throttled" reply
before any password is checked — a correct password is not accepted either, so a lockout is no
oracle. Failure replies are padded to the delay measured from the start of the attempt, so a
wrong password and an unknown account take the same time.

Pre-login limits: connections that have not logged in yet are capped per source and in total;
one more gets the protocol's "busy" reply and is closed.
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from proxy.config import Limits

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_TRACKED = 50_000  # keys remembered at most (oldest forgotten first): bounded memory


@dataclass
class _Record:
    failures: int = 0
    last: float = 0.0
    locked_until: float = 0.0


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


class Throttle:
    def __init__(self, limits: Limits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.clock = clock
        self._records: OrderedDict[str, _Record] = OrderedDict()

    def _keys(self, account: str, source: str) -> list[str]:
        keys = [f"account:{account.strip().lower()[:320]}"]
        if source and not is_loopback(source):
            keys.append(f"source:{source}")
        return keys

    def _get(self, key: str, now: float) -> _Record | None:
        record = self._records.get(key)
        if record is not None and now - record.last > self.limits.forget_after \
                and record.locked_until <= now:
            del self._records[key]
            return None
        return record

    def locked(self, account: str, source: str) -> float:
        """Seconds of lockout left for this attempt (0.0: go ahead)."""
        now = self.clock()
        left = 0.0
        for key in self._keys(account, source):
            record = self._get(key, now)
            if record is not None:
                left = max(left, record.locked_until - now)
        return left

    def failure(self, account: str, source: str) -> float:
        """Record a failed login; returns the delay its reply must have (from the attempt's start)."""
        now = self.clock()
        worst = 0
        for key in self._keys(account, source):
            record = self._get(key, now)
            if record is None:
                record = self._records[key] = _Record()
            self._records.move_to_end(key)
            record.failures += 1
            record.last = now
            if record.failures >= self.limits.lockout_after:
                record.locked_until = now + self.limits.lockout_seconds
            worst = max(worst, record.failures)
        while len(self._records) > MAX_TRACKED:
            self._records.popitem(last=False)
        return min(self.limits.failure_delay * 2 ** (worst - 1), self.limits.max_failure_delay)

    def success(self, account: str, source: str) -> None:
        for key in self._keys(account, source):
            record = self._records.get(key)
            if record is not None and record.locked_until <= self.clock():
                del self._records[key]


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
