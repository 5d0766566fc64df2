"""``xoauth2-proxy admin-password``: set the admin web page's password (stores its hash)."""

from __future__ import annotations

import argparse

from proxy.commands import Command, CommandError, load_config
from proxy.config import Config


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--password-file", metavar="FILE",
                        help="read the password from FILE ('-' for standard input)")


def _run(args: argparse.Namespace) -> int:
    return set_admin_password(load_config(args), args.password_file)


def set_admin_password(config: Config, source: str | None) -> int:
    from proxy.admin import read_password
    from proxy.admin_web.security import PasswordFileError, write_password_file
    from proxy.store import StoreError

    if config.admin is None:
        raise CommandError("the config has no [admin] table: add one (listen = "
                           "\"127.0.0.1:9465\") to turn the admin page on")
    password = read_password(source, confirm=True, prompt="Admin password")
    try:
        write_password_file(config.admin.password_file, password)
    except (PasswordFileError, StoreError) as exc:
        raise CommandError(str(exc)) from None
    except OSError as exc:
        raise CommandError(f"{config.admin.password_file}: {exc.strerror}") from None
    print(f"admin password set ({config.admin.password_file})")
    return 0


COMMANDS: tuple[Command, ...] = (
    Command("admin-password", _run, "set the admin web page's password",
            "Ask for the admin web page's password (twice) and store its scrypt hash in "
            "[admin] password_file (default: STATE_DIR/admin-password). Needs an [admin] table "
            "in the config; the running daemon reads the file at each sign-in.",
            arguments=_arguments),
)
