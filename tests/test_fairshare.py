"""The fair share of the CPU between client addresses: the pure account (policy.fairshare)."""

from __future__ import annotations

import math
import random

import pytest

from hubproxy.policy.fairshare import FairShare, FairShareRules, Standing

RULES = FairShareRules(half_life=0.1, active_for=0.005, slice=1000, sharing=100, alone=300, every=4)


def go(share: FairShare, key: str, now: float, batch: int, cost: float = 100) -> bool:
    """One unit of ``cost``, if it may go; whether it went."""
    if not share.may_go(key, now, batch):
        return False
    share.charge(key, cost, now, batch)
    return True


def test_alone_an_address_spends_its_quantum_per_batch() -> None:
    share = FairShare(RULES)
    assert share.standing("a", 0.0) is Standing.ALONE
    assert [go(share, "a", 0.0, batch=1) for _ in range(4)] == [True, True, True, False]
    assert go(share, "a", 0.0, batch=2)


def test_the_only_address_connected_is_never_held_and_keeps_no_debt() -> None:
    """Nobody can be waiting behind it: every unit goes, however much the batch has cost,
    and it owes at most its last unit when someone arrives."""
    share = FairShare(RULES)
    share.connected("a")
    share.connected("a")
    assert share.standing("a", 0.0) is Standing.SOLE
    assert all(go(share, "a", 0.0, batch=1, cost=RULES.alone) for _ in range(20))
    share.charge("a", 50 * RULES.alone, 0.0, batch=1)  # a batch's excess (net.fairness)
    assert go(share, "a", 0.0, batch=1)
    share.connected("b")  # accepted: its first step has not run yet
    assert share.standing("a", 0.0) is Standing.ALONE
    # the rules of an address alone from the next unit on: its next batch's quantum, less
    # the one unit it owes (three units' worth, less one)
    assert [go(share, "a", 0.0, batch=2) for _ in range(3)] == [True, True, False]


def test_an_address_never_said_connected_is_never_sole() -> None:
    share = FairShare(RULES)
    share.connected("b")
    assert share.standing("a", 0.0) is Standing.ALONE  # (work told of no connection)
    assert share.standing("b", 0.0) is Standing.SOLE


def test_an_address_that_left_counts_as_present_for_a_while() -> None:
    """A client that connects anew for each request keeps the other from being sole between
    its connections; one gone for ``present_for`` no longer does."""
    share = FairShare(RULES)
    share.connected("a")
    share.connected("b")
    share.connected("b")
    share.disconnected("b", 1.0)
    assert share.standing("a", 1.0) is Standing.ALONE  # one of b's two is still open
    share.disconnected("b", 2.0)
    assert share.standing("a", 2.0) is Standing.ALONE
    assert share.standing("a", 2.0 + RULES.present_for - 0.01) is Standing.ALONE
    share.connected("b")  # back: present again, whatever its last departure
    share.disconnected("b", 3.0)
    assert share.standing("a", 2.5 + RULES.present_for) is Standing.ALONE
    assert share.standing("a", 3.0 + RULES.present_for + 0.01) is Standing.SOLE
    share.disconnected("a", 5.0)
    assert share.standing("a", 5.0) is Standing.ALONE  # none connected: nobody is sole


def test_after_many_visitors_the_last_ones_departure_counts() -> None:
    """A hundred addresses come and go: the one address that stays is sole ``present_for``
    after the last of them left (two departures are all that is kept, however many)."""
    share = FairShare(RULES)
    share.connected("a")
    for n in range(100):
        share.connected(f"visitor-{n}")
        share.disconnected(f"visitor-{n}", n / 100)
    assert len(share._departures) == 2
    assert share.sole_key is None
    assert share.standing("a", 0.99 + RULES.present_for - 0.01) is not Standing.SOLE
    assert share.standing("a", 0.99 + RULES.present_for) is Standing.SOLE
    assert share.sole_key == "a"  # from now on the gate's fast path (no clock) knows it


def test_an_address_that_left_and_came_back_is_sole_after_the_others_left() -> None:
    """Its own departure does not hold it back: only another address's does."""
    share = FairShare(RULES)
    share.connected("b")
    share.connected("a")
    share.disconnected("b", 1.0)
    share.disconnected("a", 5.0)
    share.connected("a")
    assert share.standing("a", 5.0) is Standing.SOLE  # b left 4 s ago; a's own leaving: none


def test_sharing_the_cpu_each_address_goes_about_one_unit_per_batch() -> None:
    share = FairShare(RULES)
    go(share, "b", 0.0, batch=1)  # b is busy too
    assert share.standing("a", 0.001) is Standing.SHARING
    assert [go(share, "a", 0.001, batch=1) for _ in range(2)] == [True, False]
    assert go(share, "a", 0.001, batch=2)


def test_a_large_unit_goes_then_its_debt_holds_the_next_ones_back() -> None:
    """A 4 MiB manifest read back while another address is busy: it goes (no unit is ever
    refused for its size), and its address then waits out the batches it cost."""
    share = FairShare(RULES)
    go(share, "b", 0.0, batch=1)
    go(share, "a", 0.0, batch=1)
    assert go(share, "a", 0.0, batch=2, cost=1000)  # ten batches' worth
    went = [go(share, "a", 0.001, batch=b) for b in range(3, 14)]
    assert went.index(True) == 9  # batch 12: credit earned back in batches 3..12


