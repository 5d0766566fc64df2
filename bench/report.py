"""The summary table (stdout and Markdown) and JSON conversion of the bench's results."""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.harness import Series

DIRECT, PROXY, PEER = "direct", "xoauth2-proxy", "email-oauth2-proxy"
BASELINE = "baseline"
RELAY = "byte relay"


def jsonable(value: Any) -> Any:
    if isinstance(value, Series):
        return value.as_dict()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _get(data: dict, *path: str) -> Any:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _num(x: Any, digits: int = 0) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:,.{digits}f}"


def _series(s: Any, digits: int = 0) -> str:
    """median [min–max] of a Series dict, or its n/a note."""
    if not isinstance(s, dict):
        return "–"
    if s.get("median") is None:
        return s.get("note") or "–"
    if len(s.get("runs", [])) == 1:
        return _num(s["median"], digits)
    return f"{_num(s['median'], digits)} [{_num(s['min'], digits)}–{_num(s['max'], digits)}]"


def _ratio(a: Any, b: Any) -> str:
    if not isinstance(a, dict) or not isinstance(b, dict):
        return ""
    x, y = a.get("median"), b.get("median")
    if not x or not y:
        return ""
    return f" (×{x / y:.2f})"


def _paired(a: Any, b: Any) -> str:
    """Interleaved runs: the median [min–max] of each run's ratio to the direct run next to
    it, which drift on a shared machine moves far less than the ratio of the medians."""
    if not isinstance(a, dict) or not isinstance(b, dict):
        return ""
    runs, direct = a.get("runs") or [], b.get("runs") or []
    if len(runs) != len(direct) or not runs or not all(runs) or not all(direct):
        return _ratio(a, b)  # a contestant missed runs: the pairs would not line up
    pairs = sorted(x / y for x, y in zip(runs, direct, strict=True))
    mid = statistics.median(pairs)
    if len(pairs) == 1:
        return f" (×{mid:.2f})"
    return f" (×{mid:.2f} [{pairs[0]:.2f}–{pairs[-1]:.2f}])"


