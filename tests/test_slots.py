"""The pool's decisions (hubproxy.policy.slots): who may take an upstream connection slot and
which waiter goes next, as tables over plain values."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hubproxy.policy.access import client_key
from hubproxy.policy.slots import Ask, Lane, SlotLimits, grant, lane_of, slot_limits

BULK, SMALL = Lane.BULK, Lane.SMALL
A_BULK, A_SMALL = Ask("a", BULK), Ask("a", SMALL)
B_BULK, B_SMALL = Ask("b", BULK), Ask("b", SMALL)
LIMITS = SlotLimits(per_origin=10, per_client=4, reserve=2)  # bulk: 8; a client's bulk: 3


@pytest.mark.parametrize(
    ("held", "waiting", "granted"),
    [
        # a free origin: anyone
        ({}, [A_BULK], [0]),
        ({}, [A_SMALL], [0]),
        # one client's blob transfers stop one short of its share ...
        ({A_BULK: 3}, [A_BULK], []),
        # ... which keeps that slot for its own small requests
        ({A_BULK: 3}, [A_SMALL], [0]),
        # its whole share taken: nothing more for it, while another client still gets one
        ({A_BULK: 3, A_SMALL: 1}, [A_SMALL, A_BULK, B_BULK], [2]),
        # the bulk lane full (8 of 10): blobs wait, small requests still pass
        ({Ask("c", BULK): 3, Ask("d", BULK): 3, B_BULK: 2}, [A_BULK, A_SMALL], [1]),
        # the origin full: nobody, not even small requests or a client with nothing
        ({Ask("c", SMALL): 4, Ask("d", SMALL): 4, B_BULK: 2}, [A_SMALL], []),
        # arrival order among those that may go: one free slot goes to the oldest waiter
        ({Ask("c", SMALL): 4, Ask("d", SMALL): 4, Ask("e", BULK): 1}, [B_SMALL, A_SMALL], [0]),
        # a waiter at its own bound does not hold up the ones behind it
        ({A_BULK: 3, Ask("c", SMALL): 4}, [A_BULK, B_BULK, B_SMALL], [1, 2]),
        # several granted at once are counted as they go: three of B's blobs, then its HEAD
        ({}, [B_BULK, B_BULK, B_BULK, B_BULK, B_SMALL], [0, 1, 2, 4]),
    ],
)
def test_grant(held: dict[Ask, int], waiting: list[Ask], granted: list[int]) -> None:
    assert grant(LIMITS, Counter(held), waiting) == granted


@given(
    held=st.lists(st.tuples(st.sampled_from("abc"), st.sampled_from(Lane)), max_size=12),
    waiting=st.lists(st.tuples(st.sampled_from("abcd"), st.sampled_from(Lane)), max_size=20),
)
def test_grant_never_exceeds_a_bound(
    held: list[tuple[str, Lane]], waiting: list[tuple[str, Lane]]
) -> None:
    limits = SlotLimits(per_origin=8, per_client=3, reserve=2)
    now: Counter[Ask] = Counter()
    for client, lane in held:  # a legal starting point: each grant admitted by grant itself
        ask = Ask(client, lane)
        if grant(limits, now, [ask]):
            now[ask] += 1
    asks = [Ask(c, lane) for c, lane in waiting]
    for index in grant(limits, now, asks):
        now[asks[index]] += 1
    assert sum(now.values()) <= limits.per_origin
    assert sum(n for a, n in now.items() if a.lane is BULK) <= limits.bulk
    for client in "abcd":
        assert sum(n for a, n in now.items() if a.client == client) <= limits.per_client
        assert now[Ask(client, BULK)] <= limits.client_bulk


@pytest.mark.parametrize(
    ("settings", "limits"),
    [
        ((100, 0, 0), SlotLimits(100, 25, 10)),  # the defaults: a quarter, a tenth
        ((100, 30, 5), SlotLimits(100, 30, 5)),
        ((4, 0, 0), SlotLimits(4, 1, 1)),  # at least one of each
        ((1, 0, 0), SlotLimits(1, 1, 0)),  # one slot: blob transfers keep it
        ((8, 50, 50), SlotLimits(8, 8, 7)),  # clipped to the origin's slots
    ],
)
def test_slot_limits(settings: tuple[int, int, int], limits: SlotLimits) -> None:
    assert slot_limits(*settings) == limits
    assert limits.bulk >= 1


@pytest.mark.parametrize(
    ("method", "target", "lane"),
    [
        ("GET", "/v2/library/alpine/blobs/sha256:" + "a" * 64, BULK),
        ("HEAD", "/v2/library/alpine/blobs/sha256:" + "a" * 64, SMALL),
        ("GET", "/registry-v2/docker/registry/v2/blobs/sha256/aa/" + "a" * 64 + "/data", BULK),
        ("PATCH", "/v2/me/app/blobs/uploads/1234", BULK),
        ("GET", "/v2/library/alpine/manifests/latest", SMALL),
        ("GET", "/v2/", SMALL),
        ("GET", "/v2/library/alpine/tags/list", SMALL),
        ("GET", "?scope=repository:x/blobs/y:pull&service=registry", SMALL),  # a token query
        ("GET", "/v1/search?q=blobs/", SMALL),
    ],
)
def test_lane_of(method: str, target: str, lane: Lane) -> None:
    assert lane_of(method, target) is lane


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:bbbb::9", "2001:db8:1:2::/64"),  # the same host's other address
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("", ""),  # the mirror's own requests
    ],
)
def test_client_key(address: str, key: str) -> None:
    assert client_key(address) == key
