"""Pull accounting: who spent the upstream's rate limit, counted the way Docker Hub counts it.

Theory of operation. Docker Hub counts a *pull* per manifest GET (HEADs and blobs are free) per
client address (an IPv6 address's /64) or per account, over a window (6 h today, read from
``ratelimit-limit: 100;w=21600``). A mirror spends one limit for many clients, so the operator
asks two questions: which clients and images made the pulls (manifest GETs answered to clients,
what each client would have spent pulling directly), and which of them the mirror had to pass
on (manifest GETs it sent upstream itself: cache misses, moved tags). ``PullAccounting`` keeps
both, and ``RateLimitWatch`` follows what the upstream said was left, per registry and per
credential identity (see ``credential_identity``), with the one warning the operator needs when
it runs low.

Bounded memory: a ``WindowCounts`` keeps its counts in ``slots`` time slots covering its window,
at most ``max_keys`` keys per slot; beyond that a slot's further keys are summed as ``OTHER``.
Reading a table sums the slots, so a count leaves it a slot's length (window / slots) at most
after it left the window. ``top`` gives the N largest and the rest as one ``OTHER`` figure: what
the status page shows, and the only label values ``/metrics`` ever carries for clients and images
(its series are capped at N + 1 per table). ``RateLimitWatch`` is keyed by registry (from the
configuration) and identity (one of three words).

Nothing here reads a clock or does I/O: times are the caller's (one monotonic clock).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

OTHER = "other"  # the label value of everything outside the top N, and of a full slot's overflow
DEFAULT_WINDOW = 6 * 3600.0  # Docker Hub's window (w=21600)
DEFAULT_TOP = 10  # clients and images shown, and labelled on /metrics, per table
SLOTS = 24  # time slots per window: a 6 h window moves in 15-minute steps
MAX_KEYS = 256  # distinct keys counted per slot (the rest of the slot is OTHER)
LOW_SHARE = 0.10  # warn when remaining falls under this share of the limit

# who the upstream counted a request against, as far as the mirror can tell
ANONYMOUS = "anonymous"  # nothing sent: the registry counts the mirror's address
OPERATOR = "operator"  # the operator's login (--registry-login), or a token obtained with it
CLIENT = "client"  # the client's own token or login, passed on (the registry knows whose)
# (without --users a client's token is passed on as it is, and an anonymous client's token is
# "client" too: the upstream's docker-ratelimit-source header, shown on the page, says whose)
IDENTITIES = (ANONYMOUS, OPERATOR, CLIENT)


def credential_identity(
    sent: bytes | None, operator: bytes | None, *, anonymous: bool = False
) -> str:
    """Whose rate limit an upstream request spends: ``sent`` is the ``Authorization`` it
    carried, ``operator`` the operator's (or None when the request could not use it);
    ``anonymous``: a token ``sent`` was fetched by the mirror with no credentials (a mirror
    user's, under --users), so it counts as the mirror's address."""
    if sent is None:
        return ANONYMOUS
    if operator is not None and sent == operator:
        return OPERATOR
    return ANONYMOUS if anonymous else CLIENT


def manifest_repository(target: str) -> str | None:
    """The repository of a manifest request's target (``/v2/library/alpine/manifests/3.20``
    -> ``library/alpine``); None for any other request."""
    path = target.partition("?")[0]
    if not path.startswith("/v2/"):
        return None
    name, found, reference = path[4:].rpartition("/manifests/")
    if not found or not name or not reference or "/" in reference:
        return None
    return name


def client_name(address_key: str, user: str | None) -> str:
    """The accounting name of a client: ``user:alice`` for a mirror user (a login is one
    account, whatever address it pulls from), else its address key (``client_key``)."""
    return f"user:{user}" if user else address_key


@dataclass
class _Slot:
    index: int  # floor(time / slot length)
    counts: dict[str, int] = field(default_factory=dict)
    other: int = 0  # counts of keys beyond max_keys


@dataclass(frozen=True)
class Ranking:
    """A table's figures over its window: the largest keys, the rest, the total."""

    top: tuple[tuple[str, int], ...]  # (key, count), largest first, ties by key
    other: int  # every count not in ``top``
    total: int

    def labelled(self) -> dict[tuple[str, ...], float]:
        """As a ``/metrics`` gauge's series: each top key, and ``other`` (also at 0)."""
        series: dict[tuple[str, ...], float] = {(key,): float(count) for key, count in self.top}
        series[OTHER,] = series.get((OTHER,), 0.0) + float(self.other)
        return series


