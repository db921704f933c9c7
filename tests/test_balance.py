"""--workers: client connections spread evenly over the workers (policy.balance, net.board)."""

from __future__ import annotations

import math
from pathlib import Path

import h11
import pytest
import trio
import trio.testing

from hubproxy.net.board import NOT_SERVING, ConnectionBoard, clear_slot, create_board
from hubproxy.net.server import ClientRequest, ClientResponse, Server
from hubproxy.net.settings import ListenerSettings
from hubproxy.policy.balance import SHED_EVERY, sheds
from tests.wire import WireClient, read_until_closed


@pytest.mark.parametrize(
    ("mine", "counts", "shed"),
    [
        (5, [5], False),  # one worker: nobody to give connections to
        (0, [0, 0], False),
        (25, [25, 25], False),
        (26, [26, 24], False),  # within the slack
        (27, [27, 23], True),
        (20, [30, 20], False),  # the other one holds the excess
        (12, [12, 0, 0], True),  # a worker just (re)started holds none
        (5, [5, 2, 2], True),
        (4, [4, 3, 2], False),
        (10, [10, 8, 9, 9], False),  # 9 + 1
        (11, [11, 8, 9, 8], True),
        (30, [30, NOT_SERVING], False),  # the other is down: nowhere to send them
        (30, [30, 20, NOT_SERVING], True),  # ... or one of two others
        (26, [26, 24, NOT_SERVING], False),
    ],
)
def test_a_worker_sheds_what_it_holds_beyond_the_mean_and_the_slack(
    mine: int, counts: list[int], shed: bool
) -> None:
    assert sheds(mine, counts, since_last=math.inf) is shed
    assert not sheds(mine, counts, since_last=SHED_EVERY / 2)  # one at a time


def test_the_board_holds_each_workers_count_and_a_dead_workers_slot_is_cleared(
    tmp_path: Path,
) -> None:
    create_board(tmp_path, 3)
    first = ConnectionBoard(tmp_path, 0, 3)
    third = ConnectionBoard(tmp_path, 2, 3)
    assert first.counts() == [NOT_SERVING] * 3
    first.publish(7)
    third.publish(4)
    assert first.counts() == third.counts() == [7, NOT_SERVING, 4]
    clear_slot(tmp_path, 2)
    assert first.counts() == [7, NOT_SERVING, NOT_SERVING]


async def _ok(request: ClientRequest, response: ClientResponse) -> None:
    await response.start(200, [(b"content-length", b"2")])
    await response.send(b"ok")
    await response.finish()


async def test_a_worker_over_its_share_closes_one_connection_after_its_answer_at_a_time(
    tmp_path: Path, nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    create_board(tmp_path, 2)
    server = Server(ListenerSettings(listen_host="127.0.0.1", listen_port=0))
    server.board = ConnectionBoard(tmp_path, 0, 2)
    other = ConnectionBoard(tmp_path, 1, 2)
    other.publish(2)  # the other worker holds 2: with our 6, the mean is 4, the slack 1
    (host, port), *_ = await nursery.start(server.serve, _ok)
    clients = [WireClient(await trio.open_tcp_stream(host, port)) for _ in range(6)]

    async def round_of_requests() -> list[bool]:
        told = []
        for client in clients:
            head, body = await client.request("GET", "/v2/")
            assert (head.status_code, body) == (200, b"ok")
            told.append((b"connection", b"close") in head.headers)
        return told

    with trio.fail_after(10):
        while server.board.counts()[0] < 6:
            await server.wait_connections_changed()
        told = await round_of_requests()
        assert told.count(True) == 1
        gone = clients.pop(told.index(True))
        assert await read_until_closed(gone.stream) == b""  # closed after its whole answer
        await gone.aclose()
        while server.board.counts()[0] > 5:
            await server.wait_connections_changed()
        # still over its share (the client has not reconnected), but one at a time
        assert await round_of_requests() == [False] * 5
        mock_clock.jump(SHED_EVERY)
        other.publish(3)  # the client reconnected, to the other worker: 5 and 3, within the slack
        assert await round_of_requests() == [False] * 5
        assert all(client.conn.our_state is h11.DONE for client in clients)
        other.publish(1)  # ... or it went away: 5 and 1
        assert await round_of_requests() == [True, False, False, False, False]
    for client in clients:
        await client.aclose()
    server.shutdown()
