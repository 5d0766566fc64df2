"""``python -m bench``: every figure in one go against the embedded fake Microsoft 365.

See ``bench/README.md`` for what each figure means. ``--quick`` is a one-minute smoke run
with small sizes and one run per figure; the default is the full run (≥ 3 runs per figure).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import (
    clients,
    concurrency,
    env,
    ha,
    harness,
    isolation,
    logins,
    peer,
    profiling,
    report,
    startup,
    throughput,
    workers,
)
from bench.harness import Series

BENCH_DIR = Path(__file__).resolve().parent

FULL: dict[str, Any] = {
    "messages": 200, "message_size": 1_000_000, "smtp_messages": 500, "smtp_size": 100_000,
    "runs": 3, "throughput_runs": 5, "steps": [1000, 2500, 5000, 10000],
    "peer_steps": [100, 300, 500, 550], "burst": 1000, "login_samples": 200,
    "peer_login_samples": 30, "storm": 1000, "peer_storm": 100, "uvloop_steps": [5000],
    "idle_sessions": 19_000,
}
QUICK: dict[str, Any] = {
    "messages": 20, "message_size": 1_000_000, "smtp_messages": 50, "smtp_size": 100_000,
    "runs": 1, "throughput_runs": 1, "steps": [200, 500], "peer_steps": [20],
    "burst": 50, "login_samples": 20, "peer_login_samples": 3, "storm": 100, "peer_storm": 10,
    "uvloop_steps": [200], "idle_sessions": 200,
}

DIRECT, PROXY, PEER = "direct", "xoauth2-proxy", "email-oauth2-proxy"
BASELINE = "baseline"  # --baseline DIR: the proxy package of another source tree, same run
RELAY = "byte relay"  # the direct client through bench.byte_relay: one bare Python hop


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one-minute smoke run (small sizes)")
    p.add_argument("--runs", type=int, help="repeat each figure this many times")
    p.add_argument("--only", help="comma-separated figures: startup,throughput,isolation,"
                                  "burst,login,storm,ha,concurrency,profile,uvloop,workers")
    p.add_argument("--no-peer", action="store_true", help="skip email-oauth2-proxy")
    p.add_argument("--max-sessions", type=int, help="top step of the idle-session ramp")
    p.add_argument("--workdir", type=Path, help="keep the run's files here (default: a temp dir)")
    p.add_argument("--baseline", type=Path, metavar="DIR",
                   help="also measure the proxy of another source tree (a checkout whose "
                        "proxy/ package to run: before/after a change, in the same run) in "
                        "the throughput and login figures")
    p.add_argument("--update-results", action="store_true",
                   help="also rewrite bench/RESULTS.md from this run")
    return p.parse_args(argv)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sizes = dict(QUICK if args.quick else FULL)
        if args.runs:
            self.sizes["runs"] = self.sizes["throughput_runs"] = args.runs
        self.only = set(args.only.split(",")) if args.only else None
        self.results: dict[str, Any] = {"figures": {}, "errors": {}}
        self.started = time.monotonic()
        self.peer: peer.Peer | None = None
        self.baseline: tuple[env.ProxyProcess, dict[str, int]] | None = None
        self.peer_missing = "--no-peer" if args.no_peer else ""

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f}s] {text}", flush=True)

    def wanted(self, name: str) -> bool:
        return self.only is None or name in self.only

    def figure(self, name: str, fn: Callable[[], Any]) -> None:
        if not self.wanted(name):
            return
        self.say(f"== {name}")
        self.results["meta"].setdefault("loadavg_at_start", {})[name] = os.getloadavg()
        try:
            self.results["figures"][name] = fn()
        except Exception as exc:  # record it and go on with the next figure
            self.results["errors"][name] = f"{type(exc).__name__}: {exc}"
            self.say(f"  {name} FAILED: {type(exc).__name__}: {exc}")
            traceback.print_exc()

    # --- targets ------------------------------------------------------------------------------

    def targets(self, user: str) -> dict[str, clients.Target]:
        w = self.world
        up = w.upstream
        out = {
            DIRECT: clients.Target(DIRECT, "127.0.0.1",
                                   {"imap": up.ports["imaps"], "pop": up.ports["pop3s"],
                                    "smtp": up.ports["submission"]},
                                   user, token=lambda proto: self._token(user, proto),
                                   ca_file=up.ca_file),
            PROXY: clients.Target(PROXY, "127.0.0.1", w.ports, user, password=env.PASSWORD),
        }
        if self.peer is not None:
            out[PEER] = clients.Target(PEER, "127.0.0.1", self.peer.ports, user,
                                       password=peer.PASSWORD)
        return out

    def with_baseline(self, targets: dict[str, clients.Target],
                      user: str) -> dict[str, clients.Target]:
        """``targets`` and, with --baseline, the baseline tree's proxy right after ours."""
        if self.baseline is None:
            return targets
        out = {}
        for name, target in targets.items():
            out[name] = target
            if name == PROXY:
                out[BASELINE] = clients.Target(BASELINE, "127.0.0.1", self.baseline[1], user,
                                               password=env.PASSWORD)
        return out

    _tokens: dict[tuple[str, str], str] = {}

    def _token(self, user: str, protocol: str) -> str:
        """One token per user and protocol for the whole run: the direct client's warm token."""
        key = (user, protocol)
        if key not in self._tokens:
            self._tokens[key] = self.world.token(user, protocol)
        return self._tokens[key]

    # --- the run ------------------------------------------------------------------------------

    def run(self) -> int:
        args, sizes = self.args, self.sizes
        nofile = harness.raise_nofile()
        workdir = args.workdir or Path(tempfile.mkdtemp(prefix="xoauth2-bench-"))
        workdir.mkdir(parents=True, exist_ok=True)
        self.results["meta"] = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "mode": "quick" if args.quick else "full", "sizes": sizes,
            "machine": harness.machine(), "loadavg_before": os.getloadavg(),
            "upstream": "the embedded fake Microsoft 365 (proxy.demo, Twisted, one process, "
                        "listen backlog raised to 4096 by bench.upstream_run) for every "
                        "contestant",
        }
        self.say(f"upstream for every contestant: the embedded fake Microsoft 365 "
                 f"(fake Entra ID + Twisted IMAP/POP3/SMTP); workdir {workdir}")
        self.say(f"RLIMIT_NOFILE {nofile[0]}/{nofile[1]}; building the mailbox "
                 f"({sizes['messages']} x {sizes['message_size']} bytes) and accounts")
        self.world = env.World.create(workdir, messages=sizes["messages"],
                                      message_size=sizes["message_size"])
        code = 1
        try:
            self._figures(workdir)
        except KeyboardInterrupt:
            self.results["errors"]["interrupted"] = "KeyboardInterrupt"
        except Exception as exc:
            self.results["errors"]["run"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        finally:
            if self.peer is not None:
                self.peer.stop()
            self.world.close()
            self.results["meta"]["loadavg_after"] = os.getloadavg()
            self.results["meta"]["seconds"] = round(time.monotonic() - self.started, 1)
            if not args.workdir and not self.results["errors"]:
                shutil.rmtree(workdir, ignore_errors=True)
            code = self._write()
        return code

    def _figures(self, workdir: Path) -> None:
        sizes, w = self.sizes, self.world
        if self.world.smtp_missing:
            self.say(f"SMTP: {self.world.smtp_missing}")
        self.figure("startup", lambda: {**startup.measure(w, max(1, sizes["runs"]), self.say),
                                        **startup.imports(max(1, sizes["runs"]))})
        self.proxy = w.start_proxy()
        if self.args.baseline:
            source = self.args.baseline.resolve()
            config = w.second_config("proxy-baseline.toml", source)
            self.baseline = (w.start_proxy(source=source, config=config), config[1])
            self.results["meta"]["baseline"] = {"source": str(source), "commit": _commit(source)}
            self.say(f"baseline: the proxy package of {source} ({_commit(source)})")
        self.results["meta"]["proxy_ready_signal"] = (
            "READY=1" if self.proxy.ready_at is not None else "listener accept")
        if not self.args.no_peer:
            version, why = peer.ensure_installed(workdir / "peer-install.log")
            if version is None:
                self.peer_missing = why or "not installed"
            else:
                try:
                    self.peer = peer.start(w, workdir / "peer", version)
                except Exception as exc:
                    self.peer_missing = f"would not start: {exc}"[:300]
            self.results["meta"]["peer"] = {"package": peer.PACKAGE, "version": version,
                                            "missing": self.peer_missing}
            self.say(f"peer: email-oauth2-proxy {version or ''} "
                     f"{'running' if self.peer else self.peer_missing}")
        if "startup" in self.results["figures"] and self.peer is not None:
            p = self.peer

            def start_peer() -> tuple[Callable[[], None], int]:
                popen = peer.launch(w, p.config, p.log)

                def stop() -> None:
                    peer.Peer(popen, p.ports, p.config, p.log, p.version).stop()
                return stop, p.ports["imap"]

            p.stop()
            try:
                self.results["figures"]["startup"]["peer_exec_to_listen"] = startup.peer_startup(
                    start_peer, max(1, sizes["runs"]))
            finally:
                self.peer = peer.restart(p, w)
        self._warm((DIRECT, PROXY, PEER, BASELINE))
        self.figure("throughput", self._throughput)
        self.figure("isolation", self._isolation)
        self.figure("burst", self._burst)
        self.figure("login", self._login)
        self.figure("storm", self._storm)
        self.figure("ha", lambda: ha.measure(self.world, runs=self.sizes["runs"],
                                             n=self.sizes["storm"], say=self.say))
        self.figure("concurrency", self._concurrency)
        self.figure("profile", self._profile)
        self.figure("uvloop", self._uvloop)
        self.figure("workers", self._workers)

    def _warm(self, names: tuple[str, ...] = (DIRECT, PROXY, PEER)) -> None:
        """One login per contestant and account: scrypt, the peer's PBKDF2 config, tokens."""
        for user in (env.BIG, env.IDLE):
            for name, target in self.with_baseline(self.targets(user), user).items():
                if name not in names:
                    continue
                async def once(t: clients.Target = target) -> None:
                    _, conn = await clients.login_latency(t)
                    conn.close()
                asyncio.run(once())

    def _missing(self) -> dict[str, dict[str, str]]:
        out: dict[str, dict[str, str]] = {}
        if self.world.smtp_missing:
            out[PROXY] = {"smtp": f"SMTP listener not there yet ({self.world.smtp_missing})"}
        if self.peer is None and self.peer_missing:
            out[PEER] = {p: self.peer_missing for p in ("imap", "pop", "smtp")}
        return out

    def _throughput(self) -> dict[str, Any]:
        targets = list(self.with_baseline(self.targets(env.BIG), env.BIG).values())
        up = self.world.upstream
        relay = subprocess.Popen(
            [sys.executable, "-m", "bench.byte_relay", str(up.ports["imaps"]),
             str(up.ports["pop3s"]), str(up.ports["submission"])],
            cwd=BENCH_DIR.parent, stdout=subprocess.PIPE, text=True)
        try:
            assert relay.stdout is not None
            imap, pop, smtp = (int(p) for p in relay.stdout.readline().split())
            direct = targets[0]
            assert direct.name == DIRECT
            cpu_of = {PROXY: self.proxy.cpu}
            if self.baseline is not None:
                cpu_of[BASELINE] = self.baseline[0].cpu
            targets.append(dataclasses.replace(direct, name=RELAY,
                                               ports={"imap": imap, "pop": pop, "smtp": smtp}))
            return throughput.measure(targets, runs=self.sizes["throughput_runs"],
                                      sizes=self.sizes, cpu_of=cpu_of,
                                      missing=self._missing(), say=self.say)
        finally:
            relay.kill()
            relay.wait()

    def _isolation(self) -> dict[str, Any]:
        out = {}
        for name, target in self.targets(env.BIG).items():
            rss = {PROXY: self.proxy.rss, PEER: self.peer.rss if self.peer else None}.get(name)
            out[name] = isolation.measure(target, target, runs=self.sizes["runs"],
                                          messages=self.sizes["messages"], rss=rss, say=self.say)
            if name == PEER and self.peer is not None and not self.peer.alive():
                self.peer = peer.restart(self.peer, self.world)
        return out

    def _burst(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, target in self.targets(env.IDLE).items():
            runs = []
            for _ in range(self.sizes["runs"]):
                r = asyncio.run(concurrency.burst(target, self.sizes["burst"],
                                                  timeout=(5.0 if self.args.quick else 20.0) if name == PEER
                                                  else 60.0))
                runs.append(r)
                self.say(f"  {name}: {r['greeted']}/{r['n']} greeted, last greeting "
                         f"{r['last_greeting_s'] * 1e3:.0f} ms {r['first_error']}")
                time.sleep(2.0)
            last = Series("s", [r["last_greeting_s"] for r in runs])
            out[name] = {"runs": runs, "last_greeting": last,
                         "all_greeted": all(r["greeted"] == r["n"] for r in runs)}
        return out

    def _login(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, target in self.with_baseline(self.targets(env.IDLE), env.IDLE).items():
            n = self.sizes["peer_login_samples" if name == PEER else "login_samples"]
            per_run = [asyncio.run(logins.latency(target, n)) for _ in range(self.sizes["runs"])]
            out[name] = {k: Series("ms", [r[k] for r in per_run])
                         for k in per_run[0] if k != "samples"}
            out[name]["samples_per_run"] = n
            self.say(f"  {name}: LOGIN->OK p50 {out[name]['login_p50_ms'].median:.2f} ms, "
                     f"p99 {out[name]['login_p99_ms'].median:.2f} ms; connect->logged in p50 "
                     f"{out[name]['ready_p50_ms'].median:.2f} ms")
        return out

    def _storm(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        targets = self.targets(env.STORM)
        runs = []
        for _ in range(self.sizes["runs"]):
            logins.expire_token(self.world, env.STORM, self.say)
            r = asyncio.run(logins.storm(targets[PROXY], self.sizes["storm"], self.world.upstream))
            runs.append(r)
            self.say(f"  {PROXY}: {r['ok']}/{r['n']} OK, token requests {r['token_requests']}, "
                     f"all OK in {r['all_ok_s']:.2f} s {r['first_error']}")
        out[PROXY] = {"runs": runs, "token_requests": Series("requests", [r["token_requests"] for r in runs]),
                      "all_ok": Series("s", [r["all_ok_s"] for r in runs])}
        if self.peer is not None:
            runs = []
            for _ in range(self.sizes["runs"]):
                self.peer = peer.restart(self.peer, self.world, expired=env.STORM)
                r = asyncio.run(logins.storm(self.targets(env.STORM)[PEER], self.sizes["peer_storm"],
                                             self.world.upstream, timeout=300, open_parallel=4))
                runs.append(r)
                self.say(f"  {PEER}: {r['ok']}/{r['n']} OK, token requests {r['token_requests']}, "
                         f"all OK in {r['all_ok_s']:.2f} s {r['first_error']}")
            out[PEER] = {"runs": runs,
                         "token_requests": Series("requests", [r["token_requests"] for r in runs]),
                         "all_ok": Series("s", [r["all_ok_s"] for r in runs])}
        return out

    def _steps(self, steps: list[int], pid: int) -> tuple[list[int], str]:
        """Cap the ramp at what the proxy's RLIMIT_NOFILE allows (2 fds per session)."""
        limit = _nofile_soft(pid)
        cap = (limit - harness.fd_count(pid) - 64) // 2
        if self.args.max_sessions:
            steps = [s for s in steps if s < self.args.max_sessions] + [self.args.max_sessions]
        note = ""
        if steps and steps[-1] > cap:
            note = (f"{steps[-1]} sessions need {2 * steps[-1]} descriptors in the proxy; its "
                    f"RLIMIT_NOFILE is {limit} (the hard limit here: CAP_SYS_RESOURCE is not "
                    f"available to raise it), so the top step is {cap}")
            steps = [s for s in steps if s < cap] + [cap]
        return steps, note

    def _concurrency(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        steps, note = self._steps(self.sizes["steps"], self.proxy.pid)
        if note:
            self.say(f"  note: {note}")
        target = self.targets(env.IDLE)[PROXY]
        out[PROXY] = asyncio.run(concurrency.ramp(
            target, steps, rss=self.proxy.rss, alive=lambda: self.proxy.popen.poll() is None,
            say=self.say))
        out[PROXY]["limit_note"] = note
        out[PROXY]["upstream_rss_mib_after"] = harness.rss_bytes(self.world.upstream.pid) / harness.MIB
        time.sleep(3.0)
        if self.peer is not None:
            p = self.peer
            out[PEER] = asyncio.run(concurrency.ramp(
                self.targets(env.IDLE)[PEER], self.sizes["peer_steps"], rss=p.rss,
                alive=p.alive, stop_on_error=True, parallel=4, step_timeout=90, say=self.say))
            out[PEER]["note"] = ("one thread per session, each in its own select() loop; "
                                 "4 logins at a time (its listen backlog is 5)")
            if not p.alive():
                out[PEER]["died"] = True
            self.peer = peer.restart(p, self.world)
        return out

    def _profile(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        results = self.args.workdir or BENCH_DIR / "results"
        results.mkdir(parents=True, exist_ok=True)
        big = self.targets(env.BIG)[PROXY]
        idle = self.targets(env.IDLE)[PROXY]
        n = self.sizes["messages"]
        out["relay_imap_fetch"] = profiling.record(
            self.proxy.pid, results / "profile-relay.txt",
            lambda: [clients.imap_fetch_all(big, n) for _ in range(3)])
        if not self.world.smtp_missing:
            msgs = [env.message(i, self.sizes["smtp_size"]) for i in range(min(200, self.sizes["smtp_messages"]))]
            out["smtp_submission"] = profiling.record(
                self.proxy.pid, results / "profile-smtp.txt",
                lambda: [clients.smtp_send_all(big, msgs, env.BIG, "archive@contoso.example")
                         for _ in range(3)])
        out["logins"] = profiling.record(
            self.proxy.pid, results / "profile-logins.txt",
            lambda: asyncio.run(logins.latency(idle, self.sizes["login_samples"])))
        for name, summary in out.items():
            if "self" in summary:
                self.say(f"  {name}: {summary['samples']} samples; top self: "
                         + "; ".join(f"{f} {p}%" for f, p in summary["self"][:4]))
        return out

    def _uvloop(self) -> dict[str, Any]:
        """The same proxy on uvloop, and on asyncio with a smaller TLS read buffer."""
        out: dict[str, Any] = {}
        self.proxy.stop()
        self.world.procs.remove(self.proxy)
        try:
            for label, kw in (("asyncio", {}), ("uvloop", {"uvloop": True}),
                              ("asyncio+ssl_buffer_16k", {"ssl_buffer": 16384})):
                proc = self.world.start_proxy(**kw)  # type: ignore[arg-type]
                try:
                    self._warm((PROXY,))
                    big, idle = self.targets(env.BIG)[PROXY], self.targets(env.IDLE)[PROXY]
                    tp, cpu = Series("MB/s"), Series("s/GB")
                    for _ in range(self.sizes["runs"]):
                        before = proc.cpu()
                        nbytes, seconds = clients.imap_fetch_all(big, self.sizes["messages"])
                        tp.add(nbytes / seconds / 1e6)
                        cpu.add((proc.cpu() - before) / (nbytes / 1e9))
                    lat = asyncio.run(logins.latency(idle, self.sizes["login_samples"]))
                    steps, _ = self._steps(self.sizes["uvloop_steps"], proc.pid)
                    ramp = asyncio.run(concurrency.ramp(
                        idle, steps, rss=proc.rss, alive=lambda p=proc: p.popen.poll() is None,
                        say=self.say))
                    top = ramp["steps"][-1] if ramp["steps"] else {}
                    out[label] = {"imap_fetch": tp, "cpu_s_per_gb": cpu, "login": lat,
                                  "sessions": top.get("sessions"),
                                  "rss_per_session_kib": top.get("rss_per_session_kib"),
                                  "ramp_s": top.get("ramp_s"),
                                  "greeting_during_ramp_ms": ramp["greeting_during_ramp_ms"]}
                    self.say(f"  {label}: IMAP {tp.median:.0f} MB/s, {cpu.median:.2f} s/GB, "
                             f"LOGIN p50 {lat['login_p50_ms']:.2f} ms, "
                             f"{top.get('rss_per_session_kib', float('nan')):.1f} KiB/session")
                finally:
                    proc.stop()
                    self.world.procs.remove(proc)
                    time.sleep(2.0)
        finally:
            self.proxy = self.world.start_proxy()
        return out

    def _workers(self) -> dict[str, Any]:
        """workers 1/2 × asyncio/uvloop throughput, and idle sessions on 2 workers."""
        out = workers.measure(self.world, self.targets(env.BIG)[DIRECT],
                              runs=self.sizes["throughput_runs"], messages=self.sizes["messages"],
                              say=self.say)
        out["idle"] = workers.idle(self.world, self.sizes["idle_sessions"], say=self.say)
        return out

    # --- output -------------------------------------------------------------------------------

    def _write(self) -> int:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        outdir = BENCH_DIR / "results"
        outdir.mkdir(parents=True, exist_ok=True)
        data = report.jsonable(self.results)
        path = outdir / f"{stamp}.json"
        path.write_text(json.dumps(data, indent=2))
        table = report.table(data)
        print()
        print(table)
        md = report.markdown(data)
        (outdir / f"{stamp}.md").write_text(md)
        if self.args.update_results:
            update_results(BENCH_DIR / "RESULTS.md", md)
        print(f"\nJSON: {path}\nMarkdown: {outdir / (stamp + '.md')}")
        if self.results["errors"]:
            print(f"errors: {json.dumps(self.results['errors'], indent=1)}", file=sys.stderr)
            return 1
        return 0


BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def _commit(tree: Path) -> str:
    """The commit checked out in ``tree`` (and whether its work tree differs), or ``?``."""
    try:
        head = subprocess.run(["git", "-C", str(tree), "describe", "--always", "--dirty"],
                              capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return "?"
    return head.stdout.strip() or "?"


def update_results(path: Path, md: str) -> None:
    """Replace the generated part of RESULTS.md (between the markers), keeping the prose."""
    text = path.read_text() if path.exists() else ""
    if "| figure |" in md:  # the table and what follows it; the prose around it is kept
        md = md[md.index("| figure |"):]
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        path.write_text(f"{head}{BEGIN}\n{md}{END}{tail}")
    else:
        path.write_text(f"{BEGIN}\n{md}{END}\n")


def _nofile_soft(pid: int) -> int:
    with open(f"/proc/{pid}/limits", encoding="ascii") as f:
        for line in f:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    return 1024


def ensure_tools(say: Callable[[str], None] = print) -> None:
    """uvloop (for the event-loop comparison) and py-spy (the profile) in the bench's venv.

    Bench-only tools: installed here on first use, never a dependency of the proxy."""
    import importlib.util
    import subprocess

    missing = [name for name, ok in (("uvloop", importlib.util.find_spec("uvloop") is not None),
                                     ("py-spy", profiling.py_spy() is not None)) if not ok]
    if missing:
        say(f"installing {', '.join(missing)} into {sys.prefix} (bench only)")
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet",
                        "--disable-pip-version-check", *missing], check=False, timeout=600)


def main(argv: list[str] | None = None) -> int:
    ensure_tools()
    return Bench(parse(argv)).run()


if __name__ == "__main__":
    sys.exit(main())
