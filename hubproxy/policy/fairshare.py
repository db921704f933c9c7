"""Whose work goes next when several client addresses want the one CPU: the least served first.

hubproxy runs every client on one event loop. The loop runs, in each round (a *batch*), one step
of every task that is ready, so a client with a hundred busy connections gets a hundred steps
for every step of a client with one, and that one client's every step waits for all of them: an
attack that costs the mirror CPU (a burst of handshakes, a hundred manifest misses, GETs
abandoned after their first bytes) multiplies everyone else's latency.

So the TLS layer asks before each unit of CPU work it does for a client (a handshake step,
decrypting what arrived, encrypting a chunk to send) and says what the unit costs, in bytes.
This module keeps the account and answers:

- **Alone** (no other address did any work in the last ``active_for``): up to ``burst`` units
  per batch. A mirror with one busy client pays nothing but the bookkeeping, and a burst (a
  hundred requests or resets at once) is spread over a few batches, so that a client arriving
  in the middle of it waits for ``burst`` units, not a hundred.
- **Sharing** with others, none of them served less: one unit per batch, so no address puts
  more than one unit of work in front of another address's next step.
- **Yielding**: an active address has been served less (by more than ``slice`` bytes): one unit
  every ``every`` batches, so a light client (one pull) goes ahead of a heavy one (a flood), and
  the heavy one still moves.

"Served" is each address's cost charged, decaying by half every ``half_life`` seconds: recent
work counts, and an address that stops being busy is soon light again. Pure: the caller passes
the time and the batch number.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

HALF_LIFE = 0.1  # seconds: work older than a few tenths of a second hardly counts
ACTIVE_FOR = 0.005  # seconds after its last unit that an address still counts as busy
SLICE = 256 * 1024  # bytes of cost: how far ahead of a lighter address one runs before yielding
EVERY = 8  # batches per unit for a yielding address
BURST = 4  # units per batch for an address alone
FORGET_BELOW = 1.0  # an account decayed below this is dropped (the table stays small)

HANDSHAKE_COST = 64 * 1024  # a TLS handshake step, in bytes of record work it is worth
RECORD_COST = 4 * 1024  # the fixed part of any unit (a syscall, a record, Python around it)


class Standing(enum.Enum):
    ALONE = "alone"
    SHARING = "sharing"
    YIELDING = "yielding"


@dataclass
class _Account:
    served: float  # decayed cost, as of ``at``
    at: float
    last_unit: float  # when its last unit went
    last_batch: int  # the batch its last unit went in
    units: int  # units that went in ``last_batch``


@dataclass(frozen=True)
class FairShareRules:
    half_life: float = HALF_LIFE
    active_for: float = ACTIVE_FOR
    slice: float = SLICE
    every: int = EVERY
    burst: int = BURST


class FairShare:
    """The accounts of the client addresses (any hashable key: ``policy.access.client_key``)."""

    def __init__(self, rules: FairShareRules = FairShareRules()) -> None:
        self.rules = rules
        self._accounts: dict[str, _Account] = {}
        # addresses that did work within ``active_for``, as far as known (expired lazily)
        self._active: dict[str, None] = {}

    def served(self, key: str, now: float) -> float:
        """``key``'s decayed cost at ``now`` (0 for an address never or long not served)."""
        account = self._accounts.get(key)
        if account is None:
            return 0.0
        return account.served * math.exp2(-(now - account.at) / self.rules.half_life)

    def standing(self, key: str, now: float) -> Standing:
        since = now - self.rules.active_for
        standing = Standing.ALONE
        mine: float | None = None
        for other in list(self._active):
            account = self._accounts[other]
            if account.last_unit < since:
                del self._active[other]
                continue
            if other == key:
                continue
            standing = Standing.SHARING
            if mine is None:
                mine = self.served(key, now)
            if self.served(other, now) + self.rules.slice < mine:
                return Standing.YIELDING
        return standing

    def may_go(self, key: str, now: float, batch: int) -> int:
        """How many more units of ``key``'s work may run in ``batch`` (see the module doc)."""
        standing = self.standing(key, now)
        account = self._accounts.get(key)
        units = account.units if account is not None and account.last_batch == batch else 0
        if standing is Standing.ALONE:
            return max(0, self.rules.burst - units)
        if standing is Standing.SHARING:
            return 0 if units else 1
        if account is not None and batch - account.last_batch < self.rules.every:
            return 0
        return 1

    def charge(self, key: str, cost: float, now: float, batch: int) -> None:
        """Record a unit of ``key``'s work, costing ``cost``, going now in ``batch``."""
        account = self._accounts.get(key)
        if account is None:
            self._accounts[key] = _Account(cost, now, now, batch, 1)
        else:
            account.served = self.served(key, now) + cost
            account.at = now
            account.last_unit = now
            account.units = account.units + 1 if account.last_batch == batch else 1
            account.last_batch = batch
        self._active[key] = None

    def forget_idle(self, now: float) -> None:
        """Drop the accounts that decayed to nothing (call now and then: O(accounts))."""
        for key in [k for k in self._accounts if self.served(k, now) < FORGET_BELOW]:
            del self._accounts[key]
            self._active.pop(key, None)

    def __len__(self) -> int:
        return len(self._accounts)
