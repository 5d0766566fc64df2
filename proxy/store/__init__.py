"""Encrypted per-account token envelopes with key slots (``format``), in files or PostgreSQL.

The public API is re-exported here; everything else in the package is internal.
"""

from proxy.store.core import WRITER_LOCK_WAIT
from proxy.store.errors import (
    CorruptTokenFile,
    DerivationNeeded,
    FileReplaced,
    InsecureStateDir,
    KeyFileError,
    LockTimeout,
    SlotError,
    StoreError,
    StoreUnavailable,
    StoreWriteError,
    TokenFileExists,
    TokenFileMissing,
    WrongPassword,
)
from proxy.store.format import Meta, SlotInfo
from proxy.store.keyfile import generate_key_file, read_key_file
from proxy.store.settings import StoreSettings, open_store
from proxy.store.store import FileInfo, TokenStore, Unlocked

__all__ = [
    "CorruptTokenFile",
    "DerivationNeeded",
    "FileInfo",
    "FileReplaced",
    "InsecureStateDir",
    "KeyFileError",
    "LockTimeout",
    "Meta",
    "SlotError",
    "SlotInfo",
    "StoreError",
    "StoreSettings",
    "StoreUnavailable",
    "StoreWriteError",
    "TokenFileExists",
    "TokenFileMissing",
    "TokenStore",
    "Unlocked",
    "WRITER_LOCK_WAIT",
    "WrongPassword",
    "generate_key_file",
    "open_store",
    "read_key_file",
]
