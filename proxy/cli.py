"""The ``xoauth2-proxy`` command: run the daemon, authorise accounts, manage token files.

Exit codes: 0 success, 1 the operation failed, 2 bad usage or configuration, 130 interrupted.
Each command is an entry of ``COMMANDS`` (``proxy.commands.Command``); a module that adds
commands exports a tuple of them and is listed there. Heavy imports (MSAL, asyncio servers)
happen inside the commands, so ``--help`` and ``check-config`` start fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from proxy import __version__, account_commands, store_commands
from proxy.admin_web import command as admin_web_command
from proxy.commands import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    Command,
    CommandError,
    add_config_option,
    load_config,
)
from proxy.config import DEFAULT_CONFIG_PATH, Config, ConfigError, load
from proxy.migrate import command as migrate_command
from proxy.text import host_port


def cmd_version(args: argparse.Namespace) -> int:
    from proxy.paths import data_dir

    print(f"xoauth2-proxy {__version__}")
    shipped = data_dir()
    print(f"example configs, systemd units, Prometheus rules: {shipped or 'not installed'}")
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = load(args.file) if args.file else load_config(args)
    print(f"{cfg.path}: OK")
    print(f"  state directory: {cfg.state_dir}")
    for li in cfg.listeners:
        up = cfg.upstreams[li.upstream]
        floor = f" {li.min_tls_version}+" if li.tls != "none" else ""
        sources = f", only from {', '.join(map(str, li.allow_from))}" if li.allow_from else ""
        print(f"  listener {li.name}: {li.protocol} on {li.listen} (local TLS {li.tls}{floor}"
              f"{sources}) -> {host_port(up.host, up.port)} ({up.tls} TLS)")
        if li.old_tls and li.tls != "none":
            print(f"  warning: listener {li.name} accepts TLS {li.min_tls_version}, which is weak; "
                  "serve only devices that cannot do TLS 1.2 (docs/devices.md)")
    for name, p in cfg.providers.items():
        secret = ("file " + str(p.client_secret_file) if p.client_secret_file else
                  "env " + p.client_secret_env if p.client_secret_env else "none (public client)")
        print(f"  provider {name}: {p.authority_url} client {p.client_id}, secret: {secret}")
    for a in cfg.accounts.values():
        extra = f", mailbox {a.upstream_user}" if a.upstream_user else ""
        print(f"  account {a.name}: {a.flow} via {a.provider}{extra}")
    for r in cfg.relays:
        how = "with a device password" if r.require_password else "without AUTH"
        forced = f", envelope sender forced to {r.force_sender}" if r.force_sender else ""
        print(f"  relay {r.name}: on {r.listener} from {', '.join(map(str, r.sources))} "
              f"{how} as {r.account}, senders {', '.join(r.allowed_senders)}{forced}")
    if cfg.metrics.listen:
        print(f"  metrics: http://{cfg.metrics.listen}/metrics")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from proxy import logs, runtime
    from proxy.server import daemon

    config = load_config(args)
    logs.setup(args.log_level or config.log_level)
    warn_missing_credentials(config)
    try:
        return runtime.serve(config, log_level=args.log_level)
    except daemon.StartupError as exc:
        raise CommandError(f"cannot start: {exc}") from None


def warn_missing_credentials(config: Config) -> None:
    """A secret the config expects from systemd's credentials but systemd did not pass: the
    daemon starts (accounts without it work), and says at once which credential is missing and
    where systemd looks for it; logins that need it fail with the same advice."""
    import logging

    from proxy import logs, systemd

    log = logging.getLogger("proxy.daemon")
    for setting, path, advice in systemd.missing_credentials(config.secret_files()):
        logs.event(log, logging.WARNING, "credential_missing", setting=setting, path=str(path),
                   action=advice)


def cmd_demo(args: argparse.Namespace) -> int:
    from proxy.demo import run as demo_run

    return demo_run.main(Path(args.workdir) if args.workdir else None, check=args.check)


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                        help="override log_level from the config")


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--check", action="store_true",
                        help="run a scripted round trip through the proxy, then exit 0 or 1")
    parser.add_argument("--workdir", metavar="DIR",
                        help="keep the demo's config, certificates and token file in DIR "
                             "(default: a temporary folder, removed at exit)")


def _check_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", nargs="?", help="config file (default: --config)")


COMMANDS: tuple[Command, ...] = (
    Command("run", cmd_run, "serve the configured listeners until stopped",
            "Serve the configured IMAP/POP3/SMTP listeners until SIGTERM or SIGINT (graceful: "
            "stop accepting, let sessions finish for shutdown_grace seconds). SIGHUP reloads "
            "the config without dropping sessions. Under systemd: Type=notify, watchdog and "
            "socket activation (see systemd/xoauth2-proxy.service).", _run_arguments),
    Command("demo", cmd_demo, "try it: a fake Microsoft 365 and the proxy, on this machine",
            "Start the embedded fake Microsoft 365 (identity platform, IMAP, POP3, SMTP), an "
            "authorised demo account and the proxy in front of it, and print how to point a "
            "mail client at it. Needs no internet access.", _demo_arguments),
    *account_commands.COMMANDS,
    *migrate_command.COMMANDS,
    *store_commands.COMMANDS,
    *admin_web_command.COMMANDS,
    Command("check-config", cmd_check_config, "validate a config file and summarise it",
            arguments=_check_config_arguments),
    Command("version", cmd_version, "print the version and where the shipped example files are"),
)


def build_parser(commands: Sequence[Command] = COMMANDS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xoauth2-proxy",
        description="Let mail clients that only know passwords use Microsoft 365: a local "
                    "IMAP/POP3/SMTP proxy that accepts a local password and logs in upstream "
                    "with OAuth 2.0 (XOAUTH2).",
        epilog=f"The config file defaults to $XOAUTH2_PROXY_CONFIG, else {DEFAULT_CONFIG_PATH}.",
    )
    parser.add_argument("-c", "--config", metavar="FILE", help="configuration file (TOML)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in commands:
        p = sub.add_parser(command.name, help=command.help,
                           description=command.description or command.help)
        add_config_option(p)
        command.arguments(p)
        p.set_defaults(func=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"xoauth2-proxy: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CommandError as exc:
        print(f"xoauth2-proxy: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("\nxoauth2-proxy: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


__all__ = ["COMMANDS", "EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_USAGE", "CommandError", "build_parser",
           "main"]
