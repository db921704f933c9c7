"""A "something changed" signal for whoever waits on it, costing nothing when nobody does.

Budgets, turns and the pool note a change on every request (a slot taken, then given back);
only tests, the status page and a queued waiter wait for one. A ``trio.Event`` renewed on each
change, or asked ``statistics()`` to see whether anyone waits, cost an object or two per
change for nobody: this counts its waiters instead.
"""

from __future__ import annotations

import trio


class Changes:
    """Wait for the next :meth:`note`; a note with nobody waiting is one attribute test."""

    __slots__ = ("_event", "_waiting")

    def __init__(self) -> None:
        self._event = trio.Event()
        self._waiting = 0

    async def wait(self) -> None:
        """Wait until the next :meth:`note` after this call."""
        event = self._event
        self._waiting += 1
        try:
            await event.wait()
        finally:
            self._waiting -= 1

    def note(self) -> None:
        """Wake everyone waiting now (and no one who starts waiting after)."""
        if self._waiting:
            self._event.set()
            self._event = trio.Event()
