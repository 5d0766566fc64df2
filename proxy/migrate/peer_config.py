"""email-oauth2-proxy's config, read: server sections, account sections and stored tokens.

email-oauth2-proxy (PyPI ``emailproxy``) keeps one INI file. ``[IMAP-1993]``, ``[POP-1995]`` and
``[SMTP-1587]`` sections are local listeners (the local port is in the name) with the server
they relay to; a section whose name holds ``@`` is an account (``[alice@contoso.com]``), or with
``allow_catch_all_accounts`` a catch-all (``[@contoso.com]``, ``[@]``) whose settings accounts
without a section of their own inherit. Its tokens are kept in the account's section, or with
``--cache-store FILE`` in a second INI file holding only the cached options.

Stored tokens are Fernet tokens (AES-128-CBC + HMAC-SHA256) whose key is PBKDF2-HMAC-SHA256 of
the password the mail client logs in with, with the account's ``token_salt`` (base64, 16 bytes)
and ``token_iterations`` (100,000 when absent: files from before 2023). Like email-oauth2-proxy
itself we try the stored count first, then its current and legacy counts, so a token written
before a rotation still opens. Nothing here imports email-oauth2-proxy.
"""

from __future__ import annotations

import base64
import binascii
import configparser
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from proxy.config import Protocol
from proxy.secret import Secret

GLOBAL_SECTION = "emailproxy"
SERVER_SECTION = re.compile(r"^(?P<type>IMAP|POP|SMTP)-(?P<port>\d+)$")
# The options email-oauth2-proxy writes to its cache store (everything else is config).
CACHED_OPTIONS = ("access_token", "access_token_expiry", "refresh_token", "token_salt",
                  "token_iterations", "client_secret_encrypted", "last_activity")
CURRENT_ITERATIONS = 1_200_000
LEGACY_ITERATIONS = 100_000
MAX_ITERATIONS = 100_000_000  # a hand-edited count beyond this is refused, not run for hours


class PeerConfigError(Exception):
    """The file cannot be read as an email-oauth2-proxy config (one line, says what to do)."""


class WrongPeerPassword(Exception):
    """The password does not decrypt the account's stored token."""


@dataclass(frozen=True)
class PeerServer:
    section: str
    protocol: Protocol
    local_port: int
    local_address: str
    server_address: str | None
    server_port: int | None
    server_starttls: bool
    local_starttls: bool
    local_certificate_path: Path | None
    local_key_path: Path | None


@dataclass(frozen=True)
class PeerAccount:
    """An account section, with catch-all settings filled in where the account has none."""

    name: str
    options: Mapping[str, str] = field(repr=False)

    def get(self, option: str) -> str | None:
        value = self.options.get(option)
        return value if value is not None and value.strip() != "" else None

    def flag(self, option: str) -> bool:
        value = (self.get(option) or "").strip().lower()
        return value in ("1", "yes", "true", "on")

    @property
    def has_tokens(self) -> bool:
        return self.get("refresh_token") is not None

    def decrypt(self, option: str, password: Secret) -> str:
        """The stored value of ``option`` in clear; ``WrongPeerPassword`` if the password does
        not open it, ``PeerConfigError`` if the stored salt or count is unusable."""
        value = self.get(option)
        if value is None:
            raise PeerConfigError(f"[{self.name}] has no {option}")
        salt_text = self.get("token_salt")
        if salt_text is None:
            raise PeerConfigError(f"[{self.name}] has {option} but no token_salt")
        try:
            salt = base64.b64decode(salt_text.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeError):
            raise PeerConfigError(f"[{self.name}] token_salt is not base64") from None
        counts = [self._iterations(), CURRENT_ITERATIONS, LEGACY_ITERATIONS]
        for iterations in dict.fromkeys(counts):
            key = PBKDF2HMAC(algorithm=hashes.SHA256(), length=32, salt=salt,
                             iterations=iterations).derive(password.reveal().encode("utf-8"))
            try:
                plain = Fernet(base64.urlsafe_b64encode(key)).decrypt(value.encode("ascii"))
            except (InvalidToken, UnicodeError):
                continue
            return plain.decode("utf-8")
        raise WrongPeerPassword(self.name)

    def _iterations(self) -> int:
        text = self.get("token_iterations")
        if text is None:
            return LEGACY_ITERATIONS
        try:
            count = int(text)
        except ValueError:
            raise PeerConfigError(f"[{self.name}] token_iterations is not a number") from None
        if not 1 <= count <= MAX_ITERATIONS:
            raise PeerConfigError(f"[{self.name}] token_iterations {count} is out of range")
        return count


