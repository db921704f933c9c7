"""Tests for hubproxy.net.buffers: the body chunk size follows the transfers running."""

from __future__ import annotations

import gc

import pytest
import trio.testing

from hubproxy.net.buffers import (
    BODIES,
    BODY_BUDGET,
    LARGEST,
    SMALLEST,
    TransferBudget,
    auto_budget,
    worker_budget,
)
from hubproxy.net.upstream import UpstreamConnection
from hubproxy.policy.urls import parse_url

MiB = 1024 * 1024


class Transfer:
    """Something weak-referenceable that stands for one transfer."""


@pytest.mark.parametrize(
    ("running", "chunk"),
    [
        (0, LARGEST),
        (1, LARGEST),
        (18, LARGEST),  # 24 MiB / (5 x 18) = 273 KiB: the largest still fits
        (20, 240 * 1024),  # 245 KiB, down to a whole TLS record
        (100, 48 * 1024),  # a hundred transfers hold about 24 MiB of buffers, not 130
        (1000, SMALLEST),  # never under one TLS record
    ],
)
def test_chunk_follows_the_number_of_transfers(running: int, chunk: int) -> None:
    budget = TransferBudget(24 * MiB)
    transfers = [Transfer() for _ in range(running)]
    for transfer in transfers:
        budget.begin(transfer)
    assert budget.running == running
    assert budget.chunk() == chunk
    assert budget.chunk() % (16 * 1024) == 0


def test_ending_a_transfer_gives_its_share_back_and_twice_is_harmless() -> None:
    budget = TransferBudget(24 * MiB)
    transfers = [Transfer() for _ in range(100)]
    for transfer in transfers:
        budget.begin(transfer)
    small = budget.chunk()
    for transfer in transfers[:90]:
        budget.end(transfer)
        budget.end(transfer)
    assert budget.running == 10
    assert budget.chunk() > small


def test_setting_the_budget_resizes_the_chunk_at_once() -> None:
    """The size is worked out when it changes, not when asked (``--workers``: each process's
    budget is set after start-up)."""
    budget = TransferBudget(24 * MiB)
    transfers = [Transfer() for _ in range(100)]
    for transfer in transfers:
        budget.begin(transfer)
    assert budget.chunk() == 48 * 1024
    budget.budget = 48 * MiB
    assert budget.chunk() == 96 * 1024


def test_a_dropped_transfer_stops_counting() -> None:
    """A connection dropped mid-body never ends its transfer: it must not count for good."""
    budget = TransferBudget(24 * MiB)
    transfers = [Transfer() for _ in range(100)]
    for transfer in transfers:
        budget.begin(transfer)
    del transfers, transfer
    gc.collect()
    assert budget.running == 0
    assert budget.chunk() == LARGEST


async def test_an_upstream_body_counts_as_a_transfer_until_its_end() -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    conn = UpstreamConnection(parse_url("http://origin.test").origin, ours, idle_timeout=10)
    before = BODIES.running
    size = SMALLEST + 10
    await conn.send_request("GET", "/blob", [(b"host", b"origin.test")])
    await theirs.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size + b"x" * SMALLEST)
    await conn.receive_head("GET")
    assert BODIES.running == before + 1
    assert await conn.receive_body() == b"x" * SMALLEST
    await theirs.send_all(b"y" * 10)
    assert await conn.receive_body() == b"y" * 10
    assert await conn.receive_body() is None
    assert BODIES.running == before
    # a HEAD's answer has no body: nothing to count
    await conn.send_request("HEAD", "/blob", [(b"host", b"origin.test")])
    await theirs.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n")
    await conn.receive_head("HEAD")
    assert BODIES.running == before
    # nor does a body no larger than the smallest chunk (a manifest, a token): it never holds
    # a chunk of the budget, so it does not shrink the others'
    await conn.send_request("GET", "/manifest", [(b"host", b"origin.test")])
    await theirs.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % SMALLEST)
    await conn.receive_head("GET")
    assert BODIES.running == before
    await theirs.send_all(b"z" * SMALLEST)
    assert await conn.receive_body() == b"z" * SMALLEST
    assert await conn.receive_body() is None
    assert BODIES.running == before


@pytest.mark.parametrize(
    ("memory", "budget"),
    [
        (None, BODY_BUDGET),  # unknown: what a small router can spare
        (128 * MiB, BODY_BUDGET),  # a 64th would be 2 MiB: never under 8 MiB
        (1024 * MiB, 16 * MiB),  # a 1 GiB NAS or container
        (2048 * MiB + 12345, 32 * MiB),  # whole TLS records
        (4096 * MiB, 64 * MiB),
        (24 * 1024 * MiB, 64 * MiB),  # a server: 64 MiB, fifty transfers at full chunks
    ],
)
def test_the_automatic_budget_follows_the_machines_memory(memory: int | None, budget: int) -> None:
    assert auto_budget(memory) == budget
    assert auto_budget(memory) % (16 * 1024) == 0


@pytest.mark.parametrize(
    ("total", "workers", "each"),
    [
        (64 * MiB, 1, 64 * MiB),
        (64 * MiB, 4, 16 * MiB),
        (24 * MiB, 2, 12 * MiB),
        (8 * MiB, 16, 5 * LARGEST),  # never less than one transfer at full chunks
        (10 * MiB + 1, 3, 3 * MiB + 336 * 1024),  # a third, in whole TLS records
    ],
)
def test_each_worker_takes_its_part_of_the_budget(total: int, workers: int, each: int) -> None:
    assert worker_budget(total, workers) == each
