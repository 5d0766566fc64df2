"""The token store's exceptions: one family under ``StoreError``, each with a sentence to show.

Callers pick their reply by class, never by parsing messages:

- ``WrongPassword``     -> the client's local password (or service key) opens no slot.
- ``TokenFileMissing``  -> nobody has logged in for this account yet (or it was logged out).
- ``CorruptTokenFile``  -> the file exists but is unreadable; it is never overwritten silently.
- ``FileReplaced``      -> a new login replaced the file since it was unlocked; unlock again.
- ``StoreWriteError``   -> the disk refused a write; the old file is still intact.
- ``InsecureStateDir``  -> the state directory's owner or mode is unsafe; the message has the fix.
- ``TokenFileExists``   -> ``create(replace=False)`` found a file already there.
- ``SlotError``         -> duplicate label, unknown label, or removing the last slot.
- ``KeyFileError``      -> a service key file is missing, too short or otherwise unusable.
- ``DerivationNeeded``  -> ``unlock(derive=False)`` would need a key derivation.
- ``StoreUnavailable``  -> the database cannot be reached (or a lock not taken) in time:
                           temporary, nothing was changed; ``LockTimeout`` is one of them.

``path`` is where the record lives: a file's path, or for the PostgreSQL backend the database
and the account (a ``str``).
"""

from __future__ import annotations

from pathlib import Path


class StoreError(Exception):
    """Base class of every error the token store raises on purpose."""


class InsecureStateDir(StoreError):
    """The state directory is accessible to others or owned by someone else."""

    def __init__(self, path: Path, problem: str, fix: str) -> None:
        self.path = path
        self.problem = problem
        self.fix = fix
        super().__init__(f"state directory {path} {problem}; fix it with: {fix}")


Where = Path | str


class _AccountRecordError(StoreError):
    """An error about one account's record; subclasses word it with ``text``."""

    text = "account {account!r} ({path})"

    def __init__(self, account: str, path: Where) -> None:
        self.account = account
        self.path = path
        super().__init__(self.text.format(account=account, path=path))


class TokenFileMissing(_AccountRecordError):
    """No token file exists for the account."""

    text = "no token file for account {account!r} ({path}); run: xoauth2-proxy login {account}"


class TokenFileExists(_AccountRecordError):
    """``create(..., replace=False)`` refused because a token file is already there."""

    text = ("a token file for account {account!r} already exists ({path}); "
            "replacing it (a new login) must be asked for explicitly")


class CorruptTokenFile(StoreError):
    """The file is truncated, damaged, of another version, another account, or not ours."""

    def __init__(self, path: Where, reason: str, *, opened: bool = False) -> None:
        self.path = path
        self.reason = reason
        self.opened = opened  # found after a secret opened a slot (not before trying one)
        super().__init__(f"token file {path} is unusable: {reason}")


class WrongPassword(StoreError):
    """The password (or service key) opens none of the file's slots."""


class StoreWriteError(StoreError):
    """Writing failed (full disk, I/O error, lock timeout); the previous file is intact."""

    def __init__(self, path: Where, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"could not write {path}: {reason}; the previous file is unchanged")


class LockTimeout(StoreWriteError):
    """A per-account lock was not granted in time (another process holds it)."""


class StoreUnavailable(StoreError):
    """The store cannot be reached now (database down, lock not granted in time): temporary.

    Nothing was written; retrying later is safe."""

    def __init__(self, where: str, reason: str) -> None:
        self.where = where
        self.reason = reason
        super().__init__(f"token store {where} is unavailable: {reason}")


class FileReplaced(_AccountRecordError):
    """The file on disk now holds another data key: a new login happened since unlock."""

    text = ("token file {path} for account {account!r} was replaced by a new login; "
            "unlock it again")


class SlotError(StoreError):
    """A slot operation is not possible: duplicate or unknown label, or the last slot."""


class KeyFileError(StoreError):
    """A service key file cannot be used; the message names the path and the problem."""


class DerivationNeeded(StoreError):
    """``unlock(derive=False)``: the password needs a key derivation to be checked."""
