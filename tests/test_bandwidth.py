"""Bandwidth caps (issue 16 item 4): --client-bandwidth and --total-bandwidth pace what clients
get, hits (sendfile too) and misses alike, share a total fairly between addresses, never slow
a cache fill that others follow, and cost nothing when unset.

The calculator (policy.pacing) is tested on plain numbers; the rest end to end over real TLS
against the fake registry, on trio's autojump clock: durations are trio time, never real time.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import trustme

from hubproxy.policy.pacing import (
    MAX_PIECE,
    MAX_TRACKED,
    MIN_PIECE,
    MIN_RATE,
    Bucket,
    Pacing,
    piece_size,
)
from hubproxy.settings import bandwidth
from tests.conftest import RunningProxy, StartProxy
from tests.fakehub import FakeHub, fetch
from tests.registry_client import RegistryClient
from tests.test_client_limits import connect_from
from tests.test_operations import metric_samples, sample

MB = 1_000_000
OTHER = "127.0.0.2"

# -- the calculator -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rates", "piece"),
    [
        ((None, None), MAX_PIECE),
        ((MB, None), 100_000),  # 100 ms of the rate
        ((None, 2 * MB), 200_000),
        ((10 * MB, 2 * MB), 200_000),  # the smaller rate
        ((100 * MB, None), MAX_PIECE),  # a chunk at most
        ((MIN_RATE, None), MIN_PIECE),  # a TLS record's worth at least
    ],
)
def test_piece_size(rates: tuple[int | None, int | None], piece: int) -> None:
    assert piece_size(*rates) == piece


@pytest.mark.parametrize(
    ("spent", "at", "level", "ready_at"),
    [
        ([], 0.0, 100_000, 0.0),  # a new bucket is full: 100 ms of 1 MB/s
        ([(100_000, 0.0)], 0.0, 0, 0.0),  # empty, not in debt: the next piece goes
        ([(250_000, 0.0)], 0.0, -150_000, 0.15),  # in debt: paid at the rate
        ([(250_000, 0.0)], 0.1, -50_000, 0.15),
        ([(250_000, 0.0)], 10.0, 100_000, 10.0),  # a pause refills it to its depth, no more
        ([(100_000, 0.0), (100_000, 0.1)], 0.1, 0, 0.1),  # at the rate: never a wait
    ],
)
def test_bucket(spent: list[tuple[int, float]], at: float, level: float, ready_at: float) -> None:
    bucket = Bucket.full(MB, 0.0)
    for count, now in spent:
        bucket.spend(count, now)
    assert bucket.level(at) == pytest.approx(level)
    assert bucket.ready_at(at) == pytest.approx(ready_at)


def test_client_cap_is_per_address() -> None:
    pacing = Pacing(MB, None, 0.0)
    pacing.spend("a", 300_000, 0.0)
    assert pacing.client_ready_at("a", 0.0) == pytest.approx(0.2)
    assert pacing.client_ready_at("b", 0.0) == 0.0  # another address: its own bucket
    assert pacing.total_ready_at(0.0) == 0.0  # no total cap


def _share(pacing: Pacing, demands: dict[str, int], seconds: float) -> dict[str, int]:
    """Bytes each address gets in ``seconds`` under the total cap, each wanting at most its
    demand (in pieces, always waiting while it wants more)."""
    got = dict.fromkeys(demands, 0)
    now = 0.0
    for key in demands:
        pacing.join(key)
    while now < seconds:
        waiting = [k for k in demands if got[k] < demands[k]]
        if not waiting:
            break
        now = max(now, pacing.total_ready_at(now))
        key = pacing.next_turn(waiting)
        pacing.spend(key, pacing.piece, now)
        got[key] += pacing.piece
    return got


@pytest.mark.parametrize(
    ("demands", "shares"),
    [
        ({"a": 10**9, "b": 10**9}, {"a": 5 * MB, "b": 5 * MB}),  # half each
        ({"a": 10**9, "b": 10**9, "c": 10**9}, {"a": 3.33 * MB, "b": 3.33 * MB, "c": 3.33 * MB}),
        # one wants less than its share: the others take the rest
        ({"a": 1 * MB, "b": 10**9}, {"a": 1 * MB, "b": 9 * MB}),
        ({"a": 1 * MB, "b": 10**9, "c": 10**9}, {"a": 1 * MB, "b": 4.5 * MB, "c": 4.5 * MB}),
    ],
)
def test_total_is_shared_fairly(demands: dict[str, int], shares: dict[str, float]) -> None:
    got = _share(Pacing(None, MB, 0.0), demands, 10.0)
    for key, share in shares.items():
        assert got[key] == pytest.approx(share, rel=0.05), key


def test_a_pause_banks_no_credit() -> None:
    """An address that comes back after a pause starts level with the others, not with the
    lead its pause would give it."""
    pacing = Pacing(None, MB, 0.0)
    _share(pacing, {"a": 10**9}, 5.0)  # "a" alone for 5 s
    pacing.join("b")  # "b" arrives: it alternates with "a" rather than catching up 5 MB
    turns = []
    for _ in range(10):
        key = pacing.next_turn(["a", "b"])
        pacing.spend(key, pacing.piece, 10.0)
        turns.append(key)
    assert turns.count("a") >= 4 and turns.count("b") >= 4


def test_tables_are_bounded() -> None:
    pacing = Pacing(MB, MB, 0.0)
    for n in range(MAX_TRACKED + 100):
        pacing.spend(f"10.0.{n // 256}.{n % 256}", 200_000, n * 0.0001)  # all still in debt
    buckets, accounts = pacing.tracked()
    assert buckets <= MAX_TRACKED and accounts <= MAX_TRACKED


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("50M", 50 * 1024 * 1024),
        ("50MB", 50 * MB),
        ("50MiB/s", 50 * 1024 * 1024),
        ("1.5G", int(1.5 * 1024**3)),
        ("64K", MIN_RATE),
        ("off", None),
    ],
)
def test_rate_spellings(text: str, rate: int | None) -> None:
    assert bandwidth(text) == rate


@pytest.mark.parametrize(
    ("text", "message"), [("50", "no unit"), ("1K", "the slowest cap"), ("5 furlongs", "not a")]
)
def test_bad_rates(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        bandwidth(text)


# -- end to end ---------------------------------------------------------------------------------


@pytest.fixture
def start_cached(start_proxy: StartProxy, tmp_path: Path) -> StartProxy:
    """``start_proxy`` with a blob cache."""

    async def start(**overrides: Any) -> RunningProxy:
        return await start_proxy(cache_dir=str(tmp_path / "cache"), **overrides)

    return start


@pytest.fixture
def fill_clock() -> trio.testing.MockClock:
    """A clock that jumps once the run has been idle for 30 ms of real time, not at once: a
    fill's disk thread (its writes, its fsync) works while trio sees nothing runnable, and a
    clock jumping then, to the next timer seconds away, would be counted as pacing."""
    return trio.testing.MockClock(autojump_threshold=0.03)


@pytest.fixture
def idle_clock() -> trio.testing.MockClock:
    """A clock that jumps only once the run has been idle for a second of real time: for a test
    that asserts nothing waits on a timer, however slow the machine's disk threads are."""
    return trio.testing.MockClock(autojump_threshold=1.0)


