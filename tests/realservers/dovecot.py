"""A private Dovecot instance that validates XOAUTH2/OAUTHBEARER tokens by introspection.

``Dovecot.start(introspection_url=..., introspection_ca_file=...)`` writes a complete
configuration (nothing is read from /etc/dovecot) into a fresh folder under /tmp, runs
``dovecot -F -c <file>`` in its own process group and waits until every listener
answers. Listeners on 127.0.0.1: ``imap`` (STARTTLS), ``imaps``, ``pop3`` (STLS),
``pop3s``; LMTP and an auth socket for Postfix are unix sockets in the instance folder.

Passwords do not exist here: the only passdb is ``oauth2``, which POSTs the bearer
token to the RFC 7662 introspection endpoint and accepts it when the answer has
``"active": true`` and a ``username`` equal (case-insensitively) to the login name.
Users are virtual (static userdb, any name in any domain), their maildirs belong to
the system user ``mail`` and live under ``<root>/mail/<domain>/<local part>``.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import (
    HOST,
    ServerInstance,
    TlsFiles,
    free_ports,
    instance_dir,
    launch_with_retries,
    log_tail,
    make_tls_files,
    port_accepts,
    process_group_members,
    read_greeting,
    record_process_group,
    remove_tree,
    wait_until,
)

DOVECOT = "/usr/sbin/dovecot"
MAIL_USER = "mail"  # owns the virtual users' maildirs; an existing unprivileged user
LISTENERS = ("imap", "imaps", "pop3", "pop3s")
# Dovecot's greeting per listener once it is really serving (implicit TLS ones just accept).
_PLAIN_GREETING = {"imap": b"* OK", "pop3": b"+OK"}

_CONFIG = """\
# Generated for one test run by tests/realservers/dovecot.py
instance_name = {instance_name}
base_dir = {run_dir}
state_dir = {state_dir}
log_path = {log_path}
info_log_path = {log_path}
debug_log_path = {log_path}
auth_verbose = yes
# Debug lines of the auth process (passdb/introspection decisions), not the HTTP/TLS chatter.
log_debug = {log_debug}
verbose_ssl = no

protocols = imap pop3 lmtp
# No stats service clients: nothing here reads them, and a login process that starts
# while stats is still coming up waits 5 s for its handshake (slow start and stop).
stats_writer_socket_path =
listen = {host}
# Tests start and stop instances quickly; do not leave old clients behind.
shutdown_clients = yes
default_internal_user = dovecot
default_internal_group = dovecot
default_login_user = dovenull

ssl = required
ssl_cert = <{cert_file}
ssl_key = <{key_file}
ssl_dh = <{dh_file}
ssl_min_protocol = TLSv1.2

disable_plaintext_auth = yes
auth_mechanisms = xoauth2 oauthbearer
auth_username_format = %Lu
# No caching: a revoked token must fail at the very next login.
auth_cache_size = 0
login_greeting = Dovecot test instance ready.
# Failed logins are answered after this delay (Dovecot's default is 2 secs).
auth_failure_delay = {auth_failure_delay}

first_valid_uid = {mail_uid}
last_valid_uid = {mail_uid}
first_valid_gid = {mail_gid}
last_valid_gid = {mail_gid}
mail_location = maildir:~/Maildir
mail_uid = {mail_uid}
mail_gid = {mail_gid}

passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {oauth2_conf}
}}
userdb {{
  driver = static
  args = uid={mail_uid} gid={mail_gid} home={mail_root}/%Ld/%Ln allow_all_users=yes
}}

