"""Manifests in flight: one upstream GET for concurrent misses, a cap on the bytes buffered from
upstreams, and bodies sent in bounded slices of one shared buffer (issue 12, case 1)."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import cast

import h11
import pytest
import trio
import trio.testing
import trustme

from hubproxy.cache.inflight import (
    ManifestFetches,
    MemoryBudget,
    Outgoing,
    SendBudget,
    SharedBodies,
)
from hubproxy.cache.manifests import CachedManifest, accepted_types
from hubproxy.cache.pullthrough import MANIFEST_SLICE, send_sliced
from hubproxy.net.server import AccessRecord, ClientConnection, ClientResponse, _response_head
from hubproxy.net.settings import ListenerSettings
from hubproxy.policy.cachepolicy import FetchKey, confirmation_key
from hubproxy.policy.errors import MirrorBusy
from hubproxy.policy.sending import SendLimits
from tests.conftest import StartProxy
from tests.fakehub import MEDIA_DOCKER_MANIFEST, FakeHub, FetchResult, fetch, make_layer
from tests.registry_client import RegistryClient
from tests.test_pullthrough import ACCEPT, manifest_gets, pullthrough

ZERO = "sha256:" + "0" * 64
HANG = 30.0  # seconds after which an end-to-end test is hung, not slow


@asynccontextmanager
async def nursery_within(seconds: float) -> AsyncIterator[trio.Nursery]:
    """A nursery whose tasks must all end within ``seconds``: a hang fails the test."""
    with trio.fail_after(seconds):
        async with trio.open_nursery() as nursery:
            yield nursery


async def until(ready: Callable[[], bool], changed: Callable[[], Awaitable[None]]) -> None:
    """Wait, by events, until ``ready()``; ten seconds is a hang, not a slow run."""
    with trio.fail_after(10):
        while not ready():
            await changed()


def key_of(repository: str, reference: str) -> FetchKey:
    accepted = accepted_types([value.encode() for _, value in ACCEPT])
    return FetchKey("", f"/v2/{repository}/manifests/{reference}", accepted)


async def token_for(client: RegistryClient, repository: str) -> str:
    """A pull token for ``repository`` through the mirror, without fetching a manifest."""
    await client.request(f"/v2/{repository}/tags/list")
    return client.tokens[""]


async def get_manifest(base: str, ca: trustme.CA, path: str, token: str) -> FetchResult:
    return await fetch(base + path, ca, headers=[*ACCEPT, ("authorization", f"Bearer {token}")])


# -- coalescing ----------------------------------------------------------------------------------


async def test_concurrent_misses_of_one_manifest_make_one_upstream_get(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    digest = hub.add_image("library/alpine", "3.20", [make_layer(1, 1000)])
    gate = hub.hold_manifest(digest)
    proxy = await start_proxy(cache_dir=str(tmp_path / "cache"), manifest_ttl=0.0)
    fetches = pullthrough(proxy).manifest_fetches
    token = await token_for(RegistryClient(proxy.url, ca), "library/alpine")
    path = "/v2/library/alpine/manifests/3.20"
    results: list[FetchResult] = []

    async def pull() -> None:
        results.append(await get_manifest(proxy.url, ca, path, token))

    async with nursery_within(HANG) as nursery:
        for _ in range(5):
            nursery.start_soon(pull)
        # four wait on the one fetch whose body the upstream holds back
        key = key_of("library/alpine", "3.20")
        await until(lambda: fetches.followers(key) == 4, fetches.wait_changed)
        gate.set()
    assert [r.status for r in results] == [200] * 5
    assert {r.headers["docker-content-digest"] for r in results} == {digest}
    assert len({r.body for r in results}) == 1
    assert manifest_gets(hub, "library/alpine") == 1
    assert proxy.proxy.metrics.manifest_fetches_shared.get() == 4
    assert len(fetches) == 0


async def test_a_follower_with_other_credentials_never_gets_the_private_manifest(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    digest = hub.add_image("acme/secret", "v1", [make_layer(1, 1000)])
    hub.add_user("alice", "s3cret")
    hub.make_private("acme/secret", "alice")
    gate = hub.hold_manifest(digest)
    proxy = await start_proxy(cache_dir=str(tmp_path / "cache"))
    fetches = pullthrough(proxy).manifest_fetches
    alice = await token_for(
        RegistryClient(proxy.url, ca, credentials=("alice", "s3cret")), "acme/secret"
    )
    mallory = await token_for(RegistryClient(proxy.url, ca), "acme/secret")  # anonymous: no grant
    path = "/v2/acme/secret/manifests/v1"
    results: dict[str, FetchResult] = {}

    async def pull(who: str, token: str) -> None:
        results[who] = await get_manifest(proxy.url, ca, path, token)

    key = key_of("acme/secret", "v1")
    async with nursery_within(HANG) as nursery:
        nursery.start_soon(pull, "alice", alice)
        await until(lambda: fetches.current(key) is not None, fetches.wait_changed)
        nursery.start_soon(pull, "mallory", mallory)
        await until(lambda: fetches.followers(key) == 1, fetches.wait_changed)
        gate.set()
    assert results["alice"].status == 200
    assert results["alice"].headers["docker-content-digest"] == digest
    assert results["mallory"].status == 401  # the upstream's own answer to mallory's GET
    assert results["alice"].body not in results["mallory"].body
    assert proxy.proxy.metrics.manifest_fetches_shared.get() == 0
    # mallory waited, then was asked about (HEAD) like any client of a cached manifest
    heads = [s for s in hub.requests if s.method == "HEAD" and s.target == path]
    assert heads


async def test_a_failed_leader_releases_its_followers_to_fetch_themselves(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    digest = hub.add_image("library/alpine", "3.20", [make_layer(1, 1000)])
    direct = RegistryClient(hub.registry_url, ca)
    original = (await direct.request(f"/v2/library/alpine/manifests/{digest}", headers=ACCEPT)).body
    hub.swap_manifest_body(digest, b'{"not": "it"}')  # the leader's answer will not verify
    gate = hub.hold_manifest(digest)
    proxy = await start_proxy(cache_dir=str(tmp_path / "cache"))
    fetches = pullthrough(proxy).manifest_fetches
    token = await token_for(RegistryClient(proxy.url, ca), "library/alpine")
    path = "/v2/library/alpine/manifests/3.20"
    results: dict[str, FetchResult] = {}

    async def pull(who: str) -> None:
        results[who] = await get_manifest(proxy.url, ca, path, token)

    key = key_of("library/alpine", "3.20")
    before = manifest_gets(hub, "library/alpine")
    async with nursery_within(HANG) as nursery:
        nursery.start_soon(pull, "leader")
        await until(lambda: fetches.current(key) is not None, fetches.wait_changed)
        for who in ("one", "two"):
            nursery.start_soon(pull, who)
        await until(lambda: fetches.followers(key) == 2, fetches.wait_changed)
        hub.swap_manifest_body(digest, original)  # the followers' own GETs get the real one
        gate.set()
    assert results["leader"].status == 502
    assert results["one"].status == results["two"].status == 200
    assert results["one"].body == results["two"].body == original
    assert manifest_gets(hub, "library/alpine") - before == 3  # the leader's, then their own


# -- the cap on bytes in flight ----------------------------------------------------------------


async def test_manifest_misses_beyond_the_memory_cap_wait_for_room(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    first = hub.add_image("library/alpine", "a", [make_layer(1, 1000)])
    hub.add_image("library/busybox", "b", [make_layer(2, 1000)])
    gate = hub.hold_manifest(first)
    # smaller than either manifest: each still goes through alone, never two at once
    proxy = await start_proxy(cache_dir=str(tmp_path / "cache"), manifest_memory=100)
    budget = pullthrough(proxy).manifest_memory
    metrics = proxy.proxy.metrics
    results: dict[str, FetchResult] = {}

    async def pull(repository: str, tag: str, address: str) -> None:
        # two client addresses: one address fetches one manifest at a time under this budget
        client = RegistryClient(proxy.url, ca, local_address=address)
        results[tag] = await client.request(f"/v2/{repository}/manifests/{tag}", headers=ACCEPT)

    async with nursery_within(HANG) as nursery:
        nursery.start_soon(pull, "library/alpine", "a", "127.0.0.1")
        await until(lambda: budget.used > 0, budget.wait_changed)  # a's body is on its way
        assert metrics.manifest_bytes_in_flight.get() == budget.used > 100
        nursery.start_soon(pull, "library/busybox", "b", "127.0.0.2")
        await until(lambda: budget.waiting == 1, budget.wait_changed)
        assert "b" not in results
        gate.set()
    assert results["a"].status == results["b"].status == 200
    assert budget.used == budget.waiting == 0
    assert metrics.manifest_bytes_in_flight.get() == 0
    assert metrics.manifest_memory_limit.get() == 100


async def test_the_budget_admits_one_manifest_larger_than_itself_alone() -> None:
    budget = MemoryBudget(10)
    async with budget.hold(4 * 1024 * 1024, patience=1.0):
        assert budget.used == 4 * 1024 * 1024
    assert budget.used == 0


async def test_free_room_is_taken_without_a_schedule_point_and_never_after_a_cancel() -> None:
    """Holding room that is free lets no other task run first (a cached manifest's request goes
    on to its send, the schedule point it has anyway), and is still a cancel point: a caller
    cancelled before it takes nothing."""
    fetches = MemoryBudget(10)
    sends = SendBudget(SendLimits(total=8, per_client=4))
    task = trio.lowlevel.current_task()
    scheduled = task._schedule_points  # what trio.testing.assert_checkpoints reads
    async with fetches.hold(4, patience=1.0), sends.hold("a", outgoing("x", 4), patience=1.0):
        assert (fetches.used, sends.used) == (4, 4)
        assert task._schedule_points == scheduled
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            async with fetches.hold(4, patience=1.0):
                pytest.fail("room taken by a cancelled caller")
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            async with sends.hold("a", outgoing("x", 4), patience=1.0):
                pytest.fail("room taken by a cancelled caller")
    assert (fetches.used, sends.used, fetches.waiting, sends.waiting) == (0, 0, 0, 0)


async def test_a_fetch_that_does_not_fit_gets_503_after_its_patience(
    autojump_clock: trio.testing.MockClock,
) -> None:
    budget = MemoryBudget(10)
    release = trio.Event()

    async def holder() -> None:
        async with budget.hold(8, patience=1.0):
            await release.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(holder)
        await until(lambda: budget.used == 8, budget.wait_changed)
        start = trio.current_time()
        with pytest.raises(MirrorBusy) as raised:
            async with budget.hold(5, patience=30.0):
                pass
        assert trio.current_time() - start == pytest.approx(30.0)
        assert raised.value.status == 503
        assert raised.value.code == "UNAVAILABLE"
        assert (b"retry-after", b"5") in raised.value.headers
        assert budget.waiting == 0
        release.set()
    assert budget.used == 0


async def test_the_budget_serves_waiters_in_order_and_forgets_cancelled_ones() -> None:
    budget = MemoryBudget(10)
    order: list[str] = []
    release = {name: trio.Event() for name in ("a", "b", "c", "d")}

    async def take(name: str, size: int) -> None:
        async with budget.hold(size, patience=60.0):
            order.append(name)
            await release[name].wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(take, "a", 6)
        await until(lambda: order == ["a"], budget.wait_changed)
        nursery.start_soon(take, "b", 8)  # does not fit: waits
        await until(lambda: budget.waiting == 1, budget.wait_changed)
        nursery.start_soon(take, "c", 2)  # would fit, but b came first
        await until(lambda: budget.waiting == 2, budget.wait_changed)
        gives_up = trio.CancelScope()

        async def impatient() -> None:
            with gives_up:
                await take("d", 1)

        nursery.start_soon(impatient)
        await until(lambda: budget.waiting == 3, budget.wait_changed)
        gives_up.cancel()  # a waiter cancelled (its client left) leaves the queue
        await until(lambda: budget.waiting == 2, budget.wait_changed)
        assert order == ["a"]
        release["a"].set()
        await trio.testing.wait_all_tasks_blocked()  # no sockets here: every task has run
        assert sorted(order) == ["a", "b", "c"]  # b and c got in together, d never
        assert budget.used == 10
        release["b"].set()
        release["c"].set()
    assert budget.used == 0


async def test_fetches_release_followers_once_and_forget_the_fetch() -> None:
    fetches = ManifestFetches()
    key = key_of("library/alpine", "latest")
    leader = confirmation_key(b"Bearer a", "", key.path)
    fetch_ = fetches.lead(key, leader)
    manifest = CachedManifest("sha256:" + "0" * 64, "application/json", b"{}")
    got: list[CachedManifest | None] = []

    async def follow() -> None:
        got.append(await fetches.follow(fetch_))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(follow)
        nursery.start_soon(follow)
        await until(lambda: fetches.followers(key) == 2, fetches.wait_changed)
        fetches.finish(fetch_, manifest)
        fetches.finish(fetch_, None)  # the leader's finally: the first call counted
    assert got == [manifest, manifest]
    assert fetches.current(key) is None
    assert len(fetches) == 0


# -- sending --------------------------------------------------------------------------------------


def response_to_a_get(stream: trio.abc.Stream) -> ClientResponse:
    """The response to a manifest GET that a client connection over ``stream`` just read."""
    connection = ClientConnection(
        stream, settings=ListenerSettings(), client_ip="127.0.0.1", scheme="http"
    )
    connection.conn.receive_data(b"GET /v2/a/b/manifests/c HTTP/1.1\r\nhost: mirror\r\n\r\n")
    assert isinstance(connection.conn.next_event(), h11.Request)
    return ClientResponse(connection, AccessRecord("127.0.0.1", "GET", "/"))


async def test_a_manifest_body_goes_out_in_bounded_slices() -> None:
    """Over a stream with no buffering at all, each write the client can see is one slice (the
    first carries the head): a client that stops reading holds one slice, not the manifest."""
    ours, theirs = trio.testing.lockstep_stream_pair()
    response = response_to_a_get(ours)
    body = bytes(range(256)) * (4 * 4096 - 7)  # just under 4 MiB, not a multiple of a slice
    writes: list[int] = []
    reader = h11.Connection(h11.CLIENT)
    reader.send(h11.Request(method="GET", target="/", headers=[("host", "mirror")]))
    reader.send(h11.EndOfMessage())
    received = bytearray()

    async def read() -> None:
        while True:
            data = await theirs.receive_some(16 * 1024 * 1024)
            writes.append(len(data))
            reader.receive_data(bytes(data))
            while (event := reader.next_event()) is not h11.NEED_DATA:
                if isinstance(event, h11.Data):
                    received.extend(event.data)
                if isinstance(event, h11.EndOfMessage):
                    return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        await response.start(200, [(b"content-length", b"%d" % len(body))])
        await send_sliced(response, body)
        await response.finish()
    assert bytes(received) == body
    assert max(writes) <= MANIFEST_SLICE + 256  # a slice, framed (and the head, once)
    assert len(writes) >= len(body) // MANIFEST_SLICE


def test_senders_of_one_manifest_share_one_buffer() -> None:
    seen: list[int] = []
    bodies = SharedBodies(seen.append)
    digest = "sha256:" + "1" * 64
    one = CachedManifest(digest, "application/json", b"x" * 1000)
    two = CachedManifest(digest, "application/json", bytes(bytearray(b"x" * 1000)))  # a copy
    with bodies.share(one) as first, bodies.share(two) as second:
        assert first is one.body
        assert second is one.body  # the copy is not kept
        assert bodies.bytes == 1000
    assert bodies.bytes == 0
    assert seen == [1000, 1000, 1000, 0]


# -- the bound on bodies held for sending --------------------------------------------------------


def outgoing(digest: str, size: int) -> Outgoing:
    return Outgoing("library/x", digest, "application/json", size, b"x" * size)


async def test_a_sender_that_does_not_fit_drops_its_body_and_gets_503_after_its_patience(
    autojump_clock: trio.testing.MockClock,
) -> None:
    waits: list[str] = []
    budget = SendBudget(
        SendLimits(total=10, per_client=6),
        on_wait=lambda: waits.append("wait"),
        on_timeout=lambda: waits.append("timeout"),
    )
    release = trio.Event()

    async def holder() -> None:
        async with budget.hold("a", outgoing("sha256:1", 5), patience=1.0):
            await release.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(holder)
        await until(lambda: budget.used == 5, budget.wait_changed)
        late = outgoing("sha256:2", 2)
        start = trio.current_time()
        with pytest.raises(MirrorBusy) as raised:
            async with budget.hold("a", late, patience=30.0):
                pass
        assert trio.current_time() - start == pytest.approx(30.0)
        assert late.body is None  # it waited without the body
        assert raised.value.status == 503
        assert raised.value.code == "UNAVAILABLE"
        assert (b"retry-after", b"5") in raised.value.headers
        assert waits == ["wait", "timeout"]
        assert budget.waiting == 0
        # another client is let in at once, its body kept
        other = outgoing("sha256:3", 5)
        async with budget.hold("b", other, patience=0.0):
            assert budget.used == 10
            assert other.body is not None
        release.set()
    assert budget.used == budget.waiting == 0


async def test_senders_of_one_manifest_count_once_and_waiters_go_in_when_room_is_given_back() -> (
    None
):
    budget = SendBudget(SendLimits(total=8, per_client=4))
    release = trio.Event()
    order: list[str] = []

    async def send(client: str, digest: str, size: int) -> None:
        async with budget.hold(client, outgoing(digest, size), patience=60.0):
            order.append(f"{client}:{digest}")
            await release.wait()

    async with nursery_within(HANG) as nursery:
        for client in "abc":
            nursery.start_soon(send, client, "x", 4)
        await until(lambda: len(order) == 3, budget.wait_changed)
        assert budget.used == 4  # one body, three senders
        assert budget.client_used("a") == 4
        nursery.start_soon(send, "a", "y", 4)  # over a's share
        await until(lambda: budget.waiting == 1, budget.wait_changed)
        nursery.start_soon(send, "d", "z", 4)  # not held up behind a
        await until(lambda: len(order) == 4, budget.wait_changed)
        assert order[-1] == "d:z"
        assert budget.used == 8
        release.set()
    assert order[-1] == "a:y"
    assert budget.used == budget.waiting == 0


async def test_one_address_asking_many_large_manifests_without_reading_holds_only_its_share(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    """A share of 4 MiB holds one 3 MiB manifest of 127.0.0.2; the next one fetched waits for
    room to be sent, and the other four are not even fetched while it does."""
    size = 3 * 1024 * 1024
    tags = [f"t{i}" for i in range(6)]
    for i, tag in enumerate(tags):
        hub._put_manifest("library/big", tag, MEDIA_DOCKER_MANIFEST, big_manifest(i, size))
    hub._put_manifest("library/small", "v", MEDIA_DOCKER_MANIFEST, big_manifest(99, 4096))
    proxy = await start_proxy(
        tls=False, cache_dir=str(tmp_path / "cache"), manifest_memory=16 * 1024 * 1024
    )
    budget = pullthrough(proxy).manifest_sending
    gauge = proxy.proxy.metrics.manifest_bytes_sending
    assert budget.limits.per_client == 4 * 1024 * 1024
    token = await token_for(RegistryClient(proxy.url, ca), "library/big")
    seen: list[int] = []

    async def watch() -> None:
        while True:
            seen.append(budget.client_used("127.0.0.2"))
            await budget.wait_changed()

    socks = []
    async with nursery_within(HANG) as nursery:
        nursery.start_soon(watch)
        for tag in tags:
            socks.append(await never_reading(proxy.port, f"/v2/library/big/manifests/{tag}", token))
        fetch_waits = proxy.proxy.metrics.manifest_fetch_waits
        await until(lambda: fetch_waits.get() == 5 and budget.waiting == 1, budget.wait_changed)
        assert big_manifest_gets(hub) == 2  # held, and waiting to be sent: no more asked
        one = budget.client_used("127.0.0.2")
        assert size - 1024 < one == gauge.get() <= size  # one manifest's body, no more
        # another address is answered while they wait
        victim = RegistryClient(proxy.url, ca)
        answer = await victim.request("/v2/library/small/manifests/v", headers=ACCEPT)
        assert answer.status == 200
        assert budget.waiting == 1 and fetch_waits.get() == 5
        for sock in socks:
            sock.close()
        await until(lambda: budget.used == budget.waiting == 0, budget.wait_changed)
        nursery.cancel_scope.cancel()
    assert max(seen) == one  # never more than one of them held at once
    assert proxy.proxy.metrics.manifest_send_waits.get() >= 1


def big_manifest_gets(hub: FakeHub) -> int:
    """The upstream GETs of the big manifests (with a token: not the anonymous probes)."""
    return sum(
        1
        for s in hub.requests
        if s.method == "GET"
        and s.target.startswith("/v2/library/big/manifests/t")
        and "authorization" in s.headers
    )


def big_manifest(seed: int, size: int) -> str:
    doc = {
        "schemaVersion": 2,
        "mediaType": MEDIA_DOCKER_MANIFEST,
        "config": {"mediaType": "application/octet-stream", "size": 2, "digest": ZERO},
        "layers": [],
        "annotations": {"n": str(seed), "pad": "x" * (size - 400)},
    }
    return json.dumps(doc)


async def never_reading(port: int, path: str, token: str) -> trio.socket.SocketType:
    """A request from 127.0.0.2 whose client never reads the answer (a small receive buffer,
    so the kernel takes little of it)."""
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    await sock.bind(("127.0.0.2", 0))
    await sock.connect(("127.0.0.1", port))
    accept = ACCEPT[0][1]
    await sock.send(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: {accept}\r\n"
        f"Authorization: Bearer {token}\r\n\r\n".encode()
    )
    return sock


async def read_answer(sock: trio.socket.SocketType) -> tuple[bytes, bytes]:
    """The status line and body of the one answer on ``sock`` (Content-Length framed)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += await sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        more = await sock.recv(65536)
        assert more, "the answer was cut"
        body += more
    return head.split(b"\r\n", 1)[0], body


