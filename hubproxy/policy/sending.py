"""Which manifest senders may hold a body now: the bytes of manifests being sent, bounded per
client address and in all.

Theory of operation. A manifest, once stored, goes to its client from one ``bytes`` object,
held until the client has read it all: a client that opens many connections, asks many large
manifests and never reads would otherwise pin them all. So holding a body for sending takes
room in a budget first:

1. all clients together hold at most ``total`` bytes, a manifest counted once however many
   senders share its body (they share the one object);
2. one client address (``access.client_key``) holds at most ``per_client`` bytes, each manifest
   it is sending counted once (its own senders of one manifest share one body too), so one
   address cannot keep the others waiting; ``per_client`` is never below the largest manifest
   kept, so any one manifest can always be sent;
3. a sender alone is always let in (a manifest larger than the bounds still goes when nothing
   else is held);
4. waiters are served in arrival order, except that a waiter over its own client's share does
   not hold up those behind it (it could not take the room anyway), and one whose manifest is
   already held by someone (no new bytes) goes past a waiter that does not fit;
5. a client whose bodies fill its share, or one of whose senders waits for room, fetches no
   new manifest from the upstream until that changes (:func:`may_fetch`): it is not reading
   what it asked for, and every manifest fetched meanwhile would cost the upstream, the
   mirror's CPU and a read back from the store, for nobody. Nor does a client fetch more at
   once than its share holds of the largest manifests (``fetch_ahead``): a hundred requests
   sent at once would all be fetched before the first body was held.

:func:`admit` and :func:`may_fetch` are the whole decision; ``cache/inflight.py`` does the
waiting and the counting.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import NamedTuple


@dataclass(frozen=True)
class SendLimits:
    """The bounds on bytes of manifest bodies held for sending (see :func:`send_limits`)."""

    total: int  # all clients together, each manifest counted once
    per_client: int  # one client address, each manifest it sends counted once
    fetch_ahead: int = 1  # manifests one client address may be fetching at once (:func:`may_fetch`)


class SendAsk(NamedTuple):
    """A sender: a client key (``access.client_key``), the manifest's digest and its size.
    (A tuple: a key of the budget's table, hashed and compared in C for every manifest.)"""

    client: str
    digest: str
    size: int


def send_limits(total: int, largest: int) -> SendLimits:
    """The bounds from ``--manifest-memory`` (``total``): a client's share is a quarter of it,
    but at least ``largest`` (the largest manifest kept), and ``total`` at least one share; a
    client fetches as many manifests at once as its share holds of the largest."""
    per_client = max(total // 4, largest)
    return SendLimits(
        total=max(total, per_client), per_client=per_client, fetch_ahead=per_client // largest
    )


def admit(limits: SendLimits, held: Collection[SendAsk], waiting: Sequence[SendAsk]) -> list[int]:
    """The indices of ``waiting`` (oldest first) that may hold their manifest's body now, given
    the bodies ``held`` (one SendAsk per client and manifest it holds). A new sender is the
    last of ``waiting``."""
    digests: dict[str, int] = {}
    clients: dict[str, int] = {}
    holding: set[tuple[str, str]] = set()
    for ask in held:
        digests[ask.digest] = ask.size
        clients[ask.client] = clients.get(ask.client, 0) + ask.size
        holding.add((ask.client, ask.digest))
    used = sum(digests.values())
    blocked = False  # an earlier waiter needs bytes that are not free: no new bytes go past it
    granted: list[int] = []
    for index, ask in enumerate(waiting):
        if (ask.client, ask.digest) in holding:
            granted.append(index)  # its body is held for this client already: nothing new
            continue
        mine = clients.get(ask.client, 0)
        if mine and mine + ask.size > limits.per_client:
            continue  # over its own share: it does not hold up other clients
        fresh = ask.digest not in digests
        if fresh:
            if blocked or (used and used + ask.size > limits.total):
                blocked = True
                continue
            digests[ask.digest] = ask.size
            used += ask.size
        clients[ask.client] = mine + ask.size
        holding.add((ask.client, ask.digest))
        granted.append(index)
    return granted


def may_fetch(
    limits: SendLimits,
    held: Collection[SendAsk],
    waiting: Collection[SendAsk],
    fetching: int,
    client: str,
) -> bool:
    """Whether ``client``, already ``fetching`` that many manifests, may fetch another from the
    upstream now: not while the bodies held for sending to it fill its share, nor while one of
    its senders waits for room, nor beyond ``fetch_ahead`` at once."""
    if fetching >= max(1, limits.fetch_ahead) or any(ask.client == client for ask in waiting):
        return False
    return sum(ask.size for ask in held if ask.client == client) < limits.per_client
