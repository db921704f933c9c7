"""How big a body chunk is: as big as helps one transfer, as small as many transfers need.

A blob in flight holds about five buffers of one chunk each: the transport read, OpenSSL's
incoming buffer, the plaintext, the client side's outgoing buffer and its ciphertext. A cache
fill keeps up to four plaintext chunks in memory (two its writer thread has not written yet,
two for readers just behind it: ``cache/store.py``); its readers count as transfers too, and one
that takes its chunks from that memory holds no buffer of its own, so its share covers them.
256 KiB chunks are the measured sweet spot for one stream (64 KiB cost throughput, 1 MiB
gained nothing), but a hundred transfers at once then hold about 130 MiB, which a 256 MB router
cannot spare. So the chunk size follows the number of transfers running: the full 256 KiB while
their buffers fit the budget together, less as more run at once, never under 16 KiB (one TLS
record's plaintext). A transfer is counted from its first body byte to its last; a connection
that is dropped mid-body stops counting when it is garbage (a weak reference), so a lost ``end`` can
never shrink chunks for good.

The budget (``--body-memory``) follows the machine: :func:`auto_budget` gives a sixty-fourth of
its memory, at least :data:`BODY_BUDGET` (8 MiB, what a 256 MB router can spare: a hundred
transfers at 16 KiB) and at most :data:`LARGEST_AUTO_BUDGET` (64 MiB: fifty transfers at full
chunks). Small chunks cost CPU: 32 transfers of 1 MiB each, passed, missed or hit, took 25-30%
less CPU per byte with 256 KiB chunks (a 64 MiB budget) than with 48 KiB ones (8 MiB), and ran
30-40% faster (``python -m bench --cases 100x1MiB-tls``, interleaved), for 11-15 MB more peak
RSS. With ``--workers N`` each process gets its part (:func:`worker_budget`).

No I/O and no clock: plain counting.
"""

from __future__ import annotations

import weakref

LARGEST = 256 * 1024
SMALLEST = 16 * 1024
GRANULE = 16 * 1024  # one TLS record's plaintext
BUFFERS_PER_TRANSFER = 5
BODY_BUDGET = 8 * 1024 * 1024  # the smallest automatic budget, and one process's until told
LARGEST_AUTO_BUDGET = 64 * 1024 * 1024
MEMORY_SHARE = 64  # the automatic budget is this fraction of the machine's memory


def auto_budget(memory: int | None) -> int:
    """``--body-memory auto``: the body budget of a machine (or a container) with ``memory``
    bytes, all processes together; None (unknown) gets the smallest."""
    if memory is None:
        return BODY_BUDGET
    share = memory // MEMORY_SHARE
    return max(BODY_BUDGET, min(LARGEST_AUTO_BUDGET, share - share % GRANULE))


def worker_budget(total: int, workers: int) -> int:
    """One process's part of the whole mirror's body budget: an equal share, but never less
    than one transfer at full chunks (one transfer must not crawl for the sake of a count)."""
    share = total // max(1, workers)
    return max(BUFFERS_PER_TRANSFER * LARGEST, share - share % GRANULE)


class TransferBudget:
    """The chunk size for body transfers, from how many are running.

    Asked several times per chunk (a fill's window, its readers): the size is worked out when
    a transfer begins or ends (or is dropped without ending) and when the budget is set, and
    read as it stands otherwise."""

    def __init__(
        self,
        budget: int = BODY_BUDGET,
        *,
        buffers: int = BUFFERS_PER_TRANSFER,
        largest: int = LARGEST,
        smallest: int = SMALLEST,
    ) -> None:
        self._budget = budget
        self.buffers = buffers
        self.largest = largest
        self.smallest = smallest
        # id -> a weak reference whose callback drops the entry once the transfer is garbage
        self._running: dict[int, weakref.ref[object]] = {}
        self._chunk = 0
        self._resize()

    @property
    def budget(self) -> int:
        return self._budget

    @budget.setter
    def budget(self, budget: int) -> None:
        self._budget = budget
        self._resize()

    @property
    def running(self) -> int:
        return len(self._running)

    def begin(self, transfer: object) -> None:
        key = id(transfer)
        if key not in self._running:
            self._running[key] = weakref.ref(transfer, lambda _ref: self._drop(key))
            self._resize()

    def end(self, transfer: object) -> None:
        # (the reference goes with the entry, and its callback with it)
        if self._running.pop(id(transfer), None) is not None:
            self._resize()

    def _drop(self, key: int) -> None:
        if self._running.pop(key, None) is not None:
            self._resize()

    def _resize(self) -> None:
        share = self._budget // (self.buffers * max(1, len(self._running)))
        size = share - share % GRANULE
        self._chunk = max(self.smallest, min(self.largest, size))

    def chunk(self) -> int:
        """The chunk size now: the budget shared by the running transfers' buffers."""
        return self._chunk


# One per process: every body transfer shares the same memory.
BODIES = TransferBudget()
