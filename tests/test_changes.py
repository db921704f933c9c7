"""``net.changes.Changes``: the change signal of budgets, turns and the pool."""

from __future__ import annotations

import trio
import trio.testing

from hubproxy.net.changes import Changes


async def test_a_waiter_is_woken_by_the_next_note_only() -> None:
    changes = Changes()
    changes.note()  # nobody waits: nothing is kept for a later waiter
    woken: list[int] = []

    async def waiter(n: int) -> None:
        await changes.wait()
        woken.append(n)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter, 1)
        nursery.start_soon(waiter, 2)
        await trio.testing.wait_all_tasks_blocked()
        assert woken == []
        changes.note()
    assert sorted(woken) == [1, 2]
    assert changes._waiting == 0


async def test_a_cancelled_waiter_stops_counting(autojump_clock: trio.testing.MockClock) -> None:
    changes = Changes()
    with trio.move_on_after(1):
        await changes.wait()
    assert changes._waiting == 0
    event_before = changes._event
    changes.note()
    assert changes._event is event_before  # nobody waited: no event made for nobody
