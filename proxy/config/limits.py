"""Config sections ``[limits]`` (login throttling, pre-login limits) and ``[metrics]`` (the
``/metrics``, ``/healthz`` and ``/readyz`` endpoint)."""

from __future__ import annotations

from proxy.config.model import Limits, Metrics
from proxy.config.reader import Table, parse_address


def read_metrics(top: Table) -> Metrics:
    mt = top.table("metrics")
    if mt is None:
        return Metrics()
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
    return metrics


def read_limits(top: Table) -> Limits:
    limits = Limits()
    lt = top.table("limits")
    if lt is None:
        return limits
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
    return limits
