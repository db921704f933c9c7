"""Whose work goes next when several client addresses want the one CPU: the least served first.

hubproxy runs every client on one event loop. The loop runs, in each round (a *batch*), one step
of every task that is ready, so a client with a hundred busy connections gets a hundred steps
for every step of a client with one, and that one client's every step waits for all of them: an
attack that costs the mirror CPU (a burst of handshakes, a hundred manifest misses, GETs
abandoned after their first bytes) multiplies everyone else's latency.

So the TLS layer asks before each unit of CPU work it does for a client (a handshake step,
decrypting what arrived, encrypting a chunk to send, reading a cached manifest back) and says what
the unit costs, in bytes. What a client's steps really took beyond that (the request handled
after the bytes were decrypted, a connection torn down) is measured and charged after the fact,
at ``BYTES_PER_SECOND``. This module keeps the account and answers, deficit round robin over the
scheduler's batches: each address earns a quantum of cost per batch, by its standing, and a unit
goes while its address is not in debt (a large unit goes, then its debt holds the next ones back):

- **Sole** (no other address holds a connection, or held one in the last ``present_for``): no
  limit, no debt, not even an account (``net.fairness.gate`` lets its units go at once).
  Nobody can be waiting behind it, and holding its units for later batches cost a lone busy
  client a task step each (wrk's 10 connections on one cached manifest: two units held per
  three requests, 7% of the instructions of each). A newcomer's connection ends it at once
  (the server tells at accept, before the newcomer's first step), so the newcomer waits behind
  at most the batch that was running: the lone client's connections' worth of steps.
- **Alone** (no other address did any work in the last ``active_for``, but another is
  connected, or was a moment ago): ``alone`` bytes a batch. A burst (a hundred requests or
  resets at once, or a few 4 MiB manifests read back) is spread over batches, so that a client
  of the other address sending in the middle of it waits for one batch's worth, not all of it.
  The loop goes from one batch to the next without idling (``pause``).
- **Sharing** with others, none of them served less: ``sharing`` bytes a batch (one chunk), so no
  address puts more than about one chunk of work in front of another address's next step.
- **Yielding**: an active address has been served less (by more than ``slice`` bytes):
  ``sharing / every`` a batch, so a light client (one pull) goes ahead of a heavy one (a flood),
  and the heavy one still moves.

Credit is never saved up beyond one batch's quantum: an address idle for a while gets no burst.
"Served" is each address's cost charged, decaying by half every ``half_life`` seconds: recent
work counts, and an address that stops being busy is soon light again. Pure: the caller passes
the time and the batch number.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Collection
from dataclasses import dataclass

HALF_LIFE = 0.1  # seconds: work older than a few tenths of a second hardly counts
ACTIVE_FOR = 0.005  # seconds after its last unit that an address still counts as busy
# seconds after its last connection closed that an address still counts as present: a client
# that connects anew for each request (curl in a loop) keeps the others from being sole
PRESENT_FOR = 1.0
SLICE = 256 * 1024  # bytes of cost: how far ahead of a lighter address one runs before yielding
SHARING = 256 * 1024  # cost an address sharing the CPU earns per batch: one full chunk
ALONE = 1024 * 1024  # ... an address alone
EVERY = 8  # a yielding address earns SHARING / EVERY per batch
# seconds: a batch that has run less than this is short, and its units all go (see may_go)
BUSY_BATCH = 0.001
# seconds of idleness the loop waits, while units are parked, before its next batch, when more
# than one address wants the CPU (see FairShare.pause)
PAUSE = 0.001
FORGET_BELOW = 1.0  # an account decayed below this is dropped (the table stays small)

HANDSHAKE_COST = 64 * 1024  # a TLS handshake step, in bytes of record work it is worth
RECORD_COST = 64 * 1024  # the fixed part of any unit (a syscall, a record, Python around it)
TEARDOWN_COST = 256 * 1024  # a connection torn down after a reset: its tasks unwind, it closes
# a second of the event loop's time, in cost: about the bytes it encrypts or decrypts in that
# time (AES-GCM and the syscalls around it), so that measured and declared costs add up
BYTES_PER_SECOND = 1024 * 1024 * 1024


class Standing(enum.Enum):
    SOLE = "sole"
    ALONE = "alone"
    SHARING = "sharing"
    YIELDING = "yielding"


@dataclass
class _Account:
    served: float  # decayed cost, as of ``at``
    at: float
    last_unit: float  # when its last unit went
    credit: float  # bytes of cost it may still spend (negative: its debt)
    credited: int  # the batch up to which ``credit`` was earned


@dataclass(frozen=True)
class FairShareRules:
    half_life: float = HALF_LIFE
    active_for: float = ACTIVE_FOR
    slice: float = SLICE
    sharing: float = SHARING
    alone: float = ALONE
    every: int = EVERY
    busy_batch: float = BUSY_BATCH
    pause: float = PAUSE
    present_for: float = PRESENT_FOR


class FairShare:
    """The accounts of the client addresses (any hashable key: ``policy.access.client_key``)."""

    def __init__(self, rules: FairShareRules = FairShareRules()) -> None:
        self.rules = rules
        self._accounts: dict[str, _Account] = {}
        # addresses that did work within ``active_for``, as far as known (expired lazily)
        self._active: dict[str, None] = {}
        self._connections: dict[str, int] = {}  # open connections by address (only those > 0)
        # the two latest departures (an address closing its last connection) of two addresses,
        # latest first: enough to know when the one address left connected is sole
        self._departures: list[tuple[float, str]] = []
        # the address that is sole now (read by the gate's fast path: no clock, no account),
        # or the one that will be from a time (another left less than ``present_for`` ago)
        self.sole_key: str | None = None
        self._sole_from: tuple[str, float] | None = None

    def connected(self, key: str) -> None:
        """``key`` opened a connection (told at accept, before any of its work)."""
        self._connections[key] = self._connections.get(key, 0) + 1
        self._recount()

    def disconnected(self, key: str, now: float) -> None:
        """A connection of ``key`` (one :meth:`connected` was told of) closed at ``now``."""
        left = self._connections.get(key, 0) - 1
        if left > 0:
            self._connections[key] = left
            return
        self._connections.pop(key, None)
        # ``now`` never goes back: this departure is the latest
        previous = [d for d in self._departures[:2] if d[1] != key][:1]
        self._departures = [(now, key), *previous]
        self._recount()

    def _recount(self) -> None:
        self.sole_key = None
        self._sole_from = None
        if len(self._connections) != 1:
            return
        (key,) = self._connections
        others = [at for at, departed in self._departures if departed != key]
        if others:
            self._sole_from = (key, others[0] + self.rules.present_for)
        else:
            self.sole_key = key

    def _sole(self, key: str, now: float) -> bool:
        """Whether ``key`` is the only address connected, none other within ``present_for``.
        (False for an address never said to be connected: the accounts of tests and of work
        told of no connection keep the rules that follow.)"""
        if key == self.sole_key:
            return True
        pending = self._sole_from
        if pending is None or pending[0] != key or now < pending[1]:
            return False
        self.sole_key, self._sole_from = key, None
        return True

    def served(self, key: str, now: float) -> float:
        """``key``'s decayed cost at ``now`` (0 for an address never or long not served)."""
        account = self._accounts.get(key)
        if account is None:
            return 0.0
        return account.served * math.exp2(-(now - account.at) / self.rules.half_life)

    def standing(self, key: str, now: float) -> Standing:
        if self._sole(key, now):
            return Standing.SOLE
        since = now - self.rules.active_for
        standing = Standing.ALONE
        mine: float | None = None
        expired: list[str] = []  # (no copy of the table per unit of work: this runs per record)
        for other in self._active:
            if self._accounts[other].last_unit < since:
                expired.append(other)
            elif other != key:
                standing = Standing.SHARING
                if mine is None:
                    mine = self.served(key, now)
                if self.served(other, now) + self.rules.slice < mine:
                    standing = Standing.YIELDING
                    break
        for other in expired:
            del self._active[other]
        return standing

    def sharing(self, now: float) -> bool:
        """Whether more than one address did work within ``active_for`` of ``now``."""
        if len(self._active) < 2:
            return False
        since = now - self.rules.active_for
        for key in [k for k in self._active if self._accounts[k].last_unit < since]:
            del self._active[key]
        return len(self._active) > 1

    def _quantum(self, standing: Standing) -> float:
        if standing is Standing.ALONE or standing is Standing.SOLE:
            return self.rules.alone
        if standing is Standing.SHARING:
            return self.rules.sharing
        return self.rules.sharing / self.rules.every

    def _credit(self, account: _Account, quantum: float, batch: int) -> float:
        """Earn ``quantum`` for each batch since the account was last credited, up to one."""
        if batch > account.credited:
            earned = account.credit + (batch - account.credited) * quantum
            account.credit = min(earned, quantum)
            account.credited = batch
        return account.credit

    def may_go(self, key: str, now: float, batch: int, elapsed: float = math.inf) -> bool:
        """Whether a unit of ``key``'s work may run in ``batch`` (see the module doc), which has
        run for ``elapsed`` seconds so far.

        Any unit goes in a batch still short (``busy_batch``): holding it back would only add
        a batch's wait to its client's latency and save the others nothing, for a short batch
        delays nobody (a victim pulling beside 120 slow downloads waited twice as long in the
        tail when every unit of the two was weighed, with the loop 80% idle). It is charged
        all the same, so a heavy address's debt holds it back once batches do grow long."""
        account = self._accounts.get(key)
        return account is None or self._may_spend(key, account, now, batch, elapsed)

    def _may_spend(
        self, key: str, account: _Account, now: float, batch: int, elapsed: float
    ) -> bool:
        standing = self.standing(key, now)
        if standing is Standing.SOLE:
            # nobody waits behind it, and no debt is kept (as ``idle`` clears it): a newcomer
            # finds it owing at most its last unit
            account.credit = max(account.credit, 0.0)
            return True
        credit = self._credit(account, self._quantum(standing), batch)
        return credit > 0 or elapsed < self.rules.busy_batch

    def spend(
        self, key: str, cost: float, now: float, batch: int, elapsed: float = math.inf
    ) -> bool:
        """:meth:`may_go`, and if so :meth:`charge`: True when the unit goes (and is charged).
        The same answer and the same accounts as the two calls, with one look-up, one standing
        and one decay instead of two of each: it runs for every unit of TLS work."""
        account = self._accounts.get(key)
        if account is None:
            self.charge(key, cost, now, batch)
            return True
        if not self._may_spend(key, account, now, batch, elapsed):
            return False
        self._spent(key, account, cost, now)
        return True

    def pause(self, parked: Collection[str], now: float) -> float:
        """How long the loop stays idle before the next batch once every task that can run
        has run, while the addresses ``parked`` have units waiting for their credit.

        None, when they are one address alone: with nobody to share with, an idle loop only
        makes that client wait (wrk's 50 connections on one cached manifest: the loop idle a
        sixth of the time, a fifth fewer requests a second, nearly twice the p99). The wait
        for I/O still runs between batches, with no timeout, so an address that arrives is
        seen.
        ``pause`` when several want the CPU: the idle moments are the lighter addresses' (a
        victim's next request finds the loop free instead of in the middle of a batch of the
        flood that would otherwise fill every one; without them, a victim's p99 beside 120 Range
        reads of a miss rose from 17-19 to 20-30 ms)."""
        lone = (Standing.ALONE, Standing.SOLE)
        if len(parked) > 1 or any(self.standing(k, now) not in lone for k in parked):
            return self.rules.pause
        return 0.0  # (none parked: nothing to wait for either)

    def idle(self, parked: Collection[str], now: float) -> None:
        """The loop found nothing to run (after its ``pause``) while the addresses ``parked``
        had units waiting. An address alone has its debt cleared: the CPU time it stood for
        would go to nobody, and batches with nothing in them, a quantum of credit each, would
        only burn CPU until it is paid (a wait for I/O and two task steps each). It earns the
        next batch's quantum as usual."""
        if self.pause(parked, now) == 0.0:
            for key in parked:
                account = self._accounts.get(key)
                if account is not None:
                    account.credit = max(account.credit, 0.0)

    def charge(self, key: str, cost: float, now: float, batch: int) -> None:
        """Record a unit of ``key``'s work, costing ``cost``, going now in ``batch``."""
        account = self._accounts.get(key)
        if account is None:
            quantum = self._quantum(self.standing(key, now))
            self._accounts[key] = _Account(cost, now, now, quantum - cost, batch)
            self._active[key] = None
        else:
            self._spent(key, account, cost, now)

    def _spent(self, key: str, account: _Account, cost: float, now: float) -> None:
        account.served = account.served * math.exp2(-(now - account.at) / self.rules.half_life)
        account.served += cost
        account.at = now
        account.last_unit = now
        account.credit -= cost
        self._active[key] = None

    def forget_idle(self, now: float) -> None:
        """Drop the accounts that decayed to nothing (call now and then: O(accounts))."""
        for key in [k for k in self._accounts if self.served(k, now) < FORGET_BELOW]:
            del self._accounts[key]
            self._active.pop(key, None)

    def __len__(self) -> int:
        return len(self._accounts)
