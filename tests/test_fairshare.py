"""The fair share of the CPU between client addresses: the pure account (policy.fairshare)."""

from __future__ import annotations

import pytest

from hubproxy.policy.fairshare import FairShare, FairShareRules, Standing

RULES = FairShareRules(half_life=0.1, active_for=0.005, slice=1000, every=4, burst=3)


def test_alone_an_address_goes_up_to_a_burst_per_batch() -> None:
    share = FairShare(RULES)
    assert share.standing("a", 0.0) is Standing.ALONE
    for _ in range(3):
        assert share.may_go("a", 0.0, batch=1) > 0
        share.charge("a", 10, 0.0, batch=1)
    assert share.may_go("a", 0.0, batch=1) == 0  # the rest waits for the next batch
    assert share.may_go("a", 0.0, batch=2) == 3


def test_sharing_the_cpu_each_address_goes_once_per_batch() -> None:
    share = FairShare(RULES)
    share.charge("b", 10, 0.0, batch=1)  # b is busy too
    assert share.standing("a", 0.001) is Standing.SHARING
    assert share.may_go("a", 0.001, batch=1) == 1
    share.charge("a", 10, 0.001, batch=1)
    assert share.may_go("a", 0.001, batch=1) == 0
    assert share.may_go("a", 0.001, batch=2) == 1


def test_a_heavy_address_yields_to_a_lighter_busy_one() -> None:
    share = FairShare(RULES)
    share.charge("heavy", 50_000, 0.0, batch=1)
    share.charge("light", 10, 0.001, batch=1)
    assert share.standing("heavy", 0.002) is Standing.YIELDING
    assert share.standing("light", 0.002) is Standing.SHARING
    # one unit every ``every`` batches, counted from its last
    assert share.may_go("heavy", 0.002, batch=2) == 0
    assert share.may_go("heavy", 0.002, batch=4) == 0
    assert share.may_go("heavy", 0.002, batch=5) == 1
    assert share.may_go("light", 0.002, batch=2) == 1


def test_within_a_slice_of_each_other_neither_yields() -> None:
    share = FairShare(RULES)
    share.charge("a", 900, 0.0, batch=1)
    share.charge("b", 0, 0.0, batch=1)
    assert share.standing("a", 0.001) is Standing.SHARING


def test_an_address_idle_past_active_for_no_longer_holds_others_back() -> None:
    share = FairShare(RULES)
    share.charge("heavy", 50_000, 0.0, batch=1)
    share.charge("light", 10, 0.0, batch=1)
    assert share.standing("heavy", 0.004) is Standing.YIELDING
    assert share.standing("heavy", 0.006) is Standing.ALONE


def test_service_decays_by_half_every_half_life() -> None:
    share = FairShare(RULES)
    share.charge("a", 1000, 0.0, batch=1)
    assert share.served("a", 0.1) == pytest.approx(500)
    assert share.served("a", 0.2) == pytest.approx(250)
    share.charge("a", 100, 0.2, batch=2)
    assert share.served("a", 0.2) == pytest.approx(350)
    assert share.served("never", 0.2) == 0.0


def test_a_heavy_address_that_stops_is_soon_light_again() -> None:
    """Recent work counts: an address that flooded a second ago is not held back now."""
    share = FairShare(RULES)
    share.charge("was-heavy", 10_000_000, 0.0, batch=1)
    assert share.standing("was-heavy", 0.0) is Standing.ALONE
    share.charge("other", 10, 2.0, batch=2)
    share.charge("was-heavy", 10, 2.0, batch=2)  # 10 MB twenty half-lives ago: about 10 bytes
    assert share.standing("was-heavy", 2.001) is Standing.SHARING


def test_decayed_accounts_are_forgotten() -> None:
    share = FairShare(RULES)
    share.charge("a", 1000, 0.0, batch=1)
    share.charge("b", 1000, 5.0, batch=2)
    share.forget_idle(5.0)
    assert len(share) == 1
    assert share.served("a", 5.0) == 0.0
