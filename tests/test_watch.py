"""net.watch: a request gets its watch for a departing client only once it has run a while;
a send that outlives the client idle timeout cancels its connection, and an upstream send or
receive that outlives the upstream idle timeout aborts its upstream connection."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from hubproxy.net.server import ClientConnection, Server
from hubproxy.net.settings import ListenerSettings, Timeouts
from hubproxy.net.upstream import UpstreamConnection
from hubproxy.net.watch import Stalls, Watches
from hubproxy.policy.errors import ClientGone, UpstreamTimeout
from hubproxy.policy.urls import parse_url


class Client:
    """A client connection as the watch sees it: it sends or leaves when told to."""

    def __init__(self) -> None:
        self.looked = 0
        self.leaves = trio.Event()

    async def look(self) -> bool:
        self.looked += 1
        await self.leaves.wait()
        return True


@pytest.fixture
async def watches(nursery: trio.Nursery) -> Watches:
    """Watches started 10 ms into their requests, the starting task running beside the test."""
    watches = Watches(after=0.01)
    nursery.start_soon(watches.run)
    return watches


async def test_a_request_done_before_the_delay_starts_no_watch(
    autojump_clock: trio.testing.MockClock, watches: Watches
) -> None:
    client = Client()
    for _ in range(3):
        watch = watches.begin(client.look, trio.CancelScope())
        await trio.sleep(0.009)
        await watches.end(watch)
        assert not watch.started
    assert len(watches) == 0
    await trio.sleep(1)
    assert client.looked == 0


async def test_a_request_still_running_after_the_delay_is_cancelled_when_its_client_leaves(
    autojump_clock: trio.testing.MockClock, watches: Watches
) -> None:
    client = Client()
    began = trio.current_time()
    with trio.CancelScope() as scope:
        watch = watches.begin(client.look, scope)
        await trio.sleep(0.011)
        assert watch.started and client.looked == 1
        client.leaves.set()
        await trio.sleep(60)  # the upstream it waits for never answers
    await watches.end(watch)
    assert scope.cancelled_caught and watch.departed
    assert trio.current_time() - began < 0.02


async def test_each_watch_starts_its_own_delay_after_its_request_began(
    autojump_clock: trio.testing.MockClock,
) -> None:
    watches = Watches(after=0.1)
    clients = [Client() for _ in range(3)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watches.run)
        started = []
        for client in clients:
            started.append(watches.begin(client.look, trio.CancelScope()))
            await trio.sleep(0.04)
        # at 0.12: the first began at 0, the second at 0.04, the third at 0.08
        assert [w.started for w in started] == [True, False, False]
        await trio.sleep(0.03)  # 0.15
        assert [w.started for w in started] == [True, True, False]
        await trio.sleep(0.04)  # 0.19
        assert [w.started for w in started] == [True, True, True]
        for watch in started:
            await watches.end(watch)
        nursery.cancel_scope.cancel()


async def test_a_forgotten_watch_never_starts_and_a_started_one_goes_on(
    autojump_clock: trio.testing.MockClock, watches: Watches
) -> None:
    """The answer goes on without its client (a cached blob): its watch is forgotten before it
    started, and a watch already started is not stopped by that."""
    client, other = Client(), Client()
    forgotten = watches.begin(client.look, trio.CancelScope())
    watches.forget(forgotten)
    await trio.sleep(1)
    assert not forgotten.started and client.looked == 0 and watches.started == 0
    await watches.end(forgotten)  # nothing to stop
    running = watches.begin(other.look, trio.CancelScope())
    await trio.sleep(0.011)
    assert running.started and watches.started == 1
    watches.forget(running)
    await trio.sleep(0.01)
    assert other.looked == 1
    await watches.end(running)


async def test_ending_a_started_watch_waits_until_it_stopped() -> None:
    """The watch may be reading the connection: the request's end waits for it, so the next
    read of the connection never meets it."""
    watches = Watches(after=0.0)
    stopped = False

    async def look() -> bool:
        nonlocal stopped
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await trio.sleep(0.01)  # unwinding takes a while
            stopped = True
        return False  # pragma: no cover

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watches.run)
        watch = watches.begin(look, trio.CancelScope())
        await trio.testing.wait_all_tasks_blocked()
        assert watch.started
        await watches.end(watch)
        assert stopped and not watch.departed
        nursery.cancel_scope.cancel()


class Sender:
    """A client connection as :class:`Stalls` sees it: told when its send stalled."""

    def __init__(self) -> None:
        self.stalled_at: list[float] = []

    def stalled(self) -> None:
        self.stalled_at.append(trio.current_time())


async def test_a_send_that_outlives_the_limit_is_told_once_and_one_that_ends_never(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    stalls = Stalls(limit=10.0)
    assert not stalls.running
    nursery.start_soon(stalls.run)
    await trio.testing.wait_all_tasks_blocked()
    assert stalls.running
    quick, stuck, later = Sender(), Sender(), Sender()
    start = trio.current_time()
    stalls.begin(quick)
    stalls.begin(stuck)
    await trio.sleep(3.0)
    stalls.end(quick)  # done well in time
    stalls.begin(later)  # starts 3 s after the others: its own 10 s
    await trio.sleep(30.0)
    assert quick.stalled_at == []
    assert stuck.stalled_at == [start + 10.0]
    assert later.stalled_at == [start + 13.0]
    assert len(stalls) == 0
    # a send that ends after its sender was told is harmless, and the table stays empty
    stalls.end(stuck)
    stalls.begin(quick)
    stalls.end(quick)
    await trio.sleep(30.0)
    assert quick.stalled_at == [] and len(stalls) == 0


async def test_with_no_send_under_way_the_watch_holds_no_timer(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """A timer left behind would let a clock that jumps when the loop idles (tests') jump to it,
    far past where a deadline per send ever took it."""
    stalls = Stalls(limit=120.0)
    nursery.start_soon(stalls.run)
    sender = Sender()
    for _ in range(2):
        stalls.begin(sender)
        await trio.testing.wait_all_tasks_blocked()
        assert trio.lowlevel.current_statistics().seconds_to_next_deadline == 120.0
        stalls.end(sender)
        await trio.testing.wait_all_tasks_blocked()
        assert trio.lowlevel.current_statistics().seconds_to_next_deadline == math.inf
    assert sender.stalled_at == []


class StepCounter(trio.abc.Instrument):
    """Counts the steps of one task."""

    def __init__(self) -> None:
        self.task: trio.lowlevel.Task | None = None
        self.steps = 0

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.steps += 1


async def test_sends_that_begin_and_end_in_time_never_wake_the_watch(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """A lone fast client's sends empty the table after every chunk: the watching task's
    sleep is moved, never woken, so a chunk costs it no step."""
    stalls = Stalls(limit=10.0)
    counter = StepCounter()
    counter.task = await nursery.start(_run_reporting_task, stalls.run)
    await trio.testing.wait_all_tasks_blocked()
    trio.lowlevel.add_instrument(counter)
    try:
        sender = Sender()
        for _ in range(100):
            stalls.begin(sender)
            await trio.sleep(0.01)  # a chunk's send, done in time
            stalls.end(sender)
            await trio.testing.wait_all_tasks_blocked()
    finally:
        trio.lowlevel.remove_instrument(counter)
    assert counter.steps == 0
    assert sender.stalled_at == []
    stalls.begin(sender)  # and it still tells one that stalls, at its deadline
    start = trio.current_time()
    await trio.sleep(30.0)
    assert sender.stalled_at == [start + 10.0]


async def _run_reporting_task(
    run: Callable[[], Awaitable[None]], *, task_status: trio.TaskStatus[trio.lowlevel.Task]
) -> None:
    task_status.started(trio.lowlevel.current_task())
    await run()


async def test_without_a_watch_on_sends_a_connection_keeps_its_own_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A connection served by a server that is not running (tests drive ``serve`` by hand) times
    its sends itself: a stalled client is still let go."""
    settings = ListenerSettings(timeouts=Timeouts(client_idle=5.0))
    ours, _theirs = trio.testing.lockstep_stream_pair()  # a send waits for a read
    client = ClientConnection(ours, settings=settings, client_ip="127.0.0.1", scheme="http")
    assert not Server(settings).stalls.running
    start = trio.current_time()
    with pytest.raises(ClientGone):
        await client.send_bytes(b"x" * (1 << 20))  # the other end reads nothing
    assert trio.current_time() - start == pytest.approx(5.0)


# -- the upstream idle timeout ------------------------------------------------------------------


async def _running_stalls(nursery: trio.Nursery) -> Stalls:
    """The upstream pool's watch, with a 5 s idle timeout, running."""
    stalls = Stalls(limit=5.0)
    nursery.start_soon(stalls.run)
    await trio.testing.wait_all_tasks_blocked()
    return stalls


async def _upstream_pair(stalls: Stalls | None) -> tuple[UpstreamConnection, trio.SocketStream]:
    """An upstream connection on a real socket (one the watch can abort), and its origin's end."""
    a, b = trio.socket.socketpair()
    conn = UpstreamConnection(
        parse_url("http://origin.test").origin,
        trio.SocketStream(a),
        idle_timeout=5.0,
        stalls=stalls,
    )
    return conn, trio.SocketStream(b)


async def test_an_upstream_that_sends_nothing_is_aborted_by_the_pools_watch(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """The watch, not a deadline scope per receive, ends a receive after the idle timeout: the
    connection is closed, never reused, and the caller gets UpstreamTimeout."""
    stalls = await _running_stalls(nursery)
    conn, origin = await _upstream_pair(stalls)
    await conn.send_request("GET", "/v2/", [(b"host", b"origin.test")])
    assert len(stalls) == 0  # the send ended: its entry is gone
    start = trio.current_time()

    async def watched() -> None:
        await trio.testing.wait_all_tasks_blocked()
        assert len(stalls) == 1  # the receive waits as an entry in the table
        assert trio.lowlevel.current_statistics().seconds_to_next_deadline == 5.0

    nursery.start_soon(watched)
    with pytest.raises(UpstreamTimeout, match="sent nothing for 5s"):
        await conn.receive_head("GET")
    assert trio.current_time() - start == pytest.approx(5.0)
    assert not conn.reusable
    assert conn.stream.socket.fileno() == -1  # type: ignore[attr-defined]  # aborted
    assert len(stalls) == 0
    await origin.aclose()


async def test_an_upstream_that_takes_nothing_is_aborted_by_the_pools_watch(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    stalls = await _running_stalls(nursery)
    conn, origin = await _upstream_pair(stalls)
    start = trio.current_time()

    class Endless:
        async def read(self) -> bytes | None:
            return b"x" * 65536  # more than the socket buffers hold: the origin reads nothing

    with pytest.raises(UpstreamTimeout, match="accepted nothing for 5s"):
        await conn.send_request(
            "PUT",
            "/blob",
            [(b"host", b"origin.test"), (b"transfer-encoding", b"chunked")],
            Endless(),
        )
    assert trio.current_time() - start == pytest.approx(5.0)
    assert not conn.reusable
    await origin.aclose()


async def test_an_upstream_the_watch_cannot_abort_keeps_its_own_deadline(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """A stream not on a socket (memory, here) cannot be aborted from the watch's task: each
    of its receives still ends at the idle timeout, by a deadline scope of its own."""
    stalls = await _running_stalls(nursery)
    ours, _theirs = trio.testing.memory_stream_pair()
    conn = UpstreamConnection(
        parse_url("http://origin.test").origin, ours, idle_timeout=5.0, stalls=stalls
    )
    await conn.send_request("GET", "/v2/", [(b"host", b"origin.test")])
    start = trio.current_time()
    with pytest.raises(UpstreamTimeout, match="sent nothing for 5s"):
        await conn.receive_head("GET")
    assert trio.current_time() - start == pytest.approx(5.0)
    assert len(stalls) == 0  # never in the table


async def test_an_upstream_answer_in_time_leaves_the_watch_empty(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    stalls = await _running_stalls(nursery)
    conn, origin = await _upstream_pair(stalls)
    await conn.send_request("GET", "/v2/", [(b"host", b"origin.test")])
    await origin.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    await trio.sleep(4.0)  # slow, but within the idle timeout
    await origin.send_all(b"{}")
    head = await conn.receive_head("GET")
    assert head.status_code == 200
    assert await conn.receive_body() == b"{}"
    assert await conn.receive_body() is None
    assert conn.reusable
    assert len(stalls) == 0
    await trio.sleep(30.0)  # nothing is told later either: the connection is still open
    assert conn.stream.socket.fileno() != -1  # type: ignore[attr-defined]
    await conn.stream.aclose()
    await origin.aclose()
