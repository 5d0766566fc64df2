"""Token service and login CLI against the fake Entra ID over HTTPS, with real MSAL."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from proxy import store
from proxy.auth.errors import (
    AuthorisationNeeded,
    IdentityMismatch,
    NoUsableTokenFile,
    ProviderUnavailable,
    UnknownAccount,
    WrongPassword,
)
from proxy.auth.service import TokenService
from proxy.demo.process import DemoUpstream, http_session
from proxy.secret import Secret
from proxy.store import format as format_mod
from proxy.store.slots import new_password_slot
from tests.proxyenv import PASSWORD, USER, authorise, make_config, open_store, write_config

IMAP_SCOPE = "https://outlook.office.com/IMAP.AccessAsUser.All"


def introspect(upstream: DemoUpstream, token: str) -> dict[str, object]:
    session = http_session(upstream.ca_file)
    reply = session.post(f"{upstream.authority}/oauth2/v2.0/introspect", data={"token": token})
    reply.raise_for_status()
    return dict(reply.json())


def cache_secrets(token_store: store.TokenStore, user: str, password: str) -> tuple[list[str], list[str]]:
    """Access and refresh tokens inside the account's encrypted MSAL cache."""
    doc = json.loads(token_store.unlock(user, Secret(password)).payload)
    ats = [entry["secret"] for entry in doc.get("AccessToken", {}).values()]
    rts = [entry["secret"] for entry in doc.get("RefreshToken", {}).values()]
    return ats, rts


def cli(config: Path, *args: str, stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", "-c", str(config), *args],
                          input=stdin, capture_output=True, text=True, timeout=timeout)


def token_requests(upstream: DemoUpstream) -> int:
    return int(upstream.stats()["token_requests"])


async def test_cli_device_code_login_writes_sealed_file(tmp_path: Path, demo_upstream: DemoUpstream) -> None:
    config = write_config(tmp_path, demo_upstream)
    (tmp_path / "state").mkdir(mode=0o700)
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "-c", str(config), "login", USER,
                             "--password-file", "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stderr is not None
    proc.stdin.write(PASSWORD + "\n")
    proc.stdin.close()
    line = proc.stderr.readline()  # "To authorise …: To sign in, use … enter the code XXXX …"
    match = re.search(r"code (\S+) to authenticate", line)
    assert match, line
    demo_upstream.approve(match.group(1), USER)  # the person signs in at the fake Entra
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    assert proc.stdout is not None
    out = proc.stdout.read()
    assert "authorised as alice@contoso.example" in out

    cfg = make_config(tmp_path, demo_upstream)
    token_store = open_store(cfg)
    path = token_store.path(USER)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    raw = path.read_bytes()
    ats, rts = cache_secrets(token_store, USER, PASSWORD)
    assert ats and rts
    for secret in [*ats, *rts, PASSWORD, "demo-client-secret"]:
        assert secret.encode() not in raw
    assert b"RefreshToken" not in raw and b"secret" not in raw

    service = TokenService(cfg, token_store)
    token = await service.access_token(USER, Secret(PASSWORD), "imap")
    assert introspect(demo_upstream, token)["active"] is True
    assert introspect(demo_upstream, token)["username"] == USER

    before = token_requests(demo_upstream)
    with pytest.raises(WrongPassword):
        await service.access_token(USER, Secret(PASSWORD + "x"), "imap")
    with pytest.raises(UnknownAccount):
        await service.access_token("nobody@contoso.example", Secret(PASSWORD), "imap")
    assert token_requests(demo_upstream) == before


