"""The peer: email-oauth2-proxy (PyPI ``emailproxy``) against the same fake Microsoft 365.

It is installed into a venv of its own (``bench/.venv-peer/``, gitignored) so its
dependencies never mix with ours, and run headless (``--no-gui``) with its own config file:

- one ``[IMAP-port]``/``[POP-port]``/``[SMTP-port]`` section per protocol pointing at the fake
  upstream's implicit-TLS IMAP/POP ports and its STARTTLS submission port
  (``server_starttls = True``), listening on loopback;
- one section per account with the fake Entra ID's ``permission_url`` and ``token_url``
  (the peer has no authority/tenant discovery: it takes the two endpoints verbatim) and the
  same public client id and scopes xoauth2-proxy uses;
- the fake Entra's CA is trusted through ``SSL_CERT_FILE`` in the peer's environment only
  (it uses ``ssl.create_default_context()`` for the upstream and ``urllib`` for the token
  endpoint, both of which honour it).

Pre-authorisation: the peer's interactive flows need a person (or its GUI). Instead the bench
runs the device-code flow itself with MSAL against the fake Entra (approved at once by the
``auto_approve_user`` knob) and seeds the resulting access and refresh tokens into the
peer's config file, encrypted by the peer's *own* ``Cryptographer`` (``peer_seed.py`` runs in
the peer's venv). That is exactly the state the peer leaves after a first interactive login.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import msal

from bench import harness
from bench.env import ACCOUNTS, CLIENT_ID, SCOPES, World
from proxy.demo.process import http_session

BENCH_DIR = Path(__file__).resolve().parent
VENV = BENCH_DIR / ".venv-peer"
PACKAGE = "emailproxy"
PASSWORD = "peer-local-password"  # any password: the peer encrypts its tokens with it


def python() -> Path:
    return VENV / "bin" / "python"


def ensure_installed(log: Path) -> tuple[str | None, str | None]:
    """(version, None) once the peer is installed, else (None, why not)."""
    probe = [str(python()), "-c", "import importlib.metadata as m; print(m.version('emailproxy'))"]
    if python().exists():
        done = subprocess.run(probe, capture_output=True, text=True, timeout=60)
        if done.returncode == 0:
            return done.stdout.strip(), None
    with open(log, "ab") as out:
        steps = [[sys.executable, "-m", "venv", "--clear", str(VENV)],
                 [str(python()), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                  PACKAGE]]
        for step in steps:
            # a venv made from inside a venv would point at it: use the base interpreter
            if step[0] == sys.executable:
                base = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
                step[0] = str(base if base.exists() else sys.executable)
            done = subprocess.run(step, stdout=out, stderr=out, timeout=600)
            if done.returncode != 0:
                return None, f"could not install {PACKAGE} into {VENV} (see {log})"
    done = subprocess.run(probe, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        return None, f"{PACKAGE} installed but not importable: {done.stderr.strip()[-200:]}"
    return done.stdout.strip(), None


def _tokens(world: World, user: str) -> dict:
    """Access + refresh token for ``user`` through MSAL's device-code flow (auto-approved)."""
    up = world.upstream
    up.configure(auto_approve_user=user)
    try:
        app = msal.PublicClientApplication(CLIENT_ID, authority=up.authority,
                                           http_client=http_session(up.ca_file),
                                           instance_discovery=False)
        scopes = [s for proto in ("imap", "pop", "smtp") for s in SCOPES[proto]]
        flow = app.initiate_device_flow(scopes=scopes)
        result = app.acquire_token_by_device_flow(flow)
    finally:
        up.configure(auto_approve_user=None)
    if "access_token" not in result or "refresh_token" not in result:
        raise RuntimeError(f"device flow for the peer failed: {result.get('error_description')}")
    return result


@dataclass
class Peer:
    """A running email-oauth2-proxy."""

    popen: subprocess.Popen[bytes]
    ports: dict[str, int]
    config: Path
    log: Path
    version: str

    @property
    def pid(self) -> int:
        return self.popen.pid

    def rss(self) -> int:
        return harness.rss_bytes(self.pid)

    def cpu(self) -> float:
        return harness.cpu_seconds(self.pid)

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/task"))

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)