@dataclass(frozen=True)
class PeerConfig:
    path: Path
    servers: tuple[PeerServer, ...]
    accounts: tuple[PeerAccount, ...]
    catch_all: tuple[str, ...]  # sections such as "@contoso.com" and "@"
    settings: Mapping[str, str]  # the [emailproxy] section


def _parser() -> configparser.ConfigParser:
    return configparser.ConfigParser(interpolation=None)


def _read(parser: configparser.ConfigParser, path: Path, what: str) -> None:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PeerConfigError(f"{what} {path}: no such file") from None
    except (OSError, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise PeerConfigError(f"{what} {path}: cannot read: {reason}") from None
    try:
        parser.read_string(text, source=str(path))
    except configparser.Error as exc:
        first = str(exc).splitlines()[0]
        raise PeerConfigError(f"{what} {path}: not an INI file ({first})") from None


def _flag(parser: configparser.ConfigParser, section: str, option: str) -> bool:
    try:
        return parser.getboolean(section, option, fallback=False)
    except ValueError:
        raise PeerConfigError(f"[{section}] {option} must be True or False") from None


def _server(parser: configparser.ConfigParser, section: str, base: Path) -> PeerServer:
    match = SERVER_SECTION.match(section)
    assert match is not None
    kind = match.group("type")
    get = parser[section].get

    def number(option: str) -> int | None:
        text = (get(option) or "").strip()
        if not text:
            return None
        if not text.isdigit() or not 1 <= int(text) <= 65535:
            raise PeerConfigError(f"[{section}] {option} = {text!r} is not a port number")
        return int(text)

    def path(option: str) -> Path | None:
        text = (get(option) or "").strip()
        return (base / text).resolve() if text else None

    local_port = int(match.group("port"))
    if not 1 <= local_port <= 65535:
        raise PeerConfigError(f"[{section}]: {local_port} is not a port number")
    starttls = kind == "SMTP" and (_flag(parser, section, "server_starttls")
                                   or _flag(parser, section, "starttls"))
    return PeerServer(
        section=section,
        protocol={"IMAP": "imap", "POP": "pop", "SMTP": "smtp"}[kind],  # type: ignore[arg-type]
        local_port=local_port,
        local_address=(get("local_address") or "::").strip(),
        server_address=(get("server_address") or "").strip() or None,
        server_port=number("server_port"),
        server_starttls=starttls,
        local_starttls=kind == "SMTP" and _flag(parser, section, "local_starttls"),
        local_certificate_path=path("local_certificate_path"),
        local_key_path=path("local_key_path"),
    )


def load(path: Path, cache_store: Path | None = None) -> PeerConfig:
    """Read the config (and the separate cache store, if it has one) as email-oauth2-proxy
    would: cached options from the store replace those in the config."""
    path = Path(path)
    parser = _parser()
    _read(parser, path, "email-oauth2-proxy config")
    catch_all_enabled = _flag(parser, GLOBAL_SECTION, "allow_catch_all_accounts") \
        if parser.has_section(GLOBAL_SECTION) else False
    if cache_store is not None:
        if str(cache_store).startswith("aws:"):
            raise PeerConfigError("the AWS Secrets Manager cache store is not read directly; "
                                  "copy the secret's JSON into an INI file (one section per "
                                  "account) and pass that file as --cache-store")
        cache = _parser()
        _read(cache, Path(cache_store), "email-oauth2-proxy cache store")
        for section in cache.sections():
            if "@" not in section:
                continue
            if not parser.has_section(section):
                if not catch_all_enabled:
                    continue
                parser.add_section(section)
            for option, value in cache.items(section):
                if option in CACHED_OPTIONS:
                    parser.set(section, option, value)
    base = path.resolve().parent
    servers = tuple(_server(parser, s, base) for s in parser.sections() if SERVER_SECTION.match(s))
    catch_all = tuple(s for s in parser.sections() if s.startswith("@"))
    accounts = []
    for section in parser.sections():
        if "@" not in section or section.startswith("@"):
            continue
        options: dict[str, str] = {}
        if catch_all_enabled:
            domain = "@" + section.rsplit("@", 1)[-1]
            for fallback in ("@", domain):  # the account's domain wins over "@"
                if parser.has_section(fallback):
                    options.update(parser.items(fallback))
            # Tokens are per account, never inherited (a salt and a count may be).
            for option in ("access_token", "access_token_expiry", "refresh_token"):
                options.pop(option, None)
        options.update(parser.items(section))
        accounts.append(PeerAccount(section, options))
    settings = dict(parser.items(GLOBAL_SECTION)) if parser.has_section(GLOBAL_SECTION) else {}
    return PeerConfig(path.resolve(), servers, tuple(accounts), catch_all, settings)
