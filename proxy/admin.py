"""Account administration commands: login, logout, accounts, passwd.

They print for a person (stdout for results, stderr for prompts and progress) and raise
``CommandError`` with one line on failure.
"""

from __future__ import annotations

import argparse
import getpass
import secrets
import sys
import time
from pathlib import Path

from proxy import store
from proxy.auth import flows
from proxy.auth.errors import TokenError
from proxy.commands import CommandError
from proxy.config import Account, Config
from proxy.secret import Secret

MIN_PASSWORD = 8


def open_store(config: Config) -> store.TokenStore:
    try:
        return store.open_store(config)
    except store.StoreError as exc:
        raise CommandError(str(exc)) from None
    except OSError as exc:
        raise CommandError(f"state directory {config.state_dir}: {exc.strerror}") from None


def find_account(config: Config, name: str) -> Account:
    account = config.account(name)
    if account is None:
        known = ", ".join(sorted(config.accounts)) or "none"
        raise CommandError(f"no account {name!r} in {config.path} (configured: {known})")
    return account


def read_password(source: str | None, *, confirm: bool, prompt: str = "Local password") -> Secret:
    """From a file, standard input ('-'), or the terminal (asked twice)."""
    if source == "-":
        value = sys.stdin.readline().rstrip("\r\n")
    elif source:
        try:
            value = Path(source).read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise CommandError(f"cannot read password file {source}: {exc.strerror}") from None
    else:
        value = getpass.getpass(f"{prompt}: ")
        if confirm and getpass.getpass(f"{prompt} again: ") != value:
            raise CommandError("the two passwords differ; nothing was saved")
    if len(value) < MIN_PASSWORD:
        raise CommandError(f"the local password must have at least {MIN_PASSWORD} characters")
    return Secret(value)


def service_key(account: Account) -> bytes | None:
    if account.service_key_file is None:
        return None
    try:
        return store.read_key_file(account.service_key_file)
    except (store.StoreError, OSError) as exc:
        raise CommandError(f"service key for {account.name}: {exc}") from None


def cmd_login(config: Config, args: argparse.Namespace) -> int:
    account = find_account(config, args.account)
    token_store = open_store(config)
    key = service_key(account)
    try:
        # Asked first, so the person is not kept waiting after signing in.
        password = read_password(args.password_file, confirm=True,
                                 prompt=f"Local password for {account.name}")
        result = flows.login(config, account, token_store, password, out=sys.stderr,
                             service_key=key)
    except TokenError as exc:
        code = getattr(exc, "code", None)
        raise CommandError(f"login failed for {account.name}: {exc.detail or type(exc).__name__}"
                           + (f" ({code})" if code else "")) from None
    except store.StoreError as exc:
        raise CommandError(f"could not save the token file: {exc}") from None
    who = f" as {result.identity}" if result.identity else " (app-only)"
    print(f"{account.name}: authorised{who}; token file {token_store.path(account.name)}")
    if result.replaced_slots:
        print(f"{account.name}: the password did not open the old token file, so its other "
              "device passwords were removed; add them again with `xoauth2-proxy passwd`.")
    return 0


def cmd_logout(config: Config, args: argparse.Namespace) -> int:
    account = find_account(config, args.account)
    token_store = open_store(config)
    if not token_store.delete(account.name):
        raise CommandError(f"{account.name} has no token file")
    print(f"{account.name}: token file removed; clients can no longer log in as this account")
    return 0


def _when(epoch: float | None) -> str:
    if not epoch:
        return "-"
    left = epoch - time.time()
    return f"{_stamp(epoch)} ({'expired' if left <= 0 else f'in {int(left // 60)} min'})"


