"""`xoauth2-proxy import emailproxy` piece by piece: reading email-oauth2-proxy's INI and its
encrypted tokens, what maps to what, what is refused and why, and what is never overwritten.

Tokens here are sealed as email-oauth2-proxy seals them (Fernet, key = PBKDF2-HMAC-SHA256 of
the password); the test with the real email-oauth2-proxy is test_emailproxy_import.py.
"""

from __future__ import annotations

import base64
import io
import os
import stat
import tomllib
from pathlib import Path

import msal
import pytest
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from proxy import cli, store
from proxy import config as config_mod
from proxy.demo.process import DemoUpstream, http_session
from proxy.migrate import emailproxy, peer_config
from proxy.secret import Secret

CLIENT_ID = "6d2f8a41-3b7e-4c59-9e10-2a4b6c8d0e1f"
M365 = "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0"
SCOPE = ("https://outlook.office.com/IMAP.AccessAsUser.All "
         "https://outlook.office.com/POP.AccessAsUser.All https://outlook.office.com/SMTP.Send "
         "offline_access")


def seal(password: str, value: str, salt: bytes = b"0123456789abcdef",
         iterations: int = 1000) -> dict[str, str]:
    """The options email-oauth2-proxy stores for a token (a low count keeps tests fast)."""
    key = PBKDF2HMAC(algorithm=hashes.SHA256(), length=32, salt=salt,
                     iterations=iterations).derive(password.encode())
    return {"token_salt": base64.b64encode(salt).decode(), "token_iterations": str(iterations),
            "refresh_token": Fernet(base64.urlsafe_b64encode(key)).encrypt(value.encode()).decode()}


def ini(sections: dict[str, dict[str, str]]) -> str:
    return "".join(f"[{name}]\n" + "".join(f"{k} = {v}\n" for k, v in options.items()) + "\n"
                   for name, options in sections.items())


def account(token_base: str = M365, **extra: str) -> dict[str, str]:
    return {"permission_url": f"{token_base}/authorize", "token_url": f"{token_base}/token",
            "oauth2_scope": SCOPE, "redirect_uri": "http://localhost:8080", "client_id": CLIENT_ID,
            **extra}


def check(tmp_path: Path, sections: dict[str, dict[str, str]], *,
          passwords: Path | None = None,
          cache: dict[str, dict[str, str]] | None = None) -> tuple[int, str, dict]:
    """Run the import with --check; (exit code, its output, the config it would write)."""
    source = tmp_path / "emailproxy.config"
    source.write_text(ini(sections))
    cache_store = None
    if cache is not None:
        cache_store = tmp_path / "cache"
        cache_store.write_text(ini(cache))
    out = io.StringIO()
    options = emailproxy.Options(config_file=source, output=tmp_path / "new.toml",
                                 state_dir=tmp_path / "state", check=True,
                                 cache_store=cache_store,
                                 password_file=str(passwords) if passwords else None)
    code = emailproxy.Importer(options, out).run()
    text = out.getvalue()
    document = text[text.index("# Made by"):] if "# Made by" in text else ""
    return code, text, tomllib.loads(document) if document else {}


def test_decrypt_with_stored_and_legacy_iteration_counts(tmp_path: Path) -> None:
    stored = seal("pw one", "rt-1", iterations=2000)
    legacy = seal("pw two", "rt-2", iterations=peer_config.LEGACY_ITERATIONS)
    del legacy["token_iterations"]  # files from before 2023 have no count: 100,000
    source = tmp_path / "c"
    source.write_text(ini({"a@x.example": account(**stored), "b@x.example": account(**legacy)}))
    a, b = peer_config.load(source).accounts
    assert a.decrypt("refresh_token", Secret("pw one")) == "rt-1"
    assert b.decrypt("refresh_token", Secret("pw two")) == "rt-2"
    with pytest.raises(peer_config.WrongPeerPassword):
        a.decrypt("refresh_token", Secret("pw two"))
    broken = account(token_salt="not base64!", refresh_token="gAAAA")
    source.write_text(ini({"c@x.example": broken}))
    with pytest.raises(peer_config.PeerConfigError, match="token_salt is not base64"):
        peer_config.load(source).accounts[0].decrypt("refresh_token", Secret("x"))


