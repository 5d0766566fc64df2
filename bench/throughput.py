"""Figure 1 — throughput: the same stdlib client, direct to the fake Microsoft 365 over TLS,
through xoauth2-proxy, and through email-oauth2-proxy.

- IMAP: ``FETCH n:m (BODY.PEEK[])`` of the whole mailbox (``messages`` × ``message_size``)
  in batches of 10 messages (imaplib reads each literal in one large read);
- POP3: ``RETR`` of every message, the reply read in 256 KiB chunks;
- SMTP: ``MAIL``/``RCPT``/``DATA`` of ``smtp_messages`` × ``smtp_size`` over one session.

Contestants run interleaved (direct, proxy, peer, direct, …) so that drift on a shared
machine hits all of them alike; each figure is MB/s (10^6 bytes) from the first command
after login to the last reply. The proxy's CPU seconds per GB relayed come with it: a
steadier figure than wall-clock MB/s on a 2-core machine.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bench import clients, env, harness
from bench.harness import Series


def _run(protocol: str, target: clients.Target, sizes: dict[str, Any],
         smtp_messages: list[bytes]) -> tuple[int, float]:
    if protocol == "imap":
        return clients.imap_fetch_all(target, sizes["messages"])
    if protocol == "pop":
        return clients.pop_retr_all(target, sizes["messages"])
    return clients.smtp_send_all(target, smtp_messages, env.BIG, "archive@contoso.example")


def measure(targets: list[clients.Target], *, runs: int, sizes: dict[str, Any],
            cpu_of: dict[str, Callable[[], float]], missing: dict[str, dict[str, str]],
            say: Callable[[str], None]) -> dict[str, Any]:
    """{protocol: {contestant: Series}, "cpu_s_per_gb": {contestant: {protocol: Series}}}
    for the contestants in ``cpu_of`` (CPU seconds of their process)."""
    smtp_messages = [env.message(i, sizes["smtp_size"]) for i in range(sizes["smtp_messages"])]
    out: dict[str, Any] = {"cpu_s_per_gb": {name: {} for name in cpu_of}}
    for protocol in ("imap", "pop", "smtp"):
        series: dict[str, Series] = {}
        cpu = {name: Series("s/GB") for name in cpu_of}
        for target in targets:
            reason = missing.get(target.name, {}).get(protocol)
            series[target.name] = harness.na(reason, "MB/s") if reason else Series("MB/s")
        for run in range(runs):
            for target in targets:
                if not series[target.name].values and series[target.name].note:
                    continue
                proc_cpu = cpu_of.get(target.name)
                before = proc_cpu() if proc_cpu else None
                try:
                    nbytes, seconds = _run(protocol, target, sizes, smtp_messages)
                except Exception as exc:  # one contestant failing must not end the bench
                    series[target.name].note = f"error: {type(exc).__name__}: {exc}"[:200]
                    say(f"  {protocol} {target.name}: {series[target.name].note}")
                    continue
                series[target.name].add(nbytes / seconds / 1e6)
                if before is not None and proc_cpu is not None:
                    cpu[target.name].add((proc_cpu() - before) / (nbytes / 1e9))
                say(f"  {protocol} run {run + 1}/{runs} {target.name}: "
                    f"{nbytes / seconds / 1e6:.0f} MB/s")
        out[protocol] = series
        for name, series_cpu in cpu.items():
            out["cpu_s_per_gb"][name][protocol] = series_cpu
    return out