def cmd_accounts(config: Config, args: argparse.Namespace) -> int:
    token_store = open_store(config)
    rows = [("ACCOUNT", "FLOW", "TOKEN FILE", "ACCESS TOKEN EXPIRES", "REFRESH TOKEN", "SLOTS",
             "RESOURCES")]
    for account in config.accounts.values():
        if not token_store.exists(account.name):
            rows.append((account.name, account.flow, "missing", "-", "-", "-", "-"))
            continue
        try:
            info = token_store.info(account.name)
        except store.StoreError as exc:
            rows.append((account.name, account.flow, f"unreadable: {exc}", "-", "-", "-", "-"))
            continue
        state = "needs login" if info.meta.needs_reauth else "present"
        rows.append((account.name, account.flow, state, _when(info.meta.access_token_expires_at),
                     "yes" if info.meta.refresh_token_present else "no",
                     ",".join(s.label for s in info.slots),
                     ",".join(info.meta.resources) or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def cmd_passwd(config: Config, args: argparse.Namespace) -> int:
    account = find_account(config, args.account)
    token_store = open_store(config)
    try:
        if args.list:
            return _list(account, token_store)
        if args.remove:
            token_store.remove_slot(account.name, args.remove)
            print(f"{account.name}: password {args.remove!r} removed; the other passwords "
                  "still work. If it may have leaked, also run `xoauth2-proxy passwd "
                  f"{account.name} --rotate` (a copy of the old file still opens with it; "
                  "the other devices keep their passwords), or `--rotate --reissue` if its "
                  "holder may be able to write the token file (every device gets a new one)")
            return 0
        if getattr(args, "service_key", False):
            return _add_service_key(account, token_store, args)
        if getattr(args, "rotate", False):
            return _rotate(account, token_store, args)
        if getattr(args, "reissue", False):
            raise CommandError("--reissue goes with --rotate")
        current = read_password(args.password_file, confirm=False,
                                prompt=f"An existing local password of {account.name}")
        unlocked = _unlock(token_store, account, current)
        new = Secret(secrets.token_urlsafe(18))
        token_store.add_password_slot(unlocked, args.add, new)
    except store.WrongPassword:
        raise CommandError("that password does not open the token file") from None
    except store.TokenFileMissing:
        raise CommandError(f"{account.name} has no token file; run `xoauth2-proxy login "
                           f"{account.name}` first") from None
    except store.StoreError as exc:
        raise CommandError(str(exc)) from None
    print(f"{account.name}: password for {args.add!r} (shown once, store it in the device now):")
    print(new.reveal())
    return 0


def _list(account: Account, token_store: store.TokenStore) -> int:
    """``passwd --list``: one line per slot; old-form password slots are named below."""
    slots = token_store.info(account.name).slots
    print("LABEL\tKIND\tCREATED\tLAST USED")
    for slot in slots:
        print(f"{slot.label}\t{slot.kind}\t{_stamp(slot.created_at)}\t"
              f"{_stamp(slot.last_used_at) if slot.last_used_at else 'never'}")
    old = [slot.label for slot in slots if slot.old_form]
    if old:
        print(f"\nnot used since this release: {', '.join(old)} (old-form slots; `--rotate` "
              "gives them a new password unless each is used once before, by its device or "
              "as the password given to --add/--rotate)")
    return 0


def _unlock(token_store: store.TokenStore, account: Account, password: Secret) -> store.Unlocked:
    """Open the file with a password the user typed; its slot is converted to the current
    form now if it is older (as a daemon login would)."""
    unlocked = token_store.unlock(account.name, password)
    if unlocked.stale_slot:
        token_store.upgrade_slot(unlocked, password)
        unlocked = token_store.reload(unlocked)
    return unlocked


def _stamp(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(epoch))


def _add_service_key(account: Account, token_store: store.TokenStore,
                     args: argparse.Namespace) -> int:
    """``passwd --service-key``: the slot that lets the daemon unlock the token file alone."""
    path = account.service_key_file
    if path is None:
        raise CommandError(f"{account.name} has no service_key_file in the config; set one, "
                           "e.g. service_key_file = \"/etc/xoauth2-proxy/"
                           f"{account.name}.key\"")
    if not path.exists():
        store.generate_key_file(path)
        print(f"{account.name}: created service key file {path} (32 random bytes, mode 0600)")
    key = service_key(account)
    assert key is not None
    keyfile = next((s for s in token_store.info(account.name).slots if s.kind == "keyfile"), None)
    if keyfile is not None:
        try:
            token_store.unlock_with_service_key(account.name, key)
            print(f"{account.name}: the service key {path} already opens the token file")
            return 0
        except store.WrongPassword:
            pass  # a new key file: the old slot is replaced below
    current = read_password(args.password_file, confirm=False,
                            prompt=f"An existing local password of {account.name}")
    unlocked = _unlock(token_store, account, current)
    if keyfile is not None:
        token_store.remove_slot(account.name, keyfile.label)
    token_store.add_service_key_slot(unlocked, key)
    print(f"{account.name}: service key slot added; the daemon can now refresh this account's "
          f"tokens with {path} (keep it 0600, readable by the daemon only)")
    return 0


def _rotate(account: Account, token_store: store.TokenStore, args: argparse.Namespace) -> int:
    """``passwd --rotate``: a new data key, so that a copy of the old file opens nothing current
    with any old secret (after ``--remove`` of a password that may have leaked). Every device
    keeps its password but those whose slot is of the old form (never used since this
    release), which get a new one, printed once."""
    current = read_password(args.password_file, confirm=False,
                            prompt=f"An existing local password of {account.name}")
    unlocked = token_store.unlock(account.name, current)
    has_keyfile = any(s.kind == "keyfile" for s in token_store.info(account.name).slots)
    key = service_key(account) if has_keyfile else None
    reissue = bool(getattr(args, "reissue", False))
    _, issued = token_store.rotate(unlocked, current, service_key=key, reissue=reissue,
                                   generate=lambda: Secret(secrets.token_urlsafe(18)))
    kept = "every other device keeps" if issued else "every device keeps"
    print(f"{account.name}: new data key; "
          + ("the password you typed still works" if reissue else f"{kept} its password")
          + ("; the service key slot was re-wrapped" if has_keyfile else ""))
    if issued and reissue:
        print(f"{account.name}: every other device has a new password (shown once; the old "
              "ones no longer work):")
        for label, password in issued.items():
            print(f"{label}	{password.reveal()}")
    elif issued:
        print(f"{account.name}: these devices have a new password (their slot was of the old "
              "form, not used since this release, so it could not be re-wrapped; shown once, "
              "the old ones no longer work):")
        for label, password in issued.items():
            print(f"{label}\t{password.reveal()}")
    return 0
