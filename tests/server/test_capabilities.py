"""The per-upstream cache of post-login IMAP capabilities, on a real state directory."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from proxy.config import Upstream
from proxy.server import capabilities
from proxy.server.capabilities import FILE_NAME, CapabilityCache

UP = Upstream("m365", "imap", "outlook.office365.com", 993, "implicit")
M365 = "IMAP4 IMAP4rev1 AUTH=PLAIN AUTH=XOAUTH2 SASL-IR UIDPLUS MOVE ID IDLE LITERAL+"


def events(caplog: pytest.LogCaptureFixture) -> list[dict]:
    return [{"event": r.getMessage(), **getattr(r, "fields", {})} for r in caplog.records]


def state(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir(mode=0o700)
    return path


def test_learned_list_is_kept_and_survives_a_restart(tmp_path: Path) -> None:
    cache = CapabilityCache(state(tmp_path))
    entry = cache.get(UP)
    assert entry.text is None and entry.due()
    entry.learned(M365 + "\r\n")  # no event loop here: written at once
    assert entry.text == M365 and not entry.due()
    assert cache.get(UP) is entry
    saved = tmp_path / "state" / FILE_NAME
    assert saved.stat().st_mode & 0o777 == 0o600
    assert json.loads(saved.read_bytes()) == {
        "upstreams": {"m365": {"server": "outlook.office365.com:993", "capabilities": M365}}}

    again = CapabilityCache(tmp_path / "state").get(UP)
    assert again.text == M365
    assert again.due()  # announced at once, confirmed by the first login of this process


def test_file_is_rewritten_only_when_the_list_changes(tmp_path: Path) -> None:
    entry = CapabilityCache(state(tmp_path)).get(UP)
    entry.learned(M365)
    saved = tmp_path / "state" / FILE_NAME
    before = saved.stat().st_ino
    entry.learned(M365)
    entry.learned("  " + M365.replace(" ", "  "))  # the same list, spaced differently
    assert saved.stat().st_ino == before
    entry.learned(M365 + " NAMESPACE")
    assert saved.stat().st_ino != before
    assert CapabilityCache(tmp_path / "state").get(UP).text == M365 + " NAMESPACE"


def test_refresh_after_the_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    entry = CapabilityCache(None).get(UP)
    now = [1000.0]
    monkeypatch.setattr(capabilities.time, "monotonic", lambda: now[0])
    entry.learned(M365)
    now[0] += capabilities.REFRESH_SECONDS
    assert not entry.due()
    now[0] += 1
    assert entry.due()
    entry.learned(M365)
    assert not entry.due()


def test_another_server_under_the_same_name_starts_unknown(tmp_path: Path) -> None:
    cache = CapabilityCache(state(tmp_path))
    cache.get(UP).learned(M365)
    moved = Upstream("m365", "imap", "127.0.0.1", 1993, "implicit")
    assert cache.get(moved).text is None
    assert CapabilityCache(tmp_path / "state").get(moved).text is None
    assert CapabilityCache(tmp_path / "state").get(UP).text == M365


@pytest.mark.parametrize(
    "content",
    [
        b"\x00\xff not json",
        b"[]",
        b'{"upstreams": []}',
        b'{"upstreams": {"m365": {"server": "outlook.office365.com:993"}}}',
        b'{"upstreams": {"m365": {"server": 993, "capabilities": "IDLE"}}}',
        b'{"upstreams": {"m365": {"server": "outlook.office365.com:993", "capabilities": "A\\u0000B"}}}',
        b'{"upstreams": {"m365": {"server": "outlook.office365.com:993", "capabilities": " "}}}',
        b'{"upstreams": {}}' + b" " * (64 * 1024),
    ],
)
def test_damaged_file_is_ignored_and_replaced(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                              content: bytes) -> None:
    (state(tmp_path) / FILE_NAME).write_bytes(content)
    with caplog.at_level(logging.WARNING, "proxy.capabilities"):
        entry = CapabilityCache(tmp_path / "state").get(UP)
    assert entry.text is None
    (event,) = events(caplog)
    assert event["event"] == "capabilities_file_ignored" and "damaged" in event["reason"]
    entry.learned(M365)
    assert CapabilityCache(tmp_path / "state").get(UP).text == M365


def test_unreadable_or_unwritable_file_is_not_fatal(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    directory = state(tmp_path)
    os.symlink("/etc/hostname", directory / FILE_NAME)  # never followed
    with caplog.at_level(logging.INFO, "proxy.capabilities"):
        cache = CapabilityCache(directory)
        cache.path = tmp_path / "missing" / FILE_NAME
        cache.get(UP).learned(M365)
    ignored, learned, not_saved = events(caplog)
    assert ignored["event"] == "capabilities_file_ignored" and "cannot be read" in ignored["reason"]
    assert learned["event"] == "upstream_capabilities" and learned["capabilities"] == M365
    assert not_saved["event"] == "capabilities_not_saved"
    assert cache.get(UP).text == M365  # still used in memory


async def test_saves_run_in_a_thread_and_flush_waits_for_the_last(tmp_path: Path) -> None:
    cache = CapabilityCache(state(tmp_path))
    entry = cache.get(UP)
    for extra in ("A", "B", "C"):  # while the first save runs, the others coalesce
        entry.learned(f"{M365} {extra}")
    other = cache.get(Upstream("dovecot", "imap", "mail.example", 993, "implicit"))
    other.learned("IMAP4rev1 IDLE")
    await cache.flush()
    reloaded = CapabilityCache(tmp_path / "state")
    assert reloaded.get(UP).text == f"{M365} C"
    assert reloaded.get(Upstream("dovecot", "imap", "mail.example", 993, "implicit")).text == (
        "IMAP4rev1 IDLE")
