"""Delivering one event to one target: a command, an HTTPS webhook, or an email sent through
the proxy's own SMTP listener. Each raises ``DeliveryFailed`` with a one-line reason."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
from collections.abc import Callable
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

import aiohttp
import aiosmtplib

from proxy.notify.config import NotifyTarget
from proxy.notify.events import Event
from proxy.text import one_line

ENV_PREFIX = "XOAUTH2_PROXY_"
# (host, port, tls mode) of an SMTP listener, by name
SmtpAddress = Callable[[str], tuple[str, int, str]]


class DeliveryFailed(Exception):
    pass


def environment(event: Event) -> dict[str, str]:
    """What a command target gets: PATH and LANG of the daemon, and the event's fields as
    ``XOAUTH2_PROXY_EVENT``, ``…_ACCOUNT``, ``…_SUMMARY``, ``…_TIME``, ``…_USER_CODE`` and so on."""
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "TZ")}
    for key, value in event.as_dict().items():
        env[ENV_PREFIX + key.upper()] = value
    return env


def document(event: Event) -> dict[str, str]:
    """The webhook's JSON body: the event's fields, plus ``text`` (what Slack and Teams
    incoming webhooks show) and ``title``."""
    return {**event.as_dict(), "text": event.summary(), "title": f"xoauth2-proxy: {event.kind}"}


async def run_command(target: NotifyTarget, event: Event) -> None:
    try:
        proc = await asyncio.create_subprocess_exec(
            *target.argv, env=environment(event), stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    except OSError as exc:
        raise DeliveryFailed(f"cannot run {target.argv[0]}: {exc.strerror or exc}") from None
    try:
        _, err = await asyncio.wait_for(
            proc.communicate(json.dumps(event.as_dict()).encode()), target.timeout)
    except TimeoutError:
        raise DeliveryFailed(f"{target.argv[0]} did not finish within {target.timeout:g} s") from None
    finally:
        if proc.returncode is None:  # timed out, or the daemon stops: no orphan left behind
            proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        raise DeliveryFailed(f"{target.argv[0]} exited with {proc.returncode}: "
                             f"{one_line(err.decode('utf-8', 'replace'))[:200]}")


def client_tls(ca_file: object) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)


async def post_webhook(session: aiohttp.ClientSession, target: NotifyTarget, event: Event) -> None:
    try:
        async with session.post(target.url, json=document(event), ssl=client_tls(target.ca_file),
                                timeout=aiohttp.ClientTimeout(total=target.timeout),
                                allow_redirects=False) as response:
            if response.status // 100 != 2:
                raise DeliveryFailed(f"the webhook answered HTTP {response.status}")
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise DeliveryFailed(f"webhook unreachable: {one_line(str(exc)) or type(exc).__name__}"
                             ) from None


def message(target: NotifyTarget, event: Event) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = target.account
    msg["To"] = ", ".join(target.to)
    msg["Subject"] = f"[xoauth2-proxy] {event.summary()}"[:200]
    msg["Date"] = formatdate(event.at)
    msg["Message-ID"] = make_msgid("xoauth2-proxy")
    body = [event.summary(), ""]
    body += [f"{key}: {value}" for key, value in event.as_dict().items() if key != "summary"]
    msg.set_content("\n".join(body) + "\n")
    return msg


async def send_email(target: NotifyTarget, event: Event, smtp_address: SmtpAddress) -> None:
    host, port, tls = smtp_address(target.listener)
    assert target.password_file is not None
    try:
        password = (await asyncio.to_thread(target.password_file.read_text)).strip()
    except OSError as exc:
        raise DeliveryFailed(f"cannot read {target.password_file}: {exc.strerror}") from None
    context = client_tls(target.ca_file) if tls != "none" else None
    try:
        # Connected here, so that TLS checks the certificate for server_name, not the address.
        sock = await asyncio.to_thread(socket.create_connection, (host, port), target.timeout)
    except OSError as exc:
        raise DeliveryFailed(f"listener {target.listener} unreachable: {exc.strerror or exc}"
                             ) from None
    client = aiosmtplib.SMTP(hostname=target.server_name or host, sock=sock,
                             timeout=target.timeout, use_tls=tls == "implicit",
                             start_tls=tls == "starttls", tls_context=context)
    try:
        async with client:
            await client.login(target.account, password)
            await client.send_message(message(target, event))
    except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
        raise DeliveryFailed(f"mail through listener {target.listener} failed: "
                             f"{one_line(str(exc))[:200] or type(exc).__name__}") from None
