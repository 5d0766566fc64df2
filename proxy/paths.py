"""Where the files shipped beside the code are: example configs, Prometheus rules, systemd units.

A wheel installs them under ``<prefix>/share/xoauth2-proxy/`` (``config/``, ``config/prometheus/``,
``systemd/``): ``/usr/local/share/xoauth2-proxy`` for a system-wide ``pip install``,
``<venv>/share/xoauth2-proxy`` in a virtualenv. ``xoauth2-proxy version`` prints the folder.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

DISTRIBUTION = "xoauth2-proxy"
MARKER = ("share", "xoauth2-proxy", "config", "microsoft365.toml")


def data_dir() -> Path | None:
    """The shipped files' folder, from the installed distribution's record; a source checkout's
    top folder when running from one; None if neither has them."""
    try:
        files = importlib.metadata.distribution(DISTRIBUTION).files or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for entry in files:
        if entry.parts[-len(MARKER):] == MARKER:
            found = Path(str(entry.locate())).resolve().parent.parent
            if found.is_dir():
                return found
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "config" / "microsoft365.toml").is_file() and (checkout / "systemd").is_dir():
        return checkout
    return None
