"""The ``xoauth2-proxy`` command: run the daemon, authorise accounts, manage token files.

Exit codes: 0 success, 1 the operation failed, 2 bad usage or configuration, 130 interrupted.
Heavy imports (MSAL, asyncio servers) happen inside the subcommands, so ``--help`` and
``check-config`` start fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from proxy import __version__
from proxy.config import DEFAULT_CONFIG_PATH, Config, ConfigError, load

EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


class CommandError(Exception):
    """A failure to report in one line and exit 1 (no traceback)."""


def _config_path(args: argparse.Namespace) -> Path:
    return Path(args.config or os.environ.get("XOAUTH2_PROXY_CONFIG") or DEFAULT_CONFIG_PATH)


def _load(args: argparse.Namespace) -> Config:
    return load(_config_path(args))


def cmd_version(args: argparse.Namespace) -> int:
    from proxy.paths import data_dir

    print(f"xoauth2-proxy {__version__}")
    shipped = data_dir()
    print(f"example configs, systemd units, Prometheus rules: {shipped or 'not installed'}")
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = load(args.file) if args.file else _load(args)
    print(f"{cfg.path}: OK")
    print(f"  state directory: {cfg.state_dir}")
    for li in cfg.listeners:
        up = cfg.upstreams[li.upstream]
        floor = f" {li.min_tls_version}+" if li.tls != "none" else ""
        sources = f", only from {', '.join(map(str, li.allow_from))}" if li.allow_from else ""
        print(f"  listener {li.name}: {li.protocol} on {li.listen} (local TLS {li.tls}{floor}"
              f"{sources}) -> {up.host}:{up.port} ({up.tls} TLS)")
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


def _admin(name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from proxy import admin
        return int(getattr(admin, f"cmd_{name}")(_load(args), args))
    return run


def _store(name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from proxy.store import commands
        try:
            return int(getattr(commands, f"cmd_{name}")(_load(args), args))
        except commands.Failed as exc:
            raise CommandError(str(exc)) from None
    return run


def cmd_run(args: argparse.Namespace) -> int:
    import asyncio

    from proxy import logs
    from proxy.server import daemon

    config = _load(args)
    logs.setup(args.log_level or config.log_level)
    warn_missing_credentials(config)
    try:
        return asyncio.run(daemon.run(config, log_level=args.log_level))
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


def cmd_import_emailproxy(args: argparse.Namespace) -> int:
    from proxy.migrate import emailproxy

    options = emailproxy.Options(
        config_file=Path(args.peer_config),
        output=Path(args.output) if args.output else _config_path(args),
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xoauth2-proxy",
        description="Let mail clients that only know passwords use Microsoft 365: a local "
                    "IMAP/POP3/SMTP proxy that accepts a local password and logs in upstream "
                    "with OAuth 2.0 (XOAUTH2).",
        epilog=f"The config file defaults to $XOAUTH2_PROXY_CONFIG, else {DEFAULT_CONFIG_PATH}.",
    )
    parser.add_argument("-c", "--config", metavar="FILE", help="configuration file (TOML)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, func: Callable[[argparse.Namespace], int], help_: str,
            description: str | None = None) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=description or help_)
        p.add_argument("-c", "--config", metavar="FILE", default=argparse.SUPPRESS,
                       help="configuration file (TOML)")
        p.set_defaults(func=func)
        return p

    run = add("run", cmd_run, "serve the configured listeners until stopped",
              "Serve the configured IMAP/POP3/SMTP listeners until SIGTERM or SIGINT (graceful: "
              "stop accepting, let sessions finish for shutdown_grace seconds). SIGHUP reloads "
              "the config without dropping sessions. Under systemd: Type=notify, watchdog and "
              "socket activation (see systemd/xoauth2-proxy.service).")
    run.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                     help="override log_level from the config")
    demo = add("demo", cmd_demo, "try it: a fake Microsoft 365 and the proxy, on this machine",
               "Start the embedded fake Microsoft 365 (identity platform, IMAP, POP3, SMTP), an "
               "authorised demo account and the proxy in front of it, and print how to point a "
               "mail client at it. Needs no internet access.")
    demo.add_argument("--check", action="store_true",
                      help="run a scripted round trip through the proxy, then exit 0 or 1")
    demo.add_argument("--workdir", metavar="DIR",
                      help="keep the demo's config, certificates and token file in DIR "
                           "(default: a temporary folder, removed at exit)")
    login = add("login", _admin("login"), "authorise an account with Microsoft and set its local password",
                "Run the account's OAuth flow (device code: prints a URL and a code to enter in any "
                "browser), then ask for the local password clients will use and write the "
                "encrypted token file.")
    login.add_argument("account", help="account name as in the config, e.g. alice@contoso.com")
    login.add_argument("--password-file", metavar="FILE",
                       help="read the local password from FILE ('-' for standard input)")
    logout = add("logout", _admin("logout"), "delete an account's token file")
    logout.add_argument("account")
    add("accounts", _admin("accounts"), "list accounts and the state of their tokens")
    passwd = add("passwd", _admin("passwd"), "manage an account's local passwords (one per device)",
                 "Add, remove or list local passwords (key slots) of an account without a new "
                 "Microsoft login. --add prints a generated password once.")
    passwd.add_argument("account")
    group = passwd.add_mutually_exclusive_group(required=True)
    group.add_argument("--add", metavar="LABEL", help="add a password labelled LABEL")
    group.add_argument("--remove", metavar="LABEL", help="revoke the password labelled LABEL")
    group.add_argument("--list", action="store_true", help="list labels and last use")
    group.add_argument("--rotate", action="store_true",
                       help="replace the data key after revoking a password: the password given "
                            "keeps working, every other device password is replaced (printed "
                            "once), the service-key slot is re-wrapped")
    group.add_argument("--service-key", action="store_true",
                       help="add the service-key slot (creating the account's service_key_file "
                            "if missing) so the daemon can send for [[relay]] devices unattended")
    passwd.add_argument("--password-file", metavar="FILE",
                        help="with --add, --rotate or --service-key: read an existing password "
                             "from FILE ('-': stdin)")
    imports = sub.add_parser("import", help="move from another OAuth mail proxy, keeping its "
                                            "sign-ins", description="Move from another OAuth "
                             "mail proxy: its settings become this config, its stored tokens "
                             "become token files, so nobody signs in again.")
    peers = imports.add_subparsers(dest="peer", metavar="FROM", required=True)
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
    peer.add_argument("-c", "--config", metavar="FILE", default=argparse.SUPPRESS,
                      help="configuration file (TOML) to write when --output is not given")
    peer.set_defaults(func=cmd_import_emailproxy)
    from proxy.store import commands as store_commands
    store_commands.register(sub, add, _store)
    check = add("check-config", cmd_check_config, "validate a config file and summarise it")
    check.add_argument("file", nargs="?", help="config file (default: --config)")
    add("version", cmd_version, "print the version and where the shipped example files are")
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