def blob_of(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def setup(hub: FakeHub, proxy: RunningProxy, ca: trustme.CA, *blobs: bytes) -> str:
    """The blobs in a repository of the fake hub; a token for it."""
    hub.add_image("library/alpine", "3.20", list(blobs))
    client = RegistryClient(proxy.url, ca)
    assert (await client.request("/v2/library/alpine/tags/list")).status == 200
    [token] = client.tokens.values()
    return token


async def pull(
    proxy: RunningProxy, ca: trustme.CA, token: str, blob: bytes, source: str = "127.0.0.1"
) -> float:
    """GET ``blob`` from address ``source``; the trio time it took."""
    started = trio.current_time()
    client = await connect_from(source, proxy, ca)
    auth = [("authorization", f"Bearer {token}")]
    head, body = await client.request("GET", f"/v2/library/alpine/blobs/{digest_of(blob)}", auth)
    await client.aclose()
    assert head.status_code == 200 and body == blob
    return trio.current_time() - started


async def test_without_a_cache_the_relay_is_paced(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, autojump_clock: trio.testing.MockClock
) -> None:
    """Passed through from the upstream, chunk by chunk: paced all the same."""
    blob = blob_of(4, 3 * MB)
    proxy = await start_proxy(client_bandwidth=MB)
    assert proxy.proxy.pullthrough is None
    token = await setup(hub, proxy, ca, blob)
    assert 2.75 <= await pull(proxy, ca, token, blob) < 3.5


async def test_one_client_is_capped_on_a_miss_and_a_hit(
    hub: FakeHub, start_cached: StartProxy, ca: trustme.CA, fill_clock: trio.testing.MockClock
) -> None:
    blob = blob_of(1, 3 * MB)
    proxy = await start_cached(client_bandwidth=MB)
    token = await setup(hub, proxy, ca, blob)
    for _ in ("miss", "hit"):
        # 3 MB at 1 MB/s: 3 s, less the bucket's depth and one piece (100 KB each)
        assert 2.75 <= await pull(proxy, ca, token, blob) < 3.5
    assert proxy.proxy.pullthrough is not None
    assert proxy.proxy.pullthrough.blobs.size_of(digest_of(blob)[7:]) == len(blob)
    bandwidth_figures = proxy.server.figures().bandwidth
    assert bandwidth_figures.delayed_bytes["client"] > 5 * MB
    assert bandwidth_figures.paced_seconds["client"] > 5
    assert bandwidth_figures.paced_clients == 0  # none waiting now
    samples = metric_samples((await fetch(proxy.url + "/metrics", ca)).body.decode())
    assert sample(samples, "hubproxy_bandwidth_client_limit_bytes_per_second") == MB
    assert sample(samples, "hubproxy_bandwidth_total_limit_bytes_per_second") == 0
    assert sample(samples, "hubproxy_bandwidth_delayed_bytes_total", cap="client") > 5 * MB
    assert sample(samples, "hubproxy_bandwidth_paced_seconds_total", cap="client") > 5
    assert sample(samples, "hubproxy_bandwidth_delayed_bytes_total", cap="total") == 0
    assert sample(samples, "hubproxy_bandwidth_paced_clients") == 0


async def test_a_sendfile_hit_is_paced(
    hub: FakeHub, start_cached: StartProxy, ca: trustme.CA, autojump_clock: trio.testing.MockClock
) -> None:
    blob = blob_of(2, 3 * MB)
    proxy = await start_cached(tls=False, client_bandwidth=MB)
    token = await setup(hub, proxy, ca, blob)
    await pull(proxy, ca, token, blob)  # the fill
    pullthrough = proxy.proxy.pullthrough
    assert pullthrough is not None
    before = pullthrough.stats.sendfile_bytes
    assert 2.75 <= await pull(proxy, ca, token, blob) < 3.5
    assert pullthrough.stats.sendfile_bytes - before == len(blob)  # it went by sendfile


@pytest.mark.parametrize(
    "pulls",
    [
        # (address, MB, seconds it takes) under a total of 2 MB/s
        [("127.0.0.1", 3, 3.0), (OTHER, 3, 3.0)],  # 1 MB/s each: half the total
        # half each until the first is done, then all of it to the other
        [("127.0.0.1", 2, 2.0), (OTHER, 6, 4.0)],
        # shares are per address, not per connection: two connections of 127.0.0.1 share its
        # half (0.5 MB/s each) until OTHER is done; per connection, all three would take 3 s
        [("127.0.0.1", 2, 3.0), ("127.0.0.1", 2, 3.0), (OTHER, 2, 2.0)],
    ],
)
@pytest.mark.parametrize("tls", ["memory-bio", "on-the-socket"])
async def test_clients_share_the_total_fairly(
    hub: FakeHub,
    start_cached: StartProxy,
    ca: trustme.CA,
    autojump_clock: trio.testing.MockClock,
    pulls: list[tuple[str, int, float]],
    tls: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Also with TLS on the socket (what --ktls uses): corking it once stalled the first paced
    piece on the client's delayed ACK, and under the autojump clock the idle timeout fired."""
    if tls == "on-the-socket":
        monkeypatch.setattr("hubproxy.net.server.ktls_offered", lambda: True)
    blobs = [blob_of(10 + i, size * MB) for i, (_, size, _) in enumerate(pulls)]
    proxy = await start_cached(total_bandwidth=2 * MB, ktls=True)
    token = await setup(hub, proxy, ca, *blobs)
    for blob in blobs:  # cached first: hits, so that only the cap sets the pace
        await pull(proxy, ca, token, blob)
    took: dict[int, float] = {}

    async def one(index: int, source: str, blob: bytes) -> None:
        took[index] = await pull(proxy, ca, token, blob, source)

    async with trio.open_nursery() as nursery:
        for index, ((source, _, _), blob) in enumerate(zip(pulls, blobs, strict=True)):
            nursery.start_soon(one, index, source, blob)
    for index, (_, _, seconds) in enumerate(pulls):
        assert took[index] == pytest.approx(seconds, rel=0.12), pulls[index]
    assert proxy.server.figures().bandwidth.delayed_bytes["total"] > 0


async def test_a_paced_client_does_not_slow_the_fill_another_follows(
    hub: FakeHub, start_cached: StartProxy, ca: trustme.CA, fill_clock: trio.testing.MockClock
) -> None:
    """127.0.0.1 starts the fill of ``shared`` while pulling another blob at once, so it gets
    half its cap for each (0.5 MB/s); 127.0.0.2 follows that fill at its own full cap. Were the
    fill paced by the client that started it, the follower would get 0.5 MB/s too."""
    shared, other = blob_of(20, 3 * MB), blob_of(21, 3 * MB)
    proxy = await start_cached(client_bandwidth=MB)
    token = await setup(hub, proxy, ca, shared, other)
    store = proxy.proxy.pullthrough.blobs if proxy.proxy.pullthrough else None
    assert store is not None
    took: dict[str, float] = {}
    fill_done_at: list[float] = []

    async def one(name: str, source: str, blob: bytes) -> None:
        took[name] = await pull(proxy, ca, token, blob, source)

    async def watch_fill() -> None:
        while store.size_of(digest_of(shared)[7:]) is None:  # noqa: ASYNC110 (a probe)
            await trio.sleep(0.05)
        fill_done_at.append(trio.current_time() - started)

    # the upstream holds the fill after its first bytes until the follower has joined it
    stall = hub.stall_blob(digest_of(shared), after=100_000)
    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(one, "starter", "127.0.0.1", shared)
        nursery.start_soon(one, "sibling", "127.0.0.1", other)
        await stall.reached.wait()
        assert store.fills, "the fill should be under way"
        nursery.start_soon(watch_fill)
        nursery.start_soon(one, "follower", OTHER, shared)
        await trio.sleep(0.1)
        stall.release.set()
    assert took["starter"] > 5.5  # about 0.5 MB/s
    assert took["follower"] < 3.5  # about its cap of 1 MB/s: the fill did not hold it back
    assert fill_done_at[0] < 1.0  # the fill ran at the upstream's pace, paced by nobody


async def test_no_caps_by_default_no_waits(
    hub: FakeHub, start_cached: StartProxy, ca: trustme.CA, idle_clock: trio.testing.MockClock
) -> None:
    """Nothing waits on a timer: the clock, moving only after a whole second of real idleness,
    stands still. (With a clock that jumps at once, the miss's disk thread let it jump to the
    next timer 10 s away, and CI counted that as a wait.)"""
    blob = blob_of(3, 3 * MB)
    proxy = await start_cached()
    assert proxy.server.pacer is None  # nothing in the send path at all
    token = await setup(hub, proxy, ca, blob)
    assert await pull(proxy, ca, token, blob) < 0.1
    assert await pull(proxy, ca, token, blob) < 0.1
    assert proxy.server.figures().bandwidth.delayed_bytes == {}


async def test_the_status_page_shows_the_caps(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA
) -> None:
    proxy = await start_proxy(client_bandwidth=10 * 1024 * 1024, total_bandwidth=25 * MB)
    page = (await fetch(proxy.url + "/", ca)).body.decode()
    assert "Bandwidth caps" in page
    assert "10 MiB/s per client, 23.8 MiB/s in all; 0 addresses paced now" in page
    plain = await start_proxy()
    assert "Bandwidth caps" not in (await fetch(plain.url + "/", ca)).body.decode()


async def test_a_client_leaving_while_paced_leaves_nothing_queued(
    hub: FakeHub, start_cached: StartProxy, ca: trustme.CA, autojump_clock: trio.testing.MockClock
) -> None:
    """One of two clients under the total hangs up mid-blob: its queued piece goes away with
    it, and the other gets the whole total from then on."""
    blobs = [blob_of(30, 3 * MB), blob_of(31, 3 * MB)]
    proxy = await start_cached(total_bandwidth=2 * MB)
    token = await setup(hub, proxy, ca, *blobs)
    for blob in blobs:
        await pull(proxy, ca, token, blob)
    auth = [("authorization", f"Bearer {token}")]
    took: list[float] = []

    async def stay() -> None:
        took.append(await pull(proxy, ca, token, blobs[1], OTHER))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stay)
        leaver = await connect_from("127.0.0.1", proxy, ca)
        await leaver.send_request("GET", f"/v2/library/alpine/blobs/{digest_of(blobs[0])}", auth)
        assert (await leaver.receive_head()).status_code == 200
        await leaver.receive_body(limit=500_000)
        await leaver.aclose()
    # about 0.5 s sharing (1 MB/s each), then the remaining ~2.5 MB at 2 MB/s
    assert 1.5 < took[0] < 2.2
    pacer = proxy.server.pacer
    assert pacer is not None and pacer.queued() == 0
    assert proxy.server.figures().bandwidth.paced_clients == 0
