"""Which manifest senders may hold a body now (``policy/sending.py``), as a table."""

from __future__ import annotations

import pytest

from hubproxy.policy.sending import SendAsk, SendLimits, admit, may_fetch, send_limits

MiB = 1024 * 1024
LIMITS = SendLimits(total=10, per_client=4)


def ask(spec: str) -> SendAsk:
    """``"a:x:3"``: client a, manifest x, 3 bytes."""
    client, digest, size = spec.split(":")
    return SendAsk(client, digest, int(size))


@pytest.mark.parametrize(
    ("held", "waiting", "granted"),
    [
        # nothing held: the first goes, however large (alone it always fits)
        ([], ["a:x:50"], [0]),
        # within its share and the total
        (["a:x:2"], ["a:y:2"], [0]),
        # over its client's share: waits, and does not hold up another client behind it
        (["a:x:3"], ["a:y:2", "b:z:2"], [1]),
        # a client holding nothing may take one manifest larger than its share ...
        ([], ["b:z:6", "b:w:1"], [0]),
        (["a:x:3"], ["b:z:9"], []),  # ... but not past the total
        # the total is full: first come, first served, nobody new overtakes the head ...
        (["a:x:4", "b:y:4"], ["c:z:3", "d:w:1"], []),
        # ... except one whose manifest is already held (no new bytes)
        (["a:x:4", "b:y:4"], ["c:z:3", "d:x:4"], [1]),
        # a manifest held by several clients counts once in all, once for each client
        (["a:x:4", "b:x:4", "c:x:4"], ["d:y:4"], [0]),
        (["a:x:4"], ["a:y:1"], []),
        # one client's senders of one manifest share its body: no new bytes at all
        (["a:x:4"], ["a:x:4", "a:x:4"], [0, 1]),
        # room for several at once, in order, counting what each takes
        ([], ["a:x:2", "a:y:2", "a:z:2", "b:w:3", "c:v:3", "d:u:3"], [0, 1, 3, 4]),
    ],
)
def test_admit(held: list[str], waiting: list[str], granted: list[int]) -> None:
    assert admit(LIMITS, [ask(h) for h in held], [ask(w) for w in waiting]) == granted


@pytest.mark.parametrize(
    ("total", "largest", "limits"),
    [
        (32 * MiB, 4 * MiB, SendLimits(total=32 * MiB, per_client=8 * MiB, fetch_ahead=2)),
        (8 * MiB, 4 * MiB, SendLimits(total=8 * MiB, per_client=4 * MiB, fetch_ahead=1)),
        # any one manifest goes
        (MiB, 4 * MiB, SendLimits(total=4 * MiB, per_client=4 * MiB, fetch_ahead=1)),
    ],
)
def test_send_limits(total: int, largest: int, limits: SendLimits) -> None:
    assert send_limits(total, largest) == limits


@pytest.mark.parametrize(
    ("held", "waiting", "fetching", "client", "fetches"),
    [
        ([], [], 0, "a", True),
        (["a:x:3"], [], 0, "a", True),  # under its share: it may fetch one more
        (["a:x:3"], [], 1, "a", True),  # ... and another while one is on its way
        (["a:x:3"], [], 2, "a", False),  # not more at once than fetch_ahead (2 here)
        (["a:x:4"], [], 0, "a", False),  # its share is full of bodies it has not read
        (["a:x:2", "a:y:2"], [], 0, "a", False),
        (["a:x:3"], ["a:y:2"], 0, "a", False),  # one of its senders already waits for room
        ([], ["a:y:2"], 0, "a", False),
        (["a:x:4", "b:y:3"], ["a:z:1"], 0, "b", True),  # others' bodies and senders do not count
        (["c:x:9"], ["c:y:9"], 1, "b", True),
    ],
)
def test_may_fetch(
    held: list[str], waiting: list[str], fetching: int, client: str, fetches: bool
) -> None:
    limits = SendLimits(total=10, per_client=4, fetch_ahead=2)
    held_asks = [ask(h) for h in held]
    assert may_fetch(limits, held_asks, [ask(w) for w in waiting], fetching, client) is fetches
