"""The command table of ``xoauth2-proxy``: a ``Command`` is a name, its help, the arguments it
takes and the function that runs it. A module that adds commands exports a tuple of them and
``proxy.cli.COMMANDS`` lists that tuple (one line). Also here: the error a command raises to
fail in one line, the exit codes, and the config a command reads.

A command's module is imported by ``proxy.cli`` at start, so it stays light: heavy imports
(MSAL, cryptography, asyncio servers) happen inside the function that runs the command.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from proxy.config import DEFAULT_CONFIG_PATH, Config, load

EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130

Run = Callable[[argparse.Namespace], int]
Arguments = Callable[[argparse.ArgumentParser], None]


class CommandError(Exception):
    """A failure to report in one line and exit 1 (no traceback)."""


def no_arguments(parser: argparse.ArgumentParser) -> None:
    """For a command that takes no arguments of its own."""


@dataclass(frozen=True)
class Command:
    name: str
    run: Run
    help: str
    description: str | None = None  # the help, when None
    arguments: Arguments = no_arguments


def add_config_option(parser: argparse.ArgumentParser,
                      help_: str = "configuration file (TOML)") -> None:
    """``-c FILE`` after the command name too (it sets the same value as before it)."""
    parser.add_argument("-c", "--config", metavar="FILE", default=argparse.SUPPRESS, help=help_)


def config_path(args: argparse.Namespace) -> Path:
    return Path(args.config or os.environ.get("XOAUTH2_PROXY_CONFIG") or DEFAULT_CONFIG_PATH)


def load_config(args: argparse.Namespace) -> Config:
    return load(config_path(args))


__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_USAGE", "Arguments", "Command", "CommandError",
           "Run", "add_config_option", "config_path", "load_config", "no_arguments"]
