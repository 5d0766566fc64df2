"""Writers that change an account's grant or data key (``passwd --rotate``, ``login``, a
re-authorisation) wait for a refresh in flight, under the same refresh lock: the refresh saves
its rotated refresh token first, and neither overwrites the other. The fake Entra holds the
daemon's token request while the other writer runs."""

from __future__ import annotations

import asyncio
import io
import json
import secrets
from pathlib import Path

import pytest

from proxy import config as config_mod
from proxy import store
from proxy.auth import flows
from proxy.auth.errors import AuthorisationNeeded
from proxy.auth.service import TokenService
from proxy.demo.process import DemoUpstream
from proxy.secret import Secret
from tests.proxyenv import PASSWORD, USER, authorise, make_config, until_token_request_held

HELD = 3.0  # seconds the fake Entra holds the daemon's token request


def refresh_tokens(cfg: config_mod.Config) -> list[str]:
    """The refresh tokens in the account's file, read as another process would."""
    doc = json.loads(store.TokenStore(cfg.state_dir).unlock(USER, Secret(PASSWORD)).payload)
    return sorted(entry["secret"] for entry in doc.get("RefreshToken", {}).values())


async def refresh_held(upstream: DemoUpstream, service: TokenService,
                       first: str) -> asyncio.Task[str]:
    """A forced refresh (the upstream refused ``first``), once its request is held."""
    upstream.configure(token_endpoint_delay=HELD)
    task = asyncio.create_task(service.access_token(USER, Secret(PASSWORD), "imap",
                                                    rejected=first))
    await until_token_request_held(upstream, task)
    upstream.configure(token_endpoint_delay=0.0)  # the other writer's requests go at once
    return task


@pytest.fixture
def cfg(tmp_path: Path, demo_upstream: DemoUpstream) -> config_mod.Config:
    cfg = make_config(tmp_path, demo_upstream, accounts={
        USER: {"provider": "demo", "reauthorise_in_band": False}})
    authorise(cfg, demo_upstream).close()
    return cfg


async def test_a_rotation_during_a_refresh_keeps_the_rotated_refresh_token(
        cfg: config_mod.Config, demo_upstream: DemoUpstream) -> None:
    """Strict rotation: a refresh token works once. ``passwd --rotate`` used to re-encrypt the
    old refresh token while the daemon's refresh spent it; the daemon's save then failed on the
    new data key, and the next refresh from the file was refused."""
    demo_upstream.configure(strict_rotation=True)
    service = TokenService(cfg, store.TokenStore(cfg.state_dir))
    first = await service.access_token(USER, Secret(PASSWORD), "imap")
    task = await refresh_held(demo_upstream, service, first)
    cli = store.TokenStore(cfg.state_dir)  # as the passwd command does, in its own store
    unlocked = await asyncio.to_thread(cli.unlock, USER, Secret(PASSWORD))
    assert not task.done()  # the rotation starts while the refresh is held
    await asyncio.to_thread(cli.rotate, unlocked, Secret(PASSWORD),
                            generate=lambda: Secret(secrets.token_urlsafe(18)))
    second = await task
    assert second != first
    restarted = TokenService(cfg, store.TokenStore(cfg.state_dir))
    third = await restarted.access_token(USER, Secret(PASSWORD), "imap", rejected=second)
    assert third not in (first, second)  # refreshed from the file: its refresh token is live
    fourth = await service.access_token(USER, Secret(PASSWORD), "imap", rejected=third)
    assert fourth not in (first, second, third)  # the first daemon follows the new data key
    await service.aclose()
    await restarted.aclose()


async def test_a_login_during_a_refresh_is_not_overwritten(
        cfg: config_mod.Config, demo_upstream: DemoUpstream) -> None:
    """The daemon's save used to write its refresh of the old grant over the new sign-in."""
    service = TokenService(cfg, store.TokenStore(cfg.state_dir))
    first = await service.access_token(USER, Secret(PASSWORD), "imap")
    task = await refresh_held(demo_upstream, service, first)
    account = cfg.account(USER)
    assert account is not None and not task.done()  # the sign-in starts during the refresh
    await asyncio.to_thread(flows.login, cfg, account, store.TokenStore(cfg.state_dir),
                            Secret(PASSWORD), out=io.StringIO())
    signed_in = refresh_tokens(cfg)
    await task
    assert refresh_tokens(cfg) == signed_in
    await service.aclose()


async def test_a_login_during_a_refused_refresh_is_not_marked(
        cfg: config_mod.Config, demo_upstream: DemoUpstream) -> None:
    """The grant was revoked; the operator signs in again while the daemon's refresh is being
    refused. The daemon's mark used to land on the new sign-in, so every login after it was
    told to run ``xoauth2-proxy login`` again."""
    service = TokenService(cfg, store.TokenStore(cfg.state_dir))
    first = await service.access_token(USER, Secret(PASSWORD), "imap")
    demo_upstream.revoke(USER)
    task = await refresh_held(demo_upstream, service, first)
    account = cfg.account(USER)
    assert account is not None and not task.done()  # the sign-in starts during the refresh
    await asyncio.to_thread(flows.login, cfg, account, store.TokenStore(cfg.state_dir),
                            Secret(PASSWORD), out=io.StringIO())
    with pytest.raises(AuthorisationNeeded):
        await task
    assert await service.access_token(USER, Secret(PASSWORD), "imap")
    await service.aclose()


async def test_a_rotation_just_before_the_refresh_lock_is_followed(
        cfg: config_mod.Config, demo_upstream: DemoUpstream,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The rotation ends between a login's unlock and its refresh: under the lock the login
    finds a new data key, opens the file again and refreshes from it, instead of spending the
    refresh token from its own copy and failing to save the new one."""
    demo_upstream.configure(strict_rotation=True)
    service = TokenService(cfg, store.TokenStore(cfg.state_dir))
    first = await service.access_token(USER, Secret(PASSWORD), "imap")
    cli = store.TokenStore(cfg.state_dir)
    real = service.store.refresh_lock
    rotated: list[bool] = []

    def rotate_first(account: str, timeout: float | None = None) -> object:
        if not rotated:
            rotated.append(True)
            cli.rotate(cli.unlock(USER, Secret(PASSWORD)), Secret(PASSWORD),
                       generate=lambda: Secret(secrets.token_urlsafe(18)))
        return real(account, timeout)

    monkeypatch.setattr(service.store, "refresh_lock", rotate_first)
    second = await service.access_token(USER, Secret(PASSWORD), "imap", rejected=first)
    assert rotated and second != first
    restarted = TokenService(cfg, store.TokenStore(cfg.state_dir))
    third = await restarted.access_token(USER, Secret(PASSWORD), "imap", rejected=second)
    assert third not in (first, second)  # the file's refresh token is the live one
    await service.aclose()
    await restarted.aclose()
