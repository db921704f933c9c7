"""The CPU shared fairly between client addresses: the gate in front of each unit of TLS work.

``policy.fairshare`` decides; this module counts the scheduler's batches (a trio instrument
whose one hook runs once per batch, after the wait for I/O) and parks a unit that may not go
yet until a batch where it may. Parked units of one address go in arrival order, as many per
batch as its credit allows, so a burst (a hundred requests at once) is spread over the batches
instead of filling one.

Which address a unit works for is the ``serving`` context variable: the server sets it in each
client connection's task, and every task started from there (a request, its upstream
connections) inherits it. Work not done for one client (a cache fill that others follow, the
start-up checks) sets none and is never held.

A unit's declared cost is a guess made before it runs; what else a client's step does (parsing
and handling the request it just decrypted, tearing a connection down) is not behind any gate.
So while addresses share the CPU, a second instrument (the step meter) also times every step of a
task serving a client (one clock read per step: steps run back to back, each ends where the next
begins) and charges what the step took beyond what its gates declared: an address whose requests
are expensive to handle runs into debt, and its next units wait, whatever made them expensive.
With one address alone the step meter is off: it costs every task step of the process a hook
call (taking it out saved 6-11% of the CPU of 1 KiB requests, passed or cached, and 4-9% of 100
blobs of 1 MiB passed 32 at once, all from one address: ``python -m bench``, interleaved).
The whole batch is timed instead (one clock read before the wait for I/O), and what it took
beyond the declared costs is charged to the address alone: its debt still holds back the parked
units released at the next batch's start, so its batches stay about as short as metered ones.
(With no meter at all while alone, one run of ``python -m bench.load --abuse`` put a victim's
p99 beside 120 slow Range reads at 30 ms against 22 ms, and the slow GETs of case 3 over their
limit.) The step meter is on again from the first unit of a second address, and out at the
first batch after the others went quiet (``active_for``).
"""

from __future__ import annotations

import time
from collections import deque
from contextvars import ContextVar
from dataclasses import dataclass

import trio

# The one function of trio.testing this needs, from where trio defines it: importing
# trio.testing imports pytest wherever pytest is installed (trio.testing._raises_group),
# 9 MiB of memory and 70 ms of start-up in every hubproxy process of such an environment.
from trio._core._run import wait_all_tasks_blocked

from ..policy.fairshare import BYTES_PER_SECOND, FairShare

FORGET_EVERY = 1.0  # seconds between sweeps of decayed accounts


@dataclass(frozen=True)
class Serving:
    """The client a task works for, and the fair share it is held to."""

    fairness: Fairness
    key: str


serving: ContextVar[Serving | None] = ContextVar("hubproxy_serving", default=None)


async def gate(cost: float) -> None:
    """Wait until a unit of work costing ``cost`` (bytes) may go for the client this task
    serves; at once (no schedule point) when it may go now or the task serves no client."""
    current = serving.get()
    if current is not None and current.key != current.fairness.share.sole_key:
        # (the address with the only connections goes at once, unaccounted: nobody can be
        # waiting behind it; every unit of a lone client's, a task step's worth each)
        await current.fairness.take(current.key, cost)


class _Parked:
    __slots__ = ("cost", "event", "task")

    def __init__(self, cost: float) -> None:
        self.cost = cost
        self.event = trio.Event()
        self.task = trio.lowlevel.current_task()


