"""Where a fill writes: on the event loop while the disk is fast, in the disk thread for a
while after a slow write (``policy.diskpace``). Plain values, an explicit clock."""

from __future__ import annotations

from hubproxy.policy.diskpace import SLOW_HOLD, SLOW_WRITE, DiskPace


def test_a_fast_disk_writes_on_the_loop() -> None:
    pace = DiskPace()
    for now in (0.0, 1.0, 1000.0):
        assert pace.wrote(now, SLOW_WRITE / 10) is False
        assert pace.writes_on_loop(now)


def test_a_slow_write_moves_the_writes_off_the_loop_for_the_hold() -> None:
    pace = DiskPace()
    assert pace.wrote(100.0, 2 * SLOW_WRITE) is True  # turned slow: said once
    assert not pace.writes_on_loop(100.0)
    assert not pace.writes_on_loop(100.0 + SLOW_HOLD - 0.001)
    assert pace.writes_on_loop(100.0 + SLOW_HOLD)


def test_slow_writes_in_the_thread_keep_the_disk_slow_and_are_said_once() -> None:
    pace = DiskPace()
    assert pace.wrote(0.0, 1.0) is True
    assert pace.wrote(50.0, 1.0) is False  # still slow: no second log line
    assert not pace.writes_on_loop(SLOW_HOLD + 10.0)  # the later write extended the hold
    assert pace.writes_on_loop(50.0 + SLOW_HOLD)
    assert pace.wrote(50.0 + SLOW_HOLD, 1.0) is True  # slow again after a fast spell


def test_a_fast_write_does_not_end_a_slow_spell() -> None:
    pace = DiskPace()
    pace.wrote(0.0, 1.0)
    pace.wrote(1.0, 0.0)
    assert not pace.writes_on_loop(2.0)
