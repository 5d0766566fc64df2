"""The world every contestant shares: the embedded fake Microsoft 365 (one process), its
mailboxes, authorised xoauth2-proxy accounts, and the proxy itself as a subprocess
(``python -m proxy run``) whose RSS, CPU and readiness the bench can watch from outside.
"""

from __future__ import annotations

import importlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import harness
from proxy import config as config_mod
from proxy import store
from proxy.auth import flows
from proxy.demo.process import PROJECT_ROOT, DemoUpstream
from proxy.secret import Secret

SCOPES = {
    "imap": ["https://outlook.office.com/IMAP.AccessAsUser.All"],
    "pop": ["https://outlook.office.com/POP.AccessAsUser.All"],
    "smtp": ["https://outlook.office.com/SMTP.Send"],
}
CLIENT_ID = "11111111-2222-3333-4444-555555555555"

# Accounts: one mailbox full of big messages, one empty one for idle sessions and bursts,
# one whose token the refresh storm lets expire. Same local password for all (the proxy's
# key cache is per account and password).
BIG = "bench@contoso.example"
IDLE = "idle@contoso.example"
STORM = "storm@contoso.example"
ACCOUNTS = (BIG, IDLE, STORM)
PASSWORD = "bench-local-password"


def message(index: int, size: int) -> bytes:
    """A ``size``-byte RFC 5322 message of 80-column lines (CRLF)."""
    head = (f"From: sender@contoso.example\r\nTo: {BIG}\r\nSubject: bench message {index}\r\n"
            f"Message-ID: <bench-{index}@contoso.example>\r\n\r\n").encode()
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.,;:!?-_=+()[]<>/\r\n"
    body = line * ((size - len(head)) // len(line) + 1)
    text = (head + body)[:size - 2]
    if text.endswith(b"\r"):  # cut between CR and LF: no bare CR (the proxy refuses one)
        text = text[:-1] + b"."
    return text + b"\r\n"


def smtp_available() -> str | None:
    """None when the proxy has an SMTP listener, else why not."""
    try:
        mod = importlib.import_module("proxy.server.smtp")
    except Exception as exc:  # not written yet, or broken right now
        return f"proxy/server/smtp.py not importable ({type(exc).__name__}: {exc})"
    if not hasattr(mod, "SmtpListener"):
        return "proxy/server/smtp.py has no SmtpListener yet"
    return None


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def start_upstream(workdir: Path, timeout: float = 60) -> DemoUpstream:
    """``DemoUpstream.start`` with ``bench.upstream_run`` (listen backlog 4096) as the child."""
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    log_file = workdir / "upstream.log"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    command = [sys.executable, "-m", "bench.upstream_run", "--workdir", str(workdir),
               "--host", "127.0.0.1", "--knobs", "{}", "--exit-on-stdin-eof"]
    with open(log_file, "wb") as log:
        proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=log, env=env, cwd=str(workdir), close_fds=True)
    try:
        record = DemoUpstream._wait_ready(proc, log_file, timeout)
    except BaseException:
        DemoUpstream._terminate(proc, grace=2)
        raise
    return DemoUpstream(proc, record, workdir, log_file)


