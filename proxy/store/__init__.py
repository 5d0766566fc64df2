"""Encrypted per-account token files with key slots (see ``format`` for the file format).

The public API is re-exported here; everything else in the package is internal.
"""

from proxy.store.errors import (
    CorruptTokenFile,
    DerivationNeeded,
    FileReplaced,
    InsecureStateDir,
    KeyFileError,
    SlotError,
    StoreError,
    StoreWriteError,
    TokenFileExists,
    TokenFileMissing,
    WrongPassword,
)
from proxy.store.format import Meta, SlotInfo
from proxy.store.keyfile import generate_key_file, read_key_file
from proxy.store.store import FileInfo, TokenStore, Unlocked

__all__ = [
    "CorruptTokenFile",
    "DerivationNeeded",
    "FileInfo",
    "FileReplaced",
    "InsecureStateDir",
    "KeyFileError",
    "Meta",
    "SlotError",
    "SlotInfo",
    "StoreError",
    "StoreWriteError",
    "TokenFileExists",
    "TokenFileMissing",
    "TokenStore",
    "Unlocked",
    "WrongPassword",
    "generate_key_file",
    "read_key_file",
]
