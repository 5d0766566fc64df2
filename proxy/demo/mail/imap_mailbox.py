"""The mailbox side of the fake IMAP server: Twisted's IMAP interfaces over ``store``.

``Message`` (IMessage and IMessageFile over a ``StoredMessage``; MIME parts are parsed with
``email`` only when BODYSTRUCTURE or ``BODY[n]`` asks), ``MailboxView`` (one session's view
of a folder: a snapshot of its messages plus later arrivals, with sequence numbers that
change only on that session's own EXPUNGE) and ``AccountAdapter`` (IAccount and
INamespacePresenter over a ``store.Account``).
"""

from __future__ import annotations

import email
import email.policy
from io import BytesIO
from typing import Any

from twisted.internet import defer
from twisted.mail import imap4
from zope.interface import implementer

from .store import Account, Folder, StoredMessage


@implementer(imap4.IMessagePart)
class MimePart:
    """A MIME part parsed with ``email``; only used for BODY[n] and BODYSTRUCTURE."""

    def __init__(self, msg: email.message.Message) -> None:
        self._msg = msg

    def getHeaders(self, negate, *names):
        wanted = {(n.decode() if isinstance(n, bytes) else n).lower() for n in names}
        return {
            k.lower(): str(v)
            for k, v in self._msg.items()
            if (k.lower() in wanted) != bool(negate)
        }

    def _raw(self) -> bytes:
        return self._msg.as_bytes(policy=email.policy.compat32)

    def getBodyFile(self):
        raw = self._raw()
        return BytesIO(raw[StoredMessage(0, raw).header_end():])

    def getSize(self):
        return len(self._raw())

    def isMultipart(self):
        return self._msg.is_multipart()

    def getSubPart(self, part):
        if not self._msg.is_multipart():
            raise TypeError("not a multipart message")
        return MimePart(self._msg.get_payload(part))


@implementer(imap4.IMessage, imap4.IMessageFile)
class Message:
    """A stored message as Twisted's FETCH, SEARCH and COPY code wants to see it."""

    def __init__(self, stored: StoredMessage) -> None:
        self.stored = stored
        self._parsed: MimePart | None = None

    def _part(self) -> MimePart:
        if self._parsed is None:
            parsed = email.message_from_bytes(self.stored.data, policy=email.policy.compat32)
            self._parsed = MimePart(parsed)
        return self._parsed

    def getUID(self):
        return self.stored.uid

    def getFlags(self):
        return sorted(self.stored.flags)

    def getInternalDate(self):
        return self.stored.internal_date

    def getHeaders(self, negate, *names):
        return self._part().getHeaders(negate, *names)

    def getBodyFile(self):
        return BytesIO(self.stored.data[self.stored.header_end():])

    def getSize(self):
        return len(self.stored.data)

    def isMultipart(self):
        return self._part().isMultipart()

    def getSubPart(self, part):
        return self._part().getSubPart(part)

    def open(self):
        return BytesIO(self.stored.data)


class ListEntry:
    """What LIST shows of a folder: its attributes and the hierarchy delimiter."""

    def __init__(self, children: bool) -> None:
        self._flags = [r"\HasChildren" if children else r"\HasNoChildren"]

    def getFlags(self):
        return self._flags

    def getHierarchicalDelimiter(self):
        return "/"


