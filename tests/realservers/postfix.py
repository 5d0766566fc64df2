"""A private Postfix instance: submission with STARTTLS and Dovecot SASL, LMTP to Dovecot.

``Postfix.start(dovecot)`` writes ``main.cf``/``master.cf`` into a fresh root-owned
folder under /tmp (Postfix refuses config and queue folders that are not root-owned,
and its ``postfix`` user must be able to traverse the parents, which rules out pytest's
0700 tmp_path), runs ``postfix -c <dir> start`` and waits for the submission greeting.

The only network service is ``submission`` on a free 127.0.0.1 port: TLS is mandatory
(``smtpd_tls_security_level = encrypt``), AUTH is offered only after STARTTLS and is
checked by Dovecot's auth socket (``smtpd_sasl_type = dovecot``), so XOAUTH2 tokens
are validated by the same introspection as IMAP/POP3 logins. Mail for the test domain
is a virtual mailbox domain delivered with ``virtual_transport = lmtp:unix:<dovecot>``,
so it can be read back over Dovecot IMAP. Nothing is chrooted; logs go to
``<root>/postfix.log`` via ``maillog_file`` and the ``postlog`` service.
"""

from __future__ import annotations

import contextlib
import os
import pty
import pwd
import select
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import (
    HOST,
    ServerInstance,
    TlsFiles,
    free_ports,
    instance_dir,
    launch_with_retries,
    log_tail,
    make_tls_files,
    pid_alive,
    read_greeting,
    record_process_group,
    remove_tree,
    wait_until,
)

if TYPE_CHECKING:
    from .dovecot import Dovecot

POSTFIX = "/usr/sbin/postfix"
POSTFIX_USER = "postfix"

_MAIN_CF = """\
# Generated for one test run by tests/realservers/postfix.py
compatibility_level = 3.6
config_directory = {config_dir}
queue_directory = {queue_dir}
data_directory = {data_dir}
mail_owner = {mail_owner}
maillog_file = {log_path}
maillog_file_prefixes = {root}
syslog_name = postfix-test
myhostname = mail.{domain}
mydomain = {domain}
myorigin = $myhostname
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
relayhost =
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_peername_lookup = no
# A bare LF ends a line, as before Postfix 3.9 (and under its "normalize" for $mynetworks,
# where the proxy connects from): what SMTP smuggling needs, so the tests can show it fails.
smtpd_forbid_bare_newline = no
biff = no
delay_warning_time = 0
notify_classes =
smtputf8_enable = no

# Delivery: the test domain goes to Dovecot over LMTP, everything else bounces.
virtual_mailbox_domains = {domain}
virtual_mailbox_maps =
virtual_transport = lmtp:unix:{lmtp_socket}
default_transport = error:outside the test domain

# TLS
smtpd_tls_chain_files = {key_file}, {cert_file}
smtpd_tls_security_level = may
smtpd_tls_auth_only = yes
smtpd_tls_loglevel = 1
smtpd_tls_received_header = no
smtp_tls_security_level = none

# SASL through Dovecot's auth socket
smtpd_sasl_type = dovecot
smtpd_sasl_path = {auth_socket}
smtpd_sasl_auth_enable = no
smtpd_sasl_security_options = noanonymous
smtpd_sasl_tls_security_options = noanonymous
smtpd_relay_restrictions = permit_sasl_authenticated, reject_unauth_destination
smtpd_recipient_restrictions =
"""