async def test_silent_refresh_persists_rotated_refresh_token(tmp_path: Path,
                                                             demo_upstream_factory: object) -> None:
    upstream = demo_upstream_factory(access_token_lifetime=2, strict_rotation=True)  # type: ignore[operator]
    cfg = make_config(tmp_path, upstream)
    token_store = authorise(cfg, upstream)
    _, (first_rt,) = cache_secrets(token_store, USER, PASSWORD)
    service = TokenService(cfg, token_store)
    first = await service.access_token(USER, Secret(PASSWORD), "imap")
    deadline = time.monotonic() + 10
    second = first
    while second == first and time.monotonic() < deadline:
        await asyncio.sleep(0.2)  # the token's lifetime is what is being waited for
        second = await service.access_token(USER, Secret(PASSWORD), "imap")
    assert second != first and introspect(upstream, second)["active"] is True
    _, (rotated,) = cache_secrets(token_store, USER, PASSWORD)
    assert rotated != first_rt  # the new refresh token reached the file
    # A fresh process (new service, same file) still refreshes: the used token was not kept.
    restarted = TokenService(cfg, store.TokenStore(cfg.state_dir))
    third = await restarted.access_token(USER, Secret(PASSWORD), "imap")
    assert introspect(upstream, third)["active"] is True


async def test_concurrent_logins_share_one_refresh(tmp_path: Path, demo_upstream_factory: object) -> None:
    upstream = demo_upstream_factory(access_token_lifetime=1)  # type: ignore[operator]
    cfg = make_config(tmp_path, upstream)
    token_store = authorise(cfg, upstream)
    service = TokenService(cfg, token_store)
    await service.access_token(USER, Secret(PASSWORD), "imap")  # warm: app built, key derived
    await asyncio.sleep(1.1)  # let the 1-second access token expire
    upstream.reset_stats()
    tokens = await asyncio.gather(*(service.access_token(USER, Secret(PASSWORD), "imap")
                                    for _ in range(200)))
    assert token_requests(upstream) == 1
    assert len(set(tokens)) == 1


async def test_revoked_refresh_token_needs_login(tmp_path: Path, demo_upstream_factory: object) -> None:
    upstream = demo_upstream_factory(access_token_lifetime=1)  # type: ignore[operator]
    cfg = make_config(tmp_path, upstream, accounts={  # in-band: tests/reauth
        USER: {"provider": "demo", "reauthorise_in_band": False}})
    token_store = authorise(cfg, upstream)
    service = TokenService(cfg, token_store)
    await service.access_token(USER, Secret(PASSWORD), "imap")
    upstream.revoke(USER)
    await asyncio.sleep(1.1)
    with pytest.raises(AuthorisationNeeded) as info:
        await service.access_token(USER, Secret(PASSWORD), "imap")
    assert info.value.code == "AADSTS50173"
    assert f"xoauth2-proxy login {USER}" in info.value.user_text
    # The file still decrypts, keeps its refresh token, and says why it needs a login.
    unlocked = token_store.unlock(USER, Secret(PASSWORD))
    assert unlocked.meta.needs_reauth and "AADSTS50173" in unlocked.meta.needs_reauth
    assert unlocked.meta.refresh_token_present
    before = token_requests(upstream)
    with pytest.raises(AuthorisationNeeded):  # no more requests until someone logs in again
        await TokenService(cfg, token_store).access_token(USER, Secret(PASSWORD), "imap")
    assert token_requests(upstream) == before
    authorise(cfg, upstream)  # a new login clears it
    token = await TokenService(cfg, token_store).access_token(USER, Secret(PASSWORD), "imap")
    assert introspect(upstream, token)["active"] is True


@pytest.mark.parametrize("mode", ["503", "hang", "garbage"])
async def test_provider_down_is_unavailable_and_file_untouched(
        tmp_path: Path, demo_upstream_factory: object, mode: str) -> None:
    upstream = demo_upstream_factory(access_token_lifetime=1)  # type: ignore[operator]
    cfg = make_config(tmp_path, upstream)
    token_store = authorise(cfg, upstream)
    service = TokenService(cfg, token_store)
    await service.access_token(USER, Secret(PASSWORD), "imap")
    raw = token_store.path(USER).read_bytes()
    upstream.configure(token_endpoint_mode=mode)
    await asyncio.sleep(1.1)
    started = time.monotonic()
    with pytest.raises(ProviderUnavailable):
        await service.access_token(USER, Secret(PASSWORD), "imap")
    assert time.monotonic() - started < cfg.providers["demo"].timeout + 3
    assert token_store.path(USER).read_bytes() == raw
    upstream.configure(token_endpoint_mode="ok")
    if mode == "503":
        # MSAL answers a 5xx from its throttle cache for 60 s (public clients) before it asks
        # the platform again; a new service (as after a restart) asks at once.
        service = TokenService(cfg, token_store)
    token = await service.access_token(USER, Secret(PASSWORD), "imap")  # recovers by itself
    assert introspect(upstream, token)["active"] is True


