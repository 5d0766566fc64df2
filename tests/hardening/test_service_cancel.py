"""Regression: a login abandoned while its password is checked leaves no unretrieved error.

``TokenService.access_token`` shares one unlock task per (account, password) and awaits it
through ``asyncio.shield``. When the waiter is cancelled — aiosmtpd cancels its handler when
the client disconnects — shield removes its callback from the task, so a wrong password
failing afterwards was reported by asyncio as "Task exception was never retrieved". Found by
the socket fuzz (``test_fuzz_socket.py``, seeds 1, 4 and 5).
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from proxy import config as config_mod
from proxy import store
from proxy.auth.errors import WrongPassword
from proxy.auth.service import TokenService
from proxy.demo.process import DemoUpstream
from proxy.secret import Secret
from tests.hardening.conftest import Trouble
from tests.proxyenv import USER, config_dict


class SlowWrongStore:
    """A token store whose unlock takes a while and then refuses the password."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def unlock(self, account: str, password: Secret, *, derive: bool = True) -> store.Unlocked:
        if not derive:
            raise store.DerivationNeeded(account)
        self.entered.set()
        self.release.wait(10)
        raise store.WrongPassword("wrong password")


async def test_cancelled_waiter_leaves_no_unretrieved_error(
        tmp_path: Path, demo_upstream: DemoUpstream, trouble: Trouble) -> None:
    cfg = config_mod.parse(config_dict(tmp_path, demo_upstream, protocols=("imap",)),
                           tmp_path / "config.toml")
    slow = SlowWrongStore()
    service = TokenService(cfg, slow)  # type: ignore[arg-type]
    waiters = [asyncio.create_task(service.access_token(USER, Secret("wrong"), "imap"))
               for _ in range(2)]
    await asyncio.to_thread(slow.entered.wait, 10)
    for waiter in waiters:
        waiter.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    slow.release.set()
    for _ in range(200):  # the unlock task ends in its worker thread
        if not service._unlocks:
            break
        await asyncio.sleep(0.01)
    assert not service._unlocks
    trouble.check()
    # and a waiter that stays gets the error as usual
    slow.release.set()
    try:
        await service.access_token(USER, Secret("wrong"), "imap")
    except WrongPassword:
        pass
    else:
        raise AssertionError("expected WrongPassword")
    trouble.check()
