"""The waiting half of the bandwidth caps: the one place a response body piece waits to go.

``ClientResponse.send`` and ``.sendfile`` call :meth:`Pacer.take` before each piece (at most
``Pacer.piece`` bytes) when a cap is set; with none set there is no Pacer and no cost. A piece
first waits for its address's own bucket, then, under a total cap, for its turn: the pieces
waiting for the total are queued by address and handed out by :meth:`Pacer.dispatch` (a task
beside the server's connections) as the total bucket allows, the address served least first.
Every decision is ``policy.pacing``'s; this module sleeps on trio's clock.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import trio

from ..policy.pacing import Pacing

CAPS = ("client", "total")


@dataclass(frozen=True)
class BandwidthCaps:
    """``--client-bandwidth``, ``--total-bandwidth`` in bytes per second (None: no cap)."""

    client: int | None = None
    total: int | None = None

    @property
    def on(self) -> bool:
        return bool(self.client or self.total)


@dataclass(frozen=True)
class PacingFigures:
    """What ``/metrics`` shows of the caps."""

    caps: BandwidthCaps = field(default_factory=BandwidthCaps)
    delayed_bytes: dict[str, int] = field(default_factory=dict)  # by cap: bytes that waited
    paced_seconds: dict[str, float] = field(default_factory=dict)  # by cap: time waited
    paced_clients: int = 0  # addresses with a piece waiting now


@dataclass
class _Piece:
    count: int
    granted: trio.Event = field(default_factory=trio.Event)


class Pacer:
    """The caps of one process, shared by all its client connections."""

    def __init__(self, caps: BandwidthCaps) -> None:
        self.caps = caps
        # made outside trio's run too (the server is built before it starts): a bucket dated
        # -inf is simply full
        self.pacing = Pacing(caps.client, caps.total, float("-inf"))
        self.piece = self.pacing.piece
        # pieces waiting for the total, by address, in the order the addresses came (each
        # address's pieces in order too); bounded by the connections open
        self._queues: dict[str, deque[_Piece]] = {}
        self._queued = trio.Event()
        self._waiting: dict[str, int] = {}  # pieces waiting (either cap), by address
        self.delayed_bytes = dict.fromkeys(CAPS, 0)
        self.paced_seconds = dict.fromkeys(CAPS, 0.0)

    async def take(self, key: str, count: int) -> None:
        """Wait until ``count`` bytes (at most ``piece``) may go to address ``key``, and
        charge them."""
        pacing = self.pacing
        now = trio.current_time()
        ready = pacing.client_ready_at(key, now)
        if ready > now:
            before = now
            with self._paced(key):
                await trio.sleep_until(ready)
            now = trio.current_time()
            self._count("client", count, now - before)
        if pacing.total is None:
            pacing.spend(key, count, now)
            return
        if not self._queues and pacing.total_ready_at(now) <= now:
            pacing.join(key)
            pacing.spend(key, count, now)
            return
        piece = _Piece(count)
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = deque()
            pacing.join(key)
        queue.append(piece)
        self._queued.set()
        started = now
        try:
            with self._paced(key):
                await piece.granted.wait()
        finally:
            if not piece.granted.is_set():  # cancelled (the client left): out of the queue
                queue.remove(piece)
                if not queue and self._queues.get(key) is queue:
                    del self._queues[key]
        self._count("total", count, trio.current_time() - started)

    async def dispatch(self) -> None:
        """Hand the total out to the queued pieces, the address served least first (runs
        beside the connections while the server serves)."""
        pacing = self.pacing
        while True:
            if not self._queues:
                await self._queued.wait()
                self._queued = trio.Event()
                continue
            now = trio.current_time()
            ready = pacing.total_ready_at(now)
            if ready > now:
                await trio.sleep_until(ready)
                continue  # the queues may have changed meanwhile
            key = pacing.next_turn(self._queues)
            queue = self._queues[key]
            piece = queue.popleft()
            if not queue:
                del self._queues[key]
            pacing.spend(key, piece.count, now)
            piece.granted.set()

    def queued(self) -> int:
        """Pieces waiting for the total now."""
        return sum(len(queue) for queue in self._queues.values())

    def figures(self) -> PacingFigures:
        return PacingFigures(
            self.caps, dict(self.delayed_bytes), dict(self.paced_seconds), len(self._waiting)
        )

    def _count(self, cap: str, count: int, waited: float) -> None:
        self.delayed_bytes[cap] += count
        self.paced_seconds[cap] += waited

    def _paced(self, key: str) -> _Waiting:
        return _Waiting(self._waiting, key)


class _Waiting:
    """Counts a piece of ``key`` as waiting while in the ``with`` block."""

    def __init__(self, waiting: dict[str, int], key: str) -> None:
        self._waiting = waiting
        self._key = key

    def __enter__(self) -> None:
        self._waiting[self._key] = self._waiting.get(self._key, 0) + 1

    def __exit__(self, *_: object) -> None:
        left = self._waiting[self._key] - 1
        if left:
            self._waiting[self._key] = left
        else:
            del self._waiting[self._key]