async def test_wrong_identity_is_refused_and_nothing_written(tmp_path: Path, demo_upstream: DemoUpstream) -> None:
    cfg = make_config(tmp_path, demo_upstream)
    demo_upstream.configure(auto_approve_user="mallory@contoso.example")
    token_store = open_store(cfg)
    from proxy.auth import flows
    account = cfg.account(USER)
    assert account is not None
    import io
    with pytest.raises(IdentityMismatch, match="signed in as mallory@contoso.example"):
        flows.login(cfg, account, token_store, Secret(PASSWORD), out=io.StringIO())
    assert not token_store.exists(USER)
    assert list(cfg.state_dir.iterdir()) == [] or all(p.name.startswith(".") for p in cfg.state_dir.iterdir())


async def test_wrong_passwords_leave_file_identical(tmp_path: Path, demo_upstream: DemoUpstream) -> None:
    cfg = make_config(tmp_path, demo_upstream)
    token_store = authorise(cfg, demo_upstream)
    raw = token_store.path(USER).read_bytes()
    service = TokenService(cfg, token_store)
    for i in range(10):
        with pytest.raises(WrongPassword):
            await service.access_token(USER, Secret(f"wrong {i}"), "imap")
    assert token_store.path(USER).read_bytes() == raw


async def test_damaged_token_file_answers_like_a_wrong_password(
        tmp_path: Path, demo_upstream: DemoUpstream) -> None:
    """Found before the password is tried: the client hears what a wrong password hears; the
    log detail names the file and the command."""
    cfg = make_config(tmp_path, demo_upstream)
    token_store = authorise(cfg, demo_upstream)
    token_store.path(USER).write_bytes(b"not a token file")
    service = TokenService(cfg, token_store)
    with pytest.raises(NoUsableTokenFile) as info:
        await service.access_token(USER, Secret(PASSWORD), "imap")
    assert info.value.user_text == WrongPassword(USER).user_text
    assert str(cfg.state_dir) in info.value.detail
    assert f"xoauth2-proxy login {USER}" in info.value.detail


def add_device(config: Path, label: str) -> str:
    """``passwd --add LABEL`` through the command line; returns the device's new password."""
    added = cli(config, "passwd", USER, "--add", label, "--password-file", "-",
                stdin=PASSWORD + "\n")
    assert added.returncode == 0, added.stderr
    return added.stdout.strip().splitlines()[-1]


async def test_passwd_add_and_remove_device_password(tmp_path: Path, demo_upstream: DemoUpstream) -> None:
    config = write_config(tmp_path, demo_upstream)
    cfg = make_config(tmp_path, demo_upstream)
    token_store = authorise(cfg, demo_upstream)
    device_password = add_device(config, "scanner-2nd-floor")
    assert len(device_password) >= 16
    listed = cli(config, "passwd", USER, "--list")
    assert "scanner-2nd-floor" in listed.stdout and "default" in listed.stdout
    service = TokenService(cfg, store.TokenStore(cfg.state_dir))
    token = await service.access_token(USER, Secret(device_password), "smtp")
    assert introspect(demo_upstream, token)["active"] is True
    removed = cli(config, "passwd", USER, "--remove", "scanner-2nd-floor")
    assert removed.returncode == 0, removed.stderr
    with pytest.raises(WrongPassword):
        await TokenService(cfg, store.TokenStore(cfg.state_dir)).access_token(
            USER, Secret(device_password), "smtp")
    assert await service.access_token(USER, Secret(PASSWORD), "smtp")  # the other still works
    assert token_store.exists(USER)


