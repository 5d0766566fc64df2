"""In-memory mailboxes of the fake Microsoft 365, shared by its IMAP, POP3 and SMTP servers.

A ``MailStore`` maps a lower-cased address to an ``Account``: an INBOX plus any folders
created over IMAP. A ``Folder`` keeps ``StoredMessage`` objects (bytes exactly as
delivered, UID, flags, internal date) and tells its listeners (open IMAP sessions) about
new mail, so that IDLE can announce ``* N EXISTS``. No Twisted here; all calls happen on
the reactor thread.
"""

from __future__ import annotations

import email.utils
import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

_validity = itertools.count(int(time.time()))


@dataclass(eq=False)
class StoredMessage:
    uid: int
    data: bytes
    flags: set[str] = field(default_factory=set)
    internal_date: str = field(default_factory=lambda: email.utils.formatdate(localtime=True))

    def header_end(self) -> int:
        """Offset just past the blank line that ends the header (len(data) if none)."""
        i = self.data.find(b"\r\n\r\n")
        if i >= 0:
            return i + 4
        i = self.data.find(b"\n\n")
        return i + 2 if i >= 0 else len(self.data)


class Folder:
    """One mailbox folder: an ordered list of messages with strictly ascending UIDs."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.uid_validity = next(_validity)
        self.uid_next = 1
        self.messages: list[StoredMessage] = []
        self._listeners: list[Callable[[StoredMessage], None]] = []

    def append(self, data: bytes, flags: Iterable[str] = (), date: str | None = None
               ) -> StoredMessage:
        msg = StoredMessage(self.uid_next, bytes(data), set(flags))
        if date:
            msg.internal_date = date
        self.uid_next += 1
        self.messages.append(msg)
        for listener in list(self._listeners):
            listener(msg)
        return msg

    def remove(self, doomed: Iterable[StoredMessage]) -> None:
        gone = set(map(id, doomed))
        if gone:
            self.messages = [m for m in self.messages if id(m) not in gone]

    def add_listener(self, listener: Callable[[StoredMessage], None]) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[StoredMessage], None]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)


class Account:
    """The folders of one address. ``INBOX`` is case-insensitive, other names are not."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.folders: dict[str, Folder] = {"INBOX": Folder("INBOX")}
        self.subscribed: set[str] = {"INBOX"}

    @staticmethod
    def _key(name: str) -> str:
        return "INBOX" if name.upper() == "INBOX" else name

    def folder(self, name: str) -> Folder | None:
        return self.folders.get(self._key(name))

    def create(self, name: str) -> bool:
        key = self._key(name.rstrip("/"))
        if not key or key in self.folders:
            return False
        self.folders[key] = Folder(key)
        self.subscribed.add(key)
        return True

    def delete(self, name: str) -> bool:
        key = self._key(name)
        if key == "INBOX" or key not in self.folders:
            return False
        del self.folders[key]
        self.subscribed.discard(key)
        return True

    @property
    def inbox(self) -> Folder:
        return self.folders["INBOX"]


class MailStore:
    """All mailboxes of the fake tenant, keyed by lower-cased address."""

    def __init__(self) -> None:
        self._accounts: dict[str, Account] = {}

    def account(self, user: str) -> Account:
        key = user.strip().lower()
        acct = self._accounts.get(key)
        if acct is None:
            acct = self._accounts[key] = Account(key)
        return acct

    def addresses(self) -> list[str]:
        """Every mailbox that exists so far (lower case)."""
        return list(self._accounts)

    def deliver(self, recipient: str, message: bytes) -> None:
        """Append ``message`` to the recipient's INBOX, byte for byte."""
        self.account(recipient).inbox.append(message)

    def messages(self, user: str) -> list[bytes]:
        """The recipient's INBOX contents, oldest first."""
        return [m.data for m in self.account(user).inbox.messages]