# Every daemon unchrooted (the sockets and queue live outside any chroot).
_MASTER_CF = """\
# Generated for one test run by tests/realservers/postfix.py
{host}:{submission} inet n - n - - smtpd
  -o syslog_name=postfix-test/submission
  -o smtpd_tls_security_level=encrypt
  -o smtpd_sasl_auth_enable=yes
  -o smtpd_tls_auth_only=yes
  -o smtpd_client_restrictions=permit_sasl_authenticated,reject
  -o smtpd_relay_restrictions=permit_sasl_authenticated,reject
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


@dataclass
class Postfix(ServerInstance):
    """One running Postfix instance; use ``Postfix.start(dovecot)`` and ``stop()``."""

    root: Path
    config_dir: Path
    queue_dir: Path
    log_path: Path
    tls: TlsFiles
    ports: dict[str, int]
    domain: str
    startup_seconds: float = 0.0
    host: str = HOST
    _running: bool = False

    @property
    def submission_port(self) -> int:
        return self.ports["submission"]

    @property
    def ca_file(self) -> Path:
        return self.tls.ca_file

    @classmethod
    def start(
        cls,
        dovecot: Dovecot,
        *,
        tls: TlsFiles | None = None,
        timeout: float = 30.0,
        attempts: int = 4,
    ) -> Postfix:
        """Configure Postfix against ``dovecot``'s auth and LMTP sockets and start it.

        ``tls`` defaults to Dovecot's certificate, so one CA covers both servers.
        Raises ``ServerStartError`` with the log tail when Postfix does not come up.
        """
        began = time.monotonic()
        with instance_dir("xoauth2-postfix-") as root:
            if tls is None:
                tls = dovecot.tls if dovecot.tls.key_file.exists() else None
            tls = tls or make_tls_files(root / "tls")
            config_dir = root / "etc"
            queue_dir = root / "queue"
            data_dir = root / "data"
            config_dir.mkdir(mode=0o755)
            queue_dir.mkdir(mode=0o755)
            data_dir.mkdir(mode=0o700)
            owner = pwd.getpwnam(POSTFIX_USER)
            os.chown(data_dir, owner.pw_uid, owner.pw_gid)
            log_path = root / "postfix.log"
            log_path.touch(mode=0o644)

            def make() -> Postfix:
                instance = cls(
                    root=root,
                    config_dir=config_dir,
                    queue_dir=queue_dir,
                    log_path=log_path,
                    tls=tls,
                    ports={"submission": free_ports(1)[0]},
                    domain=dovecot.domain,
                )
                instance._write_config(dovecot, data_dir)
                return instance

            return launch_with_retries(make, attempts=attempts, timeout=timeout, began=began)

    def _write_config(self, dovecot: Dovecot, data_dir: Path) -> None:
        (self.config_dir / "main.cf").write_text(
            _MAIN_CF.format(
                config_dir=self.config_dir,
                queue_dir=self.queue_dir,
                data_dir=data_dir,
                mail_owner=POSTFIX_USER,
                log_path=self.log_path,
                root=self.root,
                domain=self.domain,
                lmtp_socket=dovecot.lmtp_socket,
                auth_socket=dovecot.auth_socket,
                key_file=self.tls.key_file,
                cert_file=self.tls.cert_file,
            )
        )
        (self.config_dir / "master.cf").write_text(_MASTER_CF.format(host=self.host, **self.ports))
        # Postfix re-reads a table file whose mtime is not older than the moment it began
        # reading (it might still be being written), sleeping 300 ms each time: a main.cf
        # written this second costs every Postfix command ~1.8 s. Backdate the files.
        past = time.time() - 60
        for name in ("main.cf", "master.cf"):
            os.utime(self.config_dir / name, (past, past))

    def _postfix(self, *args: str, timeout: float = 60.0) -> tuple[int, str]:
        """Run ``postfix -c <dir> ARGS``; returns (status, output).

        Postfix writes its own errors to stderr only when stderr is a terminal (else to
        syslog, which tests do not have), so the command runs on a pseudo-terminal.
        """
        leader, follower = pty.openpty()
        try:
            process = subprocess.Popen(
                [POSTFIX, "-c", str(self.config_dir), *args],
                stdin=subprocess.DEVNULL,
                stdout=follower,
                stderr=follower,
                start_new_session=True,
            )
        finally:
            os.close(follower)
        output = bytearray()
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                readable, _, _ = select.select([leader], [], [], 0.1)
                if readable:
                    try:
                        chunk = os.read(leader, 4096)
                    except OSError:  # EIO: every writer has closed the terminal
                        break
                    if not chunk:
                        break
                    output += chunk
                elif process.poll() is not None:
                    break
            status = process.wait(max(0.1, deadline - time.monotonic()))
        finally:
            os.close(leader)
        return status, output.decode(errors="replace").replace("\r\n", "\n").strip()

    def _launch(self, timeout: float) -> str | None:
        """``postfix start`` (its master waits for its own initialisation), then poll."""
        try:
            status, output = self._postfix("start", timeout=timeout)
        except subprocess.TimeoutExpired:
            self._kill_master()
            return f"postfix start did not return within {timeout:.0f}s\n{self._tail()}"
        if status != 0:
            self._kill_master()
            return (
                f"postfix -c {self.config_dir} start failed with status {status}:\n"
                f"{output}\n{self._tail()}"
            )
        self._running = True
        master = self.master_pid()
        if master is not None:
            record_process_group(self.root, master)  # the master is a session leader
        port = self.submission_port
        if wait_until(
            lambda: read_greeting(port).startswith(b"220 "),
            timeout=timeout,
            alive=lambda: self.master_pid() is not None,
        ):
            return None
        self.stop(keep_files=True)
        return (
            f"Postfix submission on port {port} did not greet within {timeout:.0f}s\n{self._tail()}"
        )

    def _tail(self) -> str:
        return f"--- {self.log_path}:\n{log_tail(self.log_path)}"

    def master_pid(self) -> int | None:
        try:
            pid = int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if pid_alive(pid) else None

    def _kill_master(self) -> None:
        """Last resort: SIGKILL the master's process group (it is a session leader)."""
        pid = self.master_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)

    def stop(self, *, keep_files: bool = False, timeout: float = 10.0) -> None:
        """Stop the master and all its children, then remove the folder (idempotent)."""
        pid = self.master_pid()
        if pid is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._postfix("stop", timeout=timeout)
            if not wait_until(lambda: not pid_alive(pid), timeout=timeout):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
            # Children that outlived their master are still in its process group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        self._running = False
        if not keep_files:
            remove_tree(self.root)
