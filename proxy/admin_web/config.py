"""``[admin]``: the admin web page's settings (off when the table is absent)::

    [admin]
    listen = "127.0.0.1:9465"
    password_file = "/var/lib/xoauth2-proxy/admin-password"   # default: in state_dir
    # Anything but loopback needs TLS and an allow list:
    cert_file = "/etc/xoauth2-proxy/admin.crt"
    key_file = "/etc/xoauth2-proxy/admin.key"
    allow_from = ["192.0.2.0/24"]
    session_minutes = 60
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from proxy.config.model import Address
from proxy.config.reader import Table, parse_address

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
PASSWORD_FILE = "admin-password"  # noqa: S105 - a file name


@dataclass(frozen=True)
class AdminSettings:
    listen: Address
    password_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None
    allow_from: tuple[Network, ...] = ()
    session_minutes: float = 60.0

    @property
    def tls(self) -> bool:
        return self.cert_file is not None

    def admits(self, host: str) -> bool:
        """May a browser at ``host`` reach the page? (loopback always may)"""
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if address.is_loopback:
            return True
        return any(address in network for network in self.allow_from)


def read_admin(top: Table, state_dir: Path) -> AdminSettings | None:
    t = top.table("admin")
    if t is None:
        return None
    listen = parse_address(t.text("listen", "127.0.0.1:9465"), t, "listen")
    cert, key = t.file_path("cert_file", must_exist=True), t.file_path("key_file", must_exist=True)
    if (cert is None) != (key is None):
        raise t.fail("cert_file", "cert_file and key_file go together")
    allow = t.networks("allow_from") if "allow_from" in t.data else ()
    if not listen.is_loopback and (cert is None or not allow):
        raise t.fail("listen", f"{listen} is not a loopback address: the admin page then needs "
                               "TLS (cert_file, key_file) and an allow_from list")
    settings = AdminSettings(
        listen=listen,
        password_file=t.file_path("password_file") or state_dir / PASSWORD_FILE,
        cert_file=cert, key_file=key, allow_from=allow,
        session_minutes=t.number("session_minutes", 60.0, 1, 7 * 24 * 60))
    t.done()
    return settings
