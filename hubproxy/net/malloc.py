"""Keep the memory of body buffers in the process instead of handing it back to the kernel.

A transfer allocates and frees a few buffers of up to 256 KiB per chunk (the ciphertext read,
the plaintext, the ciphertext written; ``net.buffers``). glibc's malloc serves blocks that large
with ``mmap`` and gives them back with ``munmap`` at every free, or lets the heap grow and trims it
again soon after, so each chunk lands on fresh pages: the kernel zero-fills them and takes a page
fault per 4 KiB. Measured on a 1 GiB pass through hubproxy: about 130,000 faults per GiB and a
fifth of the process's CPU. Raising the mmap threshold above the largest buffer, and the trim
threshold to a few body budgets, makes malloc reuse the same heap memory chunk after chunk.

Only glibc has these knobs (``mallopt``); elsewhere (musl on a router, macOS) nothing is done.
"""

from __future__ import annotations

import ctypes
import sys

# mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

# Above the largest body buffer (256 KiB of plaintext and its TLS records): blocks this large or
# larger still come from mmap, and go back to the kernel when freed.
MMAP_THRESHOLD = 1024 * 1024
# Free memory at the top of the heap kept for reuse before it is trimmed, unless told: two body
# budgets (``net.buffers``), so that a burst of transfers does not fault its way in again.
TRIM_THRESHOLD = 16 * 1024 * 1024


def tune_malloc(trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Set glibc's mmap and trim thresholds (see the module doc); whether they were set."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # musl's mallopt exists and returns 0: it does nothing
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, trim_threshold)
    )