def write_config(world: World, workdir: Path, ports: dict[str, int]) -> Path:
    up = world.upstream
    lines = ["[emailproxy]", "delete_account_token_on_password_error = False", ""]
    upstream_ports = {"IMAP": up.ports["imaps"], "POP": up.ports["pop3s"],
                      "SMTP": up.ports["submission"]}
    for kind, port in (("IMAP", ports["imap"]), ("POP", ports["pop"]), ("SMTP", ports["smtp"])):
        lines += [f"[{kind}-{port}]", "server_address = 127.0.0.1",
                  f"server_port = {upstream_ports[kind]}", "local_address = 127.0.0.1"]
        if kind == "SMTP":
            lines.append("server_starttls = True")
        lines.append("")
    scope = " ".join([s for proto in ("imap", "pop", "smtp") for s in SCOPES[proto]]
                     + ["offline_access"])
    for user in ACCOUNTS:
        lines += [f"[{user}]",
                  f"permission_url = {up.authority}/oauth2/v2.0/devicecode",
                  f"token_url = {up.authority}/oauth2/v2.0/token",
                  f"oauth2_scope = {scope}",
                  "oauth2_flow = device",
                  f"client_id = {CLIENT_ID}", ""]
    path = workdir / "emailproxy.config"
    path.write_text("\n".join(lines))
    return path


def seed(world: World, config: Path, users: tuple[str, ...] = ACCOUNTS,
         expired: tuple[str, ...] = ()) -> None:
    """Write each user's tokens into the peer's config with the peer's own encryption.

    ``expired`` users get an access-token expiry in the past (the refresh storm)."""
    entries = []
    for user in users:
        result = _tokens(world, user)
        expiry = int(time.time()) + int(result.get("expires_in", 3600))
        entries.append({"user": user, "password": PASSWORD, "access_token": result["access_token"],
                        "refresh_token": result["refresh_token"],
                        "expiry": int(time.time()) - 10 if user in expired else expiry})
    done = subprocess.run([str(python()), str(BENCH_DIR / "peer_seed.py"), str(config)],
                          input=json.dumps(entries), capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"seeding the peer's tokens failed: {done.stderr[-2000:]}")


def launch(world: World, config: Path, log: Path) -> subprocess.Popen[bytes]:
    """exec the peer on ``config`` (headless), trusting the demo CA in its environment only."""
    env = dict(os.environ)
    for name in ("PYTHONPATH", "VIRTUAL_ENV"):
        env.pop(name, None)
    env["SSL_CERT_FILE"] = world.upstream.ca_file  # the peer process only
    env.pop("SSL_CERT_DIR", None)
    with open(config.parent / "stderr.log", "ab") as err:
        return subprocess.Popen([str(python()), "-m", "emailproxy", "--no-gui", "--config-file",
                                 str(config), "--log-file", str(log)],
                                env=env, cwd=str(config.parent), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)


def _running(world: World, peer: Peer | None, config: Path, log: Path, ports: dict[str, int],
             version: str) -> Peer:
    popen = launch(world, config, log)
    new = Peer(popen, ports, config, log, version)
    try:
        for port in ports.values():
            harness.wait_port(port, timeout=30)
    except OSError:
        new.stop()
        tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
        raise RuntimeError("email-oauth2-proxy did not open its listeners: "
                           + (config.parent / "stderr.log").read_text(errors="replace")[-1000:]
                           + tail) from None
    return new


def start(world: World, workdir: Path, version: str) -> Peer:
    workdir.mkdir(parents=True, exist_ok=True)
    ports = {"imap": harness.free_port(), "pop": harness.free_port(), "smtp": harness.free_port()}
    config = write_config(world, workdir, ports)
    seed(world, config)
    return _running(world, None, config, workdir / "emailproxy.log", ports, version)


def restart(peer: Peer, world: World, *, expired: str | None = None) -> Peer:
    """Stop the peer; with ``expired``, mark that user's access token expired in its config
    (fresh tokens, expiry in the past); start it again."""
    peer.stop()
    if expired is not None:
        seed(world, peer.config, users=(expired,), expired=(expired,))
    try:
        return _running(world, peer, peer.config, peer.log, peer.ports, peer.version)
    except RuntimeError:
        # its ports were picked while free; on a busy machine an ephemeral connection may have
        # taken one since. Start afresh on new ports (new config, tokens seeded again).
        fresh = start(world, peer.config.parent, peer.version)
        if expired is not None:
            fresh.stop()
            seed(world, fresh.config, users=(expired,), expired=(expired,))
            return _running(world, fresh, fresh.config, fresh.log, fresh.ports, fresh.version)
        return fresh
