"""The C heap's settings for CPU inference.

Owns ``reuse_freed_memory``: on glibc, large blocks (above a threshold that starts at 128 kB
and adapts up to 32 MB) are mapped fresh from the kernel on every allocation and unmapped on
free, so each step's multi-megabyte activations (Mimi's first layers hold B x 64 x 1920
floats) are page-faulted and zero-filled again at every step. Raising the mmap and trim
thresholds keeps freed blocks in the heap for the next step: on a 2-core VM, Mimi at batch 32
went from 222 to 120 ms per step. The cost is that the process keeps its peak heap instead of
returning it to the system, which is what a long-running server does anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_THRESHOLD = 1 << 30  # 1 GiB: every per-step temporary stays in the heap

_done = False


def reuse_freed_memory() -> bool:
    """Apply the thresholds once per process; True when they are in effect (glibc only)."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _done = bool(mallopt(_M_MMAP_THRESHOLD, _THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, _THRESHOLD)
    )
    return _done
