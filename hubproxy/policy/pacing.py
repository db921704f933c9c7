"""Bandwidth caps (``--client-bandwidth``, ``--total-bandwidth``): when a client's bytes may go.

Theory of operation. Caps are applied by pacing, never by dropping: the send path asks before
each piece of a response body (``net.pacing``) and waits until this module says the piece may
go. Since the relay keeps one chunk in flight per direction, a client waiting here also holds
back the upstream read that would feed it; a cache fill runs in a task of its own and is paced
by nobody (its readers are).

- **Per client address** (``client_key``: an IPv6 /64 is one): a token bucket at the client
  rate, ``DEPTH`` seconds deep. A piece goes once the bucket is out of debt and is charged in
  full, so the bucket may run into debt by one piece; the next piece waits for it to be paid.
  The burst a client ever gets is the depth plus one piece.
- **All clients together**: one bucket at the total rate, and a fair share between the
  addresses waiting for it: start-time fair queueing. Each address waiting has a *served*
  count of bytes; the one served least goes next. An address that starts waiting after a
  pause starts from the *virtual time* (the served count of the last one granted) less one
  piece, so it cannot bank an idle minute into a burst, and an address that wants less than
  its share simply waits less often: the others take the rest (max-min fair,
  work-conserving).

Pieces are ``DEPTH`` of the smallest rate, between ``MIN_PIECE`` and ``MAX_PIECE`` bytes, so a
256 KiB chunk at a slow rate leaves in several pieces rather than one burst.

Plain numbers and times passed in: no clock, no I/O. The tables are bounded (``MAX_TRACKED``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .sizes import KiB

DEPTH = 0.1  # seconds of its rate a bucket holds: the most a client gets at once after a pause
MIN_PIECE = 16 * KiB  # a slower cap still sends pieces this large (a TLS record's worth)
MAX_PIECE = 256 * KiB  # ... and a faster one no larger (the largest chunk the relay sends)
MIN_RATE = 64 * KiB  # bytes per second: slower caps are refused (a 100 MB layer in half an hour)
MAX_TRACKED = 4096  # buckets and fair-share accounts kept before the settled ones are dropped


def piece_size(*rates: int | None) -> int:
    """Bytes one wait covers: ``DEPTH`` seconds of the smallest rate set, within
    [``MIN_PIECE``, ``MAX_PIECE``]; ``MAX_PIECE`` when no rate is set."""
    set_rates = [rate for rate in rates if rate]
    if not set_rates:
        return MAX_PIECE
    return max(MIN_PIECE, min(MAX_PIECE, int(min(set_rates) * DEPTH)))


@dataclass
class Bucket:
    """A token bucket that may run into debt: ``tokens`` as of ``stamp``, at most ``depth``."""

    rate: float  # bytes per second
    depth: float  # bytes
    tokens: float
    stamp: float

    @classmethod
    def full(cls, rate: float, now: float) -> Bucket:
        depth = max(rate * DEPTH, float(MIN_PIECE))
        return cls(rate, depth, depth, now)

    def level(self, now: float) -> float:
        """The tokens at ``now`` (negative: a debt still to be paid)."""
        return min(self.depth, self.tokens + max(0.0, now - self.stamp) * self.rate)

    def ready_at(self, now: float) -> float:
        """When the bucket is out of debt: ``now`` if it is."""
        level = self.level(now)
        return now if level >= 0 else now - level / self.rate

    def spend(self, count: int, now: float) -> None:
        self.tokens = self.level(now) - count
        self.stamp = max(now, self.stamp)

    def settled(self, now: float) -> bool:
        """Whether the bucket is full again (it says no more than a new one would)."""
        return self.level(now) >= self.depth


class Pacing:
    """The state of both caps for one process. ``client_rate``, ``total_rate``: bytes per
    second, None for no cap."""

    def __init__(self, client_rate: int | None, total_rate: int | None, now: float) -> None:
        self.client_rate = client_rate
        self.total_rate = total_rate
        self.piece = piece_size(client_rate, total_rate)
        self.total: Bucket | None = Bucket.full(total_rate, now) if total_rate else None
        self._clients: dict[str, Bucket] = {}  # addresses that sent lately (MAX_TRACKED)
        self._served: dict[str, float] = {}  # fair-share accounts (MAX_TRACKED)
        self._virtual = 0.0  # the served count of the address granted last

    @property
    def on(self) -> bool:
        return bool(self.client_rate or self.total_rate)

    def client_ready_at(self, key: str, now: float) -> float:
        """When address ``key``'s own cap lets its next piece go (``now``: at once)."""
        bucket = self._clients.get(key)
        return now if bucket is None else bucket.ready_at(now)

    def total_ready_at(self, now: float) -> float:
        """When the total cap lets the next piece go, to whichever address's turn it is."""
        return now if self.total is None else self.total.ready_at(now)

    def join(self, key: str) -> None:
        """Address ``key`` starts waiting for the total: it keeps a lead it has, and credit of
        one piece at most. (That piece is for a sender that was busy sending its last one when
        its turn came: it did not pause, and it is not to lose its share for that.)"""
        floor = self._virtual - self.piece
        self._served[key] = max(self._served.get(key, floor), floor)

    def next_turn(self, waiting: Iterable[str]) -> str:
        """Whose piece goes next under the total: the waiting address served least (each
        ``join``-ed); ties in the order given (the order they started waiting)."""
        served = self._served
        floor = self._virtual - self.piece
        return min(waiting, key=lambda key: served.get(key, floor))

    def spend(self, key: str, count: int, now: float) -> None:
        """``count`` bytes go to address ``key`` now: charged to its bucket, the total's, and
        its fair-share account."""
        if self.client_rate:
            bucket = self._clients.get(key)
            if bucket is None:
                if len(self._clients) >= MAX_TRACKED:
                    self._forget_settled(now)
                bucket = self._clients[key] = Bucket.full(self.client_rate, now)
            bucket.spend(count, now)
        if self.total is not None:
            self.total.spend(count, now)
            floor = self._virtual - self.piece
            start = max(self._served.get(key, floor), floor)
            self._virtual = max(self._virtual, start)
            if key not in self._served and len(self._served) >= MAX_TRACKED:
                self._forget_behind()
            self._served[key] = start + count

    def _forget_settled(self, now: float) -> None:
        """Drop the buckets that are full again; if none is (a flood of addresses all in debt,
        bounded by the connections open), the oldest charged."""
        for key in [k for k, b in self._clients.items() if b.settled(now)]:
            del self._clients[key]
        if len(self._clients) >= MAX_TRACKED:
            oldest = min(self._clients, key=lambda k: self._clients[k].stamp)
            del self._clients[oldest]

    def _forget_behind(self) -> None:
        """Drop the accounts a piece or more behind the virtual time (``join`` would start
        them there anyway); if none is, the one served least."""
        floor = self._virtual - self.piece
        for key in [k for k, served in self._served.items() if served <= floor]:
            del self._served[key]
        if len(self._served) >= MAX_TRACKED:
            del self._served[min(self._served, key=self._served.__getitem__)]

    def tracked(self) -> tuple[int, int]:
        """How many buckets and fair-share accounts are kept (tests check the bound)."""
        return len(self._clients), len(self._served)
