"""Keep idle TLS connections small: a fixed glibc mmap threshold.

asyncio gives every TLS connection a 256 KiB read buffer (``SSLProtocol.max_size``), made
with ``calloc``. glibc serves allocations that large from fresh, untouched ``mmap`` pages —
until a large block is freed, after which its *dynamic* threshold rises and such buffers come
from the heap, where ``calloc`` must zero them: 256 KiB resident per connection, used or not.
Fixing the threshold (``M_MMAP_THRESHOLD``, which also turns the dynamic rise off) keeps the
buffers in mmap pages that only become resident as far as data is actually read into them, so
an idle session costs tens of KiB instead of ~300. No effect (and no error) off glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3
THRESHOLD = 128 * 1024  # glibc's own starting value


def fix_mmap_threshold(threshold: int = THRESHOLD) -> bool:
    """Set a fixed mmap threshold; True if glibc took it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, threshold) == 1)
