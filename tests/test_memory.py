"""Freed heap pages go back to the system every ten seconds (ops/memory.py)."""

from __future__ import annotations

import sys

import pytest
import trio
import trio.testing

from hubproxy.ops.memory import TRIM_INTERVAL, find_malloc_trim, give_back_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_glibc_has_malloc_trim_and_it_runs() -> None:
    trim = find_malloc_trim()
    assert trim is not None  # the Debian and Alpine-free systems hubproxy is built on
    assert trim() in (0, 1)  # 1: memory was released, 0: there was none to release


async def test_trims_once_per_interval(autojump_clock: trio.testing.MockClock) -> None:
    calls: list[float] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(give_back_memory, lambda: calls.append(trio.current_time()))
        await trio.sleep(TRIM_INTERVAL * 3 + 1)
        nursery.cancel_scope.cancel()
    assert calls == [TRIM_INTERVAL, TRIM_INTERVAL * 2, TRIM_INTERVAL * 3]
