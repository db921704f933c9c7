"""Tests for hubproxy.net.buffers: the body chunk size follows the transfers running."""

from __future__ import annotations

import gc

import pytest
import trio.testing

from hubproxy.net.buffers import BODIES, LARGEST, SMALLEST, TransferBudget
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
    await conn.send_request("GET", "/blob", [(b"host", b"origin.test")])
    await theirs.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n12345")
    await conn.receive_head("GET")
    assert BODIES.running == before + 1
    assert await conn.receive_body() == b"12345"
    await theirs.send_all(b"67890")
    assert await conn.receive_body() == b"67890"
    assert await conn.receive_body() is None
    assert BODIES.running == before
    # a HEAD's answer has no body: nothing to count
    await conn.send_request("HEAD", "/blob", [(b"host", b"origin.test")])
    await theirs.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n")
    await conn.receive_head("HEAD")
    assert BODIES.running == before
