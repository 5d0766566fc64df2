"""Submitting a spooled message to Microsoft Graph with aiohttp (verified TLS).

Up to the upstream's ``mime_limit`` a message goes as one MIME ``sendMail`` (``text/plain``,
the base64 of the copy streamed from the spool file: byte-faithful); above it as a draft
(``POST /messages``), its attachments (``POST /attachments`` under 3 MB, else an upload
session in chunks of 3.75 MiB, each a multiple of 320 KiB) and ``POST /messages/{id}/send``.
With ``save_to_sent_items = false`` a small message goes as a JSON ``sendMail`` with
``saveToSentItems: false`` (Graph keeps a copy of MIME sends and of sent drafts whatever it
is told). Every answer but 2xx becomes a ``GraphFailure`` (``proxy.graph.errors``); a 401 is
retried once with a fresh token. ``submit`` returns Graph's ``request-id``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp

from proxy.auth.errors import TokenError
from proxy.graph import errors, message, mime
from proxy.graph.errors import GraphFailure
from proxy.graph.settings import GraphUpstream
from proxy.graph.spool import in_thread

TokenSource = Callable[[str | None], Awaitable[str]]  # rejected token (or None) -> a token
READ = 3 * 256 * 1024  # bytes read from the spool per step (a multiple of 3: base64 lines up)
SMALL_ATTACHMENT = 3 * 1024 * 1024
UPLOAD_CHUNK = 5 * 320 * 1024  # 1.56 MiB: Graph takes any multiple of 320 KiB up to 4 MB


class GraphClient:
    def __init__(self, upstream: GraphUpstream) -> None:
        self.upstream = upstream
        self.host = urlsplit(upstream.base_url).hostname or upstream.base_url
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            context = ssl.create_default_context(
                cafile=str(self.upstream.ca_file) if self.upstream.ca_file else None)
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=context, limit=64),
                timeout=aiohttp.ClientTimeout(total=self.upstream.timeout), trust_env=False)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def submit(self, spool: Path, mailbox: str, envelope: list[str],
                     token: TokenSource) -> str:
        """Send the message in ``spool`` from ``mailbox`` to exactly ``envelope``. A damaged
        message (found reading its header, outlining its parts or decoding an attachment on
        the way) is a ``554 5.6.0`` for the client, wherever it shows."""
        try:
            return await self._submit(spool, mailbox, envelope, token)
        except mime.MessageProblem as exc:
            raise errors.problem(str(exc)) from None

    async def _submit(self, spool: Path, mailbox: str, envelope: list[str],
                      token: TokenSource) -> str:
        try:
            prepared = await asyncio.to_thread(message.prepare, spool, envelope)
        except (UnicodeError, ValueError) as exc:  # a header the parsers cannot take
            raise errors.problem(f"the message's header cannot be read: {exc}") from None
        if prepared.size > self.upstream.max_message_size:
            raise errors.from_answer(413, {"error": {"code": "ErrorMessageSizeExceeded"}}, {},
                                     mailbox)
        small = prepared.size <= self.upstream.mime_limit
        if small and self.upstream.save_to_sent_items:
            return await self._send_mime(prepared, mailbox, token)
        small = prepared.size <= self.upstream.mime_limit * 9 // 10  # JSON and base64: < 4 MB
        outline = await asyncio.to_thread(message.draft, prepared)
        if small:
            return await self._send_json(prepared, outline, mailbox, token)
        return await self._send_draft(prepared, outline, mailbox, token)

    def _url(self, mailbox: str, *path: str) -> str:
        return "/".join([self.upstream.base_url, "users", quote(mailbox, safe="@"), *path])

    async def _send_mime(self, prepared: message.Prepared, mailbox: str,
                         token: TokenSource) -> str:
        length = 4 * -(-prepared.size // 3)
        _, _, headers = await self._call(
            "POST", self._url(mailbox, "sendMail"), mailbox, token,
            data=lambda: _base64_stream(prepared),
            headers={"content-type": "text/plain", "content-length": str(length)})
        return str(headers.get("request-id", ""))

    async def _send_json(self, prepared: message.Prepared, outline: message.Draft,
                         mailbox: str, token: TokenSource) -> str:
        attachments = []
        for part in outline.parts:
            data = await asyncio.to_thread(_read_part, prepared.path, part)
            attachments.append(_attachment_json(part, data))
        body = {"message": {**outline.message, "attachments": attachments},
                "saveToSentItems": False}
        _, _, headers = await self._call("POST", self._url(mailbox, "sendMail"), mailbox, token,
                                         body=body)
        return str(headers.get("request-id", ""))

    async def _send_draft(self, prepared: message.Prepared, outline: message.Draft,
                          mailbox: str, token: TokenSource) -> str:
        _, created, _ = await self._call("POST", self._url(mailbox, "messages"), mailbox, token,
                                         body=outline.message)
        draft_id = str(created.get("id", ""))
        try:
            for part in outline.parts:
                await self._attach(prepared.path, part, mailbox, draft_id, token)
            _, _, headers = await self._call(
                "POST", self._url(mailbox, "messages", draft_id, "send"), mailbox, token)
        except BaseException:
            with contextlib.suppress(GraphFailure):
                await asyncio.shield(self._call(
                    "DELETE", self._url(mailbox, "messages", draft_id), mailbox, token))
            raise
        return str(headers.get("request-id", ""))

    async def _attach(self, spool: Path, part: message.Part, mailbox: str, draft_id: str,
                      token: TokenSource) -> None:
        decoded = spool.with_name(spool.name + ".part")
        try:
            size = await in_thread(_decode_to, spool, part, decoded)  # then unlinked
            where = self._url(mailbox, "messages", draft_id, "attachments")
            if size < SMALL_ATTACHMENT:
                data = await asyncio.to_thread(decoded.read_bytes)
                await self._call("POST", where, mailbox, token,
                                 body=_attachment_json(part, data))
                return
            item = {"attachmentType": "file", "name": part.name, "size": size,
                    "contentType": part.content_type, "isInline": part.inline,
                    **({"contentId": part.content_id} if part.content_id else {})}
            _, session, _ = await self._call("POST", where + "/createUploadSession", mailbox,
                                             token, body={"AttachmentItem": item})
            await self._upload(str(session.get("uploadUrl", "")), decoded, size, mailbox)
        finally:
            with contextlib.suppress(FileNotFoundError):
                decoded.unlink()

    async def _upload(self, url: str, path: Path, size: int, mailbox: str) -> None:
        with open(path, "rb") as f:
            for first in range(0, size, UPLOAD_CHUNK):
                chunk = await asyncio.to_thread(f.read, UPLOAD_CHUNK)
                last = first + len(chunk) - 1
                await self._call("PUT", url, mailbox, None, data=_constant(chunk),
                                 headers={"content-range": f"bytes {first}-{last}/{size}"})

    async def _call(self, method: str, url: str, mailbox: str, token: TokenSource | None, *,
                    data: Callable[[], Any] | None = None, body: Any = None,
                    headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any], Any]:
        """One request (twice if the token is refused): (status, JSON body, headers)."""
        rejected: str | None = None
        for attempt in (1, 2):
            sent = dict(headers or {})
            if token is not None:
                bearer = await _bearer(token, rejected)
                sent["authorization"] = f"Bearer {bearer}"
            try:
                async with self._http().request(
                        method, url, data=data() if data else None, json=body,
                        headers=sent, allow_redirects=False) as answer:
                    answered = await _json_body(answer)
                    if answer.status == 401 and token is not None and attempt == 1:
                        rejected = bearer
                        continue
                    if answer.status >= 300:
                        raise errors.from_answer(answer.status, answered, answer.headers,
                                                 mailbox)
                    return answer.status, answered, answer.headers
            except aiohttp.ClientConnectorCertificateError as exc:
                raise errors.from_network(exc.certificate_error, self.host) from None
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                raise errors.from_network(exc, self.host) from None
        raise AssertionError("unreachable")


async def _bearer(token: TokenSource, rejected: str | None) -> str:
    try:
        return await token(rejected)
    except TokenError as exc:
        raise errors.from_token_error(exc) from None


async def _json_body(answer: aiohttp.ClientResponse) -> dict[str, Any]:
    raw = await answer.read()
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


async def _base64_stream(prepared: message.Prepared) -> AsyncIterator[bytes]:
    """The base64 of the copy (its header, then the spool from the body on), in pieces."""
    carry = prepared.header
    with open(prepared.path, "rb") as f:
        f.seek(prepared.body_offset)
        while True:
            chunk = await asyncio.to_thread(f.read, READ)
            data = carry + chunk
            usable = len(data) - len(data) % 3 if chunk else len(data)
            if usable:
                yield base64.b64encode(data[:usable])
            carry = data[usable:]
            if not chunk:
                return


def _constant(data: bytes) -> Callable[[], bytes]:
    return lambda: data


def _decode_to(spool: Path, part: message.Part, target: Path) -> int:
    size = 0
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(spool, "rb") as f, os.fdopen(fd, "wb") as out:
        for piece in mime.decoded(f, part.leaf):
            out.write(piece)
            size += len(piece)
    return size


def _read_part(spool: Path, part: message.Part) -> bytes:
    with open(spool, "rb") as f:
        return b"".join(mime.decoded(f, part.leaf))


def _attachment_json(part: message.Part, data: bytes) -> dict[str, Any]:
    return {"@odata.type": "#microsoft.graph.fileAttachment", "name": part.name,
            "contentType": part.content_type, "isInline": part.inline,
            "contentBytes": base64.b64encode(data).decode("ascii"),
            **({"contentId": part.content_id} if part.content_id else {})}
