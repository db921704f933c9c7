"""Peers (``--peer``): which instance fetches a blob from the upstream, and what a peer's answer
means. Pure functions over plain values; the I/O is in ``cache/peering.py``.

Every instance runs with the same list of mirror URLs (itself included). A digest's *owner* is
the peer with the highest random weight for it (rendezvous hashing): each instance computes the
same owner from the list alone, with no coordination, and adding or removing a peer moves only
the digests that peer gains or loses (about 1/N of them). A miss on a non-owner is fetched from
the owner, which fetches it from the upstream once for everyone.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Sequence

# Marks a request one instance sends another: its receiver never forwards it to a peer again,
# so two instances that disagree about the list (one restarted with a new one) cannot loop.
PEER_MARKER = b"hubproxy-peer"
# The connection profile of requests to peers (their CA is --peer-ca): no registry is named so
# (registry names are host names).
PEER_PROFILE = "@peers"
# How long a peer that failed (down, slow, an error) is skipped: later misses go to the
# upstream at once instead of each waiting --peer-timeout for it again.
PEER_REST = 30.0
# The answers of a peer that are the upstream's answer to this client (the owner made the same
# access decision a client meets there): passed on as they are.
PASSED_ON = frozenset({403, 404})


class PeerAnswer(enum.Enum):
    FILL = "fill"  # 200: the blob, filled from this stream as from an upstream
    PASS = "pass"  # the upstream's refusal, passed to the client
    # 401: the owner did not take this client's credentials, which need not be the upstream's
    # doing (a --users mirror token is sealed by the instance that issued it, and only that
    # one reads it): the upstream is asked here, and decides for itself; the peer is fine
    ASK_UPSTREAM = "ask-upstream"
    SKIP = "skip"  # anything else: the peer is in trouble; fetch from the upstream instead


def weight(peer: str, digest: str) -> int:
    """The random weight of ``peer`` for ``digest``: the same on every instance."""
    data = f"{peer}\n{digest}".encode()
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big")


def owner(digest: str, peers: Sequence[str]) -> int:
    """The index in ``peers`` of the owner of ``digest`` (highest random weight; ties, which
    take a SHA-256 collision of 64 bits, go to the first)."""
    if not peers:
        raise ValueError("no peers")
    weights = [weight(peer, digest) for peer in peers]
    return weights.index(max(weights))


def peer_answer(status: int) -> PeerAnswer:
    """What a peer's answer to a blob GET means for the instance that asked it."""
    if status == 200:
        return PeerAnswer.FILL
    if status == 401:
        return PeerAnswer.ASK_UPSTREAM
    if status in PASSED_ON:
        return PeerAnswer.PASS
    return PeerAnswer.SKIP


def self_index(peers: Sequence[str], matches: Sequence[bool], listen: str) -> int:
    """This instance's index in ``peers``, given which of them name it (``matches``); ValueError
    with the one line the operator reads if none or several do."""
    found = [index for index, match in enumerate(matches) if match]
    if len(found) == 1:
        return found[0]
    if not found:
        return _refuse(
            f"--peer: none of {', '.join(peers)} is this instance (listening on {listen}); "
            "list every instance's mirror URL, this one's too (its port and one of this "
            "machine's addresses or names)"
        )
    named = ", ".join(peers[index] for index in found)
    return _refuse(
        f"--peer: several URLs name this instance (listening on {listen}): {named}; "
        "list each instance once"
    )


def _refuse(line: str) -> int:
    raise ValueError(line)