def test_credit_is_not_saved_up() -> None:
    share = FairShare(RULES)
    go(share, "a", 0.0, batch=1)
    share.charge("b", 10, 0.0, batch=1)
    assert [go(share, "a", 0.001, batch=1000) for _ in range(2)] == [True, False]


def test_a_heavy_address_yields_to_a_lighter_busy_one() -> None:
    share = FairShare(RULES)
    share.charge("heavy", 50_000, 0.0, batch=-10_000)  # many batches ago: its debt is paid
    share.charge("light", 10, 0.001, batch=1)
    assert share.standing("heavy", 0.002) is Standing.YIELDING
    assert share.standing("light", 0.002) is Standing.SHARING
    # a quarter of a unit per batch: one unit every 4 batches
    went = [go(share, "heavy", 0.002, batch=b) for b in range(2, 30)]
    assert 6 <= sum(went) <= 7
    assert go(share, "light", 0.002, batch=2)


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
    """Recent work counts: an address that flooded seconds ago is not held back now."""
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


def test_in_a_short_batch_a_unit_goes_even_in_debt() -> None:
    share = FairShare(FairShareRules(sharing=100, alone=300, busy_batch=0.001))
    share.charge("a", 10_000, 0.0, batch=1)  # deep in debt
    assert not share.may_go("a", 0.0, 1, elapsed=0.002)
    assert not share.may_go("a", 0.0, 1)  # elapsed unknown: a long batch
    assert share.may_go("a", 0.0, 1, elapsed=0.0005)


@pytest.mark.parametrize(
    ("busy", "parked", "pause"),
    [
        ((), ("a",), 0.0),  # one address, nobody else: batch after batch, no idle wait
        (("a",), ("a",), 0.0),
        (("b",), ("a",), RULES.pause),  # b did work within active_for: idle moments for it
        (("a", "b"), ("a", "b"), RULES.pause),
        ((), ("a", "b"), RULES.pause),
        (("a",), (), 0.0),  # none parked: nothing to wait for
    ],
)
def test_the_loop_pauses_between_batches_only_when_addresses_share_it(
    busy: tuple[str, ...], parked: tuple[str, ...], pause: float
) -> None:
    share = FairShare(RULES)
    for key in busy:
        go(share, key, 0.0, batch=1)
    assert share.pause(parked, 0.001) == pause


def test_once_the_other_address_has_been_idle_past_active_for_the_pause_ends() -> None:
    share = FairShare(RULES)
    go(share, "b", 0.0, batch=1)
    assert share.pause(["a"], 0.004) == RULES.pause
    assert share.pause(["a"], 0.006) == 0.0


def test_idle_clears_the_debt_of_an_address_alone_only() -> None:
    """The loop found nothing to run: an address alone does not wait out its debt in empty
    batches; one sharing the CPU with another does."""
    share = FairShare(RULES)
    go(share, "a", 0.0, batch=1, cost=5 * RULES.alone)  # deep in debt
    share.idle(["a"], 0.001)
    assert go(share, "a", 0.001, batch=2)  # the next batch's quantum, as if it owed nothing
    go(share, "b", 0.001, batch=2)  # b is busy now: a shares the CPU
    go(share, "a", 0.002, batch=3, cost=5 * RULES.alone)
    share.idle(["a"], 0.002)
    assert not go(share, "a", 0.002, batch=4)


def test_sharing_while_two_addresses_worked_within_active_for() -> None:
    """What turns the step meter on (net.fairness): a second address's unit; off once it has
    been idle past ``active_for``."""
    share = FairShare(RULES)
    assert not share.sharing(0.0)
    go(share, "a", 0.0, batch=1)
    assert not share.sharing(0.001)
    go(share, "b", 0.001, batch=1)
    assert share.sharing(0.001)
    go(share, "a", 0.004, batch=2)
    assert share.sharing(0.005)
    assert not share.sharing(0.001 + RULES.active_for + 0.0001)  # b went quiet


def _state(share: FairShare) -> tuple[object, ...]:
    accounts = {
        key: (a.served, a.at, a.last_unit, a.credit, a.credited)
        for key, a in share._accounts.items()
    }
    return accounts, list(share._active), share._connections, share._departures, share.sole_key


@pytest.mark.parametrize("seed", range(20))
def test_spend_answers_and_charges_as_may_go_then_charge(seed: int) -> None:
    """``spend`` is the one call the gate makes per unit: the same verdict, and the same
    accounts after, as asking ``may_go`` and then charging, over random units of several
    addresses (sole, alone, sharing, yielding, in debt, in short and long batches, connecting
    and leaving)."""
    rng = random.Random(seed)
    one, two = FairShare(RULES), FairShare(RULES)
    now, batch = 0.0, 0
    for _ in range(300):
        now += rng.choice([0.0, 0.0001, 0.001, 0.01, 0.5])
        batch += rng.choice([0, 0, 1, 3])
        key = rng.choice("aabc")
        if rng.random() < 0.1:
            for share in (one, two):
                share.connected(key)
        elif rng.random() < 0.1 and key in one._connections:
            for share in (one, two):
                share.disconnected(key, now)
        cost = rng.choice([10.0, 100.0, 400.0, 5000.0])
        elapsed = rng.choice([0.0, 0.0005, 0.01, math.inf])
        went = one.may_go(key, now, batch, elapsed)
        if went:
            one.charge(key, cost, now, batch)
        assert two.spend(key, cost, now, batch, elapsed) is went
        assert _state(two) == _state(one)
