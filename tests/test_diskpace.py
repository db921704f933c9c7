"""Where a fill writes: on the event loop while the disk is fast, in the disk thread for a
while after slow writes (``policy.diskpace``). Plain values, an explicit clock."""

from __future__ import annotations

from hubproxy.policy.diskpace import SLOW_AVERAGE, SLOW_HOLD, DiskPace

FAST = 0.0001  # a 256 KiB chunk into the page cache
BLOCKED = 0.1  # a write held by the disk's dirty pages


def test_a_fast_disk_writes_on_the_loop() -> None:
    pace = DiskPace()
    for now in range(1000):
        assert pace.wrote(float(now), FAST) is False
        assert pace.writes_on_loop(float(now))


def test_a_few_ms_now_and_then_is_noise() -> None:
    pace = DiskPace()
    for now in range(100):
        pace.wrote(float(now), 0.004 if now % 10 == 0 else FAST)
        assert pace.writes_on_loop(float(now))


def test_one_blocked_write_moves_the_writes_off_the_loop_for_the_hold() -> None:
    pace = DiskPace()
    pace.wrote(99.0, FAST)
    assert pace.wrote(100.0, BLOCKED) is True  # turned slow: said once
    assert not pace.writes_on_loop(100.0)
    assert not pace.writes_on_loop(100.0 + SLOW_HOLD - 0.001)
    assert pace.writes_on_loop(100.0 + SLOW_HOLD)


def test_a_run_of_writes_each_a_little_slow_is_a_slow_disk() -> None:
    pace = DiskPace()
    turned = [pace.wrote(float(now), 2.5 * SLOW_AVERAGE) for now in range(40)]
    assert turned.count(True) == 1
    assert not pace.writes_on_loop(40.0)


def test_slow_writes_in_the_thread_keep_the_disk_slow_and_fast_ones_end_it() -> None:
    pace = DiskPace()
    assert pace.wrote(0.0, BLOCKED) is True
    assert pace.wrote(50.0, BLOCKED) is False  # still slow: no second log line
    assert not pace.writes_on_loop(SLOW_HOLD + 10.0)  # the later write extended the hold
    now = 51.0
    while pace.average > SLOW_AVERAGE:  # the thread's writes are fast again
        pace.wrote(now, FAST)
        now += 0.001
    # the hold runs from the last write that left the average high
    assert not pace.writes_on_loop(51.0 + SLOW_HOLD)
    assert pace.writes_on_loop(now + SLOW_HOLD)
    assert pace.wrote(now + SLOW_HOLD, BLOCKED) is True  # slow again after a fast spell
