"""How many requests of one client address are worked on at once before their answers start.

A burst of requests from one address (a thousand pipelined HEADs, a hundred connections opened at
once) would otherwise all be worked on together: every one of them takes a step in each round of
the scheduler, and every other client's next step waits for the whole round. Each address gets
``limit`` turns; a request takes one when it arrives and gives it back when its answer starts
(the head is decided), so sending a body, which the client paces, never holds a turn. The others
wait in arrival order, each address in its own queue, so one address's queue never delays
another's requests; a request that waits longer than ``wait_timeout`` gets a 503.
"""

from __future__ import annotations

from collections import Counter, deque

import trio

from ..policy.errors import MirrorBusy
from .changes import Changes


class _Waiter:
    __slots__ = ("event", "granted")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.granted = False


class Turns:
    """Turns per client key (``policy.access.client_key``), ``limit`` each."""

    def __init__(self, limit: int, wait_timeout: float) -> None:
        self.limit = max(1, limit)
        self.wait_timeout = wait_timeout
        self.active: Counter[str] = Counter()
        self._queues: dict[str, deque[_Waiter]] = {}
        self.waits = 0  # requests that had to wait for a turn
        self.wait_timeouts = 0  # ... and gave up (503)
        self._changed = Changes()  # noted when a request starts or stops waiting

    async def wait_changed(self) -> None:
        """Wait until a request starts or stops waiting for a turn (tests)."""
        await self._changed.wait()

    def _note_change(self) -> None:
        self._changed.note()

    def waiting(self) -> int:
        return sum(len(q) for q in self._queues.values())

    async def take(self, key: str) -> None:
        """Take a turn of ``key`` (waiting for one if all are taken); give it back with
        :meth:`give_back` exactly once."""
        if self.active[key] < self.limit and key not in self._queues:
            # no schedule point: the request's own I/O follows at once (one trip through the
            # scheduler less per request); a cancelled request still stops here
            await trio.lowlevel.checkpoint_if_cancelled()
            self.active[key] += 1
            return
        waiter = _Waiter()
        self._queues.setdefault(key, deque()).append(waiter)
        self.waits += 1
        self._note_change()
        try:
            with trio.CancelScope(deadline=trio.current_time() + self.wait_timeout):
                await waiter.event.wait()
        except BaseException:
            if waiter.granted:
                self.give_back(key)
            else:
                self._forget(key, waiter)
            raise
        if waiter.granted:
            return
        self._forget(key, waiter)
        self.wait_timeouts += 1
        raise MirrorBusy(
            f"the mirror is busy: {self.limit} requests from this address are already being "
            f"worked on, and none got its answer within {self.wait_timeout:g}s; retry later",
            headers=((b"retry-after", b"%d" % max(1, round(self.wait_timeout))),),
        )

    def give_back(self, key: str) -> None:
        queue = self._queues.get(key)
        if queue:
            waiter = queue.popleft()  # the turn passes on: active stays as it is
            if not queue:
                del self._queues[key]
            waiter.granted = True
            waiter.event.set()
            self._note_change()
            return
        self.active[key] -= 1
        if self.active[key] <= 0:
            del self.active[key]

    def _forget(self, key: str, waiter: _Waiter) -> None:
        queue = self._queues.get(key)
        if queue is not None:
            queue.remove(waiter)
            if not queue:
                del self._queues[key]
        self._note_change()
