"""Start and drive the demo upstream (fake Microsoft 365) from another process.

No Twisted here: the proxy and the tests use this module. :meth:`DemoUpstream.start` runs
``python -m proxy.demo.upstream`` as a child, waits (with a deadline) for its one-line JSON
ready record, and then talks to its ``/_test/`` admin endpoints over HTTPS verified with
the upstream's own CA.

MSAL note: when an ``http_client`` is injected, MSAL ignores its own ``timeout`` argument;
:func:`http_session` therefore gives every request a default timeout.
"""

from __future__ import annotations

import base64
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests

import proxy
from proxy.auth import requests_session

PROJECT_ROOT = Path(proxy.__file__).resolve().parent.parent


class DemoUpstreamError(RuntimeError):
    """The upstream did not start, died, or refused an admin call."""


def http_session(ca_file: str | Path, timeout: float | None = 10.0) -> requests.Session:
    """A ``requests.Session`` that trusts only ``ca_file`` and ignores proxy/CA env vars.

    ``trust_env=False`` matters: ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE`` would otherwise
    override ``verify``. Usable as MSAL's ``http_client``; ``timeout`` applies to every
    request that does not pass one (MSAL passes none).
    """
    return requests_session.session(str(ca_file), timeout)


class DemoUpstream:
    """A running demo upstream process and a client for its admin endpoints."""

    def __init__(self, proc: subprocess.Popen, record: dict, workdir: Path, log_file: Path) -> None:
        self.proc = proc
        self.workdir = workdir
        self.log_file = log_file
        self.record = record
        self.pid: int = record["pid"]
        self.host: str = record["host"]
        self.entra_url: str = record["entra_url"]
        self.authority: str = record["authority"]
        self.graph_url: str = record["graph_url"]
        self.ca_file: str = record["ca_file"]
        self.ports: dict[str, int] = dict(record["ports"])
        self.session = http_session(self.ca_file, timeout=30)

    # -- life cycle ------------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        workdir: Path,
        *,
        knobs: dict | None = None,
        host: str = "127.0.0.1",
        timeout: float = 20,
    ) -> DemoUpstream:
        """Start the upstream in ``workdir``; return once it is listening."""
        workdir = Path(workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        log_file = workdir / "upstream.log"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p
        )
        env["PYTHONUNBUFFERED"] = "1"
        command = [
            sys.executable,
            "-m",
            "proxy.demo.upstream",
            "--workdir",
            str(workdir),
            "--host",
            host,
            "--knobs",
            json.dumps(knobs or {}),
            "--exit-on-stdin-eof",
        ]
        with open(log_file, "wb") as log:
            proc = subprocess.Popen(  # noqa: S603
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=env,
                cwd=str(workdir),
                close_fds=True,
            )
        try:
            record = cls._wait_ready(proc, log_file, timeout)
        except BaseException:
            cls._terminate(proc, grace=2)
            raise
        return cls(proc, record, workdir, log_file)

    @staticmethod
    def _wait_ready(proc: subprocess.Popen, log_file: Path, timeout: float) -> dict:
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        buffer = b""
        fd = proc.stdout.fileno()
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while b"\n" not in buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DemoUpstreamError(
                        f"demo upstream not ready after {timeout}s; its stderr:\n"
                        + log_file.read_text(errors="replace")
                    )
                if not selector.select(remaining):
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    code = proc.wait(timeout=5)
                    raise DemoUpstreamError(
                        f"demo upstream exited (status {code}) before it was ready; its stderr:\n"
                        + log_file.read_text(errors="replace")
                    )
                buffer += chunk
        line = buffer.split(b"\n", 1)[0]
        try:
            record = json.loads(line)
        except ValueError:
            raise DemoUpstreamError(f"demo upstream printed {line!r}, not a ready record") from None
        if not record.get("ready"):
            raise DemoUpstreamError(f"demo upstream is not ready: {record!r}")
        return record

    @staticmethod
    def _terminate(proc: subprocess.Popen, grace: float) -> int:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()
        return proc.returncode

    def stop(self, grace: float = 10) -> int:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL; return the exit status."""
        self.session.close()
        return self._terminate(self.proc, grace)

    def kill(self) -> None:
        """SIGKILL at once (an outage: listeners vanish, connections reset)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self.session.close()

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def __enter__(self) -> DemoUpstream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<DemoUpstream pid={self.pid} {self.entra_url} ports={self.ports}>"

    # -- admin calls -----------------------------------------------------------------------

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.session.request(method, f"{self.entra_url}/_test/{path}", **kwargs)
        except requests.RequestException as exc:
            raise DemoUpstreamError(f"{method} /_test/{path}: {exc}") from exc
        if response.status_code >= 400:
            raise DemoUpstreamError(
                f"{method} /_test/{path}: HTTP {response.status_code} {response.text}"
            )
        return response.json()

    def config(self) -> dict:
        return self._call("GET", "config")

    def configure(self, **knobs: Any) -> dict:
        """Change knobs at once (all or nothing); return all knobs."""
        return self._call("POST", "config", json=knobs)

    def approve(self, user_code: str, username: str) -> None:
        self._call("POST", "approve", json={"user_code": user_code, "username": username})

    def expire_device_code(self, user_code: str) -> None:
        self._call("POST", "expire_device_code", json={"user_code": user_code})

    def revoke(self, username: str, access_tokens: bool = False,
               refresh_tokens: bool = True) -> int:
        """Revoke the user's refresh tokens and/or access tokens; return how many."""
        body = {"username": username, "access_tokens": access_tokens,
                "refresh_tokens": refresh_tokens}
        return self._call("POST", "revoke", json=body)["revoked"]

    def issue_token(
        self, username: str | None, scopes: list[str] | tuple[str, ...], lifetime: int | None = None
    ) -> str:
        """Mint an access token directly (``username=None``: app-only)."""
        body: dict[str, Any] = {"username": username, "scopes": list(scopes)}
        if lifetime is not None:
            body["lifetime"] = lifetime
        return self._call("POST", "token", json=body)["access_token"]

    def stats(self) -> dict:
        return self._call("GET", "stats")

    def reset_stats(self) -> None:
        self._call("POST", "stats/reset")

    def graph_stats(self) -> dict[str, int]:
        """Fake Graph requests per route (``sendMail``, ``upload chunk``, ``error CODE`` …)."""
        response = self.session.get(f"{self.graph_url}/_test/stats")
        response.raise_for_status()
        return dict(response.json())

    def mailbox(self, user: str) -> list[bytes]:
        return [base64.b64decode(m) for m in self._call("GET", "mailbox", params={"user": user})]

    def deliver(self, user: str, message: bytes) -> None:
        self._call(
            "POST",
            "deliver",
            params={"user": user},
            data=message,
            headers={"content-type": "message/rfc822"},
        )
