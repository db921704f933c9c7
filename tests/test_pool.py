"""The upstream connection pool (hubproxy.net.pool): slots bounded per client and per lane, slot
waits that end in a 503, waiters served in order, and the sweeper that closes idle connections.

The first tests drive a ``Pool`` over socket pairs whose far ends answer like a tiny upstream;
the last ones run the whole mirror in front of the fake hub, whose blobs can be made to stall
(``FakeHub.stall_blob``), with clients on several loopback addresses (127.0.0.x)."""

from __future__ import annotations

import functools
import json
import urllib.parse
from collections.abc import AsyncIterator
from typing import cast

import pytest
import trio
import trio.testing
import trustme

from hubproxy.cli import UsageError, load_settings
from hubproxy.net.pool import DIALS_PER_CLIENT, PEER_CHECK_INTERVAL, Pool
from hubproxy.net.streams import ByteStream
from hubproxy.net.upstream import REQUEST_HEADS, UpstreamConnection, _request_head
from hubproxy.ops.metrics import HubMetrics, pool_figures
from hubproxy.policy.auth import parse_challenges
from hubproxy.policy.errors import MirrorBusy
from hubproxy.policy.slots import Lane
from hubproxy.policy.urls import Origin, parse_url
from tests.conftest import StartProxy, TLSFiles, make_config
from tests.fakehub import FakeHub, make_layer, sha256_digest
from tests.wire import WireClient

ORIGIN = Origin("https", "registry.example", 443)


@pytest.fixture
async def upstream(nursery: trio.Nursery) -> AsyncIterator[TinyUpstream]:
    tiny = TinyUpstream(nursery)
    yield tiny
    for stream in tiny.ours + tiny.far:
        await trio.aclose_forcefully(stream)


class TinyUpstream:
    """What the pool connects to: one socket pair per connection, whose far end answers every
    request with ``200 ok`` until the pool closes its end (then ``closed[i]`` is set)."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.far: list[trio.SocketStream] = []
        self.ours: list[trio.SocketStream] = []
        self.closed: list[trio.Event] = []

    async def connect(self, origin: Origin, profile: str) -> ByteStream:
        ours, theirs = trio.socket.socketpair()
        far = trio.SocketStream(theirs)
        closed = trio.Event()
        self.far.append(far)
        self.closed.append(closed)
        self.nursery.start_soon(self._answer, far, closed)
        self.ours.append(trio.SocketStream(ours))
        return self.ours[-1]

    async def _answer(self, far: trio.SocketStream, closed: trio.Event) -> None:
        pending = b""
        try:
            while data := await far.receive_some(65536):
                pending += data
                while b"\r\n\r\n" in pending:
                    _, _, pending = pending.partition(b"\r\n\r\n")
                    await far.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        closed.set()


def make_pool(upstream: TinyUpstream, **overrides: float) -> Pool:
    settings: dict[str, float] = {
        "idle_timeout": 60.0,
        "keepalive": 30.0,
        "max_idle_per_origin": 8,
        "max_per_origin": 4,
        "wait_timeout": 10.0,
    }
    settings.update(overrides)
    return Pool(
        upstream.connect,
        idle_timeout=settings["idle_timeout"],
        keepalive=settings["keepalive"],
        max_idle_per_origin=int(settings["max_idle_per_origin"]),
        max_per_origin=int(settings["max_per_origin"]),
        max_per_client=int(settings.get("max_per_client", 0)),
        wait_timeout=settings["wait_timeout"],
    )


async def exchange(conn: UpstreamConnection) -> None:
    await conn.send_request("GET", "/", [(b"host", b"registry.example")])
    head = await conn.receive_head("GET")
    assert head.status_code == 200
    while await conn.receive_body() is not None:
        pass


async def hold(
    pool: Pool,
    release: trio.Event,
    *,
    client: str = "",
    lane: Lane = Lane.SMALL,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Hold one slot until ``release`` is set."""
    async with pool.connection(ORIGIN, client=client, lane=lane):
        task_status.started()
        await release.wait()


# -- the sweeper ---------------------------------------------------------------------------------


async def test_idle_connection_is_closed_after_the_keepalive_without_a_request(
    nursery: trio.Nursery, upstream: TinyUpstream, autojump_clock: trio.testing.MockClock
) -> None:
    pool = make_pool(upstream, keepalive=30.0)
    await nursery.start(pool.sweep)
    async with pool.connection(ORIGIN) as conn:
        await exchange(conn)
    assert pool.idle_count(ORIGIN) == 1
    idle_since = trio.current_time()
    with trio.fail_after(300):
        await upstream.closed[0].wait()  # the upstream sees our end close: no CLOSE_WAIT left
    assert trio.current_time() - idle_since == pytest.approx(30.0)
    assert pool.idle_count(ORIGIN) == 0
    assert pool.swept == 1


