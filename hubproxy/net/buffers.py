"""How big a body chunk is: as big as helps one transfer, as small as many transfers need.

A blob in flight holds about five buffers of one chunk each: the transport read, OpenSSL's
incoming buffer, the plaintext, the client side's outgoing buffer and its ciphertext. A cache
fill keeps up to four plaintext chunks in memory (two its writer thread has not written yet,
two for readers just behind it: ``cache/store.py``); its readers count as transfers too, and one
that takes its chunks from that memory holds no buffer of its own, so its share covers them.
256 KiB chunks are the measured sweet spot for one stream (64 KiB cost throughput, 1 MiB
gained nothing), but a hundred transfers at once then
hold about 130 MiB, which a 256 MB router cannot spare. So the chunk size follows the number of
transfers running: the full 256 KiB while their buffers fit :data:`BODY_BUDGET` together, less
as more run at once, never under 16 KiB (one TLS record's plaintext). A transfer is counted
from its first body byte to its last; a connection that is dropped mid-body stops counting when
it is garbage (a weak set), so a lost ``end`` can never shrink chunks for good.

No I/O and no clock: plain counting.
"""

from __future__ import annotations

import weakref

LARGEST = 256 * 1024
SMALLEST = 16 * 1024
GRANULE = 16 * 1024  # one TLS record's plaintext
BUFFERS_PER_TRANSFER = 5
BODY_BUDGET = 8 * 1024 * 1024


class TransferBudget:
    """The chunk size for body transfers, from how many are running."""

    def __init__(
        self,
        budget: int = BODY_BUDGET,
        *,
        buffers: int = BUFFERS_PER_TRANSFER,
        largest: int = LARGEST,
        smallest: int = SMALLEST,
    ) -> None:
        self.budget = budget
        self.buffers = buffers
        self.largest = largest
        self.smallest = smallest
        self._running: weakref.WeakSet[object] = weakref.WeakSet()

    @property
    def running(self) -> int:
        return len(self._running)

    def begin(self, transfer: object) -> None:
        self._running.add(transfer)

    def end(self, transfer: object) -> None:
        self._running.discard(transfer)

    def chunk(self) -> int:
        """The chunk size now: the budget shared by the running transfers' buffers."""
        share = self.budget // (self.buffers * max(1, len(self._running)))
        size = share - share % GRANULE
        return max(self.smallest, min(self.largest, size))


# One per process: every body transfer shares the same memory.
BODIES = TransferBudget()
