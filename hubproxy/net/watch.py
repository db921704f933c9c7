"""The watch for a client that leaves before its answer, kept for the requests that wait.

A client that closes or resets its connection while its request waits (for the upstream, an
upstream slot, a fill another request is making, the manifest budget) should cancel what is done
for it, as nginx and Go's net/http do, rather than hold those for nobody. Seeing the close takes
a task waiting for the client's socket beside the one serving the request. That costs about
70 µs of CPU per request (the task, the socket's registration with epoll, the cancellation when
the answer is done): a sixth of a cached manifest's whole cost, paid by every request, though
most (cache hits, errors, small answers) are done in well under a millisecond with nothing to
cancel.

So a request gets its watch only once it has run for ``WATCH_AFTER``: one task per server starts
the watch of each request still under way by then, and a request done sooner costs a dict entry.
The delay is long enough that a busy mirror's requests, each waiting its turn for the CPU (20-40
ms with 50 connections asking at once), still end unwatched, and short next to what the watch
saves (an upstream slot held until the upstream's 60 s idle timeout). A client that leaves is
seen at most ``WATCH_AFTER`` later than it used to be; the socket says it left whenever the
watch starts, so no close is missed.

A request answered from the cache (the blob's file, or a fill that goes on whatever its client
does) forgets its watch as its answer begins (``Watches.forget``): nothing is then held for that
client alone, a client that leaves is seen at the next send, and one that takes nothing at the
client idle timeout. That spares every blob sent for longer than ``WATCH_AFTER`` the watch's
cost (1% of the instructions of a 1 MiB miss, 32 at a time).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from .fairness import serving

log = logging.getLogger("hubproxy")

WATCH_AFTER = 0.1  # seconds a request runs unwatched

# Waits for the client to send something or leave; True: it left (the request is cancelled).
Look = Callable[[], Awaitable[bool]]


class Watch:
    """One request's watch: registered when the request begins, started if it runs long."""

    __slots__ = ("_cancel_on_leaving", "_done", "_look", "_scope", "_serving", "departed")

    def __init__(self, look: Look, cancel_on_leaving: trio.CancelScope) -> None:
        self._look = look
        self._cancel_on_leaving = cancel_on_leaving  # cancelled when the client leaves
        # the client the watch reads for (net.fairness): the task that starts it serves none
        self._serving = serving.get()
        self._scope: trio.CancelScope | None = None  # set when started
        self._done: trio.Event | None = None
        self.departed = False

    @property
    def started(self) -> bool:
        return self._scope is not None

    def start(self, nursery: trio.Nursery) -> None:
        self._scope = trio.CancelScope()
        self._done = trio.Event()
        nursery.start_soon(self._run)

    async def _run(self) -> None:
        assert self._scope is not None and self._done is not None
        if self._serving is not None:
            serving.set(self._serving)
        try:
            with self._scope:
                if await self._look():
                    self.departed = True
                    self._cancel_on_leaving.cancel()
        except Exception:  # a bug must cost one watch, never the server
            log.exception("internal error watching a client connection")
        finally:
            self._done.set()

    async def stop(self) -> None:
        """Stop a started watch and wait until it has (it may be reading the connection)."""
        assert self._scope is not None and self._done is not None
        self._scope.cancel()
        # shielded: the watch ends at once once cancelled, and must have before the connection
        # reads again or closes
        with trio.CancelScope(shield=True):
            await self._done.wait()


