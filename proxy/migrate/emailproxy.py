"""``xoauth2-proxy import emailproxy``: move from email-oauth2-proxy without a new sign-in.

Reads email-oauth2-proxy's config (and its cache store), writes our TOML config, and for each
Microsoft 365 account decrypts the stored refresh token with the password the account's mail
client logs in with, verifies it with one refresh against the identity platform (MSAL's
``acquire_token_by_refresh_token``: a refresh_token grant, no sign-in), and writes the account's
token file with that same password as its local password. Mail clients keep host, port, user
name and password. An app-only (client_credentials) account's client secret moves to a file of
its own and is verified by one token request. An account that cannot be imported is skipped
with one line saying why and what to do; the exit code is 0 only if every account was imported.

Nothing existing is replaced without ``--force``; ``--check`` prints the plan and the config
and writes nothing (it checks passwords locally but asks the identity platform nothing).
"""

from __future__ import annotations

import getpass
import os
import re
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import msal

from proxy import config as config_mod
from proxy import store
from proxy.auth import flows, msal_client
from proxy.auth.errors import (
    AuthConfigError,
    AuthorisationNeeded,
    IdentityMismatch,
    ProviderUnavailable,
    TokenError,
)
from proxy.migrate import peer_config, plan, toml_out
from proxy.migrate.peer_config import PeerAccount, WrongPeerPassword
from proxy.secret import Secret
from proxy.store.names import SUFFIX, file_stem

DEFAULT_STATE_DIR = Path("/var/lib/xoauth2-proxy")
_PASSWORD_LINE = re.compile(r"(?P<account>[^\s#][^\s]*)[ \t](?P<password>.*)")


class ImportFailed(Exception):
    """The import as a whole cannot run (one line; the CLI exits 1)."""


@dataclass
class Options:
    config_file: Path
    output: Path
    state_dir: Path
    cache_store: Path | None = None
    accounts: tuple[str, ...] = ()
    password_file: str | None = None
    ca_file: Path | None = None
    force: bool = False
    check: bool = False