async def test_idle_connection_the_upstream_closed_is_swept_before_the_keepalive(
    nursery: trio.Nursery, upstream: TinyUpstream, autojump_clock: trio.testing.MockClock
) -> None:
    pool = make_pool(upstream, keepalive=600.0)
    await nursery.start(pool.sweep)
    async with pool.connection(ORIGIN) as conn:
        await exchange(conn)
    ours = conn.stream
    assert isinstance(ours, trio.SocketStream)
    await upstream.far[0].aclose()  # the upstream's own idle timeout: our end is in CLOSE_WAIT
    await trio.sleep(PEER_CHECK_INTERVAL + 0.1)
    assert pool.idle_count(ORIGIN) == 0
    assert pool.swept == 1
    assert ours.socket.fileno() == -1  # closed, not just forgotten


async def test_sweeper_sleeps_while_nothing_is_idle_and_wakes_for_a_new_idle_connection(
    nursery: trio.Nursery, upstream: TinyUpstream, autojump_clock: trio.testing.MockClock
) -> None:
    pool = make_pool(upstream, keepalive=30.0)
    await nursery.start(pool.sweep)
    await trio.sleep(3600)  # nothing idle: nothing to do, for as long as it takes
    async with pool.connection(ORIGIN) as conn:
        await exchange(conn)
    with trio.fail_after(31):
        await upstream.closed[0].wait()


# -- slots ---------------------------------------------------------------------------------------


async def test_slot_wait_times_out_with_mirror_busy(
    nursery: trio.Nursery, upstream: TinyUpstream, autojump_clock: trio.testing.MockClock
) -> None:
    pool = make_pool(upstream, max_per_origin=1, wait_timeout=7.0)
    release = trio.Event()
    await nursery.start(hold, pool, release)
    start = trio.current_time()
    with pytest.raises(MirrorBusy) as caught:
        async with pool.connection(ORIGIN, client="192.0.2.1"):
            pytest.fail("got a slot that was taken")
    assert trio.current_time() - start == pytest.approx(7.0)
    error = caught.value
    assert (error.status, error.code) == (503, "UNAVAILABLE")
    assert "busy" in error.message
    assert str(ORIGIN) in error.message
    assert (b"retry-after", b"7") in error.headers
    assert pool.wait_timeouts[str(ORIGIN), "small"] == 1
    assert pool.waiting() == {}
    release.set()
    async with pool.connection(ORIGIN) as conn:  # the slot is free again, at once
        assert trio.current_time() - start == pytest.approx(7.0)
        await exchange(conn)


async def test_waiters_are_served_in_arrival_order(
    nursery: trio.Nursery, upstream: TinyUpstream
) -> None:
    pool = make_pool(upstream, max_per_origin=1)
    release = trio.Event()
    await nursery.start(hold, pool, release)
    served: list[int] = []

    async def wait_turn(index: int) -> None:
        async with pool.connection(ORIGIN, client=f"192.0.2.{index}"):
            served.append(index)

    for index in range(5):
        nursery.start_soon(wait_turn, index)
        await trio.testing.wait_all_tasks_blocked()  # each is queued before the next
    assert sum(pool.waiting().values()) == 5
    release.set()
    while len(served) < 5:
        await pool.wait_changed()
    assert served == [0, 1, 2, 3, 4]


async def test_one_client_cannot_take_every_slot(
    nursery: trio.Nursery, upstream: TinyUpstream
) -> None:
    pool = make_pool(upstream, max_per_origin=8, max_per_client=3)
    release = trio.Event()
    blob = functools.partial(hold, pool, release, client="192.0.2.1", lane=Lane.BULK)
    for _ in range(2):  # a client's blob transfers: one fewer than its share of 3
        await nursery.start(blob)
    nursery.start_soon(blob)
    await trio.testing.wait_all_tasks_blocked()
    assert pool.waiting() == {(str(ORIGIN), "bulk"): 1}
    # the same client's token request still has the last slot of its share ...
    async with pool.connection(ORIGIN, client="192.0.2.1") as conn:
        await exchange(conn)
    # ... and another client's blob transfer is not held up by the first client's waiter
    async with pool.connection(ORIGIN, client="192.0.2.2", lane=Lane.BULK) as conn:
        await exchange(conn)
    assert pool.slots_in_use() == {(str(ORIGIN), "bulk"): 2}
    release.set()


