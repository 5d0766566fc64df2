"""Logging: one event per line on stderr, ``key=value`` fields, journald priorities.

``event(log, logging.INFO, "login", protocol="imap", account=…, result="ok")`` writes
``level=info event=login protocol=imap account=… result=ok``. Values are quoted when they hold
spaces; every character that is not printable (C0 and C1 controls, DEL, line and paragraph
separators, bidirectional and other format controls) is escaped as ``\\xNN`` or ``\\uNNNN``
(``\\r``, ``\\n``, ``\\t`` for those three), so a peer cannot forge or disguise a log line.
A ``Secret`` renders as ``***``: passwords and tokens never reach a log line, at any level
(``tests/ops/test_logs.py`` runs whole sessions at debug level and searches the output for
them).

Stable field names, so that log queries keep working: ``event`` (what happened), ``protocol``,
``listener``, ``account``, ``peer`` (client ``host:port``), ``mechanism``, ``result`` (the same
words as the ``logins_total`` metric), ``reason`` (one line, why), ``latency`` and ``duration``
(seconds), ``action`` (what the operator should do), ``error`` (an exception, one line).
Levels: debug for per-connection detail, info for sessions and state changes, warning for a
failed login or refresh, error for what needs an operator.

Under systemd (stderr is the journal's stream) each line starts with ``<N>``, the syslog
priority, so ``journalctl -p warning`` works; elsewhere it starts with a local timestamp.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from proxy.runtime import WORKER_ENV
from proxy.secret import Secret

_WORKER = os.environ.get(WORKER_ENV, "")

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}


def _render(value: Any) -> str:
    if isinstance(value, Secret):
        return "***"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = f"{value:.3f}".rstrip("0").rstrip(".")
    else:
        text = str(value)
    text = text.replace("\\", "\\\\")
    if not text.isprintable():
        text = "".join(c if c.isprintable() else _escape(c) for c in text)
    if not text or any(c in text for c in ' "='):
        text = '"' + text.replace('"', '\\"') + '"'
    return text


_ESCAPES = {"\r": "\\r", "\n": "\\n", "\t": "\\t"}


def _escape(char: str) -> str:
    code = ord(char)
    return _ESCAPES.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
                                  if code < 0x10000 else f"\\U{code:08x}")


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
        if _WORKER:  # workers = N: which worker process wrote the line
            parts.append(f"worker={_WORKER}")
        fields: dict[str, Any] = getattr(record, "fields", None) or {}
        parts.append(f"event={_render(record.getMessage())}")
        parts.extend(f"{k}={_render(v)}" for k, v in fields.items() if v is not None)
        if record.exc_info and record.exc_info[0] is not None:
            exc = record.exc_info[1]
            parts.append(f"error={_render(type(exc).__name__ + ': ' + str(exc))}")
        if self.journald:  # "<6>level=info …": the priority prefix, then the fields
            return parts[0] + " ".join(parts[1:])
        return " ".join(parts)


# Libraries that would log request details (URLs, headers, SMTP command lines) at debug level:
# never below WARNING, whatever our own level, so that debug logging cannot leak a secret.
_QUIET = ("msal", "urllib3", "requests", "mail.log", "asyncio")


def stderr_is_journal(environ: dict[str, str] | None = None) -> bool:
    """True if stderr is the journal's stream: ``$JOURNAL_STREAM`` is ``DEV:INODE`` of it.

    A process started from a unit inherits the variable even when its stderr was redirected
    elsewhere (a pipe, a file); then the ``<N>`` prefixes would only be noise.
    """
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def setup(level: str = "info") -> None:
    """Configure the root logger once: stderr, key=value, journald prefixes under systemd."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    journald = stderr_is_journal()
    handler.setFormatter(KeyValueFormatter(journald=journald, timestamps=not journald))
    root.addHandler(handler)
    set_level(level)


def set_level(level: str) -> None:
    """Change the level (also on a config reload); the quiet libraries stay at WARNING+."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    for noisy in _QUIET:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def event(log: logging.Logger, level: int, name: str, **fields: Any) -> None:
    if log.isEnabledFor(level):
        log.log(level, name, extra={"fields": fields})
