"""The ``requests`` session MSAL talks through (and the demo's admin client): every request
gets a default timeout (MSAL passes none, and ignores its own ``timeout`` when given an
``http_client``), and proxy or CA environment variables are not trusted
(``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE`` would otherwise override ``verify``)."""

from __future__ import annotations

from typing import Any

import requests


class TimeoutSession(requests.Session):
    """A session whose requests without a ``timeout`` get ``default_timeout``."""

    def __init__(self, timeout: float | None) -> None:
        super().__init__()
        self.default_timeout = timeout

    def request(self, method: Any, url: Any, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self.default_timeout
        return super().request(method, url, *args, **kwargs)


def session(verify: str | bool, timeout: float | None) -> requests.Session:
    """A session that verifies TLS with ``verify`` (a CA file, or True: the system's CAs)."""
    result = TimeoutSession(timeout)
    result.trust_env = False
    result.verify = verify
    return result
