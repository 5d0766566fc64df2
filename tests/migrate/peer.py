"""The real email-oauth2-proxy (PyPI ``emailproxy``) in a virtualenv of its own, run against the
embedded fake Microsoft 365 and authorised through its own code.

Its no-GUI ``--local-server-auth`` mode logs the sign-in URL and starts a one-shot web server on
the account's ``redirect_uri``; a small real HTTP client plays the browser (the fake Entra signs
in the ``login_hint`` user at once and redirects to that server with the code), and
email-oauth2-proxy redeems the code and stores the tokens in its config, encrypted with the
password the IMAP client logged in with.
"""

from __future__ import annotations

import imaplib
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from proxy.demo.process import DemoUpstream

PACKAGE = "emailproxy"
CLIENT_ID = "6d2f8a41-3b7e-4c59-9e10-2a4b6c8d0e1f"
SCOPE = ("https://outlook.office.com/IMAP.AccessAsUser.All "
         "https://outlook.office.com/POP.AccessAsUser.All "
         "https://outlook.office.com/SMTP.Send offline_access")
# What pip prints when it cannot reach a package index (and only then is the test skipped).
UNREACHABLE = ("NewConnectionError", "Failed to establish a new connection",
               "Temporary failure in name resolution", "Network is unreachable",
               "ConnectTimeoutError", "No route to host", "ProxyError", "Name or service not known")


def install(venv: Path) -> tuple[Path | None, str]:
    """(the venv's python, "") once emailproxy is installed; (None, why) if no package index
    is reachable. Any other failure raises."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300,
                   capture_output=True)
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PIP_CONSTRAINT", "VIRTUAL_ENV")}
    done = subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check",
                           "--retries", "2", "--timeout", "30", PACKAGE],
                          capture_output=True, text=True, timeout=900, env=env)
    output = done.stdout + done.stderr
    if done.returncode != 0:
        if any(marker in output for marker in UNREACHABLE):
            return None, f"pip cannot reach a package index to install {PACKAGE}"
        raise AssertionError(f"pip install {PACKAGE} failed:\n{output[-4000:]}")
    return python, ""


def free_port() -> int:
    """A port free now (email-oauth2-proxy takes its ports from section names, not port 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def config_text(upstream: DemoUpstream, ports: dict[str, int], accounts: dict[str, int],
                gmail: str) -> str:
    """email-oauth2-proxy's INI config: a server section per protocol on ``ports``, a
    Microsoft 365 section per account (``accounts``: name -> its redirect port) and a
    Gmail-style section."""
    authority, up = upstream.authority, upstream.ports
    lines = ["[emailproxy]", "delete_account_token_on_password_error = False", "",
             f"[IMAP-{ports['imap']}]", "server_address = 127.0.0.1",
             f"server_port = {up['imaps']}", "local_address = 127.0.0.1", "",
             f"[POP-{ports['pop']}]", "server_address = 127.0.0.1",
             f"server_port = {up['pop3s']}", "local_address = 127.0.0.1", "",
             f"[SMTP-{ports['smtp']}]", "server_address = 127.0.0.1",
             f"server_port = {up['submission']}", "server_starttls = True",
             "local_address = 127.0.0.1", ""]
    for name, redirect_port in accounts.items():
        lines += [f"[{name}]", f"permission_url = {authority}/oauth2/v2.0/authorize",
                  f"token_url = {authority}/oauth2/v2.0/token", f"oauth2_scope = {SCOPE}",
                  f"redirect_uri = http://127.0.0.1:{redirect_port}/", f"client_id = {CLIENT_ID}",
                  "use_pkce = True", ""]
    lines += [f"[{gmail}]", "permission_url = https://accounts.google.com/o/oauth2/auth",
              "token_url = https://oauth2.googleapis.com/token",
              "oauth2_scope = https://mail.google.com/", "redirect_uri = http://localhost",
              "client_id = 1234567890-abcdefg.apps.googleusercontent.com",
              "client_secret = not-a-real-secret", ""]
    return "\n".join(lines)


class Peer:
    """A running email-oauth2-proxy (no GUI, local-server auth), trusting the demo CA only
    through its environment, as a user would point it at a private CA."""

    def __init__(self, python: Path, config: Path, ca_file: str,
                 cache_store: Path | None = None) -> None:
        self.log = config.parent / "emailproxy.log"
        self.ca_file = ca_file
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SSL_CERT_DIR")}
        env.update(SSL_CERT_FILE=ca_file, REQUESTS_CA_BUNDLE=ca_file)
        with open(config.parent / "emailproxy.stderr", "wb") as err:
            self.proc = subprocess.Popen(
                [str(python), "-m", "emailproxy", "--no-gui", "--local-server-auth",
                 "--config-file", str(config), "--log-file", str(self.log),
                 *(["--cache-store", str(cache_store)] if cache_store else [])],
                env=env, cwd=str(config.parent), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_listening(self, ports: list[int], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        for port in ports:
            while True:
                if self.proc.poll() is not None:
                    raise AssertionError(f"email-oauth2-proxy exited ({self.proc.returncode}):"
                                         f"\n{self.text()[-3000:]}")
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise AssertionError(f"email-oauth2-proxy not listening on {port}:\n"
                                             f"{self.text()[-3000:]}") from None
                    time.sleep(0.05)

    def sign_in_url(self, user: str, outcome: dict[str, object], timeout: float = 60) -> str:
        pattern = re.compile(rf"authenticate account {re.escape(user)}: (\S+)")
        deadline = time.monotonic() + timeout
        while True:
            match = pattern.search(self.text())
            if match:
                return match.group(1)
            if "error" in outcome:
                raise AssertionError(f"the IMAP login for {user} failed: {outcome['error']!r}")
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"email-oauth2-proxy asked no sign-in for {user}:\n"
                                     f"{self.text()[-3000:]}")
            time.sleep(0.05)

    def authorise(self, user: str, password: str, imap_port: int) -> None:
        """A first IMAP login through email-oauth2-proxy, and the sign-in it asks for."""
        outcome: dict[str, object] = {}

        def client() -> None:
            try:
                imap = imaplib.IMAP4("127.0.0.1", imap_port, timeout=120)
                outcome["login"] = imap.login(user, password)[0]
                imap.logout()
            except Exception as exc:  # noqa: BLE001 - reported below, in the test's thread
                outcome["error"] = exc

        thread = threading.Thread(target=client, name=f"imap-login-{user}")
        thread.start()
        try:
            url = self.sign_in_url(user, outcome)
            browser = urllib.request.build_opener(urllib.request.HTTPSHandler(
                context=ssl.create_default_context(cafile=self.ca_file)))
            with browser.open(url, timeout=60) as page:  # follows the redirect to the peer
                assert page.status == 200, page.status
        finally:
            thread.join(timeout=150)
        assert outcome.get("login") == "OK", (outcome, self.text()[-3000:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