def test_cache_store_supplies_tokens_and_nothing_else(tmp_path: Path) -> None:
    sealed = seal("pw", "rt")
    cache = {"a@x.example": {**sealed, "client_id": "from-the-cache"},
             "stray@x.example": sealed}
    source, store_file = tmp_path / "config", tmp_path / "cache"
    source.write_text(ini({"a@x.example": account()}))
    store_file.write_text(ini(cache))
    assert not peer_config.load(source).accounts[0].has_tokens
    (a,) = peer_config.load(source, store_file).accounts  # no section for stray: not an account
    assert a.has_tokens and a.get("client_id") == CLIENT_ID  # config options stay the config's
    assert a.decrypt("refresh_token", Secret("pw")) == "rt"
    with pytest.raises(peer_config.PeerConfigError, match="no such file"):
        peer_config.load(source, tmp_path / "missing")


def test_catch_all_settings_are_inherited_by_signed_in_users(tmp_path: Path) -> None:
    sections = {"emailproxy": {"allow_catch_all_accounts": "True"},
                "@contoso.example": account(), "@": account(client_id="other")}
    cache = {"ann@contoso.example": seal("pw", "rt")}
    code, text, config = check(tmp_path, sections, cache=cache)
    assert config["accounts"] == {"ann@contoso.example": {"provider": "contoso-onmicrosoft-com",
                                                          "flow": "auth_code"}}
    assert config["providers"]["contoso-onmicrosoft-com"]["client_id"] == CLIENT_ID
    assert "note: [@contoso.example] is a catch-all account" in text
    assert code == 1  # no --password-file: the password is not known, so not ready