class WindowCounts:
    """Counts per key over a sliding window, in time slots (see the module doc)."""

    def __init__(
        self, window: float = DEFAULT_WINDOW, *, slots: int = SLOTS, max_keys: int = MAX_KEYS
    ) -> None:
        if not window > 0 or slots < 1 or max_keys < 1:
            raise ValueError(f"a window needs a length, slots and keys: {window}, {slots}")
        self.window = window
        self.slots = slots
        self.max_keys = max_keys
        self.slot_length = window / slots
        self._slots: deque[_Slot] = deque()

    def _index(self, now: float) -> int:
        return math.floor(now / self.slot_length)

    def _forget(self, now: float) -> None:
        oldest = self._index(now) - self.slots + 1
        while self._slots and self._slots[0].index < oldest:
            self._slots.popleft()

    def add(self, key: str, now: float, count: int = 1) -> None:
        """Count ``count`` for ``key`` at time ``now`` (times never go back)."""
        index = math.floor(now / self.slot_length)
        slots = self._slots
        if not slots or slots[-1].index < index:
            # a new slot: what left the window goes now (within one slot nothing leaves, so
            # the other counts of a slot, two per manifest answered, skip this)
            self._forget(now)
            slots.append(_Slot(index))
        slot = slots[-1]
        counts = slot.counts
        if key in counts:
            counts[key] += count
        elif len(counts) < self.max_keys:
            counts[key] = count
        else:
            slot.other += count

    def entries(self) -> int:
        """Keys held over all slots (at most ``slots * max_keys``)."""
        return sum(len(slot.counts) for slot in self._slots)

    def totals(self, now: float) -> dict[str, int]:
        """Each key's count within the window ending at ``now`` (without the overflow)."""
        self._forget(now)
        totals: dict[str, int] = {}
        for slot in self._slots:
            for key, count in slot.counts.items():
                totals[key] = totals.get(key, 0) + count
        return totals

    def top(self, now: float, n: int) -> Ranking:
        """The ``n`` keys counted most in the window ending at ``now``, and the rest."""
        totals = self.totals(now)
        overflow = sum(slot.other for slot in self._slots)
        ranked = rank(totals.items(), n)
        shown = sum(count for _, count in ranked)
        total = sum(totals.values()) + overflow
        return Ranking(ranked, total - shown, total)


def rank(items: Iterable[tuple[str, int]], n: int) -> tuple[tuple[str, int], ...]:
    """The ``n`` largest counts, largest first; equal counts by key, so the order is stable."""
    return tuple(sorted(items, key=lambda item: (-item[1], item[0]))[: max(0, n)])


class PullAccounting:
    """The pulls of one mirror over a window: by client, by image, and the upstream's."""

    def __init__(self, window: float = DEFAULT_WINDOW, *, top: int = DEFAULT_TOP) -> None:
        self.window = window
        self.top_n = top
        self.clients = WindowCounts(window)  # client name -> manifest GETs answered to it
        self.images = WindowCounts(window)  # image (registry/repository) -> the same
        self.upstream_images = WindowCounts(window)  # image -> manifest GETs sent upstream

    def client_pull(self, *, client: str, image: str, now: float) -> None:
        """A manifest GET answered 2xx to ``client`` (``client_name``) for ``image``."""
        self.clients.add(client, now)
        self.images.add(image, now)

    def upstream_pull(self, *, image: str, now: float) -> None:
        """A manifest GET the mirror sent upstream, answered 2xx (what Docker Hub counts)."""
        self.upstream_images.add(image, now)


