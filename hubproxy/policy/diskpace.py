"""Where a cache fill writes and hashes its chunks: on the event loop while the disk is fast, in
the store's disk thread while it is slow.

Theory of operation. Writing a chunk to the page cache takes tens of microseconds and hashing it
about a hundred and fifty (sha256 at 1.7 GB/s); both are work the fill must do anyway. Done on
the event loop, they cost only that. Handed to a worker thread, each chunk also costs a thread
wake-up, a wake-up of the loop when it is written, and the two threads passing the GIL back and
forth: measured on a 1 GiB miss over TLS, 0.6 CPU-seconds per GiB more, and no faster (the
socket work the thread was to run beside already kept both cores of the bench machine busy).

The thread earns its cost only when writes block: a disk behind on its dirty pages (an SD
card, a USB disk, a network file system) holds a ``write`` for tens to hundreds of
milliseconds, and on the event loop that would hold every client. A chunk reaches the page
cache in about 0.1 ms, and a few milliseconds now and then are noise (a virtual machine's first
touch of memory measured up to 4 ms here). A write that took long without blocking (its thread
kept from the CPU by other processes) counts as 0: the store reports the time of a write only
when its thread slept in it, since a thread would not write sooner on a busy CPU, and handing
over would cost CPU the machine lacks. So the store's writes are averaged (an exponential
average over about the last ``1 / weight`` writes); while the average is over
``slow_average``, which one write of about 16 ms or a run of 2 ms writes brings it to, the disk
is slow, and for ``hold`` seconds after, new chunks go to the thread (whose writes are timed
too and keep the average current). Once the average stayed under the mark for ``hold``
seconds, fills write on the loop again: while a disk stays slow, about one slow write per
``hold`` lands on the loop.

Plain values and an explicit ``now``: no clock, no I/O (the store times its writes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# seconds: the average write over which the disk counts as slow (a 256 KiB chunk reaches the
# page cache in about 0.1 ms, even on a router's CPU in well under a millisecond)
SLOW_AVERAGE = 0.002
# how much one write moves the average
WEIGHT = 1 / 8
# seconds a slow average keeps fills off the loop
SLOW_HOLD = 60.0


@dataclass
class DiskPace:
    """Whether the disk was seen slow lately, from the durations of the store's writes."""

    slow_average: float = SLOW_AVERAGE
    weight: float = WEIGHT
    hold: float = SLOW_HOLD
    average: float = 0.0
    slow_until: float = -math.inf

    def writes_on_loop(self, now: float) -> bool:
        """Whether a chunk handed over at ``now`` is written on the event loop."""
        return now >= self.slow_until

    def wrote(self, now: float, seconds: float) -> bool:
        """Note a write that ended at ``now`` after ``seconds``; True when it turned the disk
        slow (it was not before), which the store says once in its log."""
        self.average += (seconds - self.average) * self.weight
        if self.average <= self.slow_average:
            return False
        was_fast = self.writes_on_loop(now)
        self.slow_until = now + self.hold
        return was_fast