def test_servers_accounts_and_settings_map(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("x")
    key.write_text("x")
    v1 = "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2"
    office365 = ("https://outlook.office365.com/IMAP.AccessAsUser.All "
                 "https://outlook.office365.com/SMTP.Send offline_access")
    sections = {
        "IMAP-1993": {"server_address": "outlook.office365.com", "server_port": "993"},
        "IMAP-2993": {"server_address": "imap.example.net", "server_port": "993",
                      "local_address": "0.0.0.0",  # noqa: S104 - a config value, not a bind
                      "local_certificate_path": str(cert),
                      "local_key_path": str(key)},
        "POP-1995": {"server_address": "outlook.office365.com", "server_port": "995",
                     "local_address": "127.0.0.1"},
        "SMTP-1587": {"server_address": "smtp.office365.com", "server_port": "587",
                      "server_starttls": "True", "local_address": "127.0.0.1",
                      "local_starttls": "True", "local_certificate_path": str(cert),
                      "local_key_path": str(key)},
        "SMTP-1465": {"server_address": "smtp.example.net", "server_port": "465",
                      "local_address": "::1"},
        "alice@contoso.example": account(**seal("alice-pw", "rt")),
        "bob@contoso.example": account(oauth2_flow="device", oauth2_scope=office365,
                                       **seal("bob-pw", "rt")),
        "cat@fabrikam.example": account("https://login.microsoftonline.com/fabrikam/oauth2/v2.0",
                                        **seal("cat-pw", "rt")),
        "dan@contoso.example": account(v1),
        "eve@contoso.example": account(oauth2_flow="password"),
        "fay@contoso.example": account(jwt_certificate_path="c.pem", jwt_key_path="k.pem"),
        "gus@gmail.com": account("https://oauth2.googleapis.com"),
    }
    passwords = tmp_path / "passwords"
    passwords.write_text("alice@contoso.example alice-pw\nbob@contoso.example wrong\n")
    code, text, config = check(tmp_path, sections, passwords=passwords)
    assert code == 1
    lines = text.splitlines()
    assert "alice@contoso.example: would import (auth_code via provider contoso-onmicrosoft-com" \
        in text
    assert any(line.startswith("bob@contoso.example: skipped: the password given does not "
                               "decrypt") for line in lines)
    assert any(line.startswith("cat@fabrikam.example: skipped: no password given") for line in lines)
    assert "dan@contoso.example: skipped: its token_url is the identity platform's v1.0" in text
    assert "eve@contoso.example: skipped: it uses the resource owner password flow" in text
    assert "fay@contoso.example: skipped: it signs in with a certificate" in text
    assert "gus@gmail.com: skipped: it is not a Microsoft 365 account" in text
    assert "note: [IMAP-2993]" not in text  # TLS: it may keep listening on every address

    providers = config["providers"]
    assert set(providers) == {"contoso-onmicrosoft-com", "contoso-onmicrosoft-com-2", "fabrikam"}
    assert providers["contoso-onmicrosoft-com"] == {
        "authority": "https://login.microsoftonline.com", "tenant": "contoso.onmicrosoft.com",
        "client_id": CLIENT_ID}  # the documented scopes: no scopes table
    assert providers["contoso-onmicrosoft-com-2"]["scopes"]["imap"] == [
        "https://outlook.office365.com/IMAP.AccessAsUser.All"]
    assert providers["contoso-onmicrosoft-com-2"]["scopes"]["pop"] == office365.split()[:2]
    assert config["accounts"]["bob@contoso.example"]["flow"] == "device_code"
    assert set(config["accounts"]) == {"alice@contoso.example", "bob@contoso.example",
                                       "cat@fabrikam.example"}

    listeners = {li["name"]: li for li in config["listeners"]}
    assert listeners["imap-1993"]["listen"] == "127.0.0.1:1993"  # '::' without TLS: loopback
    assert "note: [IMAP-1993]: email-oauth2-proxy listened on :: without TLS" in text
    assert listeners["imap-2993"] | {} == {
        "name": "imap-2993", "protocol": "imap", "tls": "implicit", "cert_file": str(cert),
        "key_file": str(key), "listen": "0.0.0.0:2993",  # noqa: S104 - as above
        "upstream": "imap-imap-example-net-993"}
    assert listeners["smtp-1587"]["tls"] == "starttls"
    assert listeners["smtp-1465"]["listen"] == "[::1]:1465"
    upstreams = config["upstreams"]
    assert upstreams["smtp"] == {"protocol": "smtp", "host": "smtp.office365.com", "port": 587,
                                 "tls": "starttls"}
    assert upstreams[listeners["smtp-1465"]["upstream"]]["tls"] == "implicit"
    assert len(upstreams) == 5
    assert not (tmp_path / "new.toml").exists() and not (tmp_path / "state").exists()


def test_app_only_secret_moves_to_a_file(tmp_path: Path, demo_upstream: DemoUpstream) -> None:
    secret = "demo-client-secret"  # the fake Entra's app secret
    base = f"{demo_upstream.authority}/oauth2/v2.0"
    app = {"token_url": f"{base}/token", "oauth2_scope": "https://outlook.office365.com/.default",
           "oauth2_flow": "client_credentials", "client_id": CLIENT_ID, "client_secret": secret}
    source = tmp_path / "emailproxy.config"
    source.write_text(ini({
        "svc@contoso.example": app,
        "enc@contoso.example": {**app, "client_secret": "", "client_secret_encrypted": "gAAAA"},
        "bad@contoso.example": {**app, "client_id": "other-app", "client_secret": "wrong"}}))
    passwords = tmp_path / "passwords"
    passwords.write_text("svc@contoso.example any password\nbad@contoso.example any password\n")
    output = tmp_path / "etc" / "config.toml"
    out = io.StringIO()
    code = emailproxy.Importer(emailproxy.Options(
        config_file=source, output=output, state_dir=tmp_path / "state",
        password_file=str(passwords), ca_file=Path(demo_upstream.ca_file)), out).run()
    text = out.getvalue()
    assert code == 1, text
    assert "svc@contoso.example: imported (app-only; client secret verified" in text
    assert "enc@contoso.example: skipped: its client secret is stored encrypted" in text
    assert ("bad@contoso.example: skipped: the identity platform refused the app-only sign-in: "
            "invalid_client: AADSTS7000215") in text
    assert demo_upstream.stats()["grant_types"] == {"client_credentials": 2}
    secret_file = output.parent / f"{demo_upstream.authority.rsplit('/', 1)[1]}.client-secret"
    assert secret_file.read_text() == secret + "\n"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert secret not in output.read_text() and secret not in text
    cfg = config_mod.load(output)
    assert sorted(cfg.accounts) == ["bad@contoso.example", "svc@contoso.example"]
    assert cfg.accounts["svc@contoso.example"].flow == "client_credentials"
    assert cfg.providers[cfg.accounts["svc@contoso.example"].provider].client_secret() == secret
    unlocked = store.TokenStore(cfg.state_dir).unlock("svc@contoso.example",
                                                      Secret("any password"))
    assert unlocked.meta.flow == "client_credentials"
    assert not store.TokenStore(cfg.state_dir).exists("bad@contoso.example")


def test_password_file_and_account_selection_errors(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "emailproxy.config"
    source.write_text(ini({"a@x.example": account(**seal("pw", "rt"))}))
    bad = tmp_path / "passwords"
    bad.write_text("a@x.example\n")
    base = ["import", "emailproxy", str(source), "--output", str(tmp_path / "o.toml"),
            "--state-dir", str(tmp_path / "state")]
    assert cli.main([*base, "--password-file", str(bad)]) == cli.EXIT_FAILED
    assert "line 1: expected 'ACCOUNT PASSWORD'" in capsys.readouterr().err
    assert cli.main([*base, "--accounts", "nobody@x.example"]) == cli.EXIT_FAILED
    assert "no account section [nobody@x.example]" in capsys.readouterr().err
    assert cli.main(["import", "emailproxy", str(tmp_path / "missing")]) == cli.EXIT_FAILED
    assert "no such file" in capsys.readouterr().err


# --- against the fake Microsoft 365 ----------------------------------------------------------


def refresh_token(upstream: DemoUpstream, user: str) -> str:
    """A refresh token for ``user`` from a device-code sign-in (auto-approved)."""
    upstream.configure(auto_approve_user=user)
    app = msal.PublicClientApplication(CLIENT_ID, authority=upstream.authority,
                                       instance_discovery=False,
                                       http_client=http_session(upstream.ca_file))
    flow = app.initiate_device_flow(scopes=SCOPE.split()[:3])
    result = app.acquire_token_by_device_flow(flow)
    upstream.configure(auto_approve_user=None)
    return str(result["refresh_token"])


def test_refused_token_existing_files_and_force(tmp_path: Path,
                                                demo_upstream: DemoUpstream) -> None:
    users = {"ok@contoso.example": "ok password", "gone@contoso.example": "gone password"}
    base = f"{demo_upstream.authority}/oauth2/v2.0"
    source = tmp_path / "emailproxy.config"
    source.write_text(ini({user: account(base, **seal(pw, refresh_token(demo_upstream, user)))
                           for user, pw in users.items()}))
    demo_upstream.revoke("gone@contoso.example")
    passwords = tmp_path / "passwords"
    passwords.write_text("".join(f"{u} {p}\n" for u, p in users.items()))
    output, state = tmp_path / "new.toml", tmp_path / "state"
    demo_upstream.reset_stats()

    def run(*extra: str) -> tuple[int, str]:
        out = io.StringIO()
        options = emailproxy.Options(config_file=source, output=output, state_dir=state,
                                     password_file=str(passwords),
                                     ca_file=Path(demo_upstream.ca_file), force="--force" in extra,
                                     accounts=tuple(a for a in extra if "@" in a))
        return emailproxy.Importer(options, out).run(), out.getvalue()

    code, text = run()
    assert code == 1
    assert "ok@contoso.example: imported (token verified by one refresh" in text
    assert ("gone@contoso.example: skipped: the identity platform refused its stored refresh "
            "token (AADSTS50173)") in text
    assert "run `xoauth2-proxy login gone@contoso.example`" in text
    assert demo_upstream.stats()["grant_types"] == {"refresh_token": 2}
    first = output.read_bytes()
    token_file = store.TokenStore(state).path("ok@contoso.example")
    before = token_file.read_bytes()

    with pytest.raises(emailproxy.ImportFailed, match="exists; choose another --output"):
        run()
    assert output.read_bytes() == first
    output.unlink()
    code, text = run("ok@contoso.example")
    assert "ok@contoso.example: skipped: its token file exists already; --force replaces it" \
        in text
    assert token_file.read_bytes() == before and code == 1
    code, text = run("ok@contoso.example", "--force")
    assert code == 0 and "imported 1 of 1 account;" in text
    assert token_file.read_bytes() != before
    assert store.TokenStore(state).unlock("ok@contoso.example", Secret("ok password"))
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