async def test_senders_that_waited_without_their_body_send_it_whole_once_let_in(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    size = 1536 * 1024
    texts = {f"t{i}": big_manifest(i, size) for i in range(4)}
    for tag, text in texts.items():
        hub._put_manifest("library/big", tag, MEDIA_DOCKER_MANIFEST, text)
    proxy = await start_proxy(
        tls=False, cache_dir=str(tmp_path / "cache"), manifest_memory=16 * 1024 * 1024
    )
    budget = pullthrough(proxy).manifest_sending
    token = await token_for(RegistryClient(proxy.url, ca), "library/big")
    socks = {
        tag: await never_reading(proxy.port, f"/v2/library/big/manifests/{tag}", token)
        for tag in texts
    }
    answers: dict[str, tuple[bytes, bytes]] = {}

    async def read(tag: str) -> None:
        answers[tag] = await read_answer(socks[tag])

    async with nursery_within(HANG) as nursery:
        # two fit in the address's 4 MiB share; the third waits, its body dropped, and the
        # fourth is not fetched while it does
        await until(
            lambda: budget.waiting == 1 and budget.client_used("127.0.0.2") > size,
            budget.wait_changed,
        )
        assert big_manifest_gets(hub) == 3
        assert proxy.proxy.metrics.manifest_fetch_waits.get() >= 1
        assert budget.client_used("127.0.0.2") <= budget.limits.per_client
        for tag in texts:  # now the client reads: each waiter goes in as room is given back
            nursery.start_soon(read, tag)
    for sock in socks.values():
        sock.close()
    for tag, text in texts.items():
        status, body = answers[tag]
        assert status.startswith(b"HTTP/1.1 200 ")
        assert body == text.encode()
    assert proxy.proxy.metrics.manifest_send_waits.get() == 1
    assert budget.used == budget.waiting == 0


async def test_one_address_at_its_fetch_share_never_holds_up_another() -> None:
    """Issue 12 case 1: one address's many manifest misses take at most its share of the bytes
    in flight; another address's miss starts at once, ahead of the first address's queue."""
    budget = MemoryBudget(32, share=8)
    order: list[str] = []
    release = trio.Event()

    async def take(name: str, client: str, size: int) -> None:
        async with budget.hold(size, patience=60.0, client=client):
            order.append(name)
            await release.wait()

    async with trio.open_nursery() as nursery:
        for i in range(4):
            nursery.start_soon(take, f"a{i}", "10.0.0.1", 4)
        await until(lambda: budget.waiting == 2, budget.wait_changed)
        assert len(order) == 2 and budget.used_by == {"10.0.0.1": 8}
        nursery.start_soon(take, "b0", "10.0.0.2", 4)
        await until(lambda: "b0" in order, budget.wait_changed)
        assert budget.waiting == 2  # a's two others still wait: b0 went past them
        release.set()
    assert budget.used == 0 and budget.used_by == {}


@pytest.mark.parametrize("private", [b"location", b"set-cookie"])
async def test_a_response_head_is_remembered_unless_it_carries_a_location_or_a_cookie(
    private: bytes,
) -> None:
    """Answers with the same head share h11's event for it (made and validated once); one with
    a Location (a signed CDN address) or a cookie is made afresh and kept nowhere."""

    async def answer(headers: list[tuple[bytes, bytes]]) -> bytes:
        ours, theirs = trio.testing.memory_stream_pair()
        response = response_to_a_get(ours)
        await response.start(200, headers)
        await response.send(b"{}")
        await response.finish()
        return bytes(await theirs.receive_some())

    _response_head.cache_clear()
    plain = [(b"content-type", b"application/json"), (b"content-length", b"2")]
    first, second = await answer(plain), await answer(plain)
    assert first == second and first.endswith(b"\r\n\r\n{}")
    assert _response_head.cache_info()[:2] == (1, 1)  # (hits, misses)
    secret = (private, b"https://cdn.example/blob?signature=s3cret")
    for _ in range(2):
        assert b"s3cret" in await answer([*plain, secret])
    assert _response_head.cache_info().currsize == 1
    # a head that cannot be a key (a bytearray value) is answered all the same, made afresh
    unkeyed = await answer([*plain, (b"x-value", cast(bytes, bytearray(b"mutable")))])
    assert b"x-value: mutable\r\n" in unkeyed
    assert _response_head.cache_info().currsize == 1