class Watches:
    """The watches of one server's requests: those not started yet, oldest first, and the task
    (``run``, beside the server) that starts each once its request has run ``after``."""

    def __init__(self, after: float = WATCH_AFTER) -> None:
        self.after = after
        self._waiting: dict[Watch, float] = {}  # unstarted watch: when its request began
        self._wakeup = trio.Event()
        self.started = 0  # watches started so far (tests)

    def begin(self, look: Look, cancel_on_leaving: trio.CancelScope) -> Watch:
        """Register the watch of a request that begins now (cancelled through
        ``cancel_on_leaving``, its connection's scope, if its client leaves)."""
        watch = Watch(look, cancel_on_leaving)
        if not self._waiting:
            self._wakeup.set()
        self._waiting[watch] = trio.current_time()
        return watch

    def forget(self, watch: Watch) -> None:
        """The rest of the request's answer needs nothing held for its client alone: its watch
        is not started (one already started goes on until the request ends)."""
        self._waiting.pop(watch, None)

    async def end(self, watch: Watch) -> None:
        """The request is done: forget its watch, or stop it if started."""
        if self._waiting.pop(watch, None) is None and watch.started:
            await watch.stop()

    def __len__(self) -> int:
        return len(self._waiting)

    async def run(self) -> None:
        """Start each watch when its request has run ``after`` (runs until cancelled)."""
        async with trio.open_nursery() as nursery:
            while True:
                if not self._waiting:
                    self._wakeup = trio.Event()
                    await self._wakeup.wait()
                    continue
                oldest = next(iter(self._waiting.values()))
                await trio.sleep_until(oldest + self.after)
                now = trio.current_time()
                while self._waiting:
                    watch, began = next(iter(self._waiting.items()))
                    if began + self.after > now:  # (the sleep's own sum: no rounding apart)
                        break
                    del self._waiting[watch]
                    watch.start(nursery)
                    self.started += 1


class Stalled(Protocol):
    """What :class:`Stalls` tells that its send (or receive) has not ended in time."""

    def stalled(self) -> None: ...


class Stalls:
    """The sends or receives under way that must each end within one ``limit``, each with the
    time by which it must, and the task (``run``) that tells the owner of one that did not
    (:meth:`Stalled.stalled`). The server keeps one for its sends to clients (the client idle
    timeout: the connection is cancelled), the upstream pool one for every upstream send and
    receive (the upstream idle timeout: the connection is aborted).

    A deadline scope around every send registers a deadline in trio's sorted table and takes it
    out again, a cancel status made and dropped, for every response and every body chunk; a
    dict entry costs a fraction of that. Every entry waits the same limit, so the table is in
    deadline order as it is in insertion order, and the task sleeps until the oldest entry's.
    Once no send is under way it holds no timer (a clock that jumps to the next timer when the
    loop idles, as tests' do, jumps no further than it did with a deadline per send)."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.running = False  # run() is watching: a sender not watched keeps its own deadline
        self._sending: dict[Stalled, float] = {}  # sender -> when its send must have ended
        # run()'s sleep, until the oldest entry's deadline (none while nothing is under way).
        # Moved, not cancelled, as the table fills and empties: the sends to a lone fast client
        # empty it after every chunk, and waking the task for that (an Event set, a Cancelled
        # raised and caught, two task steps) cost 7% of the instructions of a hit's 256 KiB
        # chunk (64 MiB to one client, under callgrind: 638-656 million, 596-613 moved)
        self._asleep: trio.CancelScope | None = None

    def begin(self, sender: Stalled) -> None:
        """A send (or receive) of ``sender``'s starts now (one at a time per sender)."""
        deadline = trio.current_time() + self.limit
        if not self._sending and self._asleep is not None:
            self._asleep.deadline = deadline
        self._sending[sender] = deadline

    def end(self, sender: Stalled) -> None:
        """It ended (done, failed or cancelled)."""
        self._sending.pop(sender, None)
        if not self._sending and self._asleep is not None:
            self._asleep.deadline = math.inf

    def __len__(self) -> int:
        return len(self._sending)

    async def run(self) -> None:
        """Tell each sender whose send (or receive) outlived ``limit`` (runs until cancelled)."""
        self.running = True
        try:
            while True:
                oldest = next(iter(self._sending.values()), math.inf)
                with trio.CancelScope(deadline=oldest) as asleep:
                    self._asleep = asleep
                    await trio.sleep_forever()
                # nothing below awaits: no send begins or ends until the next sleep
                self._asleep = None
                now = trio.current_time()
                while self._sending:
                    sender, deadline = next(iter(self._sending.items()))
                    if deadline > now:
                        break
                    del self._sending[sender]
                    sender.stalled()
        finally:
            self.running = False
            self._asleep = None
