"""Everything the proxy takes from aiosmtpd's and aiosmtplib's private parts, in one place.

aiosmtpd's ``SMTP`` protocol offers no public way to replace its command loop, to restart its
idle timer per chunk, to read the client's stream or to run a handler hook; aiosmtplib none to
wait for its transport's drain or to see bytes the server sent that no command claimed. The
proxy needs all of these, so this module reaches in for them — and nothing else in the proxy
does. ``AdaptedSMTP`` turns them into public names; ``drain`` and ``unclaimed`` do the same
for aiosmtplib.

The versions this is written and tested against are pinned in ``setup.cfg`` (``SUPPORTED``);
``missing_privates`` names any private attribute a newer release dropped, and the test suite
fails on it with that list rather than at some later line.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from aiosmtpd.smtp import SMTP
from aiosmtplib import SMTP as SMTPClient
from aiosmtplib.protocol import SMTPProtocol

SUPPORTED = {"aiosmtpd": ">=1.4.6,<1.5", "aiosmtplib": ">=5.1.3,<5.2"}

# The private attributes used below, by the class that must have them.
_SERVER_PRIVATES = ("_handle_client", "_reset_timeout", "_timeout_cb", "_call_handler_hook",
                    "_set_post_data_state", "_smtp_methods", "_tls_handshake_okay",
                    "_tls_protocol", "_handler_coroutine", "_timeout_handle",
                    "_timeout_duration", "_reader", "_writer", "__ident__")
_CLIENT_PRIVATES = ("_drain_helper", "_buffer")

_watched: weakref.WeakSet[asyncio.Task[None]] = weakref.WeakSet()


def missing_privates() -> list[str]:
    """The private attributes this module uses that the installed libraries lack (checked on
    an instance: aiosmtpd and asyncio set most of them in ``__init__``)."""
    loop = asyncio.new_event_loop()  # never run: the constructors only want one
    try:
        server = SMTP(handler=object(), loop=loop)
        connected = getattr(server, "_cb_client_connected", None)  # sets _reader, _writer
        if connected is not None:
            connected(object(), object())
        missing = [f"aiosmtpd SMTP.{name}" for name in ("_cb_client_connected",
                                                         *_SERVER_PRIVATES)
                   if not hasattr(server, name)]
        client = SMTPProtocol(loop=loop)
        missing += [f"aiosmtplib SMTPProtocol.{name}" for name in _CLIENT_PRIVATES
                    if not hasattr(client, name)]
    finally:
        loop.close()
    return missing


def _retrieve(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()


class AdaptedSMTP(SMTP):
    """aiosmtpd's protocol with its private parts under public names.

    Subclasses provide ``serve`` (the command loop), ``idle_duration`` (the idle timer's
    length now) and ``idle_expired`` (what to say before aiosmtpd closes an idle client)."""

    _idle_deadline = 0.0

    # --- what the subclass provides ---------------------------------------------------------

    async def serve(self) -> None:
        raise NotImplementedError

    def idle_duration(self) -> float:
        return float(self._timeout_duration)

    def idle_expired(self) -> None:
        """Called when the idle timer fires, before aiosmtpd closes the connection."""

    # --- aiosmtpd's hooks, routed to the public names -----------------------------------------

    async def _handle_client(self) -> None:
        await self.serve()

    def _reset_timeout(self, duration: float | None = None) -> None:
        """Restart the idle timer. Called per command and per chunk received, so it only
        moves a deadline: the timer is re-armed when it fires early, or when the deadline
        comes sooner than it."""
        self._idle_deadline = deadline = self.loop.time() + (
            self.idle_duration() if duration is None else duration)
        handle = self._timeout_handle
        if handle is None or handle.cancelled() or handle.when() > deadline:
            if handle is not None:
                handle.cancel()
            self._timeout_handle = self.loop.call_at(deadline, self._idle_check)

    def _idle_check(self) -> None:
        if self.loop.time() < self._idle_deadline:  # activity since: wait for the rest
            self._timeout_handle = self.loop.call_at(self._idle_deadline, self._idle_check)
            return
        self._timeout_cb()

    def _timeout_cb(self) -> None:
        self.idle_expired()
        super()._timeout_cb()

    # --- public names for private parts -------------------------------------------------------

    def restart_idle(self, seconds: float | None = None) -> None:
        """Restart the idle timer with ``seconds`` (None: ``idle_duration()``)."""
        self._reset_timeout(seconds)

    @property
    def reader(self) -> asyncio.StreamReader:
        reader = self._reader
        assert isinstance(reader, asyncio.StreamReader)
        return reader

    @property
    def writer(self) -> asyncio.StreamWriter:
        writer = self._writer
        assert isinstance(writer, asyncio.StreamWriter)
        return writer

    @property
    def ident(self) -> str:
        return str(self.__ident__)

    @property
    def tls_handshake_okay(self) -> bool:
        return bool(self._tls_handshake_okay)

    @property
    def tls_started(self) -> bool:
        """A STARTTLS handshake has completed on this connection."""
        return self._tls_protocol is not None

    def unread(self, data: bytes) -> None:
        """Put ``data`` back where the next read starts; the reader must be empty (a read took
        all it held). After the client's end of stream a reader takes no more bytes, so a new
        one holds ``data`` and the end."""
        reader = self.reader
        if not reader.at_eof():
            reader.feed_data(data)
            return
        fresh = asyncio.StreamReader(limit=self.line_length_limit, loop=self.loop)
        fresh.feed_data(data)
        fresh.feed_eof()
        self._reader = fresh

    def command_method(self, verb: str) -> Callable[[str | None], Awaitable[None]] | None:
        """aiosmtpd's ``smtp_VERB`` method for ``verb``, None for an unknown command."""
        method: Callable[[str | None], Awaitable[None]] | None = self._smtp_methods.get(verb)
        return method

    async def call_hook(self, name: str, *args: Any) -> Any:
        """The handler's ``handle_NAME`` hook as aiosmtpd calls it (MISSING if it has none)."""
        return await self._call_handler_hook(name, *args)

    def after_data(self) -> None:
        """aiosmtpd's state after a DATA transaction (a new envelope)."""
        self._set_post_data_state()

    def watch_handler_task(self) -> None:
        """aiosmtpd re-raises a client reset from its command task, where nothing retrieves it:
        retrieve it (once per task)."""
        task = self._handler_coroutine
        if task is not None and task not in _watched:
            _watched.add(task)
            task.add_done_callback(_retrieve)

    def retrieve_reset(self) -> None:
        """asyncio's StreamReaderProtocol keeps a reset in its ``_closed`` future and marks it
        retrieved only in ``__del__``; when the protocol dies in a reference cycle the future
        can be collected first and asyncio logs "exception was never retrieved"."""
        closed = getattr(self, "_closed", None)
        if isinstance(closed, asyncio.Future) and closed.done() and not closed.cancelled():
            closed.exception()


async def drain(client: SMTPClient) -> None:
    """Wait while the upstream transport's write buffer is full (aiosmtplib's protocol is an
    asyncio FlowControlMixin: ``_drain_helper``)."""
    protocol = client.protocol
    if protocol is not None:
        await protocol._drain_helper()


def unclaimed(client: SMTPClient) -> int:
    """Bytes the upstream sent after the last reply read (aiosmtplib keeps them in its
    protocol's ``_buffer``, where the next command would take them for its own reply)."""
    buffer = getattr(client.protocol, "_buffer", None)
    return len(buffer) if buffer is not None else 0


__all__ = ["AdaptedSMTP", "SUPPORTED", "drain", "missing_privates", "unclaimed"]
