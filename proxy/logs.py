"""Logging: one event per line on stderr, ``key=value`` fields, journald priorities.

``event(log, "login", protocol="imap", account=…, result="ok")`` writes
``level=info event=login protocol=imap account=… result=ok``. Values are quoted when they hold
spaces; CR/LF are escaped so a peer cannot forge log lines. A ``Secret`` renders as ``***``:
passwords and tokens never reach a log line, at any level.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from proxy.secret import Secret

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}


def _render(value: Any) -> str:
    if isinstance(value, Secret):
        return "***"
    if isinstance(value, float):
        text = f"{value:.3f}".rstrip("0").rstrip(".")
    else:
        text = str(value)
    text = text.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n")
    if not text or any(c in text for c in ' "='):
        text = '"' + text.replace('"', '\\"') + '"'
    return text


class KeyValueFormatter(logging.Formatter):
    def __init__(self, *, journald: bool, timestamps: bool) -> None:
        super().__init__()
        self.journald, self.timestamps = journald, timestamps

    def format(self, record: logging.LogRecord) -> str:
        parts = []
        if self.journald:
            parts.append(f"<{_PRIORITY.get(record.levelno, 6)}>")
        elif self.timestamps:
            parts.append(self.formatTime(record, "%Y-%m-%dT%H:%M:%S"))
        parts.append(f"level={record.levelname.lower()}")
        fields: dict[str, Any] = getattr(record, "fields", None) or {}
        parts.append(f"event={_render(record.getMessage())}")
        parts.extend(f"{k}={_render(v)}" for k, v in fields.items() if v is not None)
        if record.exc_info and record.exc_info[0] is not None:
            exc = record.exc_info[1]
            parts.append(f"error={_render(type(exc).__name__ + ': ' + str(exc))}")
        return (parts[0] + " " if self.journald else "") + " ".join(parts[1 if self.journald else 0:])


def setup(level: str = "info") -> None:
    """Configure the root logger once: stderr, key=value, journald prefixes under systemd."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    journald = bool(os.environ.get("JOURNAL_STREAM"))
    handler.setFormatter(KeyValueFormatter(journald=journald, timestamps=not journald))
    root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in ("msal", "urllib3", "mail.log", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def event(log: logging.Logger, level: int, name: str, **fields: Any) -> None:
    if log.isEnabledFor(level):
        log.log(level, name, extra={"fields": fields})
