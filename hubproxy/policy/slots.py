"""Who may hold a pooled connection to an upstream origin, and which waiter goes next.

Theory of operation. Every origin (registry, token service, CDN) has ``per_origin`` slots: the
connections open to it at once. A request asks for a slot in one of two lanes:

- BULK: a blob's body (or an upload's), which can take minutes;
- SMALL: everything else (tokens, manifests, ``/v2/`` pings, tag lists, any HEAD): one round trip.

Three bounds keep one client, or one kind of request, from taking the slots from everyone else:

1. blob transfers hold at most ``per_origin - reserve`` slots of an origin, so ``reserve`` slots
   are always left for small requests: a pull's token and manifest never queue behind layers;
2. one client address holds at most ``per_client`` slots of an origin, and its blob transfers at
   most one fewer, so its own token and manifest requests are not starved by its own layers
   either (IPv6 clients count per /64, the block one host is usually given);
3. waiters are served in arrival order, except that a waiter whose own lane or address is at its
   bound does not hold up those behind it: it could not take the slot anyway.

:func:`grant` is the whole decision; the pool (``net/pool.py``) does the waiting, the timeouts
and the counting. Nothing here reads a clock or touches a socket.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple


class Lane(enum.Enum):
    SMALL = "small"  # tokens, manifests, pings, HEADs: one round trip
    BULK = "bulk"  # blob bodies, uploads: as long as the transfer


@dataclass(frozen=True)
class SlotLimits:
    """The bounds of one origin's slots, already resolved (see :func:`slot_limits`)."""

    per_origin: int  # slots of one origin, all lanes and clients together
    per_client: int  # slots one client address may hold at one origin
    reserve: int  # slots blob transfers may never take

    @property
    def bulk(self) -> int:
        """Slots of an origin that blob transfers may hold."""
        return self.per_origin - self.reserve

    @property
    def client_bulk(self) -> int:
        """Slots one client's blob transfers may hold (one fewer than its share, if it has two)."""
        return self.per_client - 1 if self.per_client > 1 else 1


class Ask(NamedTuple):
    """Who asks for a slot: a client key (``access.client_key``; "" for the mirror's own
    requests) and a lane. (A tuple, as ``urls.Origin``: a key of the pool's tables.)"""

    client: str
    lane: Lane


def slot_limits(per_origin: int, per_client: int = 0, reserve: int = 0) -> SlotLimits:
    """The bounds from the settings: ``per_client`` 0 is a quarter of ``per_origin``, ``reserve``
    0 a tenth; both at least 1 and clipped so that blob transfers keep at least one slot."""
    per_origin = max(1, per_origin)
    client = per_client or max(1, per_origin // 4)
    kept = reserve or max(1, per_origin // 10)
    return SlotLimits(
        per_origin=per_origin,
        per_client=min(client, per_origin),
        reserve=min(kept, per_origin - 1),
    )


def lane_of(method: str, target: str) -> Lane:
    """BULK for a request that moves a blob's body: anything but HEAD on ``.../blobs/...``
    (GET of a blob, also after its redirect to a CDN, and upload requests); SMALL otherwise."""
    path = target.partition("?")[0]
    if method != "HEAD" and "/blobs/" in path:
        return Lane.BULK
    return Lane.SMALL


def grant(limits: SlotLimits, held: Mapping[Ask, int], waiting: Sequence[Ask]) -> list[int]:
    """The indices of ``waiting`` (oldest first) that get a slot now, given the slots ``held``
    (how many each Ask holds at this origin). A new request is a one-element ``waiting``."""
    total = bulk = 0
    by_client: dict[str, list[int]] = {}  # client -> [slots, bulk slots]
    for ask, count in held.items():
        total += count
        mine = by_client.setdefault(ask.client, [0, 0])
        mine[0] += count
        if ask.lane is Lane.BULK:
            bulk += count
            mine[1] += count
    granted: list[int] = []
    for index, ask in enumerate(waiting):
        if total >= limits.per_origin:
            break  # no waiter can take a slot now, whoever it is
        mine = by_client.setdefault(ask.client, [0, 0])
        if mine[0] >= limits.per_client:
            continue
        if ask.lane is Lane.BULK:
            if bulk >= limits.bulk or mine[1] >= limits.client_bulk:
                continue
            bulk += 1
            mine[1] += 1
        total += 1
        mine[0] += 1
        granted.append(index)
    return granted