async def test_a_burst_opens_a_few_connections_and_takes_those_put_back(
    nursery: trio.Nursery, upstream: TinyUpstream
) -> None:
    """One address's burst opens at most DIALS_PER_CLIENT connections at once; its other
    requests take a connection put back meanwhile instead of opening their own, and another
    address's request opens one at once."""
    gate = trio.Event()
    gate.set()
    dials: list[str] = []

    async def slow_connect(origin: Origin, profile: str) -> ByteStream:
        dials.append(str(origin))
        await gate.wait()
        return await upstream.connect(origin, profile)

    pool = Pool(
        slow_connect,
        idle_timeout=60.0,
        keepalive=30.0,
        max_idle_per_origin=8,
        max_per_origin=20,
        max_per_client=20,
    )
    release = trio.Event()

    async def exchange_then_hold(*, task_status: trio.TaskStatus[None]) -> None:
        async with pool.connection(ORIGIN, client="192.0.2.1") as conn:
            await exchange(conn)  # reusable once its exchange is done
            task_status.started()
            await release.wait()

    await nursery.start(exchange_then_hold)
    gate = trio.Event()  # from now on, new connections take until the gate opens
    done: list[str] = []

    async def one(client: str) -> None:
        async with pool.connection(ORIGIN, client=client) as conn:
            await exchange(conn)
            done.append(client)

    for _ in range(DIALS_PER_CLIENT + 6):
        nursery.start_soon(one, "192.0.2.1")
    await trio.testing.wait_all_tasks_blocked()
    assert len(dials) == 1 + DIALS_PER_CLIENT  # the held one, then at most 4 at once
    nursery.start_soon(one, "192.0.2.2")
    await trio.testing.wait_all_tasks_blocked()
    assert len(dials) == 2 + DIALS_PER_CLIENT  # another address is not behind them
    release.set()  # the held connection goes back to the pool: the six waiting take it in turn
    with trio.fail_after(10):
        while len(done) < 6:
            await pool.wait_changed()
    assert len(dials) == 2 + DIALS_PER_CLIENT and pool.opened == 1
    gate.set()
    with trio.fail_after(10):
        while len(done) < DIALS_PER_CLIENT + 7:
            await pool.wait_changed()
    assert pool.in_use(ORIGIN) == 0


async def test_cancelled_waiter_leaves_no_trace(
    nursery: trio.Nursery, upstream: TinyUpstream
) -> None:
    pool = make_pool(upstream, max_per_origin=1)
    release = trio.Event()
    await nursery.start(hold, pool, release)
    with trio.CancelScope() as scope:
        nursery.start_soon(trio.sleep_forever)  # keep the nursery busy while we cancel
        scope.cancel()
        async with pool.connection(ORIGIN):
            pytest.fail("a cancelled wait got a slot")
    assert pool.waiting() == {}
    release.set()
    await trio.testing.wait_all_tasks_blocked()
    assert pool.in_use(ORIGIN) == 0


def test_pool_figures_reach_metrics() -> None:
    async def never(origin: Origin, profile: str) -> ByteStream:
        raise AssertionError("not connecting")

    metrics = HubMetrics()
    pool = Pool(never, idle_timeout=1, keepalive=1, max_idle_per_origin=1, max_per_origin=40)
    metrics.pool = lambda: pool_figures(pool)
    pool.waits[str(ORIGIN), "bulk"] += 3
    pool.wait_timeouts[str(ORIGIN), "bulk"] += 1
    text = metrics.render().decode()
    assert 'hubproxy_upstream_slot_limit{limit="per_origin"} 40' in text
    assert 'hubproxy_upstream_slot_limit{limit="per_client"} 10' in text
    assert 'hubproxy_upstream_slot_limit{limit="reserve_small"} 4' in text
    origin = str(ORIGIN)
    assert f'hubproxy_upstream_slot_waits_total{{origin="{origin}",lane="bulk"}} 3' in text
    assert f'hubproxy_upstream_slot_wait_timeouts_total{{origin="{origin}",lane="bulk"}} 1' in text


def test_pool_flags_reach_the_config() -> None:
    _, config = load_settings(
        [
            "--pool-max-per-origin",
            "40",
            "--pool-max-per-client",
            "6",
            "--pool-reserve-small",
            "5",
            "--pool-wait-timeout",
            "12",
            "--upstream-keepalive",
            "9",
        ]
    )
    assert (config.pool_max_per_origin, config.pool_max_per_client) == (40, 6)
    assert config.pool_reserve_small == 5
    assert (config.timeouts.pool_wait, config.timeouts.upstream_keepalive) == (12, 9)
    _, defaults = load_settings([])
    assert (defaults.pool_max_per_origin, defaults.pool_max_per_client) == (100, 0)
    assert (defaults.timeouts.pool_wait, defaults.timeouts.upstream_keepalive) == (30, 30)
    with pytest.raises(UsageError, match="--pool-max-per-origin must be at least 1"):
        load_settings(["--pool-max-per-origin", "0"])


