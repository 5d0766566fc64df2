"""Config loading: the examples load, and every mistake is one line naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy import config
from proxy.config import ConfigError
from tests.ops.util import SHIPPED

EXAMPLES = sorted((SHIPPED / "config").glob("*.toml"))

MINIMAL = """
state_dir = "state"
[providers.p]
tenant = "contoso.onmicrosoft.com"
client_id = "00000000-0000-0000-0000-000000000000"
[upstreams.imap]
protocol = "imap"
host = "outlook.office365.com"
port = 993
[[listeners]]
protocol = "imap"
listen = "127.0.0.1:1143"
upstream = "imap"
[accounts."Alice@Contoso.com"]
provider = "p"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def load_text(tmp_path: Path, text: str) -> config.Config:
    return config.load(write(tmp_path, text))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_load(path: Path) -> None:
    cfg = config.load(path)
    assert cfg.listeners and cfg.accounts


def test_minimal_defaults(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, MINIMAL)
    assert cfg.state_dir == tmp_path / "state"
    account = cfg.account("ALICE@contoso.COM")
    assert account is not None and account.flow == "device_code"
    assert cfg.upstreams["imap"].tls == "implicit"
    assert cfg.listeners[0].tls == "none" and cfg.listeners[0].listen.is_loopback
    assert cfg.scopes(account, "imap") == ("https://outlook.office.com/IMAP.AccessAsUser.All",)
    assert set(cfg.login_scopes(account)) == {
        "https://outlook.office.com/IMAP.AccessAsUser.All",
        "https://outlook.office.com/POP.AccessAsUser.All",
        "https://outlook.office.com/SMTP.Send",
    }


def test_app_only_scope(tmp_path: Path) -> None:
    text = MINIMAL.replace('provider = "p"', 'provider = "p"\nflow = "client_credentials"')
    text = text.replace('client_id = "0', 'client_secret_env = "SECRET"\nclient_id = "0')
    cfg = load_text(tmp_path, text)
    account = cfg.account("alice@contoso.com")
    assert account is not None
    assert cfg.scopes(account, "smtp") == ("https://outlook.office365.com/.default",)


@pytest.mark.parametrize(
    ("change", "key", "words"),
    [
        (("client_id =", "client_idd ="), "providers.p.client_id", "client_idd"),
        (("port = 993", "port = 99999"), "upstreams.imap.port", "65535"),
        (("port = 993", 'port = "993"'), "upstreams.imap.port", "whole number"),
        (('host = "outlook', 'hots = "x"\nhost = "outlook'), "upstreams.imap.hots", "unknown key"),
        (('listen = "127.0.0.1:1143"', 'listen = "0.0.0.0:1143"'), "listeners[0].listen", "clear"),
        (('listen = "127.0.0.1:1143"', 'listen = "1143"'), "listeners[0].listen", "HOST:PORT"),
        (('upstream = "imap"', 'upstream = "nope"'), "listeners[0].upstream", "no [upstreams.nope]"),
        (('provider = "p"', 'provider = "q"'), 'accounts."Alice@Contoso.com".provider', "no [providers.q]"),
        (('protocol = "imap"\nlisten', 'protocol = "imap"\ntls = "tsl"\nlisten'), "listeners[0].tls",
         "one of none, starttls, implicit"),
        (('tenant =', 'client_secret = "x"\ntenant ='), "providers.p.client_secret", "client_secret_file"),
        (("port = 993", "port = 993\nverify = false"), "upstreams.imap.verify", "always verified"),
        (("port = 993", "port = 993\nwarm_connections = 65"), "upstreams.imap.warm_connections",
         "between 0 and 64"),
        (('protocol = "imap"\nhost', 'protocol = "smtp"\nwarm_connections = 1\nhost'),
         "upstreams.imap.warm_connections", "IMAP and POP3 upstreams only"),
        (('[accounts."Alice@Contoso.com"]', '[accounts.alice]'), "accounts.alice", "user names"),
        (('provider = "p"', 'provider = "p"\nupstream_user = "a\\u0001@contoso.com"'),
         'accounts."Alice@Contoso.com".upstream_user', "control characters"),
        (('[accounts."Alice@Contoso.com"]', '[accounts."Alice\\u0001@Contoso.com"]'),
         'accounts."Alice\x01@Contoso.com"', "control characters"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, change: tuple[str, str], key: str, words: str) -> None:
    assert change[0] in MINIMAL
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, MINIMAL.replace(change[0], change[1], 1))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'config.toml'}: {key}: "), message
    assert words in message


def test_client_credentials_needs_secret(tmp_path: Path) -> None:
    text = MINIMAL.replace('provider = "p"', 'provider = "p"\nflow = "client_credentials"')
    with pytest.raises(ConfigError, match="client_secret_file or client_secret_env"):
        load_text(tmp_path, text)


def test_syntax_error_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="TOML syntax error"):
        load_text(tmp_path, "state_dir = \n")
    with pytest.raises(ConfigError, match="no such file"):
        config.load(tmp_path / "absent.toml")


def test_client_secret_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "secret").write_text("s3cret\n")
    cfg = load_text(tmp_path, MINIMAL.replace('tenant =', 'client_secret_file = "secret"\ntenant ='))
    assert cfg.providers["p"].client_secret() == "s3cret"
    cfg = load_text(tmp_path, MINIMAL.replace('tenant =', 'client_secret_env = "XP_SECRET"\ntenant ='))
    monkeypatch.delenv("XP_SECRET", raising=False)
    with pytest.raises(ConfigError, match="XP_SECRET is not set"):
        cfg.providers["p"].client_secret()
    monkeypatch.setenv("XP_SECRET", "fromenv")
    assert cfg.providers["p"].client_secret() == "fromenv"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_check_config_examples(path: Path) -> None:
    result = cli("check-config", str(path))
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (("client_id =", "client_idd ="), "providers.p.client_id"),
        (("port = 993", "port = 0"), "upstreams.imap.port"),
        (('host = "outlook', 'hots = "x"\nhost = "outlook'), "upstreams.imap.hots"),
        (('client_id = "00000000-0000-0000-0000-000000000000"\n', ""), "providers.p.client_id"),
    ],
)
def test_check_config_errors_exit_2(tmp_path: Path, change: tuple[str, str], key: str) -> None:
    path = write(tmp_path, MINIMAL.replace(*change))
    result = cli("check-config", str(path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0] and "Traceback" not in result.stderr


def test_help_and_version() -> None:
    result = cli("--help")
    assert result.returncode == 0
    for command in ("run", "demo", "login", "logout", "accounts", "passwd", "check-config", "version"):
        assert command in result.stdout
    assert cli("version").stdout.startswith("xoauth2-proxy ")