async def test_passwd_rotate_locks_out_an_old_copy_with_a_revoked_password(
        tmp_path: Path, demo_upstream: DemoUpstream) -> None:
    """``--remove`` alone keeps the data key: a copy of the old file plus the removed password
    still opened the current tokens. ``--rotate`` replaces the data key, and every other
    device keeps its password."""
    config = write_config(tmp_path, demo_upstream)
    cfg = make_config(tmp_path, demo_upstream)
    token_store = authorise(cfg, demo_upstream)
    passwords = {label: add_device(config, label) for label in ("printer", "scanner")}
    stolen = tmp_path / "stolen"
    stolen.mkdir(mode=0o700)
    shutil.copy2(token_store.path(USER), stolen / token_store.path(USER).name)
    removed = cli(config, "passwd", USER, "--remove", "printer")
    assert removed.returncode == 0 and "--rotate" in removed.stdout, removed.stderr

    def old_key_opens_current() -> bool:
        old_key = store.TokenStore(stolen).unlock(USER, Secret(passwords["printer"])).data_key
        path = token_store.path(USER)
        return format_mod.decrypt_payload(format_mod.decode(path.read_bytes(), path),
                                          old_key) is not None

    assert old_key_opens_current()  # what --remove alone leaves open
    rotated = cli(config, "passwd", USER, "--rotate", "--password-file", "-",
                  stdin=passwords["scanner"] + "\n")
    assert rotated.returncode == 0, rotated.stderr
    assert "every device keeps its password" in rotated.stdout
    assert "\t" not in rotated.stdout  # no password was issued
    assert not old_key_opens_current()
    service = TokenService(cfg, store.TokenStore(cfg.state_dir))
    token = await service.access_token(USER, Secret(passwords["scanner"]), "smtp")
    assert introspect(demo_upstream, token)["active"] is True
    assert await service.access_token(USER, Secret(PASSWORD), "imap")
    with pytest.raises(WrongPassword):
        await service.access_token(USER, Secret(passwords["printer"]), "smtp")
    await service.aclose()


async def test_passwd_rotate_reissue_gives_every_other_device_a_new_password(
        tmp_path: Path, demo_upstream: DemoUpstream) -> None:
    config = write_config(tmp_path, demo_upstream)
    cfg = make_config(tmp_path, demo_upstream)
    authorise(cfg, demo_upstream)
    scanner = add_device(config, "scanner")
    alone = cli(config, "passwd", USER, "--reissue")
    assert alone.returncode != 0 and "--add" in alone.stderr + alone.stdout  # needs --rotate
    rotated = cli(config, "passwd", USER, "--rotate", "--reissue", "--password-file", "-",
                  stdin=PASSWORD + "\n")
    assert rotated.returncode == 0, rotated.stderr
    assert "the password you typed still works" in rotated.stdout
    assert "every other device has a new password" in rotated.stdout
    label, new = rotated.stdout.strip().splitlines()[-1].split("\t")
    assert label == "scanner" and new != scanner
    service = TokenService(cfg, store.TokenStore(cfg.state_dir))
    assert await service.access_token(USER, Secret(PASSWORD), "imap")
    assert await service.access_token(USER, Secret(new), "imap")
    with pytest.raises(WrongPassword):
        await service.access_token(USER, Secret(scanner), "imap")
    await service.aclose()


def add_old_form_slot(token_store: store.TokenStore, label: str, password: str) -> None:
    """A slot as a release before public-key slots wrote it (its code path, ``slots``)."""
    unlocked = token_store.unlock(USER, Secret(PASSWORD))
    path = token_store.path(USER)
    assert isinstance(path, Path)
    doc = format_mod.decode(path.read_bytes(), path)
    slot, _ = new_password_slot(label, password.encode(), format_mod.ScryptParams(2**10),
                                unlocked.data_key, USER, time.time())
    path.write_bytes(format_mod.encode(dataclasses.replace(doc, slots=(*doc.slots, slot))))


