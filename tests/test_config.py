"""Config loading: the examples load, and every mistake is one line naming the key."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from proxy import config
from proxy.config import ConfigError
from proxy.demo import certs
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


# --- TLS for old devices: min_tls_version, ciphers, allow_from ------------------------------


def tls_config(tmp_path: Path, listen: str = "127.0.0.1:1143", extra: str = "") -> str:
    paths = certs.generate(tmp_path / "tls")
    return MINIMAL.replace('listen = "127.0.0.1:1143"', (
        f'listen = "{listen}"\ntls = "implicit"\ncert_file = "{paths.cert_file}"\n'
        f'key_file = "{paths.key_file}"\n{extra}'))


def test_tls_defaults_and_choices(tmp_path: Path) -> None:
    li = load_text(tmp_path, tls_config(tmp_path)).listeners[0]
    assert (li.min_tls_version, li.ciphers, li.allow_from, li.old_tls) == ("1.2", None, (), False)
    li = load_text(tmp_path, tls_config(tmp_path, extra='min_tls_version = "1.0"')).listeners[0]
    assert li.old_tls and li.allow_from == ()  # loopback: no allow list needed
    li = load_text(tmp_path, tls_config(tmp_path, "0.0.0.0:993", (  # noqa: S104
        'min_tls_version = "1.1"\nciphers = "RSA+AES"\n'
        'allow_from = ["192.0.2.0/24", "2001:db8::7"]'))).listeners[0]
    assert li.old_tls and li.ciphers == "RSA+AES"
    assert [str(n) for n in li.allow_from] == ["192.0.2.0/24", "2001:db8::7/128"]
    assert li.admits("192.0.2.9") and li.admits("::ffff:192.0.2.9") and li.admits("2001:db8::7")
    assert not li.admits("192.0.3.1") and not li.admits("127.0.0.1") and not li.admits("?")


@pytest.mark.parametrize(
    ("listen", "extra", "key", "words"),
    [
        ("0.0.0.0:993", 'min_tls_version = "1.0"', "min_tls_version", "open to any address"),
        ("192.0.2.1:993", 'min_tls_version = "1.1"', "min_tls_version", "allow_from"),
        ("127.0.0.1:993", "min_tls_version = 1.0", "min_tls_version", 'min_tls_version = "1.0"'),
        ("127.0.0.1:993", 'min_tls_version = "1.4"', "min_tls_version", "must be one of"),
        ("127.0.0.1:993", 'ciphers = "NO-SUCH-CIPHER"', "ciphers", "selects no cipher"),
        ("127.0.0.1:993", 'allow_from = ["0.0.0.0/0"]', "allow_from", "matches every address"),
        ("127.0.0.1:993", 'allow_from = ["192.0.2.1/24"]', "allow_from", "192.0.2.0/24"),
        ("127.0.0.1:993", "allow_from = []", "allow_from", "must list"),
    ],
)
def test_tls_errors_name_the_key(tmp_path: Path, listen: str, extra: str, key: str,
                                 words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, tls_config(tmp_path, listen, extra))
    message = str(info.value)
    assert "\n" not in message and f"listeners[0].{key}: " in message and words in message


def test_tls_options_need_tls(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"listeners\[0\].min_tls_version: applies to a listener "
                                          "with tls"):
        load_text(tmp_path, MINIMAL.replace('upstream = "imap"\n',
                                            'upstream = "imap"\nmin_tls_version = "1.2"\n'))


def test_check_config_refuses_old_tls_open_to_any_address(tmp_path: Path) -> None:
    path = write(tmp_path, tls_config(tmp_path, "0.0.0.0:993", 'min_tls_version = "1.0"'))  # noqa: S104
    result = cli("check-config", str(path))
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "listeners[0].min_tls_version: TLS 1.0 is allowed only on a listener restricted to " \
           "loopback or to source networks" in lines[0] and "allow_from" in lines[0]
    path = write(tmp_path, tls_config(tmp_path, "0.0.0.0:993", (  # noqa: S104
        'min_tls_version = "1.0"\nallow_from = ["192.0.2.0/24"]')))
    result = cli("check-config", str(path))
    assert result.returncode == 0, result.stderr
    assert "(local TLS implicit 1.0+, only from 192.0.2.0/24)" in result.stdout
    assert "warning: listener imap0 accepts TLS 1.0" in result.stdout


def test_relay_sources_restrict_an_old_tls_listener(tmp_path: Path) -> None:
    paths = certs.generate(tmp_path / "tls")
    (tmp_path / "key").write_bytes(b"k" * 32)
    text = MINIMAL + f"""
