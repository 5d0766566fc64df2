"""The ``store`` command's entry in the command table (``store init``, ``store migrate``). Its
body is in ``proxy.store.commands``, imported when it runs (it brings cryptography and psycopg),
so ``--help`` stays fast."""

from __future__ import annotations

import argparse

from proxy.commands import Command, CommandError, load_config


def _store(args: argparse.Namespace) -> int:
    from proxy.store import commands
    try:
        return commands.cmd_store(load_config(args), args)
    except commands.Failed as exc:
        raise CommandError(str(exc)) from None


def _store_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("init", "migrate"))
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--to", metavar="DSN", help="migrate: from state_dir into this database")
    where.add_argument("--from", dest="from_", metavar="DSN",
                       help="migrate: from this database into state_dir")
    parser.add_argument("--force", action="store_true",
                        help="migrate: replace accounts that already exist at the destination")


COMMANDS = (
    Command("store", _store, "set up the shared token store, move accounts into it",
            "Create or migrate the PostgreSQL token store's schema ([store] in the config), or "
            "move every account between the file store (state_dir) and a database, keeping "
            "every local password and service key (the envelopes are copied encrypted, as they "
            "are).", _store_arguments),
)
