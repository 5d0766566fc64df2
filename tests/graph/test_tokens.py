"""Graph tokens from the same account's MSAL cache and refresh token; ``login`` asks for the
Graph scopes when a Graph upstream is configured; ``accounts`` shows the resources; the config
of Graph upstreams and fallbacks."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from proxy import config as config_mod
from proxy.auth.errors import AuthorisationNeeded
from proxy.auth.service import TokenService
from proxy.demo.process import DemoUpstream, http_session
from proxy.secret import Secret
from tests.auth.test_service import cli
from tests.graph.util import graph_config, graph_dict, write_graph_config
from tests.proxyenv import PASSWORD, USER, authorise, make_config

MIME = b"From: alice@contoso.example\r\nTo: bob@example.com\r\nSubject: t\r\n\r\nhello\r\n"


def graph_send(upstream: DemoUpstream, token: str, user: str = "me") -> int:
    path = "me" if user == "me" else f"users/{user}"
    with http_session(upstream.ca_file) as session:
        return session.post(f"{upstream.graph_url}/v1.0/{path}/sendMail",
                            headers={"authorization": f"Bearer {token}",
                                     "content-type": "text/plain"},
                            data=base64.b64encode(MIME)).status_code


async def test_graph_token_from_the_same_refresh_token(tmp_path: Path,
                                                      demo_upstream: DemoUpstream) -> None:
    cfg = graph_config(tmp_path, demo_upstream)
    assert "https://graph.microsoft.com/Mail.Send" in cfg.login_scopes(cfg.accounts[USER])
    token_store = authorise(cfg, demo_upstream)
    assert token_store.info(USER).meta.resources == ("graph", "outlook")
    demo_upstream.reset_stats()
    tokens = TokenService(cfg, token_store)
    graph = await tokens.access_token(USER, Secret(PASSWORD), "graph")
    smtp = await tokens.access_token(USER, Secret(PASSWORD), "smtp")
    assert graph != smtp
    assert graph_send(demo_upstream, graph) == 202
    assert graph_send(demo_upstream, smtp) == 401  # an Outlook token is not for Graph
    grants = demo_upstream.stats()["grant_types"]
    assert set(grants) <= {"refresh_token"}  # no new sign-in: the same refresh token
    assert await tokens.access_token(USER, Secret(PASSWORD), "graph") == graph  # from memory
    await tokens.aclose()


async def test_app_only_graph_token(tmp_path: Path, demo_upstream: DemoUpstream) -> None:
    app_user = "scanner@contoso.example"
    cfg = graph_config(tmp_path, demo_upstream,
                       accounts={app_user: {"provider": "demo", "flow": "client_credentials"}})
    token_store = authorise(cfg, demo_upstream, user=app_user)
    tokens = TokenService(cfg, token_store)
    graph = await tokens.access_token(app_user, Secret(PASSWORD), "graph")
    assert graph_send(demo_upstream, graph, user=USER) == 202
    await tokens.aclose()


async def test_without_a_graph_upstream_login_asks_for_outlook_only(
        tmp_path: Path, demo_upstream: DemoUpstream) -> None:
    cfg = make_config(tmp_path, demo_upstream)
    assert not any("graph" in s for s in cfg.login_scopes(cfg.accounts[USER]))
    token_store = authorise(cfg, demo_upstream)
    assert token_store.info(USER).meta.resources == ("outlook",)
    tokens = TokenService(cfg, token_store)
    with pytest.raises(Exception, match="no Graph upstream"):
        await tokens.access_token(USER, Secret(PASSWORD), "graph")
    await tokens.aclose()


def test_accounts_shows_resources(tmp_path: Path, demo_upstream: DemoUpstream) -> None:
    path = write_graph_config(tmp_path, demo_upstream)
    authorise(graph_config(tmp_path, demo_upstream), demo_upstream)
    table = cli(path, "accounts")
    assert table.returncode == 0, table.stderr
    assert "RESOURCES" in table.stdout
    row = next(line for line in table.stdout.splitlines() if line.startswith(USER))
    assert row.endswith("graph,outlook")


def test_config_of_graph_upstreams_and_fallbacks(tmp_path: Path,
                                                 demo_upstream: DemoUpstream) -> None:
    cfg = graph_config(tmp_path, demo_upstream, fallback=True,
                       graph={"save_to_sent_items": False})
    graph = cfg.graph.upstreams["graph"]
    assert graph.base_url.endswith("/v1.0") and graph.save_to_sent_items is False
    assert cfg.graph.fallbacks["smtp"].graph == "graph"
    assert cfg.graph.fallbacks["smtp"].retry_seconds == 3600
    cases = [
        ({"base_url": "http://graph.example/v1.0"}, False, "must be an https:// URL"),
        ({"verify": False}, False, "always verified"),
        ({"saveToSentItems": False}, False, "unknown key"),
    ]
    for extra, fallback, message in cases:
        data = graph_dict(tmp_path, demo_upstream, graph=extra, fallback=fallback)
        with pytest.raises(config_mod.ConfigError, match=message):
            config_mod.parse(data, tmp_path / "config.toml")
    data = graph_dict(tmp_path, demo_upstream)
    data["upstreams"]["smtp"]["fallback"] = "nowhere"
    with pytest.raises(config_mod.ConfigError, match='protocol = "graph"'):
        config_mod.parse(data, tmp_path / "config.toml")
    data = graph_dict(tmp_path, demo_upstream)
    data["upstreams"]["imap"]["fallback"] = "graph"
    with pytest.raises(config_mod.ConfigError, match="SMTP upstreams only"):
        config_mod.parse(data, tmp_path / "config.toml")


async def test_graph_without_consent_leaves_the_account_usable(
        tmp_path: Path, demo_upstream: DemoUpstream) -> None:
    """An account that signed in before a Graph upstream was configured has no Graph consent:
    its Graph token is refused (AADSTS65001), its other resources are not, and the token file
    is not marked as needing a new sign-in."""
    before = make_config(tmp_path, demo_upstream)
    token_store = authorise(before, demo_upstream)
    assert "graph" not in token_store.info(USER).meta.resources
    cfg = graph_config(tmp_path, demo_upstream,
                       accounts={USER: {"provider": "demo", "flow": "device_code",
                                        "reauthorise_in_band": False}})
    tokens = TokenService(cfg, token_store)
    with pytest.raises(AuthorisationNeeded) as refused:
        await tokens.access_token(USER, Secret(PASSWORD), "graph")
    assert refused.value.code == "AADSTS65001"
    assert await tokens.access_token(USER, Secret(PASSWORD), "imap")
    assert token_store.info(USER).meta.needs_reauth is None
    await tokens.aclose()
