"""The account commands' entries in the command table: ``login``, ``logout``, ``accounts`` and
``passwd``, with their arguments. Their bodies are in ``proxy.admin``, imported when one of
them runs (it brings MSAL and cryptography), so ``--help`` stays fast."""

from __future__ import annotations

import argparse

from proxy.commands import Command, load_config


def _login(args: argparse.Namespace) -> int:
    from proxy import admin
    return admin.cmd_login(load_config(args), args)


def _logout(args: argparse.Namespace) -> int:
    from proxy import admin
    return admin.cmd_logout(load_config(args), args)


def _accounts(args: argparse.Namespace) -> int:
    from proxy import admin
    return admin.cmd_accounts(load_config(args), args)


def _passwd(args: argparse.Namespace) -> int:
    from proxy import admin
    return admin.cmd_passwd(load_config(args), args)


def _login_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("account", help="account name as in the config, e.g. alice@contoso.com")
    parser.add_argument("--reissue", action="store_true",
                        help="with --rotate: also give every other device a new password (for a "
                             "removed password whose holder may be able to write the token file "
                             "or the database)")
    parser.add_argument("--password-file", metavar="FILE",
                        help="read the local password from FILE ('-' for standard input)")


def _logout_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("account")


def _passwd_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("account")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--add", metavar="LABEL", help="add a password labelled LABEL")
    group.add_argument("--remove", metavar="LABEL", help="revoke the password labelled LABEL")
    group.add_argument("--list", action="store_true", help="list labels and last use")
    group.add_argument("--rotate", action="store_true",
                       help="replace the data key after revoking a password: every device keeps "
                            "its password (a slot not used since this release gets a new one, "
                            "printed once), the service-key slot is re-wrapped")
    group.add_argument("--service-key", action="store_true",
                       help="add the service-key slot (creating the account's service_key_file "
                            "if missing) so the daemon can send for [[relay]] devices unattended")
    parser.add_argument("--reissue", action="store_true",
                        help="with --rotate: also give every other device a new password (for a "
                             "removed password whose holder may be able to write the token file "
                             "or the database)")
    parser.add_argument("--password-file", metavar="FILE",
                        help="with --add, --rotate or --service-key: read an existing password "
                             "from FILE ('-': stdin)")


COMMANDS: tuple[Command, ...] = (
    Command("login", _login, "authorise an account with Microsoft and set its local password",
            "Run the account's OAuth flow (device code: prints a URL and a code to enter in any "
            "browser), then ask for the local password clients will use and write the "
            "encrypted token file.", _login_arguments),
    Command("logout", _logout, "delete an account's token file", arguments=_logout_arguments),
    Command("accounts", _accounts, "list accounts and the state of their tokens"),
    Command("passwd", _passwd, "manage an account's local passwords (one per device)",
            "Add, remove or list local passwords (key slots) of an account without a new "
            "Microsoft login. --add prints a generated password once.", _passwd_arguments),
)
