"""A token service in a process of its own, for tests of the cross-process refresh lock.

``python -m tests.auth.refresher CONFIG ACCOUNT PASSWORD``: builds the daemon's token service on
the config's store, says ``ready``, waits for a line on standard input, asks for the account's
IMAP access token and prints it.
"""

from __future__ import annotations

import asyncio
import sys

from proxy import config, store
from proxy.auth.service import TokenService
from proxy.secret import Secret


async def main(path: str, account: str, password: str) -> None:
    cfg = config.load(path)
    service = TokenService(cfg, store.open_store(cfg))
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    token = await service.access_token(account, Secret(password), "imap")
    print(token, flush=True)
    await service.aclose()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
