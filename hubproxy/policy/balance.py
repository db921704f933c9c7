"""Client connections spread evenly over the ``--workers`` processes.

The kernel gives each new connection to one worker's listening socket by a hash of its
addresses (``SO_REUSEPORT``): fifty connections opened at once land 20 and 30 about as often as
25 and 25, and keep-alive clients (a CI fleet, a Kubernetes node, wrk) then stay where they
landed. The worker holding more answers each request later: with wrk's 50 connections on a
passed manifest, one run split 25/25 had a p99 of 42 ms, 27/23 one of 60 ms, 20/30 one of 55 ms.

So each worker publishes how many client connections it holds (``net.board``), and a worker
holding more than its share (beyond ``SLACK``) answers a request with ``Connection: close``: the
client opens a new connection, which the kernel hashes anew, landing on the crowded worker again
with probability 1/N. One connection at most every ``SHED_EVERY``: the client has reconnected
and is counted again before the next is shed (a burst of answers does not close more than the
excess), and a few reconnects a second is all it ever costs the clients.
"""

from __future__ import annotations

from collections.abc import Sequence

SLACK = 1  # connections a worker may hold above the mean before it sheds one
SHED_EVERY = 0.1  # seconds: at most one connection shed this often, per worker


def sheds(mine: int, counts: Sequence[int], since_last: float) -> bool:
    """Whether a worker holding ``mine`` client connections closes one after the answer that
    starts now, ``since_last`` seconds after it last shed one; ``counts``: every worker's
    published count, its own included, negative for a worker not serving (dead, or not started
    yet: no new connection can land there, so it takes no share)."""
    if since_last < SHED_EVERY:
        return False
    serving = [count for count in counts if count >= 0]
    workers = len(serving)
    return workers > 1 and mine * workers > sum(serving) + SLACK * workers
