"""Where operator events come from: the login throttle's lockout and the refresh-failure watch
(each once per incident), and the notifier's filters and deduplication."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from proxy import config as config_mod
from proxy.config import Limits
from proxy.notify import events
from proxy.notify.dispatch import Notifier
from proxy.server.limits import Throttle


def kinds(since: int) -> list[events.Event]:
    return list(events.HUB.recent)[since:]


def test_lockout_publishes_once_per_lockout() -> None:
    throttle = Throttle(Limits(lockout_after=2, lockout_seconds=60))
    before = len(events.HUB.recent)
    for _ in range(4):
        throttle.failure("alice@contoso.example", "192.0.2.9")
    found = [e for e in kinds(before) if e.kind == "source_locked_out"]
    assert len(found) == 1
    assert found[0].fields == {"source": "192.0.2.9", "user": "alice@contoso.example"}
    assert "192.0.2.9 was locked out" in found[0].summary()


def test_refresh_failing_after_the_threshold_once_per_incident() -> None:
    hub = events.Hub()
    watch = events.RefreshWatch(after=0)
    original = events.HUB
    events.HUB = hub
    try:
        watch.failed("alice@contoso.example", "identity platform unreachable")
        watch.failed("alice@contoso.example", "identity platform unreachable")
        watch.succeeded("alice@contoso.example")
        watch.failed("alice@contoso.example", "timed out")
    finally:
        events.HUB = original
    assert [(e.kind, e.fields["reason"]) for e in hub.recent] == [
        ("refresh_failing", "identity platform unreachable"), ("refresh_failing", "timed out")]
    slow = events.RefreshWatch(after=900)
    slow.failed("bob@contoso.example", "x")
    assert "bob@contoso.example" not in slow.told


async def test_filters_and_repeat_window(tmp_path: Path) -> None:
    out = tmp_path / "calls"
    script = "import os, sys; open(sys.argv[1], 'a').write(os.environ['XOAUTH2_PROXY_ACCOUNT'] + '\\n')"
    cfg = config_mod.parse({
        "providers": {"p": {"tenant": "t", "client_id": "c"}},
        "accounts": {"a@example.com": {}, "b@example.com": {}},
        "notify": [{"type": "command", "argv": [sys.executable, "-c", script, str(out)],
                    "events": ["reauthorised"], "accounts": ["a@example.com"],
                    "repeat_after": 3600}]}, tmp_path / "c.toml")
    hub = events.Hub()
    notifier = Notifier(cfg.notify, lambda name: ("127.0.0.1", 0, "none"), hub=hub)
    notifier.start()
    try:
        hub.publish("reauthorised", "a@example.com", via="admin")
        hub.publish("reauthorised", "a@example.com", via="admin")  # within repeat_after
        hub.publish("reauthorised", "b@example.com", via="admin")  # not its account
        hub.publish("authorisation_needed", "a@example.com")  # not its event
        await notifier.idle()
        for _ in range(400):
            if out.exists():
                break
            await asyncio.sleep(0.05)
    finally:
        await notifier.aclose()
    assert out.read_text() == "a@example.com\n"
