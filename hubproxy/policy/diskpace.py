"""Where a cache fill writes and hashes its chunks: on the event loop while the disk is fast, in
the store's disk thread while it is slow.

Theory of operation. Writing a chunk to the page cache takes tens of microseconds and hashing it
about a hundred and fifty (sha256 at 1.7 GB/s); both are work the fill must do anyway. Done on
the event loop, they cost only that. Handed to a worker thread, each chunk also costs a thread
wake-up, a wake-up of the loop when it is written, and the two threads passing the GIL back and
forth: measured on a 1 GiB miss over TLS, 0.6 CPU-seconds per GiB more, and no faster (the
socket work the thread was to run beside already kept both cores of the bench machine busy).

The thread earns its cost only when a write blocks: a disk behind on its dirty pages (an SD
card, a USB disk, a network file system) can hold a ``write`` for hundreds of milliseconds, and
on the event loop that would hold every client. So a write that takes longer than
``slow_write`` marks the disk slow for ``hold`` seconds (from that write), and while it is slow
new chunks go to the thread (whose writes are timed too and keep the mark fresh). Once no slow
write was seen for ``hold`` seconds, fills write on the loop again: at most one slow write per
``hold`` lands on the loop while a disk stays slow.

Plain values and an explicit ``now``: no clock, no I/O (the store times its writes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# a chunk (at most 256 KiB) reaches the page cache in well under a millisecond even on a
# router's CPU; a write this long waited for the disk
SLOW_WRITE = 0.004
# seconds a slow write keeps fills off the loop
SLOW_HOLD = 60.0


@dataclass
class DiskPace:
    """Whether the disk was seen slow lately, from the durations of the store's writes."""

    slow_write: float = SLOW_WRITE
    hold: float = SLOW_HOLD
    slow_until: float = -math.inf

    def writes_on_loop(self, now: float) -> bool:
        """Whether a chunk handed over at ``now`` is written on the event loop."""
        return now >= self.slow_until

    def wrote(self, now: float, seconds: float) -> bool:
        """Note a write that ended at ``now`` after ``seconds``; True when it turned the disk
        slow (it was not before), which the store says once in its log."""
        if seconds <= self.slow_write:
            return False
        was_fast = self.writes_on_loop(now)
        self.slow_until = max(self.slow_until, now + self.hold)
        return was_fast