@dataclass
class World:
    """The upstream, the proxy's config and token files, and the bench's own knowledge."""

    workdir: Path
    upstream: DemoUpstream
    config_path: Path
    ports: dict[str, int]  # the proxy's listeners
    smtp_missing: str | None
    messages: int
    message_size: int
    log_level: str = "info"
    procs: list[ProxyProcess] = field(default_factory=list)

    @classmethod
    def create(cls, workdir: Path, *, messages: int, message_size: int,
               log_level: str = "info") -> World:
        workdir.mkdir(parents=True, exist_ok=True)
        upstream = start_upstream(workdir / "upstream")
        try:
            smtp_missing = smtp_available()
            ports = {"imap": harness.free_port(), "pop": harness.free_port()}
            if smtp_missing is None:
                ports["smtp"] = harness.free_port()
            path = cls._write_config(workdir, upstream, ports, log_level, "proxy.toml")
            world = cls(workdir, upstream, path, ports, smtp_missing, messages, message_size,
                        log_level)
            world._authorise()
            for i in range(messages):
                upstream.deliver(BIG, message(i, message_size))
        except BaseException:
            upstream.stop()
            raise
        return world

    @staticmethod
    def _write_config(workdir: Path, upstream: DemoUpstream, ports: dict[str, int],
                      log_level: str, filename: str, state: str = "state") -> Path:
        ca = upstream.ca_file
        up = {"imap": (upstream.ports["imaps"], "implicit"), "pop": (upstream.ports["pop3s"], "implicit"),
              "smtp": (upstream.ports["submission"], "starttls")}
        # The defaults, one process on asyncio, left unsaid so that a --baseline tree from before
        # those settings reads the same file; the uvloop figure switches the loop through
        # bench/proxy_run.py, bench/workers.py sets both itself.
        lines = [f"state_dir = {_toml_value(str(workdir / state))}",
                 f"log_level = {_toml_value(log_level)}", "shutdown_grace = 2", "",
                 "[providers.demo]", f"authority = {_toml_value(upstream.entra_url)}",
                 'tenant = "demo-tenant"', f"client_id = {_toml_value(CLIENT_ID)}",
                 f"ca_file = {_toml_value(ca)}", "timeout = 30", ""]
        for proto in ports:
            port, tls = up[proto]
            lines += [f"[upstreams.{proto}]", f'protocol = "{proto}"', 'host = "127.0.0.1"',
                      f"port = {port}", f'tls = "{tls}"', f"ca_file = {_toml_value(ca)}",
                      "connect_timeout = 30", ""]
        for proto, port in ports.items():
            lines += ["[[listeners]]", f'name = "{proto}"', f'protocol = "{proto}"',
                      f'listen = "127.0.0.1:{port}"', f'upstream = "{proto}"', ""]
        for name in ACCOUNTS:
            lines += [f'[accounts."{name}"]', 'provider = "demo"', 'flow = "device_code"', ""]
        path = workdir / filename
        path.write_text("\n".join(lines))
        return path

    def second_config(self, filename: str, source: Path) -> tuple[Path, dict[str, int]]:
        """The same accounts and upstreams on other listener ports, for a second proxy from
        another source tree (``start_proxy(source=...)``) beside the first; its own token
        files, written by that tree's code (an older tree may not read newer files)."""
        ports = {proto: harness.free_port() for proto in self.ports}
        state = filename.removesuffix(".toml") + "-state"
        path = self._write_config(self.workdir, self.upstream, ports, self.log_level, filename,
                                  state)
        (self.workdir / state).mkdir(mode=0o700, exist_ok=True)
        login = ("import io, sys\n"
                 "from proxy import config, store\n"
                 "from proxy.auth import flows\n"
                 "from proxy.secret import Secret\n"
                 "cfg = config.load(sys.argv[1])\n"
                 "flows.login(cfg, cfg.account(sys.argv[2]), store.TokenStore(cfg.state_dir),\n"
                 "            Secret(sys.argv[3]), out=io.StringIO())\n")
        env = dict(os.environ, PYTHONPATH=str(source))
        for name in ACCOUNTS:
            self.upstream.configure(auto_approve_user=name)
            subprocess.run([sys.executable, "-c", login, str(path), name, PASSWORD], env=env,
                           cwd=str(self.workdir), check=True, timeout=120)
        self.upstream.configure(auto_approve_user=None)
        return path, ports

    def config(self) -> config_mod.Config:
        return config_mod.load(self.config_path)

    def _authorise(self) -> None:
        """The real device-code flow for each account, approved at once by the fake Entra."""
        cfg = self.config()
        cfg.state_dir.mkdir(mode=0o700, exist_ok=True)
        os.chmod(cfg.state_dir, 0o700)
        token_store = store.TokenStore(cfg.state_dir)
        for name in ACCOUNTS:
            self.authorise(name, cfg, token_store)
        self.upstream.configure(auto_approve_user=None)

    def authorise(self, name: str, cfg: config_mod.Config | None = None,
                  token_store: store.TokenStore | None = None) -> None:
        cfg = cfg or self.config()
        token_store = token_store or store.TokenStore(cfg.state_dir)
        account = cfg.account(name)
        assert account is not None
        self.upstream.configure(auto_approve_user=account.mailbox)
        flows.login(cfg, account, token_store, Secret(PASSWORD), out=io.StringIO())

    def token(self, user: str, protocol: str) -> str:
        """An access token straight from the fake Entra (for the direct contestant)."""
        return self.upstream.issue_token(user, SCOPES[protocol])

    def start_proxy(self, *, uvloop: bool = False, ssl_buffer: int | None = None,
                    wrapper: list[str] | None = None, timeout: float = 30.0,
                    source: Path | None = None,
                    config: tuple[Path, dict[str, int]] | None = None) -> ProxyProcess:
        """The proxy as a child process; ``source`` runs another source tree's ``proxy``
        package (a baseline to compare with), ``config`` another config and its ports."""
        proc = ProxyProcess.start(self, uvloop=uvloop, ssl_buffer=ssl_buffer, wrapper=wrapper,
                                  timeout=timeout, source=source, config=config)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            proc.stop()
        self.upstream.stop()


