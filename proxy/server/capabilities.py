"""What each upstream IMAP server offers after login, remembered for the next greeting.

Before login the proxy answers CAPABILITY itself; clients that read the list only then (imaplib
and tools built on it, many appliances) must find the upstream's post-login extensions (IDLE,
MOVE, UIDPLUS…) in it, or they fall back to polling. ``UpstreamCapabilities`` is one upstream's
list, shared by every listener of that upstream: sessions read ``text`` for the greeting, pass
``due()`` to the upstream machine (which then sends CAPABILITY after login if the OK did not
carry the list) and report each list a login brings with ``learned``.

``CapabilityCache`` keeps one entry per upstream name and the lists in one small file in the
state directory (``imap-capabilities.json``: upstream name, server address, capability list;
nothing secret), so that the first client after a restart sees the full list. The file is
written atomically, in a worker thread, only when a list changes; a damaged file is ignored
(logged) and replaced by the next change. An entry whose server address differs from the
configured one is not used.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from proxy import logs
from proxy.config import Upstream
from proxy.store.atomic import atomic_write, read_regular
from proxy.store.errors import StoreWriteError
from proxy.text import host_port

log = logging.getLogger("proxy.capabilities")

FILE_NAME = "imap-capabilities.json"
REFRESH_SECONDS = 3600.0  # an upstream that reports nothing in its OK is asked this often
_MAX_FILE = 64 * 1024
_MAX_LIST = 4000  # characters of one list


class UpstreamCapabilities:
    """The capability list one upstream announces after login; ``text`` is None while unknown.

    ``due()``: the next login should ask for the list (it was not learned by this process yet,
    or over ``REFRESH_SECONDS`` ago). A list loaded from the state directory is used for
    greetings at once and confirmed by the first login.
    """

    def __init__(self, name: str = "", server: str = "", text: str | None = None,
                 on_change: Callable[[], None] | None = None) -> None:
        self.name, self.server, self.text = name, server, text
        self._learned_at: float | None = None  # time.monotonic() of the last report
        self._on_change = on_change

    def due(self) -> bool:
        return self._learned_at is None or time.monotonic() - self._learned_at > REFRESH_SECONDS

    def learned(self, capabilities: str) -> None:
        """A login reported the upstream's list (``UpstreamLoggedIn.capabilities``)."""
        self._learned_at = time.monotonic()
        if capabilities == self.text:  # the common case: nothing to do
            return
        text = " ".join(capabilities[:_MAX_LIST].split())
        if not text or text == self.text or not text.isprintable():
            return
        self.text = text
        logs.event(log, logging.INFO, "upstream_capabilities", upstream=self.name,
                   capabilities=text)
        if self._on_change is not None:
            self._on_change()


class CapabilityCache:
    """``UpstreamCapabilities`` per upstream name, persisted in ``state_dir`` (if given)."""

    def __init__(self, state_dir: Path | None) -> None:
        self.path = state_dir / FILE_NAME if state_dir is not None else None
        self._entries: dict[str, UpstreamCapabilities] = {}
        self._saving: asyncio.Task[None] | None = None
        self._dirty = False
        for name, (server, text) in self._load().items():
            self._entries[name] = UpstreamCapabilities(name, server, text, self._changed)

    def get(self, upstream: Upstream) -> UpstreamCapabilities:
        """The entry for ``upstream``; a new, unknown one if its server address changed."""
        server = host_port(upstream.host, upstream.port)
        entry = self._entries.get(upstream.name)
        if entry is None or entry.server != server:
            entry = self._entries[upstream.name] = UpstreamCapabilities(
                upstream.name, server, on_change=self._changed)
        return entry

    async def flush(self) -> None:
        """Wait until the last change is on disk (the daemon's stop)."""
        while self._saving is not None:
            await asyncio.shield(self._saving)

    # --- the file ---------------------------------------------------------------------------

    def _load(self) -> dict[str, tuple[str, str]]:
        if self.path is None:
            return {}
        try:
            _, data = read_regular(self.path, _MAX_FILE)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            self._ignored(f"it cannot be read ({exc.strerror or exc})")
            return {}
        try:
            entries = _parse(data or b"")
        except ValueError as exc:
            self._ignored(f"it is damaged ({exc})")
            return {}
        return entries

    def _ignored(self, reason: str) -> None:
        logs.event(log, logging.WARNING, "capabilities_file_ignored", path=str(self.path),
                   reason=reason, action="none needed: it is rewritten when a login reports "
                                         "an upstream's capabilities")

    def _changed(self) -> None:
        if self.path is None:
            return
        if self._saving is not None:
            self._dirty = True  # the running save writes again when it is done
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a command-line tool): write now
            self._write(self._encode())
            return
        self._saving = loop.create_task(self._save(), name="save upstream capabilities")

    async def _save(self) -> None:
        try:
            while True:
                self._dirty = False
                await asyncio.to_thread(self._write, self._encode())
                if not self._dirty:
                    return
        finally:
            self._saving = None

    def _encode(self) -> bytes:
        upstreams = {name: {"server": e.server, "capabilities": e.text}
                     for name, e in sorted(self._entries.items()) if e.text is not None}
        return json.dumps({"upstreams": upstreams}, indent=1).encode() + b"\n"

    def _write(self, data: bytes) -> None:
        assert self.path is not None
        try:
            atomic_write(self.path, data)
        except StoreWriteError as exc:
            logs.event(log, logging.WARNING, "capabilities_not_saved", path=str(self.path),
                       reason=exc.reason)


def _parse(data: bytes) -> dict[str, tuple[str, str]]:
    """The file's entries, name → (server, list); ValueError (one line) if it is damaged."""
    if len(data) > _MAX_FILE:
        raise ValueError("too large")
    try:
        upstreams = json.loads(data)["upstreams"]
        entries = {name: (entry["server"], entry["capabilities"])
                   for name, entry in upstreams.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"not the expected JSON: {type(exc).__name__}") from None
    out = {}
    for name, (server, text) in entries.items():
        if not (isinstance(server, str) and isinstance(text, str) and text.strip()
                and text.isprintable()):
            raise ValueError(f"entry {name!r} is not valid")
        out[name] = (server, " ".join(text[:_MAX_LIST].split()))
    return out
