"""`xoauth2-proxy demo`: the README's first command."""

from __future__ import annotations

import imaplib
import re
import signal
import subprocess
import sys
import time
from pathlib import Path


def test_demo_check_round_trip(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "proxy", "demo", "--check", "--workdir",
                             str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "demo check OK" in result.stdout
    for step in ("SMTP: sent", "SMTP through Microsoft Graph: sent", "IMAP: LOGIN", "POP3: USER/PASS"):
        assert step in result.stdout
    assert (tmp_path / "config.toml").exists()


def test_demo_serves_until_interrupted(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "demo", "--workdir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        port = None
        while port is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, proc.stderr.read() if proc.stderr else "demo exited"
            match = re.search(r"IMAP\s+127\.0\.0\.1:(\d+)\s+user (\S+)\s+password (\S+)", line)
            if match:
                port, user, password = int(match.group(1)), match.group(2), match.group(3)
        assert port is not None
        client = imaplib.IMAP4("127.0.0.1", port, timeout=30)
        assert client.login(user, password)[0] == "OK"
        client.logout()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