@dataclass
class ProxyProcess:
    """``python -m proxy run`` (or the uvloop shim) as a child: pid, readiness, stop."""

    popen: subprocess.Popen[bytes]
    started: float  # perf_counter at exec
    ready_at: float | None  # READY=1 received (sd_notify), if the daemon sends it
    accept_at: float  # the IMAP listener first accepted a connection
    notify_messages: list[str]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def startup_seconds(self) -> float:
        return (self.ready_at if self.ready_at is not None else self.accept_at) - self.started

    @classmethod
    def start(cls, world: World, *, uvloop: bool = False, ssl_buffer: int | None = None,
              wrapper: list[str] | None = None, timeout: float = 30.0,
              source: Path | None = None,
              config: tuple[Path, dict[str, int]] | None = None) -> ProxyProcess:
        config_path, ports = config or (world.config_path, world.ports)
        notify_path = world.workdir / f"notify-{os.getpid()}-{time.monotonic_ns()}.sock"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(notify_path))
        env = dict(os.environ)
        env["NOTIFY_SOCKET"] = str(notify_path)
        # ``source`` first for the proxy package; this tree stays on the path for bench.proxy_run.
        env["PYTHONPATH"] = os.pathsep.join(
            str(p) for p in (source, PROJECT_ROOT, env.get("PYTHONPATH")) if p)
        env.pop("PYTHONASYNCIODEBUG", None)
        module = ["-m", "proxy"]
        if uvloop or ssl_buffer:  # the experiments: see bench/proxy_run.py
            module = ["-m", "bench.proxy_run"]
            env["BENCH_UVLOOP"] = "1" if uvloop else "0"
            if ssl_buffer:
                env["BENCH_SSL_BUFFER"] = str(ssl_buffer)
        command = [*(wrapper or []), sys.executable, *module, "-c", str(config_path), "run"]
        log_path = world.workdir / f"proxy-{len(world.procs)}.log"
        log = open(log_path, "wb")  # noqa: SIM115 - owned by the child
        started = time.perf_counter()
        popen = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                 stderr=subprocess.STDOUT, cwd=str(world.workdir),
                                 start_new_session=True)
        log.close()
        ready_at = accept_at = None
        messages: list[str] = []
        port = ports["imap"]
        deadline = started + timeout
        notify.setblocking(False)
        try:
            while ready_at is None or accept_at is None:
                if popen.poll() is not None:
                    raise RuntimeError(f"proxy exited with {popen.returncode}:\n"
                                       + log_path.read_text(errors="replace")[-3000:])
                if time.perf_counter() > deadline:
                    if accept_at is not None:
                        break  # no sd_notify support (yet): the listener time is the figure
                    popen.kill()
                    raise RuntimeError("proxy did not start in time:\n"
                                       + log_path.read_text(errors="replace")[-3000:])
                try:
                    data = notify.recv(4096)
                    messages.append(data.decode(errors="replace"))
                    if any(line == "READY=1" for line in data.decode(errors="replace").split("\n")):
                        ready_at = time.perf_counter()
                    continue
                except BlockingIOError:
                    pass
                if accept_at is None:
                    try:
                        with socket.create_connection(("127.0.0.1", port), timeout=1):
                            accept_at = time.perf_counter()
                            if ready_at is None:
                                # give a notify-capable daemon a moment to say READY
                                deadline = min(deadline, accept_at + 1.0)
                    except OSError:
                        pass
                time.sleep(0.002)
        finally:
            notify.close()
            notify_path.unlink(missing_ok=True)
        assert accept_at is not None
        return cls(popen, started, ready_at, accept_at, messages, log_path)

    def rss(self) -> int:
        return harness.rss_bytes(self.pid)

    def cpu(self) -> float:
        return harness.cpu_seconds(self.pid)

    def stop(self, grace: float = 15.0) -> int | None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)
        return self.popen.returncode
