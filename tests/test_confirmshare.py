"""Access confirmations shared between the workers of ``--workers N`` (``cache/confirmshare.py``,
``cachepolicy.encode_shared``/``decode_shared``): real Unix datagram sockets, in one process."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest
import trio
import trio.testing

from hubproxy.app import _share_confirmations
from hubproxy.cache.confirmshare import ConfirmationShare
from hubproxy.cache.pullthrough import PullThrough
from hubproxy.policy.cachepolicy import (
    ACCESS_CONFIRMATION_TTL,
    ConfirmationKey,
    IdentityFields,
    confirmation_key,
    decode_shared,
    decode_verified,
    encode_shared,
    encode_verified,
)
from hubproxy.workers import WorkerRole

BLOB = "/v2/library/alpine/blobs/sha256:" + "1" * 64


def test_a_shared_confirmation_reads_back_as_it_was_sent() -> None:
    keys = [
        confirmation_key(b"Bearer t", "", BLOB),
        confirmation_key(None, "ghcr.io", "/v2/owner/app/manifests/sha256:" + "2" * 64),
    ]
    lines = encode_shared([(keys[0], 42.5), (keys[1], 0.25)]).split(b"\n")
    assert lines[-1] == b"" and b"Bearer" not in b"".join(lines)  # the credentials hashed
    assert [decode_shared(line) for line in lines[:-1]] == [(keys[0], 42.5), (keys[1], 0.25)]


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"garbage",
        b"0.000 " + b"a" * 64 + b" - " + BLOB.encode(),  # no time left
        b"-1.000 " + b"a" * 64 + b" - " + BLOB.encode(),
        b"10.000 " + b"A" * 64 + b" - " + BLOB.encode(),  # not a sha256 in hex
        b"10.000 " + b"a" * 63 + b" - " + BLOB.encode(),
        b"10.000 " + b"a" * 64 + b" - /token/1",  # not a registry path
        b"10.000 " + b"a" * 64 + b" - " + BLOB.encode() + b" extra",
        b"10.000 " + b"a" * 64 + b" Reg!stry " + BLOB.encode(),
    ],
)
def test_anything_but_a_live_confirmation_is_dropped(line: bytes) -> None:
    assert decode_shared(line) is None


def test_a_shared_confirmation_lives_no_longer_than_one_made_here() -> None:
    line = b"999999.000 " + b"a" * 64 + b" - " + BLOB.encode()
    decoded = decode_shared(line)
    assert decoded is not None and decoded[1] == ACCESS_CONFIRMATION_TTL


def test_a_verification_goes_as_one_line_and_comes_back_whole() -> None:
    line = encode_verified("0f" * 32, (123, 4096, 1_700_000_000_123_456_789, -1), 3.14159)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert decode_verified(line[:-1]) == (
        "0f" * 32,
        (123, 4096, 1_700_000_000_123_456_789, -1),
        3.142,
    )
    assert decode_verified(encode_verified("0f" * 32, (1, 2, 3, 4), -5.0)[:-1]) == (
        "0f" * 32,
        (1, 2, 3, 4),
        0.0,  # a clock that went back says "just now", never the future
    )


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"V " + b"0f" * 32 + b" 1 2 3 4",  # no age
        b"V " + b"0F" * 32 + b" 1 2 3 4 0.000",  # not lowercase hex
        b"V " + b"0f" * 31 + b" 1 2 3 4 0.000",  # not a sha256
        b"V " + b"0f" * 32 + b" 1 2 x 4 0.000",
        b"V " + b"0f" * 32 + b" 1 2 3 4 -1.000",  # an age from the future
        b"V " + b"0f" * 32 + b" 1 2 3 4 0.000 extra",
        b"v " + b"0f" * 32 + b" 1 2 3 4 0.000",
    ],
)
def test_anything_else_is_not_a_verification(line: bytes) -> None:
    assert decode_verified(line) is None


async def test_confirmations_reach_the_other_workers_and_nothing_else_counts(
    tmp_path: Path,
) -> None:
    shares = [ConfirmationShare(tmp_path, index, 3) for index in range(3)]
    kept: dict[int, list[tuple[ConfirmationKey, float]]] = {1: [], 2: []}
    verified: dict[int, list[tuple[str, IdentityFields, float]]] = {1: [], 2: []}
    key = confirmation_key(b"Bearer t", "", BLOB)
    many = [(confirmation_key(b"Bearer t", "", f"{BLOB}{n}"), 30.0) for n in range(200)]
    everything = trio.Event()

    def keeper(index: int) -> Callable[[ConfirmationKey, float], None]:
        def keep(key: ConfirmationKey, seconds_left: float) -> None:
            kept[index].append((key, seconds_left))
            if all(len(got) == 1 + len(many) for got in kept.values()):
                everything.set()

        return keep

    def verifier(index: int) -> Callable[[str, IdentityFields, float], None]:
        def keep_verified(hexdigest: str, identity: IdentityFields, age: float) -> None:
            verified[index].append((hexdigest, identity, age))

        return keep_verified

    try:
        async with trio.open_nursery() as nursery:
            for index in (1, 2):
                nursery.start_soon(shares[index].receive, keeper(index), verifier(index))
            await trio.testing.wait_all_tasks_blocked()
            # a stranger's datagrams in the same directory: neither a confirmation nor a
            # verification, dropped
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as stranger:
                stranger.sendto(b"hello\n", str(tmp_path / "confirm-1.sock"))
                stranger.sendto(
                    b"V " + b"g" * 64 + b" 1 2 3 4 0.000\n", str(tmp_path / "confirm-1.sock")
                )
            shares[0].send_verified("ab" * 32, (7, 1024, 10**18, -5), 1.25)
            shares[0].send([(key, 20.0)])
            shares[0].send(many)  # more than one datagram holds: split at lines
            with trio.fail_after(5):
                await everything.wait()
            nursery.cancel_scope.cancel()
        for index in (1, 2):
            assert kept[index] == [(key, 20.0), *many]
            assert shares[index].received == 1 + len(many)
            assert verified[index] == [("ab" * 32, (7, 1024, 10**18, -5), 1.25)]
        assert shares[0].sent == 1 + len(many)
    finally:
        for share in shares:
            share.close()
    assert sorted(os.listdir(tmp_path)) == []  # each worker's socket removed


def test_a_worker_that_is_down_misses_them_without_an_error(tmp_path: Path) -> None:
    share = ConfirmationShare(tmp_path, 0, 2)  # worker 1 never bound its socket
    try:
        share.send([(confirmation_key(None, "", BLOB), 10.0)])
    finally:
        share.close()


async def test_a_worker_without_its_socket_says_so_and_serves_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    role = WorkerRole(1, 2, 443, tmp_path / "gone", control_fd=-1)  # no run directory: no bind
    pullthrough = cast(PullThrough, SimpleNamespace(share_confirmations=None))
    with caplog.at_level(logging.WARNING, logger="hubproxy"):
        await _share_confirmations(role, pullthrough)  # returns: nothing to receive
    assert "worker 1 cannot share access confirmations" in caplog.text
    assert pullthrough.share_confirmations is None