async def test_passwd_rotate_issues_a_password_only_for_an_old_form_slot(
        tmp_path: Path, demo_upstream: DemoUpstream) -> None:
    config = write_config(tmp_path, demo_upstream)
    cfg = make_config(tmp_path, demo_upstream)
    token_store = authorise(cfg, demo_upstream)
    scanner = add_device(config, "scanner")
    add_old_form_slot(token_store, "fax", "fax password from an older release")
    listed = cli(config, "passwd", USER, "--list")
    assert "not used since this release: fax" in listed.stdout, listed.stderr
    rotated = cli(config, "passwd", USER, "--rotate", "--password-file", "-",
                  stdin=PASSWORD + "\n")
    assert rotated.returncode == 0, rotated.stderr
    assert "every other device keeps its password" in rotated.stdout
    issued = dict(line.split("\t") for line in rotated.stdout.splitlines() if "\t" in line)
    assert list(issued) == ["fax"]
    service = TokenService(cfg, store.TokenStore(cfg.state_dir))
    assert await service.access_token(USER, Secret(scanner), "smtp")
    assert await service.access_token(USER, Secret(issued["fax"]), "smtp")
    with pytest.raises(WrongPassword):
        await service.access_token(USER, Secret("fax password from an older release"), "smtp")
    assert "not used since" not in cli(config, "passwd", USER, "--list").stdout
    await service.aclose()


async def test_a_slot_at_a_lower_cost_is_upgraded_at_its_next_login(
        tmp_path: Path, demo_upstream: DemoUpstream, caplog: pytest.LogCaptureFixture) -> None:
    """A file written at an older cost keeps opening; the login that opens it rewrites its
    slot at the daemon's cost, and later logins need no derivation at the old cost."""
    caplog.set_level(logging.INFO, logger="proxy.auth")
    cfg = make_config(tmp_path, demo_upstream)
    older = authorise(cfg, demo_upstream)  # the tests' cost: n=2**15
    path = older.path(USER)
    assert json.loads(path.read_bytes().split(b"\n")[0])["slots"][0]["kdf"]["n"] == 2**15
    service = TokenService(cfg, store.TokenStore(cfg.state_dir, scrypt_n=2**16))
    assert await service.access_token(USER, Secret(PASSWORD), "imap")
    kdf = json.loads(path.read_bytes().split(b"\n")[0])["slots"][0]["kdf"]
    assert kdf["n"] == 2**16
    assert any(r.getMessage() == "slot_upgraded" for r in caplog.records)
    fresh = TokenService(cfg, store.TokenStore(cfg.state_dir, scrypt_n=2**16))
    assert await fresh.access_token(USER, Secret(PASSWORD), "smtp")
    assert not fresh.store.unlock(USER, Secret(PASSWORD)).stale_slot
    await service.aclose()
    await fresh.aclose()


async def test_client_credentials_app_only(tmp_path: Path, demo_upstream: DemoUpstream) -> None:
    app_user = "scanner@contoso.example"
    cfg = make_config(tmp_path, demo_upstream,
                      accounts={app_user: {"provider": "demo", "flow": "client_credentials"}})
    token_store = authorise(cfg, demo_upstream, user=app_user)
    token = await TokenService(cfg, token_store).access_token(app_user, Secret(PASSWORD), "smtp")
    info = introspect(demo_upstream, token)
    assert info["active"] is True and "/.default" in str(info["scope"])


async def test_accounts_and_logout_cli(tmp_path: Path, demo_upstream: DemoUpstream) -> None:
    config = write_config(tmp_path, demo_upstream)
    cfg = make_config(tmp_path, demo_upstream)
    authorise(cfg, demo_upstream)
    table = cli(config, "accounts")
    assert table.returncode == 0, table.stderr
    row = next(line for line in table.stdout.splitlines() if line.startswith(USER))
    assert "device_code" in row and "present" in row and "yes" in row and "default" in row
    assert cli(config, "logout", USER).returncode == 0
    assert "missing" in cli(config, "accounts").stdout
    assert cli(config, "logout", USER).returncode == 1


def test_requests_env_does_not_change_trust(tmp_path: Path, demo_upstream: DemoUpstream,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A CA bundle variable in the environment must not replace the configured CA."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/nonexistent/ca.pem")
    monkeypatch.setenv("CURL_CA_BUNDLE", "/nonexistent/ca.pem")
    cfg = make_config(tmp_path, demo_upstream)
    token_store = authorise(cfg, demo_upstream)
    assert token_store.exists(USER)
    assert os.environ["REQUESTS_CA_BUNDLE"]
    with pytest.raises(OSError):  # requests trusting the environment fails (SSLError is one)
        requests.get(demo_upstream.entra_url, timeout=5)
