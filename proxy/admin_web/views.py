"""What the accounts page shows of an account: clear facts from its token file and the
in-band flow, as display strings (no secret; blocking file reads: call in a thread)."""

from __future__ import annotations

import time
from typing import Any

from proxy import store
from proxy.auth.reauth import Flow
from proxy.config import Account


def when(epoch: float | None) -> str:
    if not epoch:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(epoch))


def account_view(token_store: store.TokenStore, account: Account, flow: Flow | None
                 ) -> dict[str, Any]:
    view: dict[str, Any] = {"name": account.name, "flow": account.flow, "slots": [],
                            "has_file": False, "needs": False,
                            "can_reauth": account.flow != "client_credentials"}
    if flow is not None and flow.live:
        view["device_flow"] = f"{flow.user_code} at {flow.url}, until {when(flow.expires_at)}"
    try:
        info = token_store.info(account.name)
    except store.TokenFileMissing:
        view.update(state=f"no token file: authorise it once with `xoauth2-proxy login "
                          f"{account.name}`", needs=True, can_reauth=False)
        return view
    except (store.StoreError, OSError) as exc:
        view.update(state=f"token file unusable: {exc}", needs=True)
        return view
    meta = info.meta
    view["has_file"] = True
    if meta.needs_reauth:
        view.update(state=f"needs re-authorisation: {meta.needs_reauth}", needs=True)
    elif not meta.refresh_token_present and account.flow != "client_credentials":
        view.update(state="no refresh token: needs re-authorisation", needs=True)
    else:
        view["state"] = "ok"
    view["access_expiry"] = when(meta.access_token_expires_at)
    view["updated"] = when(meta.updated_at)
    view["slots"] = [{"label": s.label, "kind": s.kind, "created": when(s.created_at),
                      "last_used": when(s.last_used_at)} for s in info.slots]
    return view
