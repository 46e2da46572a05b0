"""Keep freed memory in the process instead of handing it back to the OS at once.

glibc's malloc returns large freed blocks to the kernel (munmap, or trimming
the heap top), so a loop that frees and reallocates the same tensors every step
page-faults them in again each time. Measured here on a plain training step of
an MLP (784-512-512-10, batch 256): ~700 page faults per step; with the fast
engine 100-900 per micro-batch on average, up to 2000 in one call (glibc adapts
its mmap threshold to earlier frees, so the count depends on their order), and
~3900 at glibc's fixed default threshold. PyTorch's CPU
performance guide suggests a caching allocator for this; these two glibc
settings do the same job without a dependency. Freed memory is then reused by
the next step, and the process keeps its peak footprint.

Called by the processes that run gns-sweep's loops (Ray tasks, the engine
benchmark); never on import, as it changes the whole process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
_MMAP_BYTES = 32 << 20  # blocks below this come from the heap, where freed ones are reused
_TRIM_BYTES = 1 << 30  # free space at the heap top kept before trimming

_done = False


def keep_freed_memory() -> bool:
    """Apply the settings once per process; False where malloc is not glibc's (nothing changes)."""
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
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_BYTES))
    return _done