service imap-login {{
  inet_listener imap {{
    address = {host}
    port = {imap}
  }}
  inet_listener imaps {{
    address = {host}
    port = {imaps}
    ssl = yes
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    address = {host}
    port = {pop3}
  }}
  inet_listener pop3s {{
    address = {host}
    port = {pop3s}
    ssl = yes
  }}
}}
service lmtp {{
  unix_listener lmtp-postfix {{
    mode = 0600
    user = postfix
    group = postfix
  }}
}}
{anvil_penalty}service auth {{
  unix_listener auth-postfix {{
    mode = 0660
    user = postfix
    group = postfix
  }}
}}
protocol lmtp {{
  postmaster_address = postmaster@{domain}
}}
protocol pop3 {{
  pop3_uidl_format = %08Xu%08Xv
}}
"""

# RFC 7662 introspection with a POSTed token=...; no tokeninfo_url (an empty one makes
# Dovecot introspect directly) and no grant_url (only for password grant, not used).
_OAUTH2_CONF = """\
introspection_mode = post
introspection_url = {introspection_url}
username_attribute = username
active_attribute = active
active_value = true
tls_ca_cert_file = {ca_file}
timeout_msecs = 10000
# yes: also log the HTTP/TLS exchange with the introspection endpoint (very verbose)
debug = {debug}
"""


@dataclass
class Dovecot(ServerInstance):
    """One running Dovecot instance; use ``Dovecot.start(...)`` and ``stop()``."""

    root: Path
    config_file: Path
    log_path: Path
    tls: TlsFiles
    ports: dict[str, int]
    domain: str
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    startup_seconds: float = 0.0
    host: str = HOST

    # -- addresses other pieces need -------------------------------------------------
    @property
    def ca_file(self) -> Path:
        """CA that signed this instance's certificate (for the proxy's upstream ca_file)."""
        return self.tls.ca_file

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def auth_socket(self) -> Path:
        """Dovecot auth socket for Postfix (``smtpd_sasl_type = dovecot``)."""
        return self.run_dir / "auth-postfix"

    @property
    def lmtp_socket(self) -> Path:
        """LMTP unix socket for Postfix (``virtual_transport = lmtp:unix:...``)."""
        return self.run_dir / "lmtp-postfix"

    @property
    def mail_root(self) -> Path:
        return self.root / "mail"

    # -- life cycle ------------------------------------------------------------------
    @classmethod
    def start(
        cls,
        *,
        introspection_url: str,
        introspection_ca_file: str | os.PathLike[str],
        domain: str = "example.test",
        tls: TlsFiles | None = None,
        timeout: float = 20.0,
        attempts: int = 4,
        debug: bool = True,
        http_debug: bool = False,
        auth_penalty: bool = False,
        auth_failure_delay: str = "2 secs",
    ) -> Dovecot:
        """Write a config, start Dovecot and wait until all listeners serve.

        ``auth_penalty=False`` (default) turns off Dovecot's per-IP penalty (each failed
        login delays the next attempt from that IP by 2, 4, 8 ... 15 s): every test
        client, and the proxy, connects from 127.0.0.1, so the penalty would make tests
        slow and order-dependent. ``auth_failure_delay`` keeps Dovecot's real default.

        Retries with new ports when one was taken between choosing and binding it.
        Raises ``ServerStartError`` with the log tail when Dovecot does not come up.
        """
        began = time.monotonic()
        with instance_dir("xoauth2-dovecot-") as root:
            tls = tls or make_tls_files(root / "tls")
            mail_root = root / "mail"
            mail_root.mkdir(mode=0o700)
            os.chown(mail_root, pwd.getpwnam(MAIL_USER).pw_uid, grp.getgrnam(MAIL_USER).gr_gid)
            # The auth process runs as the unprivileged "dovecot" user and opens the CA
            # file lazily at the first login; the fake Entra's CA usually sits in pytest's
            # 0700 tmp_path, so give Dovecot its own readable copy.
            entra_ca = root / "introspection-ca.pem"
            shutil.copyfile(introspection_ca_file, entra_ca)
            entra_ca.chmod(0o644)
            oauth2_conf = root / "dovecot-oauth2.conf.ext"
            oauth2_conf.write_text(
                _OAUTH2_CONF.format(
                    introspection_url=introspection_url,
                    ca_file=entra_ca,
                    debug="yes" if http_debug else "no",
                )
            )
            options = {
                "debug": debug,
                "auth_penalty": auth_penalty,
                "auth_failure_delay": auth_failure_delay,
            }
            return launch_with_retries(
                lambda: cls._write_config(root, tls, oauth2_conf, domain, options),
                attempts=attempts,
                timeout=timeout,
                began=began,
            )

    @classmethod
    def _write_config(
        cls,
        root: Path,
        tls: TlsFiles,
        oauth2_conf: Path,
        domain: str,
        options: dict[str, object],
    ) -> Dovecot:
        ports = dict(zip(LISTENERS, free_ports(len(LISTENERS)), strict=True))
        mail = pwd.getpwnam(MAIL_USER)
        config_file = root / "dovecot.conf"
        log_path = root / "dovecot.log"
        config_file.write_text(
            _CONFIG.format(
                instance_name=f"xoauth2-test-{root.name}",
                run_dir=root / "run",
                state_dir=root / "state",
                log_path=log_path,
                log_debug=(
                    "category=auth AND NOT category=http-client AND NOT category=ssl"
                    if options["debug"]
                    else ""
                ),
                auth_failure_delay=options["auth_failure_delay"],
                # Without its anvil socket the auth process silently skips the penalty.
                anvil_penalty=(
                    ""
                    if options["auth_penalty"]
                    else "service anvil {\n  unix_listener anvil-auth-penalty {\n"
                    "    mode = 0\n  }\n}\n"
                ),
                host=HOST,
                cert_file=tls.cert_file,
                key_file=tls.key_file,
                dh_file="/usr/share/dovecot/dh.pem",
                mail_uid=mail.pw_uid,
                mail_gid=mail.pw_gid,
                oauth2_conf=oauth2_conf,
                mail_root=root / "mail",
                domain=domain,
                **ports,
            )
        )
        return cls(
            root=root,
            config_file=config_file,
            log_path=log_path,
            tls=tls,
            ports=ports,
            domain=domain,
        )

    def _launch(self, timeout: float) -> str | None:
        """Start the master in the foreground; None when ready, else an error text."""
        output = self.root / "dovecot.stdout"
        with output.open("ab") as out:
            self.process = subprocess.Popen(
                [DOVECOT, "-F", "-c", str(self.config_file)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        process = self.process
        record_process_group(self.root, process.pid)

        def ready() -> bool:
            for name, prefix in _PLAIN_GREETING.items():
                if not read_greeting(self.ports[name]).startswith(prefix):
                    return False
            return (
                all(port_accepts(self.ports[n]) for n in ("imaps", "pop3s"))
                and self.auth_socket.exists()
                and self.lmtp_socket.exists()
            )

        if wait_until(ready, timeout=timeout, alive=lambda: process.poll() is None):
            return None
        self._terminate()
        return (
            f"Dovecot did not start within {timeout:.0f}s "
            f"(exit status {process.returncode}; config {self.config_file}).\n"
            f"--- {output.name}:\n{log_tail(output, 15)}\n"
            f"--- {self.log_path.name}:\n{log_tail(self.log_path)}"
        )

    def _terminate(self, timeout: float = 10.0) -> None:
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        # The master shares its process group with every child it forked; reap stragglers.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(5)
        self.process = None

    def stop(self, *, keep_files: bool = False) -> None:
        """Stop every process of this instance and remove its folder (idempotent)."""
        self._terminate()
        if not keep_files:
            remove_tree(self.root)

    def kill_auth(self) -> int:
        """SIGKILL the auth process (``…/auth``; the master starts a new one on demand):
        whoever waits on the auth socket, such as Postfix's SASL client, loses its connection.
        Returns the pid killed."""
        assert self.process is not None
        titles = []
        for pid in process_group_members(self.process.pid):
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
            except OSError:
                continue
            titles.append(title)
            if title.strip().endswith(b"/auth"):  # "dovecot-<instance>/auth"
                os.kill(pid, signal.SIGKILL)
                return pid
        raise AssertionError(f"no dovecot/auth process among {titles}")

    # -- inspection ------------------------------------------------------------------
    def maildir(self, user: str) -> Path:
        local, _, domain = user.lower().partition("@")
        return self.mail_root / (domain or "") / local / "Maildir"

    def mailbox_messages(self, user: str) -> list[bytes]:
        """Raw messages in ``user``'s INBOX, read straight from the maildir, oldest first."""
        maildir = self.maildir(user)
        files = [p for sub in ("new", "cur") for p in (maildir / sub).glob("*") if p.is_file()]
        files.sort(key=lambda p: (p.stat().st_mtime, p.name))
        return [p.read_bytes() for p in files]

    def first_message(self, user: str, timeout: float = 30.0) -> bytes:
        """The oldest message in ``user``'s INBOX, waiting for Postfix's asynchronous delivery."""
        if not wait_until(lambda: bool(self.mailbox_messages(user)), timeout=timeout, interval=0.1):
            raise AssertionError("the message never reached Dovecot")
        return self.mailbox_messages(user)[0]
