"""The fake Microsoft Graph over HTTPS (requests with the demo CA, real MSAL for tokens), and the
fake Entra and SMTP behaviour Graph sending depends on: one resource per token request, a Graph
token from the same refresh token, and SMTP AUTH switched off for the tenant."""

from __future__ import annotations

import base64
import email
import email.policy
import smtplib

import pytest
import requests

from proxy.demo.process import DemoUpstream, http_session
from proxy.demo.tokens import TENANT_ID
from tests.demo.demotools import IMAP, SMTP, USER, public_app, refresh_grant
from tests.demo.test_mail_smtp import submission, xoauth2

GRAPH = "https://graph.microsoft.com/"
SEND, READWRITE = GRAPH + "Mail.Send", GRAPH + "Mail.ReadWrite"
MIME = (b"From: alice@example.com\r\nTo: bob@example.com\r\nBcc: hidden@example.com\r\n"
        b"Subject: via Graph\r\n\r\nbody line\r\n.dot\r\n")


def post(up: DemoUpstream, path: str, token: str | None, headers: dict | None = None, **kw
         ) -> requests.Response:
    headers = {**({"authorization": f"Bearer {token}"} if token else {}), **(headers or {})}
    with http_session(up.ca_file) as session:
        return session.post(f"{up.graph_url}/v1.0/{path}", headers=headers, **kw)


def test_mime_send_is_delivered_byte_for_byte_without_bcc(demo_upstream) -> None:
    token = demo_upstream.issue_token(USER, [SEND])
    with http_session(demo_upstream.ca_file) as session:
        answer = session.post(f"{demo_upstream.graph_url}/v1.0/users/{USER}/sendMail",
                              headers={"authorization": f"Bearer {token}",
                                       "content-type": "text/plain"},
                              data=base64.b64encode(MIME))
    assert answer.status_code == 202 and answer.headers["request-id"]
    delivered = MIME.replace(b"Bcc: hidden@example.com\r\n", b"")
    assert demo_upstream.mailbox("bob@example.com") == [delivered]
    assert demo_upstream.mailbox("hidden@example.com") == [delivered]


def mime_post(up: DemoUpstream, token: str, raw: bytes = MIME, user: str = "me"
              ) -> requests.Response:
    path = "me/sendMail" if user == "me" else f"users/{user}/sendMail"
    return post(up, path, token, data=base64.b64encode(raw),
                headers={"content-type": "text/plain"})


def test_tokens_are_checked_for_audience_and_permission(demo_upstream) -> None:
    outlook = demo_upstream.issue_token(USER, [SMTP])
    read_write = demo_upstream.issue_token(USER, [READWRITE])
    with http_session(demo_upstream.ca_file) as session:
        bare = session.post(f"{demo_upstream.graph_url}/v1.0/me/sendMail", data=b"")
    assert bare.status_code == 401
    assert bare.json()["error"]["code"] == "InvalidAuthenticationToken"
    wrong = mime_post(demo_upstream, outlook)
    assert wrong.status_code == 401 and "audience" in wrong.json()["error"]["message"]
    denied = mime_post(demo_upstream, read_write)
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "ErrorAccessDenied"
    other = mime_post(demo_upstream, demo_upstream.issue_token(USER, [SEND]),
                      user="carol@example.com")
    assert other.status_code == 403
    draft = post(demo_upstream, "me/messages", demo_upstream.issue_token(USER, [SEND]),
                 json={"subject": "x"})
    assert draft.status_code == 403  # drafts need Mail.ReadWrite


def test_send_as_and_recipients(demo_upstream) -> None:
    token = demo_upstream.issue_token(USER, [SEND])
    forged = MIME.replace(b"From: alice@", b"From: boss@")
    answer = mime_post(demo_upstream, token, forged)
    assert answer.status_code == 403 and answer.json()["error"]["code"] == "ErrorSendAsDenied"
    demo_upstream.configure(graph_send_as={USER: ["boss@example.com"]})
    assert mime_post(demo_upstream, token, forged).status_code == 202
    nobody = mime_post(demo_upstream, token, b"From: alice@example.com\r\n\r\nx\r\n")
    assert nobody.json()["error"]["code"] == "ErrorInvalidRecipients"
    rejected = mime_post(demo_upstream, token, MIME.replace(b"bob@", b"reject.me@"))
    assert rejected.status_code == 400


def test_app_only_roles_and_access_policy(demo_upstream) -> None:
    app = demo_upstream.issue_token(None, [GRAPH + ".default"])
    assert mime_post(demo_upstream, app, user=USER).status_code == 202
    assert mime_post(demo_upstream, app).status_code == 400  # /me needs a delegated token
    demo_upstream.configure(graph_app_mailboxes=["scanner@example.com"])
    blocked = mime_post(demo_upstream, app, user=USER)
    assert blocked.status_code == 403 and "AccessPolicy" in blocked.json()["error"]["message"]
    demo_upstream.configure(graph_app_mailboxes=None, graph_app_roles=["Mail.ReadWrite"])
    assert mime_post(demo_upstream, app, user=USER).status_code == 403


