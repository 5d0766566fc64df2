"""One refresh per account across processes on one machine: the file store's refresh lock.

Two processes, each with its own token service on the same state directory, ask for the token
of an account whose access token has expired, at the same moment, while the token endpoint is
slow: one asks the identity platform, the other waits for the lock, re-reads the token file and
uses the token the first one saved.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from proxy.demo.process import DemoUpstream
from tests.proxyenv import PASSWORD, USER, authorise, make_config, write_config

ROOT = Path(__file__).resolve().parents[2]


def test_two_processes_make_one_token_request(tmp_path: Path,
                                              demo_upstream: DemoUpstream) -> None:
    demo_upstream.configure(access_token_lifetime=1)  # expired for MSAL at once
    authorise(make_config(tmp_path, demo_upstream), demo_upstream).close()
    path = write_config(tmp_path, demo_upstream)
    demo_upstream.configure(access_token_lifetime=3600, token_endpoint_delay=1.0)
    demo_upstream.reset_stats()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-m", "tests.auth.refresher", str(path), USER,
                               PASSWORD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=env, cwd=ROOT, text=True)
             for _ in range(2)]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = [proc.communicate(timeout=120) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    tokens = [out.strip() for out, _ in results]
    assert all(proc.returncode == 0 for proc in procs), [err for _, err in results]
    assert tokens[0] and tokens[0] == tokens[1]
    assert demo_upstream.stats()["token_requests"] == 1
    lock = next((tmp_path / "state").glob("*.refresh"))
    assert lock.stat().st_mode & 0o777 == 0o600
