"""Giving freed memory back to the system, every ten seconds.

Body chunks and TLS buffers of 16-256 KiB are allocated and freed all day; ``net.malloc`` has
glibc serve them from the heap and keep up to 16 MiB free at its top, so that a transfer reuses
warm pages instead of faulting in fresh ones for every chunk. A heap with live blocks between
free ones keeps its free pages, though: the resident size creeps up a little with every new mix
of transfers, though nothing leaks (the Python heap, traced with tracemalloc over a soak, stays
flat). ``malloc_trim(0)`` hands every whole free page back (glibc 2.8 and later ``madvise`` them
wherever they are, not only at the top). Every ten seconds that costs a fraction of a
millisecond, and the pages it frees are faulted in again at most that often: nothing next to
the faults per chunk ``net.malloc`` saves. Measured with ``python -m bench.load --soak 30`` before
``net.malloc``: an RSS slope of +54 KiB/min after minute 5 without the trim, +16 with it (issue
12's bound is 50). Other C libraries (musl) have no ``malloc_trim``; there this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from collections.abc import Callable

import trio

log = logging.getLogger("hubproxy")

# seconds. Once a minute left the resident size a sawtooth of about 5 MiB over a busy minute (the
# top of the heap refilled within seconds of each trim), which is most of what a soak's slope
# measured; every ten seconds keeps it close to the memory really in use.
TRIM_INTERVAL = 10.0


def machine_memory(
    proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup"
) -> int | None:
    """Bytes of memory this process may use: the machine's, or less if its cgroup (a container,
    a systemd unit's ``MemoryMax=``) or one above it is limited: a mirror in a 256 MB container
    must size its buffers for 256 MB. None if unknown."""
    known: list[int] = []
    try:
        known.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # a system without these sysconf names
        pass
    known.extend(_cgroup_limits(proc_cgroup, root))
    positive = [value for value in known if value > 0]
    return min(positive) if positive else None


def _cgroup_limits(proc_cgroup: str, root: str) -> list[int]:
    """The memory limits of this process's cgroup and every one above it (v2 ``memory.max``,
    v1 ``memory.limit_in_bytes``); "max", or v1's huge number, is no limit at all."""
    try:
        with open(proc_cgroup) as file:
            lines = file.read().splitlines()
    except OSError:
        return []
    limits = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            base, name = root, "memory.max"  # v2: one hierarchy
        elif "memory" in controllers.split(","):
            base, name = os.path.join(root, "memory"), "memory.limit_in_bytes"
        else:
            continue
        parts = [part for part in path.split("/") if part and part != ".."]
        for depth in range(len(parts), -1, -1):
            try:
                with open(os.path.join(base, *parts[:depth], name)) as file:
                    text = file.read().strip()
            except OSError:
                continue
            if text.isdigit():
                limits.append(int(text))
    return limits


def find_malloc_trim() -> Callable[[], object] | None:
    """glibc's ``malloc_trim(0)`` as a callable, or None where the C library has none."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


async def give_back_memory(
    trim: Callable[[], object] | None = None,
    interval: float = TRIM_INTERVAL,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Call ``trim`` (default: :func:`find_malloc_trim`'s) every ``interval`` seconds, for as
    long as the server runs; return at once where there is nothing to call."""
    trim = trim or find_malloc_trim()
    task_status.started()
    if trim is None:
        log.debug("no malloc_trim in this C library: freed heap pages stay with the process")
        return
    while True:
        await trio.sleep(interval)
        trim()
