"""``GraphSink``: an SMTP client's transactions sent through Microsoft Graph (a ``MessageSink``).

The proxy answers MAIL and RCPT itself (the path's syntax with ``proxy.protocol.smtp_syntax``,
SIZE; the ``[[relay]]`` rules are the SMTP front's, before MAIL reaches a sink), spools DATA
un-dot-stuffed into a private file (``state_dir/graph-spool``, 0700; the file 0600, written in
1 MiB steps on a worker thread, removed after the answer; files left by a process that was
killed are removed when the next process first uses the folder: ``proxy.graph.spool``), and
after the final dot submits it with ``GraphClient`` and answers ``250`` only after Graph's 202,
with Graph's request id as the queue id (the transaction relay's message line logs it).
``xoauth2_proxy_graph_messages_total`` counts the outcomes; a debug line says how Graph
answered. ``noop``, ``quit``, ``drop``,
``connected``, ``size_limit`` and ``log_fields`` are what the SMTP front asks of an upstream
session besides the ``MessageSink`` methods.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from prometheus_client import Counter

from proxy import logs, metrics
from proxy.graph.client import GraphClient, TokenSource
from proxy.graph.errors import GraphFailure
from proxy.graph.spool import in_thread, spool_dir, spool_prefix
from proxy.protocol.smtp_syntax import BadPath, parse_path
from proxy.server.smtp_sink import Reply

log = logging.getLogger("proxy.graph")

MESSAGES = Counter("xoauth2_proxy_graph_messages_total",
                   "Messages submitted through Microsoft Graph, by outcome.", ["result"],
                   registry=metrics.REGISTRY)
for _result in metrics.SMTP_MESSAGE_RESULTS:
    MESSAGES.labels(_result)
MAX_RECIPIENTS = 500  # Exchange Online's per-message recipient limit
FLUSH = 1024 * 1024

__all__ = ["GraphSink", "spool_dir"]


class GraphSink:
    """One client connection's transactions, sent through Graph as ``mailbox``."""

    def __init__(self, client: GraphClient, *, account: str, mailbox: str, token: TokenSource,
                 spool: Path, size_limit: int) -> None:
        self.client, self.account, self.mailbox, self.token = client, account, mailbox, token
        self.spool, self.size_limit = spool, size_limit
        self.log_fields: dict[str, object] = {}
        self.connected = True
        self._sender: str | None = None
        self._recipients: list[str] = []
        self._file: BinaryIO | None = None
        self._path: Path | None = None
        self._pending = bytearray()
        self._tail = b"\r\n"  # the last bytes written: a dot after CR LF is a stuffing dot
        self._size = 0

    # --- the MessageSink protocol -----------------------------------------------------------

    async def mail(self, sender: str, options: Sequence[str]) -> Reply:
        if self._sender is not None:
            return Reply(503, "5.5.1 Sender already specified")
        if sender not in ("", "<>") and isinstance(parse_path(f"<{sender}>"), BadPath):
            return Reply(501, "5.1.7 Bad sender address syntax")
        for option in options:
            keyword, _, value = option.partition("=")
            if keyword.upper() == "SIZE" and value.isdigit() and int(value) > self.size_limit:
                return Reply(552, "5.3.4 Message size exceeds fixed maximum message size of "
                                  f"{self.size_limit} bytes")
        self._sender = sender
        return Reply(250, "2.1.0 Sender OK")

    async def rcpt(self, recipient: str, options: Sequence[str]) -> Reply:
        if self._sender is None:
            return Reply(503, "5.5.1 Need MAIL command first")
        if options:
            return Reply(555, "5.5.4 RCPT TO takes no parameters here")
        path = parse_path(f"<{recipient}>")
        if isinstance(path, BadPath) or "@" not in recipient:
            return Reply(501, "5.1.3 Bad recipient address syntax")
        if len(self._recipients) >= MAX_RECIPIENTS:
            return Reply(452, f"4.5.3 Too many recipients (at most {MAX_RECIPIENTS} a message)")
        if recipient.lower() not in (r.lower() for r in self._recipients):
            self._recipients.append(recipient)
        return Reply(250, "2.1.5 Recipient OK")

    async def data(self) -> Reply:
        if self._sender is None or not self._recipients:
            return Reply(503, "5.5.1 Need RCPT command first")
        fd, name = await in_thread(_spool_file, self.spool, undo=_remove_spool_file)
        self._file, self._path = os.fdopen(fd, "wb"), Path(name)
        self._pending.clear()
        self._tail, self._size = b"\r\n", 0
        return Reply(354, "Start mail input; end with <CRLF>.<CRLF>")

    async def write(self, chunk: bytes) -> None:
        if self._file is None or not chunk:
            return
        data = (self._tail + chunk).replace(b"\r\n.", b"\r\n")[len(self._tail):]
        self._tail = (self._tail + chunk)[-2:]
        self._size += len(data)
        if self._size <= self.size_limit:
            self._pending += data
            if len(self._pending) >= FLUSH:
                await self._flush()

    async def end(self) -> Reply:
        started = time.monotonic()
        path, size = self._path, self._size
        try:
            await self._flush()
            await self._close_file()
            if path is None:
                return Reply(503, "5.5.1 Need DATA command first")
            if size > self.size_limit:
                reply = Reply(552, "5.3.4 Message size exceeds fixed maximum message size of "
                                   f"{self.size_limit} bytes")
                return self._logged(reply, "rejected", size, started, None)
            request_id = await self.client.submit(path, self.mailbox, list(self._recipients),
                                                  self.token)
            reply = Reply(250, f"2.0.0 OK queued as {request_id or 'unknown'} "
                               "(Microsoft Graph)")
            return self._logged(reply, "accepted", size, started, request_id)
        except GraphFailure as exc:
            kind = "deferred" if exc.reply.code < 500 else "rejected"
            return self._logged(exc.reply, kind, size, started, None, exc.result)
        finally:
            await self.abort()

    async def abort(self) -> None:
        await self._close_file()
        if self._path is not None:
            with contextlib.suppress(FileNotFoundError):
                await asyncio.to_thread(self._path.unlink)
        self._path, self._sender, self._recipients = None, None, []
        self._pending.clear()

    async def reset(self) -> Reply:
        await self.abort()
        return Reply(250, "2.0.0 Reset state")

    async def close(self) -> None:
        await self.abort()

    # --- what the SMTP front asks of an upstream session ----------------------------------

    async def noop(self) -> Reply:
        return Reply(250, "2.0.0 OK")

    async def quit(self) -> Reply:
        self.drop()
        return Reply(221, "2.0.0 Bye")

    def drop(self) -> None:
        """Forget the transaction at once (no await: the front's ``drop``)."""
        self.connected = False
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._path is not None:
            with contextlib.suppress(FileNotFoundError):
                self._path.unlink()
            self._path = None

    # --- helpers ------------------------------------------------------------------------------

    async def _flush(self) -> None:
        if self._file is not None and self._pending:
            data = bytes(self._pending)
            self._pending.clear()
            await asyncio.to_thread(self._file.write, data)

    async def _close_file(self) -> None:
        if self._file is not None:
            f, self._file = self._file, None
            await asyncio.to_thread(f.close)

    def _logged(self, reply: Reply, result: str, size: int, started: float,
                request_id: str | None, reason: str | None = None) -> Reply:
        MESSAGES.labels(result).inc()
        logs.event(log, logging.DEBUG, "graph_submission", **self.log_fields,
                   recipients=len(self._recipients), size=size, request_id=request_id,
                   result=result, reason=reason, latency=round(time.monotonic() - started, 3))
        return reply


def _spool_file(spool: Path) -> tuple[int, str]:
    return tempfile.mkstemp(prefix=spool_prefix(spool), dir=spool)


def _remove_spool_file(made: tuple[int, str]) -> None:
    try:
        os.close(made[0])
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(made[1])