class Fairness(trio.abc.Instrument):
    """The gate's state for one server: the accounts, the batch count, the parked units."""

    def __init__(self, share: FairShare | None = None) -> None:
        self.share = share if share is not None else FairShare()  # (an empty one is falsy)
        self.batch = 0
        self._parked: dict[str, deque[_Parked]] = {}
        self._someone_parked = trio.Event()
        self._next_sweep = 0.0
        self.waits = 0  # units that had to wait for a later batch (/metrics)
        self._step_ended = self._batch_started = time.perf_counter()
        # cost the gates charged in the running step (metering), or in the batch (alone)
        self._declared = 0.0
        self._released: dict[trio.lowlevel.Task, float] = {}  # cost charged for a parked unit
        self._meter = _StepMeter(self)
        self.metering = False  # the step meter is installed (addresses share the CPU)
        self._alone: str | None = None  # while not metering: whose units went in this batch

    def connected(self, key: str) -> None:
        """A connection of ``key`` was accepted: it counts as present from now (before its
        first step), so an address that was the only one connected is no longer."""
        self.share.connected(key)

    def disconnected(self, key: str) -> None:
        self.share.disconnected(key, trio.current_time())

    def after_io_wait(self, timeout: float) -> None:
        """A new batch: let each address's parked units go, while it has credit (charged now,
        so that no unit arriving later in the batch overtakes them)."""
        self.batch += 1
        if self._parked or self.metering:
            now = trio.current_time()
            if self.metering and not self.share.sharing(now):
                self.stop_metering()
            for key, queue in list(self._parked.items()):
                while queue and self.share.spend(key, queue[0].cost, now, self.batch):
                    unit = queue.popleft()
                    if self.metering:
                        self._released[unit.task] = self._released.get(unit.task, 0.0) + unit.cost
                    else:
                        self._alone = key
                        self._declared += unit.cost
                    unit.event.set()
                if not queue:
                    del self._parked[key]
        self._step_ended = self._batch_started = time.perf_counter()

    def before_io_wait(self, timeout: float) -> None:
        """A batch ended: with the step meter off, charge the address alone what the batch
        took beyond its units' declared costs (work for no client counted in: a fill it
        started, mostly)."""
        alone, self._alone = self._alone, None
        if self.metering:
            return
        declared, self._declared = self._declared, 0.0
        if alone is None:
            return
        excess = (time.perf_counter() - self._batch_started) * BYTES_PER_SECOND - declared
        if excess > 0:
            self.share.charge(alone, excess, trio.current_time(), self.batch)

    def _start_metering(self) -> None:
        self._step_ended = time.perf_counter()
        self._declared = 0.0  # what the batch declared before: its steps from here are metered
        self._alone = None
        trio.lowlevel.add_instrument(self._meter)
        self.metering = True

    def stop_metering(self) -> None:
        """Take the step meter out (an address alone again, or the server stopping)."""
        if self.metering:
            trio.lowlevel.remove_instrument(self._meter)
            self.metering = False
            self._released.clear()

    def measure_step(self, task: trio.lowlevel.Task) -> None:
        """Charge a client's step what it took beyond what its gates declared (the step
        meter's hook)."""
        ended = time.perf_counter()
        took = ended - self._step_ended
        self._step_ended = ended
        declared = self._declared
        self._declared = 0.0
        current = task.context.get(serving)
        if current is None or current.fairness is not self:
            return
        if self._released:
            declared += self._released.pop(task, 0.0)
        excess = took * BYTES_PER_SECOND - declared
        if excess > 0:
            self.share.charge(current.key, excess, trio.current_time(), self.batch)

    async def keep_batches_coming(self) -> None:
        """While units are parked, make sure batches happen: with nothing else to do the loop
        would sleep in its wait for I/O and count none. Once the loop has been idle for the
        share's ``pause`` (real time: the wait for I/O times out, whatever the run's clock
        says, a test's frozen clock too; none for an address alone), this task's step is a
        batch. Runs until cancelled, beside the server."""
        while True:
            await self._someone_parked.wait()
            await wait_all_tasks_blocked(self.share.pause(self._parked.keys(), trio.current_time()))
            self.share.idle(self._parked.keys(), trio.current_time())
            if not self._parked:
                self._someone_parked = trio.Event()

    async def take(self, key: str, cost: float) -> None:
        now = trio.current_time()
        if now >= self._next_sweep:
            self._next_sweep = now + FORGET_EVERY
            self.share.forget_idle(now)
        elapsed = time.perf_counter() - self._batch_started
        if key not in self._parked and self.share.spend(key, cost, now, self.batch, elapsed):
            if not self.metering:
                if self.share.sharing(now):
                    self._start_metering()  # this step on: its unit's cost below is its own
                else:
                    self._alone = key
            self._declared += cost
            return
        self.waits += 1
        unit = _Parked(cost)
        self._parked.setdefault(key, deque()).append(unit)
        self._someone_parked.set()
        try:
            await unit.event.wait()
        except BaseException:
            self._unpark(key, unit)
            raise

    def _unpark(self, key: str, unit: _Parked) -> None:
        queue = self._parked.get(key)
        if queue is None:
            return
        try:
            queue.remove(unit)
        except ValueError:  # released already
            return
        if not queue:
            del self._parked[key]

    def parked(self) -> int:
        """Units waiting for a later batch now."""
        return sum(len(queue) for queue in self._parked.values())


class _StepMeter(trio.abc.Instrument):
    """The hook on every task step, installed only while addresses share the CPU (see the
    module doc): a separate instrument, so that trio calls no step hook at all without it."""

    def __init__(self, fairness: Fairness) -> None:
        self._fairness = fairness

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        self._fairness.measure_step(task)