# -- the upstream's rate limit ---------------------------------------------------------------------


@dataclass(frozen=True)
class Allowance:
    """What an upstream last said of one identity's rate limit (``ratelimit-*`` headers)."""

    registry: str
    identity: str
    remaining: float
    limit: float | None  # None: it sent no ratelimit-limit
    window: float | None  # seconds (the ``w=`` parameter)
    source: str  # docker-ratelimit-source: the address or account it counted ("" if none)
    seen: float  # wall clock, for people
    low: bool  # under LOW_SHARE of the limit (the warning was given)


@dataclass(frozen=True)
class RanLow:
    """The remaining pulls fell under ``LOW_SHARE`` of the limit: warn once."""

    allowance: Allowance


@dataclass(frozen=True)
class Recovered:
    """The remaining pulls are back at or above ``LOW_SHARE``: the next fall warns again."""

    allowance: Allowance


def is_low(remaining: float, limit: float | None) -> bool:
    """Whether ``remaining`` is under ``LOW_SHARE`` of ``limit`` (never without a limit)."""
    return limit is not None and limit > 0 and remaining < LOW_SHARE * limit


class RateLimitWatch:
    """The latest allowance per (registry, identity), and when to warn (once per fall)."""

    def __init__(self) -> None:
        self._latest: dict[tuple[str, str], Allowance] = {}

    def note(
        self,
        *,
        registry: str,
        identity: str,
        remaining: float,
        limit: float | None,
        window: float | None,
        source: str,
        wall: float,
    ) -> RanLow | Recovered | None:
        """An upstream's answer said this; returns what to log (None: nothing new)."""
        key = (registry, identity)
        before = self._latest.get(key)
        low = is_low(remaining, limit)
        allowance = Allowance(registry, identity, remaining, limit, window, source, wall, low)
        self._latest[key] = allowance
        was_low = before is not None and before.low
        if low and not was_low:
            return RanLow(allowance)
        if was_low and not low:
            return Recovered(allowance)
        return None

    def latest(self, registry: str, identity: str) -> Allowance | None:
        """What was last said for ``identity`` at ``registry``; None: nothing yet."""
        return self._latest.get((registry, identity))

    def allowances(self) -> tuple[Allowance, ...]:
        """The latest of each (registry, identity), by registry then identity."""
        return tuple(self._latest[key] for key in sorted(self._latest))


def _pulls(count: float) -> str:
    return f"{count:g} pull{'s' if count != 1 else ''}"


def low_line(allowance: Allowance) -> str:
    """The one warning when an upstream's remaining pulls fall under 10% of its limit."""
    limit = allowance.limit or 0.0
    who = {
        ANONYMOUS: "anonymous pulls (counted against this mirror's address)",
        OPERATOR: "the operator login (--registry-login)",
        CLIENT: "the clients' own tokens",
    }.get(allowance.identity, allowance.identity)
    window = f" per {allowance.window / 3600:g} h" if allowance.window else ""
    source = f", counted as {allowance.source}" if allowance.source else ""
    return (
        f"{allowance.registry} rate limit nearly spent: {_pulls(allowance.remaining)} left of "
        f"{limit:g}{window} for {who}{source}; at 0 the upstream answers 429 and only cached "
        f"images can be pulled. The status page's 'Who spent the rate limit' names the clients "
        f"and images; a login with a higher limit (--registry-login) or fewer cache misses "
        f"(--manifest-ttl) helps"
    )


def recovered_line(allowance: Allowance) -> str:
    """The line when the remaining pulls are back above 10% (a new window began)."""
    limit = f" of {allowance.limit:g}" if allowance.limit else ""
    return (
        f"{allowance.registry} rate limit for {allowance.identity} pulls recovered: "
        f"{_pulls(allowance.remaining)} left{limit}"
    )