# -- the whole mirror ----------------------------------------------------------------------------


async def request_from(
    address: str, port: int, target: str, headers: list[tuple[str, str]] | None = None
) -> WireClient:
    """Send one request from ``address`` (127.0.0.x) to a plain-HTTP mirror; the caller reads
    the answer (and closes the client)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=address)
    client = WireClient(stream, f"127.0.0.1:{port}")
    await client.send_request("GET", target, headers)
    return client


async def mirror_token(port: int, address: str, repository: str) -> str:
    """A pull token for ``repository`` as a client at ``address`` gets one: the challenge of
    ``/v2/``, then the mirror's token endpoint it names."""
    client = await request_from(address, port, "/v2/")
    head = await client.receive_head()
    await client.receive_body()
    await client.aclose()
    assert head.status_code == 401
    challenge = dict(head.headers)[b"www-authenticate"].decode()
    (bearer,) = parse_challenges(challenge)
    realm = urllib.parse.urlsplit(bearer.param("realm") or "")
    query = urllib.parse.urlencode(
        {"service": bearer.param("service") or "", "scope": f"repository:{repository}:pull"}
    )
    client = await request_from(address, port, f"{realm.path}?{query}")
    head = await client.receive_head()
    body = await client.receive_body()
    await client.aclose()
    assert head.status_code == 200, body
    token: str = json.loads(body)["token"]
    return token


async def test_one_client_with_slow_transfers_leaves_the_cdn_to_others(
    nursery: trio.Nursery, hub: FakeHub, start_proxy: StartProxy
) -> None:
    """Case 2 of issue 12: one address holding slow Range-less downloads took every CDN slot."""
    slow = make_layer(1, 1 << 20)  # more than one chunk of the fake CDN, which then stalls
    small = make_layer(2, 100_000)
    hub.add_image("library/alpine", "3.20", [slow, small])
    stalled = hub.stall_blob(sha256_digest(slow), after=100_000, times=1000)
    proxy = await start_proxy(tls=False, pool_max_per_origin=8, pool_max_per_client=4)
    pool = proxy.proxy.pool
    cdn = str(parse_url(hub.cdn_url).origin)
    token = await mirror_token(proxy.port, "127.0.0.1", "library/alpine")
    auth = [("authorization", f"Bearer {token}")]
    target = f"/v2/library/alpine/blobs/{sha256_digest(slow)}"

    async def slow_pull() -> None:
        client = await request_from("127.0.0.1", proxy.port, target, auth)
        try:
            assert (await client.receive_head()).status_code == 200
            await stalled.release.wait()
        finally:
            await client.aclose()

    for _ in range(8):  # as many as the CDN has slots
        nursery.start_soon(slow_pull)
    with trio.fail_after(20):
        # a client's blob transfers hold one fewer than its share of 4; the rest wait
        while pool.slots_in_use().get((cdn, "bulk")) != 3 or pool.waiting() != {(cdn, "bulk"): 5}:
            await pool.wait_changed()
        # another client: its token, its manifest and its layer are all answered
        other = "127.0.0.2"
        token = await mirror_token(proxy.port, other, "library/alpine")
        auth = [("authorization", f"Bearer {token}")]
        client = await request_from(
            other,
            proxy.port,
            "/v2/library/alpine/manifests/3.20",
            [*auth, ("accept", "application/vnd.docker.distribution.manifest.v2+json")],
        )
        head, _ = await client.receive_head(), await client.receive_body()
        assert head.status_code == 200
        await client.aclose()
        client = await request_from(
            other, proxy.port, f"/v2/library/alpine/blobs/{sha256_digest(small)}", auth
        )
        head, body = await client.receive_head(), await client.receive_body()
        await client.aclose()
    assert head.status_code == 200
    assert body == small
    assert pool.slots_in_use()[cdn, "bulk"] == 3  # the slow ones are still there, still bounded
    stalled.release.set()


@pytest.fixture
def patient_clock() -> trio.testing.MockClock:
    """Virtual time that jumps only after half a real second with every task blocked: real
    sockets on 127.0.0.1 answer long before, so only timeouts are skipped."""
    return trio.testing.MockClock(autojump_threshold=0.5)