def test_throttling_and_outage_knobs(demo_upstream) -> None:
    token = demo_upstream.issue_token(USER, [SEND])
    demo_upstream.configure(graph_throttle=2, graph_retry_after=7)
    for _ in range(2):
        answer = mime_post(demo_upstream, token)
        assert answer.status_code == 429 and answer.headers["retry-after"] == "7"
    assert mime_post(demo_upstream, token).status_code == 202
    demo_upstream.configure(graph_outage=True)
    answer = mime_post(demo_upstream, token)
    assert answer.status_code == 503 and answer.headers["retry-after"] == "7"


def test_draft_with_upload_session_inline_part_and_send(demo_upstream) -> None:
    token = demo_upstream.issue_token(USER, [SEND, READWRITE])
    message = {"subject": "scan", "body": {"contentType": "html",
                                           "content": '<p>see <img src="cid:logo1"></p>'},
               "from": {"emailAddress": {"address": USER}},
               "toRecipients": [{"emailAddress": {"address": "bob@example.com"}}],
               "bccRecipients": [{"emailAddress": {"address": "hidden@example.com"}}],
               "internetMessageId": "<scan-1@example.com>"}
    draft = post(demo_upstream, "me/messages", token, json=message)
    assert draft.status_code == 201
    draft_id = draft.json()["id"]
    small = post(demo_upstream, f"me/messages/{draft_id}/attachments", token, json={
        "@odata.type": "#microsoft.graph.fileAttachment", "name": "logo.png",
        "contentType": "image/png", "contentBytes": base64.b64encode(b"PNG").decode(),
        "isInline": True, "contentId": "logo1"})
    assert small.status_code == 201
    payload = bytes(range(256)) * 20_000  # 5 MB: two chunks
    session = post(demo_upstream, f"me/messages/{draft_id}/attachments/createUploadSession",
                   token, json={"AttachmentItem": {"attachmentType": "file", "name": "scan.pdf",
                                                   "size": len(payload),
                                                   "contentType": "application/pdf"}})
    assert session.status_code == 201
    url = session.json()["uploadUrl"]
    with http_session(demo_upstream.ca_file) as http:
        bad = http.put(url, data=payload[:10], headers={"content-range": "bytes 5-14/99"})
        assert bad.status_code == 416
        step = 4 * 1024 * 1024
        for first in range(0, len(payload), step):
            chunk = payload[first:first + step]
            answer = http.put(url, data=chunk, headers={
                "content-range": f"bytes {first}-{first + len(chunk) - 1}/{len(payload)}"})
            assert answer.status_code in (200, 201)
        assert answer.status_code == 201
    assert post(demo_upstream, f"me/messages/{draft_id}/send", token).status_code == 202
    for rcpt in ("bob@example.com", "hidden@example.com"):
        (raw,) = demo_upstream.mailbox(rcpt)
        parsed = email.message_from_bytes(raw, policy=email.policy.default)
        assert parsed["Message-ID"] == "<scan-1@example.com>" and parsed["Bcc"] is None
        parts = {p.get_filename(): p for p in parsed.walk() if p.get_filename()}
        assert parts["scan.pdf"].get_content() == payload
        assert parts["logo.png"]["Content-ID"] == "<logo1>"
    assert demo_upstream.graph_stats()["upload chunk"] == 2


def test_one_resource_per_token_request_and_graph_from_the_same_refresh_token(
        demo_upstream) -> None:
    app = public_app(demo_upstream)
    flow = app.initiate_device_flow(scopes=[IMAP, SMTP, SEND])  # consent to both resources
    demo_upstream.approve(flow["user_code"], USER)
    result = app.acquire_token_by_device_flow(flow)
    granted = result["scope"].split()  # a token is for one resource only
    assert "access_token" in result and granted in ([IMAP, SMTP], [SMTP, IMAP], [SEND])
    (account,) = app.get_accounts()
    graph = app.acquire_token_silent_with_error([SEND], account=account)
    assert graph is not None and "access_token" in graph
    assert mime_post(demo_upstream, graph["access_token"]).status_code == 202
    unconsented = app.acquire_token_silent_with_error([READWRITE], account=account)
    assert unconsented is not None and unconsented.get("error") == "invalid_grant"
    (rt,) = [r["secret"] for r in app.token_cache.search(app.token_cache.CredentialType.
                                                         REFRESH_TOKEN)]
    with http_session(demo_upstream.ca_file) as session:
        both = session.post(f"{demo_upstream.entra_url}/{TENANT_ID}/oauth2/v2.0/token",
                            data=refresh_grant(rt, f"{IMAP} {SEND}"))
    assert both.status_code == 400 and both.json()["error"] == "invalid_scope"
    assert "AADSTS28000" in both.json()["error_description"]


def test_smtp_auth_disabled_knob(demo_upstream, ctx, token) -> None:
    demo_upstream.configure(smtp_auth_disabled=True)
    s = submission(demo_upstream, ctx)
    with pytest.raises(smtplib.SMTPAuthenticationError) as err:
        s.auth("XOAUTH2", xoauth2(USER, token))
    assert err.value.smtp_code == 535
    assert err.value.smtp_error.startswith(
        b"5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the "
        b"Tenant. Visit https://aka.ms/smtp_auth_disabled for more information.")
    s.quit()
