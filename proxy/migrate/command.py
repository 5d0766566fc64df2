"""``xoauth2-proxy import emailproxy``: the command table entry, its arguments, and the call
into ``proxy.migrate.emailproxy`` (imported when the command runs)."""

from __future__ import annotations

import argparse
from pathlib import Path

from proxy.commands import Command, CommandError, add_config_option, config_path
from proxy.config import DEFAULT_CONFIG_PATH


def import_emailproxy(args: argparse.Namespace) -> int:
    from proxy.migrate import emailproxy

    options = emailproxy.Options(
        config_file=Path(args.peer_config),
        output=Path(args.output) if args.output else config_path(args),
        state_dir=Path(args.state_dir) if args.state_dir else emailproxy.DEFAULT_STATE_DIR,
        cache_store=Path(args.cache_store) if args.cache_store else None,
        accounts=tuple(a for a in (args.accounts or "").split(",") if a.strip()),
        password_file=args.password_file,
        ca_file=Path(args.ca_file).resolve() if args.ca_file else None,
        force=args.force,
        check=args.check,
    )
    try:
        return emailproxy.Importer(options).run()
    except emailproxy.ImportFailed as exc:
        raise CommandError(f"import: {exc}") from None


def _arguments(parser: argparse.ArgumentParser) -> None:
    peers = parser.add_subparsers(dest="peer", metavar="FROM", required=True)
    peer = peers.add_parser(
        "emailproxy", help="from email-oauth2-proxy (PyPI emailproxy)",
        description="Read email-oauth2-proxy's config (and its cache store), write this "
                    "proxy's config (one provider per app registration, one upstream per "
                    "server, one listener per local port, one account per account section) "
                    "and, for each Microsoft 365 account, decrypt its stored refresh token "
                    "with the password its mail client logs in with, verify it with one "
                    "refresh, and write its token file with that same password. Accounts "
                    "that cannot be imported are skipped with the reason; the exit code is 0 "
                    "only if all were imported. See docs/migrating.md.")
    peer.add_argument("peer_config", metavar="CONFIG_FILE",
                      help="email-oauth2-proxy's config file (emailproxy.config)")
    peer.add_argument("--cache-store", metavar="FILE",
                      help="its separate token cache, if it ran with --cache-store FILE")
    peer.add_argument("--accounts", metavar="A,B",
                      help="import only these account sections (comma-separated)")
    peer.add_argument("--output", metavar="NEW.toml",
                      help="where to write the config (default: --config, else "
                           f"{DEFAULT_CONFIG_PATH})")
    peer.add_argument("--state-dir", metavar="DIR",
                      help="state_dir of the new config, where token files go (default "
                           "/var/lib/xoauth2-proxy)")
    peer.add_argument("--password-file", metavar="FILE",
                      help="lines 'ACCOUNT PASSWORD': the password each account's mail client "
                           "logs in with ('-': standard input; default: asked on the terminal)")
    peer.add_argument("--ca-file", metavar="FILE",
                      help="trust only this CA for the identity platform and the mail servers "
                           "(private servers; email-oauth2-proxy took it from SSL_CERT_FILE)")
    peer.add_argument("--force", action="store_true",
                      help="replace an existing config, client secret file or token file")
    peer.add_argument("--check", action="store_true",
                      help="print the plan and the config; write nothing, ask nobody")
    add_config_option(peer, "configuration file (TOML) to write when --output is not given")


COMMANDS: tuple[Command, ...] = (
    Command("import", import_emailproxy,
            "move from another OAuth mail proxy, keeping its sign-ins",
            "Move from another OAuth mail proxy: its settings become this config, its stored "
            "tokens become token files, so nobody signs in again.", _arguments),
)
