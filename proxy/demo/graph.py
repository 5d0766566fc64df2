"""The fake Microsoft Graph (mail sending only) on ``twisted.web`` over HTTPS.

Routes (``{user}`` is a user principal name or an object id; ``me`` for delegated tokens)::

    POST /v1.0/{users/{user}|me}/sendMail                    MIME (text/plain, base64) or JSON
    POST /v1.0/{users/{user}|me}/messages                    create a draft (JSON)
    POST /v1.0/{...}/messages/{id}/attachments               a small file attachment (JSON)
    POST /v1.0/{...}/messages/{id}/attachments/createUploadSession
    PUT  /upload/{session}                                   one Content-Range chunk, no token
    POST /v1.0/{...}/messages/{id}/send
    GET  /_test/stats                                        requests per route

Bearer tokens come from the fake Entra (:class:`proxy.demo.tokens.TokenAuthority`) and are
checked for audience (``https://graph.microsoft.com``) and permission: ``Mail.Send`` to send,
``Mail.ReadWrite`` for drafts, attachments and upload sessions; app-only tokens carry the
roles of ``knobs.graph_app_roles`` and reach the mailboxes of ``knobs.graph_app_mailboxes``.
Knobs: ``graph_throttle`` (the next N requests get 429 with ``Retry-After``),
``graph_outage`` (503), ``graph_send_as``, ``graph_request_limit``. Sent messages go into the
shared :class:`proxy.demo.mail.MailStore`, so IMAP and POP3 read them back.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

from twisted.web import resource, server

from proxy.demo import graph_mail
from proxy.demo.graph_mail import Attachment, Draft, GraphError
from proxy.demo.knobs import Knobs
from proxy.demo.mail.store import MailStore
from proxy.demo.tokens import GRAPH, TokenAuthority, object_id, resource_of

MAX_CHUNK = 4 * 1024 * 1024  # one upload-session PUT
_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")
_WRITES = {"messages", "attachments", "createUploadSession"}


class UploadSession:
    def __init__(self, draft: Draft, item: dict[str, Any]) -> None:
        self.draft = draft
        self.name = str(item.get("name") or "attachment")
        self.content_type = str(item.get("contentType") or "application/octet-stream")
        self.size = int(item.get("size") or 0)
        self.is_inline = bool(item.get("isInline"))
        self.content_id = item.get("contentId")
        self.data = bytearray()


class Graph(resource.Resource):
    isLeaf = True

    def __init__(self, knobs: Knobs, authority: TokenAuthority, store: MailStore) -> None:
        super().__init__()
        self.knobs, self.authority, self.store = knobs, authority, store
        self.drafts: dict[str, Draft] = {}
        self.uploads: dict[str, UploadSession] = {}
        self.stats: Counter[str] = Counter()

    def render(self, request: server.Request) -> bytes:
        request_id = str(uuid.uuid4())
        request.setHeader("request-id", request_id)
        request.setHeader("client-request-id",
                          request.getHeader("client-request-id") or request_id)
        segments = [s.decode("utf-8", "replace") for s in request.path.split(b"/")[1:]]
        method = request.method.decode("ascii", "replace")
        if segments == ["_test", "stats"]:
            return _json(request, 200, dict(self.stats))
        try:
            self._faults(request)
            status, body = self._route(request, method, segments)
        except GraphError as exc:
            self.stats[f"error {exc.code}"] += 1
            body = {"error": {"code": exc.code, "message": exc.message, "innerError": {
                "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S"),
                "request-id": request_id}}}
            return _json(request, exc.status, body)
        return _json(request, status, body)

    def _faults(self, request: server.Request) -> None:
        if self.knobs.graph_outage:
            request.setHeader("retry-after", str(self.knobs.graph_retry_after))
            raise GraphError(503, "ServiceUnavailable", "The service is temporarily "
                             "unavailable. Please retry later.")
        if self.knobs.graph_throttle > 0:
            self.knobs.graph_throttle -= 1
            request.setHeader("retry-after", str(self.knobs.graph_retry_after))
            raise GraphError(429, "ApplicationThrottled", "Application is over its "
                             "MailboxConcurrency limit.")

    def _route(self, request: server.Request, method: str, seg: list[str]
               ) -> tuple[int, Any]:
        if len(seg) == 2 and seg[0] == "upload" and method == "PUT":
            return self._upload(request, seg[1])
        if seg[:1] != ["v1.0"] or method not in ("POST", "DELETE"):
            raise GraphError(404 if seg[:1] != ["v1.0"] else 405, "BadRequest",
                             f"Unsupported request: {method} {'/'.join(seg)}")
        body = _read(request)
        if len(body) > self.knobs.graph_request_limit:
            raise GraphError(413, "ErrorRequestEntityTooLarge", "The request body is larger "
                             f"than {self.knobs.graph_request_limit} bytes.")
        rest, who = self._user(seg)
        action = rest[-1] if rest else ""
        mailbox, app_only = self._authorise(
            request, "Mail.ReadWrite" if action in _WRITES or method == "DELETE" else "Mail.Send",
            who)
        self.stats[action] += 1
        if rest == ["sendMail"]:
            return self._send_mail(request, body, mailbox, app_only)
        if rest == ["messages"]:
            return self._create_draft(body, mailbox)
        if method == "DELETE" and len(rest) == 2 and rest[0] == "messages":
            self.drafts.pop(rest[1], None)
            return 204, None
        if len(rest) >= 3 and rest[0] == "messages":
            draft = self.drafts.get(rest[1])
            if draft is None or draft.owner != mailbox:
                raise GraphError(404, "ErrorItemNotFound", "The specified object was not "
                                 "found in the store.")
            if rest[2:] == ["send"]:
                return self._send_draft(draft, app_only)
            if rest[2:] == ["attachments"]:
                return self._attach(draft, _parse_json(body))
            if rest[2:] == ["attachments", "createUploadSession"]:
                return self._create_session(request, draft, _parse_json(body))
        raise GraphError(400, "BadRequest", f"Unsupported segment: {'/'.join(rest)}")

    # -- tokens and mailboxes --------------------------------------------------------------

    @staticmethod
    def _user(seg: list[str]) -> tuple[list[str], str]:
        """The path after the mailbox, and the mailbox as named ("me", a UPN or an id)."""
        if len(seg) >= 2 and seg[1] == "me":
            return seg[2:], "me"
        if len(seg) >= 3 and seg[1] == "users":
            return seg[3:], seg[2]
        raise GraphError(400, "BadRequest", "Resource not found for the segment "
                         f"'{seg[1] if len(seg) > 1 else ''}'.")

    def _authorise(self, request: server.Request, permission: str, named: str
                   ) -> tuple[str, bool]:
        """(the mailbox, whether the token is app-only), or the refusal Graph would give."""
        header = (request.getHeader("authorization") or "").strip()
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise GraphError(401, "InvalidAuthenticationToken", "Access token is empty.")
        at = self.authority.lookup(token.strip())
        if at is None:
            raise GraphError(401, "InvalidAuthenticationToken", "Lifetime validation failed, "
                             "the token is expired.")
        if not at.scopes or any(resource_of(s) != GRAPH for s in at.scopes):
            raise GraphError(401, "InvalidAuthenticationToken", "Invalid audience.")
        if at.username is None:
            granted = {r.lower() for r in self.knobs.graph_app_roles}
        else:
            granted = {s.rsplit("/", 1)[-1].lower() for s in at.scopes}
        if permission.lower() not in granted:
            raise GraphError(403, "ErrorAccessDenied", "Access is denied. Check credentials "
                             f"and try again. (the token has no {permission} permission)")
        return self._resolve(named, at.username), at.username is None

    def _resolve(self, mailbox: str, username: str | None) -> str:
        if mailbox == "me":
            if username is None:
                raise GraphError(400, "BadRequest", "/me request is only valid with delegated "
                                 "authentication flow.")
            return username.lower()
        wanted = mailbox.lower()
        if "@" not in wanted:
            known = [a for a in self.store.addresses() + ([username] if username else [])
                     if object_id(a) == wanted]
            if not known:
                raise GraphError(404, "ErrorInvalidUser", f"The requested user '{mailbox}' is "
                                 "invalid.")
            wanted = known[0].lower()
        if username is not None and wanted != username.lower():
            raise GraphError(403, "ErrorAccessDenied", "Access is denied. Check credentials "
                             "and try again.")
        allowed = self.knobs.graph_app_mailboxes
        if username is None and allowed is not None and wanted not in {
                a.lower() for a in allowed}:
            raise GraphError(403, "ErrorAccessDenied", "Access to OData is disabled: "
                             "blocked by tenant configured AppOnly AccessPolicy settings.")
        return wanted

    # -- sending ---------------------------------------------------------------------------

    def _send_mail(self, request: server.Request, body: bytes, mailbox: str, app_only: bool
                   ) -> tuple[int, Any]:
        kind = (request.getHeader("content-type") or "").split(";")[0].strip().lower()
        if kind == "text/plain":
            try:
                raw = base64.b64decode(body, validate=True)
            except (binascii.Error, ValueError):
                raise GraphError(400, "ErrorMimeContentInvalidBase64String", "Invalid base64 "
                                 "string for MIME content.") from None
            sender, recipients = graph_mail.mime_parties(raw)
            graph_mail.check_send_as(sender, mailbox, app_only, self.knobs.graph_send_as)
            graph_mail.check_recipients(recipients)
            self._deliver(raw, recipients, mailbox, save=True)
            return 202, None
        payload = _parse_json(body)
        message = payload.get("message")
        if not isinstance(message, dict):
            raise GraphError(400, "ErrorInvalidRequest", "The 'message' property is required.")
        draft = Draft("", mailbox, message)
        for item in message.get("attachments") or []:
            self._attach(draft, item if isinstance(item, dict) else {})
        return self._send_draft(draft, app_only, save=payload.get("saveToSentItems", True))

    def _send_draft(self, draft: Draft, app_only: bool, save: Any = True) -> tuple[int, Any]:
        sender, recipients = graph_mail.draft_parties(draft.message)
        graph_mail.check_send_as(sender, draft.owner, app_only, self.knobs.graph_send_as)
        graph_mail.check_recipients(recipients)
        raw, recipients = graph_mail.render(draft, draft.owner)
        self.drafts.pop(draft.id, None)
        self._deliver(raw, recipients, draft.owner, save=save is not False)
        return 202, None

    def _deliver(self, raw: bytes, recipients: list[str], mailbox: str, save: bool) -> None:
        copy = graph_mail.without_bcc(raw)
        for address in recipients:
            self.store.deliver(address, copy)
        if save:
            account = self.store.account(mailbox)
            account.create("Sent Items")
            folder = account.folder("Sent Items")
            assert folder is not None
            folder.append(raw, {"\\Seen"})

    # -- drafts, attachments, upload sessions ----------------------------------------------

    def _create_draft(self, body: bytes, mailbox: str) -> tuple[int, Any]:
        message = _parse_json(body)
        draft = Draft(f"AAMk{secrets.token_urlsafe(24)}", mailbox, message)
        self.drafts[draft.id] = draft
        return 201, {"id": draft.id, "isDraft": True, "subject": message.get("subject")}

    def _attach(self, draft: Draft, item: dict[str, Any]) -> tuple[int, Any]:
        try:
            data = base64.b64decode(str(item.get("contentBytes") or ""), validate=True)
        except (binascii.Error, ValueError):
            raise GraphError(400, "ErrorInvalidRequest", "contentBytes is not base64.") from None
        draft.attachments.append(Attachment(
            str(item.get("name") or "attachment"),
            str(item.get("contentType") or "application/octet-stream"), data,
            bool(item.get("isInline")), item.get("contentId")))
        return 201, {"id": secrets.token_urlsafe(12), "size": len(data)}

    def _create_session(self, request: server.Request, draft: Draft, body: dict[str, Any]
                        ) -> tuple[int, Any]:
        item = body.get("AttachmentItem")
        if not isinstance(item, dict) or int(item.get("size") or 0) <= 0:
            raise GraphError(400, "ErrorInvalidRequest", "AttachmentItem with a size is "
                             "required.")
        token = secrets.token_urlsafe(24)
        self.uploads[token] = UploadSession(draft, item)
        host = request.getHeader("host") or "localhost"
        expiry = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
        return 201, {"uploadUrl": f"https://{host}/upload/{token}",
                     "expirationDateTime": expiry, "nextExpectedRanges": ["0-"]}

    def _upload(self, request: server.Request, token: str) -> tuple[int, Any]:
        session = self.uploads.get(token)
        if session is None:
            raise GraphError(404, "ErrorItemNotFound", "The upload session was not found.")
        if request.getHeader("authorization"):
            raise GraphError(401, "InvalidAuthenticationToken", "An upload URL carries its own "
                             "token: send no Authorization header.")
        match = _RANGE.fullmatch((request.getHeader("content-range") or "").strip())
        chunk = _read(request)
        if match is None:
            raise GraphError(400, "InvalidContentRange", "Content-Range is required.")
        first, last, total = (int(g) for g in match.groups())
        if (first != len(session.data) or last - first + 1 != len(chunk)
                or total != session.size or len(chunk) > MAX_CHUNK):
            raise GraphError(416, "InvalidRange", f"Expected bytes {len(session.data)}- of "
                             f"{session.size}, chunks of at most {MAX_CHUNK} bytes.")
        self.stats["upload chunk"] += 1
        session.data += chunk
        if len(session.data) < session.size:
            return 200, {"nextExpectedRanges": [f"{len(session.data)}-"]}
        del self.uploads[token]
        session.draft.attachments.append(Attachment(
            session.name, session.content_type, bytes(session.data), session.is_inline,
            session.content_id))
        return 201, None


def _read(request: server.Request) -> bytes:
    return request.content.read() if request.content is not None else b""


def _parse_json(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body or b"{}")
    except ValueError:
        raise GraphError(400, "BadRequest", "Unable to read JSON request payload.") from None
    if not isinstance(value, dict):
        raise GraphError(400, "BadRequest", "The request payload must be a JSON object.")
    return value


def _json(request: server.Request, status: int, body: Any) -> bytes:
    request.setResponseCode(status)
    if body is None:
        return b""
    request.setHeader("content-type", "application/json; charset=utf-8")
    return json.dumps(body).encode()


def start(reactor: Any, *, host: str, tls: Any, knobs: Knobs, authority: TokenAuthority,
          store: MailStore) -> int:
    """Listen on port 0 of ``host`` (HTTPS); return the port."""
    site = server.Site(Graph(knobs, authority, store))
    site.noisy = False
    return int(reactor.listenSSL(0, site, tls, interface=host).getHost().port)