[upstreams.smtp]
protocol = "smtp"
host = "smtp.office365.com"
port = 587
[[listeners]]
name = "printers"
protocol = "smtp"
listen = "0.0.0.0:2587"
upstream = "smtp"
tls = "starttls"
cert_file = "{paths.cert_file}"
key_file = "{paths.key_file}"
min_tls_version = "1.0"
[accounts."scanner@contoso.com"]
provider = "p"
service_key_file = "key"
[[relay]]
listener = "printers"
sources = ["192.0.2.0/24", "198.51.100.7"]
account = "scanner@contoso.com"
allowed_senders = ["scanner@contoso.com"]
"""
    li = load_text(tmp_path, text).listeners[1]
    assert [str(n) for n in li.allow_from] == ["192.0.2.0/24", "198.51.100.7/32"]
    assert li.admits("192.0.2.50") and not li.admits("203.0.113.1")


def test_devices_example_old_printer_listener_loads(tmp_path: Path) -> None:
    """The commented old-printer listener in config/devices.toml, uncommented, loads."""
    text = (SHIPPED / "config" / "devices.toml").read_text()
    lines = text.splitlines()
    start = lines.index("# [[listeners]]")
    block = []
    for line in lines[start:]:
        if not line.startswith("# "):
            break
        block.append(line[2:])
    paths = certs.generate(tmp_path / "tls")
    listener = "\n".join(block).replace("/etc/xoauth2-proxy/tls/cert.pem", str(paths.cert_file))
    listener = listener.replace("/etc/xoauth2-proxy/tls/key.pem", str(paths.key_file))
    head, sep, tail = text.partition("[metrics]")
    cfg = config.parse(tomllib.loads(head + listener + "\n" + sep + tail),
                       SHIPPED / "config" / "devices.toml")
    li = next(li for li in cfg.listeners if li.name == "old-printers")
    assert li.old_tls and [str(n) for n in li.allow_from] == ["192.168.20.0/24"]


@dataclass(frozen=True)
class Example:
    size: int
    name: str


def read_example(top: config.Table) -> Example:
    """A config section as another package would write one: the reader's Table in, a frozen
    dataclass out, every mistake a ConfigError naming the key."""
    t = top.table("example", required=True)
    assert t is not None
    example = Example(size=int(t.number("size", 1, 1, 10)), name=t.text("name", "x"))
    t.done()
    return example


def test_a_section_reads_through_the_public_table(tmp_path: Path) -> None:
    file = tmp_path / "config.toml"
    top = config.Table({"example": {"size": 3}}, "", file)
    assert read_example(top) == Example(3, "x")
    with pytest.raises(ConfigError, match=r"config.toml: example.size: must be between 1 and 10"):
        read_example(config.Table({"example": {"size": 11}}, "", file))
    with pytest.raises(ConfigError, match=r"example.sise: unknown key; did you mean 'size'\?"):
        read_example(config.Table({"example": {"sise": 1}}, "", file))


def test_the_reader_and_model_import_without_the_loader(tmp_path: Path) -> None:
    """A section module elsewhere imports proxy.config.reader and .model; the loader, which
    imports that section, must then not be imported with them (it would be a cycle)."""
    code = ("import sys, proxy.config.reader, proxy.config.model, proxy.config as c\n"
            "assert 'proxy.config.loader' not in sys.modules, 'loader imported too early'\n"
            "assert c.load is sys.modules['proxy.config.loader'].load\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(config.__file__).resolve().parent.parent.parent),
         *filter(None, [os.environ.get("PYTHONPATH")])]))
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