@implementer(imap4.IMailbox, imap4.ICloseableMailbox)
class MailboxView:
    """One session's view of a folder: a snapshot of its messages plus later arrivals."""

    def __init__(self, folder: Folder, writeable: bool) -> None:
        self.folder = folder
        self._writeable = writeable
        self._msgs: list[StoredMessage] = list(folder.messages)
        self._listeners: list[Any] = []

    # -- IMailboxInfo / IMailbox
    def getFlags(self):
        return [r"\Seen", r"\Answered", r"\Flagged", r"\Deleted", r"\Draft"]

    def getHierarchicalDelimiter(self):
        return "/"

    def getUIDValidity(self):
        return self.folder.uid_validity

    def getUIDNext(self):
        return self.folder.uid_next

    def getUID(self, message):
        return self._msgs[message - 1].uid

    def getMessageCount(self):
        return len(self._msgs)

    def getRecentCount(self):
        return 0

    def getUnseenCount(self):
        return sum(1 for m in self._msgs if r"\Seen" not in m.flags)

    def isWriteable(self):
        return self._writeable

    def destroy(self):
        raise imap4.MailboxException("Permission denied.")

    def requestStatus(self, names):
        return imap4.statusRequestHelper(self, names)

    def addListener(self, listener):
        if not self._listeners:
            self.folder.add_listener(self._arrived)
        self._listeners.append(listener)

    def removeListener(self, listener):
        if listener in self._listeners:
            self._listeners.remove(listener)
        if not self._listeners:
            self.folder.remove_listener(self._arrived)

    def close(self):
        self._listeners.clear()
        self.folder.remove_listener(self._arrived)

    def _arrived(self, msg: StoredMessage) -> None:
        self._msgs.append(msg)
        for listener in list(self._listeners):
            listener.newMessages(len(self._msgs), None)

    def addMessage(self, message, flags=(), date=None):
        data = message.read() if hasattr(message, "read") else bytes(message)
        stored = self.folder.append(data, flags, date.decode() if isinstance(date, bytes)
                                    else date)
        return defer.succeed(stored.uid)

    def expunge(self, uids: imap4.MessageSet | None = None) -> list[int]:
        """Remove \\Deleted messages (only those in ``uids`` if given); return their
        sequence numbers in descending order, which is how EXPUNGE responses may go out."""
        if uids is not None:
            _set_last(uids, self._msgs[-1].uid if self._msgs else 0)
        doomed = [
            (seq, m) for seq, m in enumerate(self._msgs, 1)
            if r"\Deleted" in m.flags and (uids is None or m.uid in uids)
        ]
        self.folder.remove(m for _, m in doomed)
        gone = {id(m) for _, m in doomed}
        self._msgs = [m for m in self._msgs if id(m) not in gone]
        return [seq for seq, _ in reversed(doomed)]

    def move(self, messages: imap4.MessageSet, uid: bool, target: Folder
             ) -> tuple[list[int], list[int], list[int]]:
        """Append the chosen messages to ``target`` and remove them here: their UIDs, the
        UIDs of the copies, and their sequence numbers in descending order (for EXPUNGE)."""
        chosen = self._select(messages, uid)
        copies = [target.append(m.data, m.flags, m.internal_date) for _, m in chosen]
        self.folder.remove(m for _, m in chosen)
        gone = {id(m) for _, m in chosen}
        self._msgs = [m for m in self._msgs if id(m) not in gone]
        return ([m.uid for _, m in chosen], [c.uid for c in copies],
                [seq for seq, _ in reversed(chosen)])

    def _select(self, messages: imap4.MessageSet, uid: bool) -> list[tuple[int, StoredMessage]]:
        msgs = self._msgs
        if uid:
            _set_last(messages, msgs[-1].uid if msgs else 0)
            return [(seq, m) for seq, m in enumerate(msgs, 1) if m.uid in messages]
        _set_last(messages, len(msgs))
        return [(seq, m) for seq, m in enumerate(msgs, 1) if seq in messages]

    def fetch(self, messages, uid):
        return [(seq, Message(m)) for seq, m in self._select(messages, uid)]

    def store(self, messages, flags, mode, uid):
        flags = {f if isinstance(f, str) else f.decode() for f in flags}
        result = {}
        for seq, m in self._select(messages, uid):
            if mode > 0:
                m.flags |= flags
            elif mode < 0:
                m.flags -= flags
            else:
                m.flags = set(flags)
            result[seq] = sorted(m.flags)
        return result


def _set_last(messages: imap4.MessageSet, last: int) -> None:
    try:
        messages.last = last
    except ValueError:  # already set by an earlier pass
        pass


@implementer(imap4.IAccount, imap4.INamespacePresenter)
class AccountAdapter:
    """``IAccount`` over a ``store.Account``."""

    def __init__(self, account: Account) -> None:
        self._account = account

    def select(self, name, rw=True):
        folder = self._account.folder(name)
        return None if folder is None else MailboxView(folder, bool(rw))

    def create(self, pathspec):
        return self._account.create(pathspec)

    def delete(self, name):
        if not self._account.delete(name):
            raise imap4.MailboxException("No such mailbox.")

    def rename(self, oldname, newname):
        raise imap4.MailboxException("RENAME is not supported here.")

    def isSubscribed(self, name):
        return self._account._key(name) in self._account.subscribed

    def subscribe(self, name):
        if self._account.folder(name) is None:
            raise imap4.MailboxException("No such mailbox.")
        self._account.subscribed.add(self._account._key(name))

    def unsubscribe(self, name):
        self._account.subscribed.discard(self._account._key(name))

    def listMailboxes(self, ref, wildcard):
        pattern = imap4.wildcardToRegexp(ref + wildcard, "/")
        names = list(self._account.folders)
        return [
            (name, ListEntry(any(n.startswith(name + "/") for n in names)))
            for name in names if pattern.match(name)
        ]

    def getPersonalNamespaces(self):
        return [["", "/"]]

    def getSharedNamespaces(self):
        return None

    def getOtherNamespaces(self):
        return None

    def getUserNamespaces(self):
        return None