def read_passwords(source: str | None) -> dict[str, Secret] | None:
    """``ACCOUNT PASSWORD`` lines (one space or tab between them; the password is the rest of
    the line, as is); blank lines and lines starting with # are ignored. '-': standard input."""
    if source is None:
        return None
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    except (OSError, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ImportFailed(f"cannot read password file {source}: {reason}") from None
    passwords: dict[str, Secret] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _PASSWORD_LINE.fullmatch(line)
        if match is None or not match.group("password"):
            raise ImportFailed(f"password file {source}, line {number}: expected "
                               "'ACCOUNT PASSWORD' (the line is not shown: it may hold one)")
        passwords[match.group("account").lower()] = Secret(match.group("password"))
    return passwords


class Importer:
    def __init__(self, options: Options, out: TextIO | None = None) -> None:
        self.options = options
        self.out = out if out is not None else sys.stdout
        self.imported: list[str] = []

    def say(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    def skip(self, name: str, reason: str) -> None:
        self.say(f"{name}: skipped: {reason}")

    # --- the whole run ---------------------------------------------------------------------

    def run(self) -> int:
        o = self.options
        try:
            peer = peer_config.load(o.config_file, o.cache_store)
        except peer_config.PeerConfigError as exc:
            raise ImportFailed(str(exc)) from None
        only = {a.strip().lower() for a in o.accounts if a.strip()} or None
        known = {a.name.lower() for a in peer.accounts}
        if only is not None and only - known:
            raise ImportFailed(f"no account section [{', '.join(sorted(only - known))}] in "
                               f"{o.config_file} (accounts: {', '.join(sorted(known)) or 'none'})")
        mapped = plan.build(peer, only)
        if not o.check and o.output.exists() and not o.force:
            raise ImportFailed(f"{o.output} exists; choose another --output, or --force to "
                               "replace it")
        secrets = self._client_secrets(mapped)
        secret_files = {name: o.output.parent / f"{name}.client-secret" for name in secrets}
        document = mapped.document(o.state_dir, o.ca_file, secret_files)
        text = self._header() + toml_out.dumps(document)
        for note in mapped.notes:
            self.say(f"note: {note}")
        for item in mapped.accounts:
            if item.skip is not None:
                self.skip(item.name, item.skip)
        if not mapped.configured():
            self.say("nothing to import: no account section is a Microsoft 365 account this "
                     "proxy can serve")
            return 1
        try:
            cfg = config_mod.parse(tomllib.loads(text), o.output.resolve())
        except config_mod.ConfigError as exc:
            raise ImportFailed(f"the config made from {o.config_file} does not load: {exc}") \
                from None
        if o.check:
            return self._check(mapped, cfg, text)
        passwords = read_passwords(o.password_file)
        self._write_secrets(secrets, secret_files)
        token_store = self._store(cfg)
        for item in mapped.configured():
            account = cfg.accounts[item.name]
            reason = self._import(cfg, account, item.peer, passwords, token_store)
            if reason is None:
                self.imported.append(item.name)
            else:
                self.skip(item.name, reason)
        write_text(o.output, text, force=o.force)
        total = len(mapped.accounts)
        self.say(f"imported {len(self.imported)} of {total} account{'s' * (total != 1)}; "
                 f"config written to {o.output}, token files in {cfg.state_dir}")
        return 0 if len(self.imported) == total else 1

    def _header(self) -> str:
        return (f"# Made by `xoauth2-proxy import emailproxy` from {self.options.config_file} "
                f"on {time.strftime('%Y-%m-%d')}.\n"
                "# Check it with `xoauth2-proxy check-config`; docs/migrating.md says what maps "
                "to what.\n\n")

    def _check(self, mapped: plan.Plan, cfg: config_mod.Config, text: str) -> int:
        passwords = read_passwords(self.options.password_file)
        ready = 0
        for item in mapped.configured():
            account = cfg.accounts[item.name]
            reason = self._local_checks(account, item.peer, passwords, store_dir=cfg.state_dir)
            if isinstance(reason, str):
                self.skip(item.name, reason)
                continue
            ready += 1
            how = ("one refresh against the identity platform verifies the stored token"
                   if account.flow != "client_credentials" else
                   "app-only: one token request verifies the client secret")
            self.say(f"{item.name}: would import ({account.flow} via provider "
                     f"{account.provider}; {how}; local password: the mail client's)")
        if self.options.output.exists() and not self.options.force:
            self.say(f"note: {self.options.output} exists: the import itself needs --force, "
                     "or another --output")
        self.say(f"would write {self.options.output} (shown below) and token files in "
                 f"{cfg.state_dir}; nothing was written")
        self.say("")
        self.say(text.rstrip("\n"))
        return 0 if ready == len(mapped.accounts) else 1

    # --- secrets ---------------------------------------------------------------------------

    def _client_secrets(self, mapped: plan.Plan) -> dict[str, Secret]:
        """The client secrets of app-only accounts, per provider. An account whose secret is
        stored encrypted, or differs from the provider's, is marked skipped."""
        found: dict[str, Secret] = {}
        for item in mapped.configured():
            if item.flow != "client_credentials" or item.provider is None:
                continue
            secret = item.peer.get("client_secret")
            if secret is None:
                item.skip = ("its client secret is stored encrypted (client_secret_encrypted); "
                             "put the secret in a file and add the account by hand as in "
                             "config/app-only.toml")
                continue
            if item.provider in found and found[item.provider].reveal() != secret.strip():
                item.skip = (f"its client secret differs from another account's of provider "
                             f"{item.provider}; add it by hand as in config/app-only.toml")
                continue
            found[item.provider] = Secret(secret.strip())
        return found

    def _write_secrets(self, secrets: dict[str, Secret], files: dict[str, Path]) -> None:
        for name, secret in secrets.items():
            write_text(files[name], secret.reveal() + "\n", force=self.options.force, mode=0o600)
            self.say(f"provider {name}: client secret moved to {files[name]} (mode 0600); the "
                     "config names the file, never the secret")

    # --- one account -----------------------------------------------------------------------

    def _store(self, cfg: config_mod.Config) -> store.TokenStore:
        try:
            return store.TokenStore(cfg.state_dir)
        except (store.StoreError, OSError) as exc:
            raise ImportFailed(f"state directory {cfg.state_dir}: {exc}") from None

    def _password(self, name: str, passwords: dict[str, Secret] | None) -> Secret | None:
        if passwords is not None:
            return passwords.get(name)
        if not sys.stdin.isatty():
            return None
        value = getpass.getpass(f"Password {name}'s mail client logs in with: ")
        return Secret(value) if value else None

    def _local_checks(self, account: config_mod.Account, peer: PeerAccount,
                      passwords: dict[str, Secret] | None, *,
                      store_dir: Path) -> tuple[Secret, str | None] | str:
        """(password, refresh token or None for app-only) or why the account is skipped."""
        name = account.name
        delegated = account.flow != "client_credentials"
        if delegated and not peer.has_tokens:
            return ("email-oauth2-proxy holds no refresh token for it (never signed in, or "
                    f"stored elsewhere: --cache-store?); run `xoauth2-proxy login {name}`")
        password = self._password(name, passwords)
        if password is None:
            return ("no password given: add the line 'ACCOUNT PASSWORD' with the password its "
                    "mail client logs in with to --password-file")
        if not self.options.force and (store_dir / (file_stem(name) + SUFFIX)).exists():
            return ("its token file exists already; --force replaces it (the account's other "
                    "device passwords with it)")
        encrypted = "refresh_token" if delegated else ("access_token" if peer.get("access_token")
                                                       else None)
        if encrypted is None:
            return password, None
        try:
            value = peer.decrypt(encrypted, password)
        except WrongPeerPassword:
            return ("the password given does not decrypt its stored token (email-oauth2-proxy "
                    "encrypts it with the password the mail client logs in with); give that "
                    f"password, or run `xoauth2-proxy login {name}` to sign in afresh")
        except peer_config.PeerConfigError as exc:
            return f"its stored token cannot be read: {exc}"
        return password, (value if delegated else None)

    def _import(self, cfg: config_mod.Config, account: config_mod.Account, peer: PeerAccount,
                passwords: dict[str, Secret] | None, token_store: store.TokenStore) -> str | None:
        checked = self._local_checks(account, peer, passwords, store_dir=cfg.state_dir)
        if isinstance(checked, str):
            return checked
        password, refresh_token = checked
        cache = msal.SerializableTokenCache()
        identity: str | None = None
        try:
            identity = verify(cfg, account, cache, refresh_token)
        except TokenError as exc:
            return refused(cfg, account, exc)
        expiry, has_rt = msal_client.cache_summary(cache)
        meta = store.Meta(identity=identity, flow=account.flow, access_token_expires_at=expiry,
                          refresh_token_present=has_rt, needs_reauth=None,
                          updated_at=time.time())
        try:
            token_store.create(account.name, cache.serialize().encode("utf-8"), meta,
                               password=password, replace=self.options.force)
        except store.TokenFileExists:
            return "its token file exists already; --force replaces it"
        except (store.StoreError, OSError) as exc:
            return f"its token file could not be written: {exc}"
        what = ("token verified by one refresh" if account.flow != "client_credentials"
                else "app-only; client secret verified by one token request")
        self.say(f"{account.name}: imported ({what}; token file "
                 f"{token_store.path(account.name)}; local password: the mail client's)")
        return None


def verify(cfg: config_mod.Config, account: config_mod.Account,
           cache: msal.SerializableTokenCache, refresh_token: str | None) -> str | None:
    """One grant against the identity platform; MSAL fills ``cache`` with what it returns.

    Delegated: a refresh_token grant with the stored refresh token, and the signed-in user is
    returned. App-only: a client_credentials grant with the provider's secret. Any refusal
    raises TokenError."""
    app = msal_client.build_app(cfg, account, cache)
    scopes = list(cfg.login_scopes(account))
    if account.flow == "client_credentials":
        msal_client.check_result(account.name, msal_client.call(
            account.name, lambda: app.acquire_token_for_client(scopes)))
        return None
    assert refresh_token is not None
    result = msal_client.call(account.name, lambda: app.acquire_token_by_refresh_token(
        refresh_token, scopes=scopes))
    msal_client.check_result(account.name, result)
    return flows.check_identity(account, result)


def refused(cfg: config_mod.Config, account: config_mod.Account, exc: TokenError) -> str:
    """The skip reason for a grant the identity platform (or the check after it) refused."""
    name = account.name
    detail = exc.detail or type(exc).__name__
    if account.flow == "client_credentials" and not isinstance(exc, ProviderUnavailable):
        secret = cfg.providers[account.provider].client_secret_file
        return (f"the identity platform refused the app-only sign-in: {detail}; check the "
                f"client secret in {secret} and the app's application permissions, then run "
                f"`xoauth2-proxy login {name}`")
    if isinstance(exc, IdentityMismatch):
        return f"{detail}; run `xoauth2-proxy login {name}`"
    if isinstance(exc, AuthorisationNeeded):
        code = f" ({exc.code})" if exc.code else ""
        return (f"the identity platform refused its stored refresh token{code}: {detail}; run "
                f"`xoauth2-proxy login {name}` to sign in afresh")
    if isinstance(exc, AuthConfigError):
        return (f"the identity platform refused the application's settings: {detail}. If the "
                "app registration needs a client secret for delegated sign-in, allow public "
                "client flows in it (xoauth2-proxy signs users in as a public client) and run "
                f"`xoauth2-proxy login {name}`")
    return (f"the identity platform could not be asked ({detail}); nothing was written for it: "
            f"run the import again later with --force, or `xoauth2-proxy login {name}`")


def write_text(path: Path, text: str, *, force: bool, mode: int = 0o644) -> None:
    """Write ``path`` whole or not at all (temp file, fsync, rename); never replaces an
    existing file unless ``force``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not force:
        raise ImportFailed(f"{path} exists; --force replaces it")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
    try:
        try:
            os.fchmod(fd, mode)
            os.write(fd, text.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