def rows(data: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(figure, direct, xoauth2-proxy, email-oauth2-proxy, target)."""
    f = data.get("figures", {})
    out: list[tuple[str, str, str, str, str]] = []
    tp = f.get("throughput") or {}
    peer_na = _get(data, "meta", "peer", "missing") or ""
    for proto, label, target in (("imap", "IMAP FETCH 200 × 1 MB, MB/s", "proxy ≥ 0.95 × direct"),
                                 ("pop", "POP3 RETR, MB/s", "proxy ≥ 0.95 × direct"),
                                 ("smtp", "SMTP submission, MB/s", "proxy ≥ 0.95 × direct")):
        t = tp.get(proto) or {}
        d = t.get(DIRECT)
        n = data.get("meta", {}).get("sizes", {})
        if proto == "imap":
            label = f"IMAP FETCH {n.get('messages')} × {n.get('message_size', 0) // 1000} kB, MB/s"
        elif proto == "pop":
            label = f"POP3 RETR {n.get('messages')} × {n.get('message_size', 0) // 1000} kB, MB/s"
        else:
            label = f"SMTP submit {n.get('smtp_messages')} × {n.get('smtp_size', 0) // 1000} kB, MB/s"
        out.append((label, _series(d), _series(t.get(PROXY)) + _paired(t.get(PROXY), d),
                    (_series(t.get(PEER)) + _paired(t.get(PEER), d)) if t.get(PEER) else peer_na,
                    target))
    if any((tp.get(p) or {}).get(RELAY) for p in ("imap", "pop", "smtp")):
        out.append(("one bare Python hop: the direct client through a plain asyncio byte relay "
                    "(IMAP / POP / SMTP), × direct", "",
                    " / ".join(_paired((tp.get(p) or {}).get(RELAY),
                                       (tp.get(p) or {}).get(DIRECT)).strip(" ()") or "–"
                               for p in ("imap", "pop", "smtp")), "", "the floor for any proxy"))
    cpu_of = tp.get("cpu_s_per_gb") or {PROXY: tp.get("proxy_cpu_s_per_gb") or {}}
    cpu = cpu_of.get(PROXY) or {}
    if cpu:
        out.append(("proxy CPU per GB relayed (IMAP / POP / SMTP), s", "",
                    " / ".join(_series(cpu.get(p), 2) for p in ("imap", "pop", "smtp")), "", ""))
    if any((tp.get(p) or {}).get(BASELINE) for p in ("imap", "pop", "smtp")):
        source = _get(data, "meta", "baseline", "commit") or ""
        out.append((f"baseline ({source}): IMAP / POP / SMTP, × direct", "",
                    " / ".join(_paired((tp.get(p) or {}).get(BASELINE),
                                       (tp.get(p) or {}).get(DIRECT)).strip(" ()") or "–"
                               for p in ("imap", "pop", "smtp")), "", "same run as the rows above"))
        base_cpu = cpu_of.get(BASELINE) or {}
        out.append((f"baseline ({source}): CPU per GB relayed (IMAP / POP / SMTP), s", "",
                    " / ".join(_series(base_cpu.get(p), 2) for p in ("imap", "pop", "smtp")),
                    "", ""))
    conc = f.get("concurrency") or {}
    for name in (PROXY, PEER):
        c = conc.get(name)
        if not c or not c.get("steps"):
            continue
        top = c["steps"][-1]
        clean = [s for s in c["steps"] if not s.get("errors")]
        best = clean[-1]["sessions"] if clean else 0
        text = (f"{_num(top.get('open'))} open / {_num(top.get('sessions'))}, "
                f"{_num(top.get('errors'))} errors; {_num(top.get('rss_per_session_kib'), 1)} KiB/session; "
                f"greeting p50/p99 {_num(top.get('greeting_ms_p50'), 2)}/{_num(top.get('greeting_ms_p99'), 2)} ms; "
                f"NOOP p50/p99 {_num(top.get('noop_ms_p50'), 2)}/{_num(top.get('noop_ms_p99'), 2)} ms")
        if name == PEER:
            text = f"clean up to {best}; at {top.get('sessions')}: " + text
            if c.get("first_error"):
                text += f"; first error: {c['first_error'][:80]}"
        out.append(("idle IMAP sessions (IDLE), top step", "",
                    text if name == PROXY else "", text if name == PEER else "",
                    "0 errors, ≤ 40 KiB/session"))
        dr = c.get("greeting_during_ramp_ms") or {}
        if name == PROXY:
            out.append(("greeting latency while the ramp logs in, p50/p99/max ms", "",
                        f"{_num(dr.get('p50'), 1)}/{_num(dr.get('p99'), 1)}/{_num(dr.get('max'), 0)}",
                        "", ""))
    iso = f.get("isolation") or {}
    if iso:
        def iso_text(x: Any) -> str:
            if not x:
                return ""
            if x.get("error") and not (x.get("ratio") or {}).get("median"):
                return f"error: {x['error']}"
            growth = _series(x.get("rss_growth"), 1) if (x.get("rss_growth") or {}).get("median") is not None else "–"
            return (f"{_series(x.get('ratio'), 2)} of solo ({_series(x.get('beside_slow'))} MB/s); "
                    f"RSS growth {growth} MiB")
        out.append(("fast reader beside a 64 KB/s reader", iso_text(iso.get(DIRECT)),
                    iso_text(iso.get(PROXY)), iso_text(iso.get(PEER)) or peer_na,
                    "≥ 0.9 × solo, RSS flat"))
    burst = f.get("burst") or {}
    if burst:
        def b_text(x: Any) -> str:
            if not x:
                return ""
            runs = x.get("runs") or [{}]
            return (f"{'all' if x.get('all_greeted') else 'NOT all'} greeted; last after "
                    f"{_series(x.get('last_greeting'), 2)} s"
                    + ("" if x.get("all_greeted") else f" ({runs[-1].get('first_error', '')[:60]})"))
        n = data.get("meta", {}).get("sizes", {}).get("burst")
        out.append((f"{n} simultaneous connects", b_text(burst.get(DIRECT)),
                    b_text(burst.get(PROXY)), b_text(burst.get(PEER)) or peer_na,
                    "all greeted"))
    lg = f.get("login") or {}
    if lg:
        d = lg.get(DIRECT) or {}
        for key, label in (("login", "LOGIN→OK (direct: AUTHENTICATE→OK), p50 / p99 ms"),
                           ("ready", "connect→logged in, p50 / p99 ms")):
            def l_text(x: Any, k: str = key) -> str:
                if not x:
                    return ""
                p50, p99 = x.get(f"{k}_p50_ms") or {}, x.get(f"{k}_p99_ms") or {}
                text = f"{_num(p50.get('median'), 2)} / {_num(p99.get('median'), 2)}"
                if d and x is not d and p50.get("median") is not None:
                    text += (f" (added {_num(p50['median'] - d[f'{k}_p50_ms']['median'], 2)} / "
                             f"{_num(p99['median'] - d[f'{k}_p99_ms']['median'], 2)})")
                return text
            out.append((label, l_text(d), l_text(lg.get(PROXY)), l_text(lg.get(PEER)) or peer_na,
                        "added p50 ≤ 2 ms"))
            if lg.get(BASELINE):
                out.append((f"baseline: {label}", "", l_text(lg.get(BASELINE)), "", ""))
    st = f.get("startup") or {}
    if st:
        out.append(("first LOGIN of a password (scrypt) minus warm LOGIN, ms", "",
                    _series(st.get("first_login_extra"), 1), "", ""))
    storm = f.get("storm") or {}
    if storm:
        def s_text(x: Any, n: Any) -> str:
            if not x:
                return ""
            runs = x.get("runs") or [{}]
            return (f"n={n}: {_series(x.get('token_requests'))} token requests; all OK in "
                    f"{_series(x.get('all_ok'), 2)} s" + ("" if all(r.get("errors") == 0 for r in runs)
                                                          else f"; errors {runs[-1].get('errors')}"))
        sizes = data.get("meta", {}).get("sizes", {})
        out.append(("refresh storm (expired token, concurrent logins)", "",
                    s_text(storm.get(PROXY), sizes.get("storm")),
                    s_text(storm.get(PEER), sizes.get("peer_storm")) or peer_na,
                    "1 token request"))
    if st:
        out.append((f"exec → ready ({st.get('ready_signal', '')}), ms", "",
                    _series(st.get("exec_to_ready")),
                    (_series(st.get("peer_exec_to_listen")) + " (to listen)")
                    if st.get("peer_exec_to_listen") else "", ""))
        out.append(("import proxy.cli / proxy.server.daemon (importtime), ms", "",
                    f"{_series(st.get('cli_import_ms'), 1)} / {_series(st.get('daemon_import_ms'), 1)}",
                    "", ""))
    uv = f.get("uvloop") or {}
    for label, x in uv.items():
        if not isinstance(x, dict):
            continue
        out.append((f"proxy on {label}: IMAP MB/s, s/GB, LOGIN p50 ms, KiB/session @ {x.get('sessions')}",
                    "", f"{_series(x.get('imap_fetch'))}; {_series(x.get('cpu_s_per_gb'), 2)}; "
                        f"{_num((x.get('login') or {}).get('login_p50_ms'), 2)}; "
                        f"{_num(x.get('rss_per_session_kib'), 1)}", "", ""))
    from bench import ha, workers  # figures of bench/ha.py and bench/workers.py

    for figure, text in ha.rows(f.get("ha") or {}):
        out.append((figure, "", text, "", "1 token request, 0 failed"))

    for figure, text in workers.rows(f.get("workers") or {}):
        out.append((figure, "", text, "", "19,000 open, 0 errors, ≤ 40 KiB/session"
                    if figure.startswith("idle") else ""))
    return out


def table(data: dict[str, Any]) -> str:
    head = ("figure", DIRECT, PROXY + " (× direct)", PEER + " (× direct)", "target")
    body = rows(data)
    lines = [" | ".join(head), "-" * 100]
    for r in body:
        lines.append(" | ".join(r))
    meta = data.get("meta", {})
    lines.insert(0, f"Upstream for every contestant: {meta.get('upstream', '')}")
    return "\n".join(lines)


def markdown(data: dict[str, Any]) -> str:
    meta = data.get("meta", {})
    m = meta.get("machine", {})
    peer = meta.get("peer") or {}
    out = ["## Performance", "",
           f"Run of `python -m bench` ({meta.get('mode')}) on {meta.get('started')}: "
           f"{m.get('cores')} cores ({m.get('cpu')}), {m.get('memory_gib')} GiB, Linux "
           f"{m.get('kernel')}, Python {m.get('python')}, {m.get('openssl')}; "
           f"load average before/after {meta.get('loadavg_before')}/{meta.get('loadavg_after')}; "
           f"{meta.get('seconds')} s in all.",
           "",
           f"Upstream for **every** contestant: {meta.get('upstream')}. Peer: "
           f"email-oauth2-proxy {peer.get('version') or ''} {peer.get('missing') or ''} "
           "(PyPI `emailproxy`, in its own venv, same upstream and fake Entra ID, tokens "
           "pre-authorised into its config). Figures are median [min–max] over the runs.",
           "",
           "| figure | direct | xoauth2-proxy (× direct) | email-oauth2-proxy (× direct) | target |",
           "|---|---|---|---|---|"]
    for r in rows(data):
        out.append("| " + " | ".join(c.replace("|", "/") for c in r) + " |")
    prof = _get(data, "figures", "profile") or {}
    for name, summary in prof.items():
        if not isinstance(summary, dict) or "self" not in summary:
            continue
        out += ["", f"Profile `{name}` (py-spy, {summary['samples']} busy samples, "
                    f"{summary.get('idle_samples', 0)} idle left out) — self time: "
                    + "; ".join(f"{f} {p}%" for f, p in summary["self"][:6])
                    + ". Inclusive: " + "; ".join(f"{f} {p}%" for f, p in summary["inclusive"][:6])]
    notes = []
    conc = _get(data, "figures", "concurrency", PROXY) or {}
    if conc.get("limit_note"):
        notes.append(f"Idle sessions: {conc['limit_note']}.")
    if data.get("errors"):
        notes.append(f"Figures that failed: {data['errors']}.")
    if notes:
        out += [""] + [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


def standalone(kind: str, data: dict[str, Any],
               rows: Callable[[dict[str, Any]], list[tuple[str, str]]]) -> None:
    """The end of a figure's own command (``python -m bench.KIND``): the rows as a Markdown
    table, the raw figures in ``bench/results/KIND-TIMESTAMP.json``, the load average."""
    data["loadavg_after"] = os.getloadavg()
    for figure, text in rows(data):
        print(f"| {figure} | {text} |")
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(exist_ok=True)
    (results / f"{kind}-{time.strftime('%Y%m%dT%H%M%S')}.json").write_text(
        json.dumps(jsonable(data), indent=2))
    print(f"load average before/after: {data['loadavg_before']} / {data['loadavg_after']}")
