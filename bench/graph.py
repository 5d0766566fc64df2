"""Graph beside SMTP: ``python -m bench.graph [--messages N] [--size BYTES] [--runs R]``.

The same smtplib client submits the same messages through two listeners of one proxy (``python
-m proxy run`` as a child): one whose upstream is the fake Microsoft 365's SMTP server
(XOAUTH2, command by command), one whose upstream is its fake Graph (spooled, then ``sendMail``
as MIME up to 3 MiB, a draft with upload sessions above). Both upstreams are the one demo
process. Runs are interleaved; each figure is the median over the runs of messages per second
and MB/s (10^6 bytes) from the first MAIL to the last reply. ``--update-results`` writes the
rows into bench/RESULTS.md between its ``graph`` markers.
"""

from __future__ import annotations

import argparse
import io
import os
import smtplib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import env, harness
from proxy import config as config_mod
from proxy import store
from proxy.auth import flows
from proxy.demo.process import PROJECT_ROOT, DemoUpstream
from proxy.secret import Secret

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
BEGIN, END = "<!-- graph:begin -->", "<!-- graph:end -->"


def write_config(workdir: Path, up: DemoUpstream, ports: dict[str, int]) -> Path:
    ca = repr(up.ca_file).replace("'", '"')
    text = f"""state_dir = "{workdir / 'state'}"
log_level = "warning"
shutdown_grace = 2

[providers.demo]
authority = "{up.entra_url}"
tenant = "demo-tenant"
client_id = "{env.CLIENT_ID}"
ca_file = {ca}

[upstreams.smtp]
protocol = "smtp"
host = "127.0.0.1"
port = {up.ports["submission"]}
tls = "starttls"
ca_file = {ca}

[upstreams.graph]
protocol = "graph"
base_url = "{up.graph_url}/v1.0"
ca_file = {ca}

[[listeners]]
name = "smtp"
protocol = "smtp"
listen = "127.0.0.1:{ports['smtp']}"
upstream = "smtp"

[[listeners]]
name = "graph"
protocol = "smtp"
listen = "127.0.0.1:{ports['graph']}"
upstream = "graph"

[accounts."{env.BIG}"]
provider = "demo"
"""
    path = workdir / "graph-bench.toml"
    path.write_text(text)
    return path


def authorise(path: Path, up: DemoUpstream) -> None:
    cfg = config_mod.load(path)
    cfg.state_dir.mkdir(mode=0o700, exist_ok=True)
    account = cfg.account(env.BIG)
    assert account is not None
    up.configure(auto_approve_user=account.mailbox)
    flows.login(cfg, account, store.TokenStore(cfg.state_dir), Secret(env.PASSWORD),
                out=io.StringIO())


def submit(port: int, messages: list[bytes]) -> float:
    """Seconds to send every message over one logged-in session."""
    client = smtplib.SMTP("127.0.0.1", port, timeout=300)
    try:
        client.ehlo()
        client.login(env.BIG, env.PASSWORD)
        started = time.perf_counter()
        for data in messages:
            refused = client.sendmail(env.BIG, ["archive@contoso.example"], data)
            if refused:
                raise RuntimeError(f"refused {refused!r}")
        elapsed = time.perf_counter() - started
        client.quit()
        return elapsed
    finally:
        client.close()


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the proxy exited")
        try:
            smtplib.SMTP("127.0.0.1", port, timeout=5).quit()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} not ready")


def run(messages: int, size: int, runs: int) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="bench-graph-") as tmp:
        workdir = Path(tmp)
        up = env.start_upstream(workdir / "upstream")
        proc = None
        try:
            ports = {"smtp": harness.free_port(), "graph": harness.free_port()}
            path = write_config(workdir, up, ports)
            authorise(path, up)
            environ = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
            proc = subprocess.Popen([sys.executable, "-m", "proxy", "run", "--config", str(path)],
                                    env=environ, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL)
            wait_port(ports["graph"], proc)
            # From the mailbox itself: Graph refuses another From without Send As.
            batch = [env.message(i, size).replace(b"From: sender@contoso.example",
                                                  f"From: {env.BIG}".encode())
                     for i in range(messages)]
            seconds: dict[str, list[float]] = {"smtp": [], "graph": []}
            for attempt in range(runs):
                for name in ("smtp", "graph"):
                    seconds[name].append(submit(ports[name], batch))
                    print(f"  run {attempt + 1}/{runs} {name}: {seconds[name][-1]:.2f} s",
                          flush=True)
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=30)
            up.stop()
    nbytes = messages * size
    rows = []
    for name, label in (("smtp", "SMTP (XOAUTH2)"), ("graph", "Microsoft Graph")):
        values = seconds[name]
        per_s = sorted(messages / s for s in values)
        mbs = sorted(nbytes / s / 1e6 for s in values)
        rows.append(f"| {label}: {messages} × {size // 1000} kB through the proxy | "
                    f"{statistics.median(per_s):.1f} [{per_s[0]:.1f}–{per_s[-1]:.1f}] | "
                    f"{statistics.median(mbs):.1f} [{mbs[0]:.1f}–{mbs[-1]:.1f}] |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.graph", description=__doc__)
    parser.add_argument("--messages", type=int, default=50)
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--large", type=int, default=0,
                        help="also this many 25 MB messages (the upload-session path)")
    parser.add_argument("--update-results", action="store_true")
    args = parser.parse_args(argv)
    head = ["| path | messages/s | MB/s |", "|---|---|---|"]
    rows = run(args.messages, args.size, args.runs)
    if args.large:
        rows += run(args.large, 25_000_000, args.runs)
    table = "\n".join(head + rows)
    print(table)
    if args.update_results:
        text = RESULTS.read_text()
        block = f"{BEGIN}\n{table}\n{END}"
        if BEGIN in text:
            text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
        else:
            text = text.rstrip("\n") + "\n\n### Graph beside SMTP\n\n" + block + "\n"
        RESULTS.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