async def test_blob_transfers_leave_slots_for_small_requests_and_waits_end_in_503(
    nursery: trio.Nursery,
    ca: trustme.CA,
    tls_files: TLSFiles,
    patient_clock: trio.testing.MockClock,
) -> None:
    """A registry that serves blobs itself (registry:2): four clients' stalled blob transfers
    fill its bulk lane; a fifth client's manifest and ping still pass on the reserved slot, and
    the blob transfer that found no slot gets a 503 after --pool-wait-timeout, not a hang."""
    hub = FakeHub(ca, auth_layout="basic", basic_anonymous=True)
    hub.ratelimit_limit = None
    await nursery.start(hub.serve)
    slow = make_layer(3, 1 << 20)
    hub.add_image("library/alpine", "3.20", [slow])
    stalled = hub.stall_blob(sha256_digest(slow), after=100_000, times=1000)
    from hubproxy.app import serve

    config = make_config(
        hub,
        tls_files,
        tls=False,
        pool_max_per_origin=4,  # a reserve of 1 for small requests: 3 for blobs
        timeouts={"pool_wait": 5.0},
    )
    app = await nursery.start(serve, config)
    port = app.server.bound[0][1]
    pool = app.proxy.pool
    registry = str(parse_url(hub.registry_url).origin)
    target = f"/v2/library/alpine/blobs/{sha256_digest(slow)}"
    answers: dict[str, tuple[int, float, dict[bytes, bytes], bytes]] = {}
    refused = trio.Event()

    async def pull(address: str) -> None:
        client = await request_from(address, port, target)
        try:
            head = await client.receive_head()
            body = b"" if head.status_code == 200 else await client.receive_body()
            answers[address] = (head.status_code, trio.current_time(), dict(head.headers), body)
            if head.status_code != 200:
                refused.set()
            await stalled.release.wait()
        finally:
            await client.aclose()

    start = trio.current_time()
    for index in range(1, 5):
        nursery.start_soon(pull, f"127.0.0.{index}")
    while pool.slots_in_use().get((registry, "bulk")) != 3 or not pool.waiting():
        await pool.wait_changed()
    assert trio.current_time() - start < 1  # no timeout was needed to get here
    for target_path in ("/v2/library/alpine/manifests/3.20", "/v2/"):
        client = await request_from("127.0.0.9", port, target_path)
        head = await client.receive_head()
        await client.receive_body()
        await client.aclose()
        assert head.status_code == 200, target_path
    await refused.wait()
    (status, when, headers, body), *others = sorted(answers.values(), key=lambda a: -a[0])
    assert [answer[0] for answer in others] == [200, 200, 200]
    assert status == 503
    assert when - start == pytest.approx(5.0, abs=1.0)
    error = json.loads(body)["errors"][0]
    assert error["code"] == "UNAVAILABLE"
    assert "busy" in error["message"]
    assert registry in error["message"]
    assert headers[b"retry-after"] == b"5"
    assert pool.wait_timeouts[registry, "bulk"] == 1
    stalled.release.set()


async def test_request_heads_without_credentials_are_remembered_and_with_them_never() -> None:
    """h11's event for an upstream request head is made once for the same head; a head that
    carries a credential or a query (a signed CDN address) is made afresh each time and kept
    nowhere, and still goes upstream."""
    ours, theirs = trio.testing.memory_stream_pair()
    conn = UpstreamConnection(parse_url("http://origin.test").origin, ours, idle_timeout=10)
    _request_head.cache_clear()
    plain = [(b"host", b"origin.test"), (b"accept", b"*/*")]
    for _ in range(3):
        await conn.send_request("GET", "/v2/x/manifests/1", plain)
        assert b"GET /v2/x/manifests/1 HTTP/1.1\r\nhost: origin.test\r\n" in (
            await theirs.receive_some()
        )
    assert _request_head.cache_info()[:2] == (2, 1)  # (hits, misses)
    for name in (b"authorization", b"cookie"):
        await conn.send_request("GET", "/v2/x/manifests/1", [*plain, (name, b"Bearer s3cret")])
        assert b": Bearer s3cret\r\n" in await theirs.receive_some()
    await conn.send_request("GET", "/blobs/1?signature=s3cret", plain)  # a signed CDN address
    assert b"GET /blobs/1?signature=s3cret " in await theirs.receive_some()
    await conn.send_request(
        "GET", "/v2/x/manifests/1", [*plain, (b"x-v", cast(bytes, bytearray(b"m")))]
    )
    assert b"x-v: m\r\n" in await theirs.receive_some()  # not a key: made afresh
    assert _request_head.cache_info().currsize == 1
    assert _request_head.cache_info().maxsize == REQUEST_HEADS
