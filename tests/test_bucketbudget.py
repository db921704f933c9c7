"""The bucket's size budget (``--cache-store-size``): the sweep's decision as tables, and the
sweeps, leases and access times against moto's S3 server (the fixtures of ``conftest``)."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing
import trustme

from hubproxy.cache.bucket import ACCESS_EVERY, LEASE_RENEW, LEASE_TTL, SWEEP_EVERY, BucketBudget
from hubproxy.cache.objects import (
    ObjectStore,
    S3Objects,
    blob_key,
    open_object_store,
    parse_store_url,
)
from hubproxy.cache.shared import SharedStore
from hubproxy.cli import load_settings
from hubproxy.policy.bucketbudget import (
    CLEAN_AFTER,
    Lease,
    Listed,
    access_key,
    blob_digest,
    lease_body,
    lease_key,
    low_water,
    plan_sweep,
    read_lease,
    still_evictable,
)
from hubproxy.settings import UsageError
from tests.conftest import TLSFiles
from tests.fakehub import FakeHub, fetch, make_layer
from tests.registry_client import RegistryClient
from tests.test_cachestore import (
    bucket,
    on_bucket,
    pull,
    run_instance,
    shared_of,
)
from tests.test_operations import metric_samples, sample

__all__ = ["bucket"]  # the fixture, shared with test_cachestore (moto_url: conftest)

obstore = pytest.importorskip("obstore")


def hexes(n: int) -> list[str]:
    return [hashlib.sha256(bytes([i])).hexdigest() for i in range(n)]


A, B, C, D = hexes(4)


def blob(digest: str, size: int, modified: float) -> Listed:
    return (blob_key(digest), size, modified)


def marker(digest: str, modified: float) -> Listed:
    return (access_key(digest), 0, modified)


def lease(digest: str, expires: float, holder: str = "h1") -> Lease:
    return Lease(lease_key(digest, holder), digest, expires)


# -- the decision ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("blobs", "markers", "leases", "budget", "evict", "held"),
    [
        # within the budget: nothing, however old
        ([blob(A, 40, 1), blob(B, 60, 2)], [], [], 100, (), ()),
        # over: the oldest first, down to a tenth below the budget (90)
        ([blob(A, 40, 1), blob(B, 40, 2), blob(C, 40, 3)], [], [], 100, (A,), ()),
        ([blob(A, 40, 3), blob(B, 40, 2), blob(C, 40, 1)], [], [], 100, (C,), ()),
        # down to the low water, not just under the budget: 101 -> 60
        ([blob(A, 41, 1), blob(B, 30, 2), blob(C, 30, 3)], [], [], 100, (A,), ()),
        ([blob(A, 10, 1), blob(B, 30, 2), blob(C, 61, 3)], [], [], 100, (A, B), ()),
        # an access marker makes an old blob recent
        ([blob(A, 40, 1), blob(B, 40, 2), blob(C, 40, 3)], [marker(A, 9)], [], 100, (B,), ()),
        # a marker older than the blob's commit changes nothing
        ([blob(A, 40, 5), blob(B, 40, 2), blob(C, 40, 3)], [marker(A, 1)], [], 100, (B,), ()),
        # a live lease is skipped however old; the next oldest goes instead
        ([blob(A, 40, 1), blob(B, 40, 2), blob(C, 40, 3)], [], [lease(A, 11)], 100, (B,), (A,)),
        # an expired one protects nothing
        ([blob(A, 40, 1), blob(B, 40, 2), blob(C, 40, 3)], [], [lease(A, 10)], 100, (A,), ()),
        # every blob leased: over the budget, nothing evicted
        ([blob(A, 80, 1), blob(B, 80, 2)], [], [lease(A, 99), lease(B, 99, "h2")], 100, (), (A, B)),
        # a budget below one blob: everything not leased goes
        ([blob(A, 5, 1), blob(B, 5, 2), blob(C, 5, 3)], [], [lease(B, 99)], 1, (A, C), (B,)),
        # the same times: by digest, so every instance picks the same ones
        ([blob(B, 40, 1), blob(A, 40, 1), blob(C, 40, 1)], [], [], 100, (min(A, B, C),), ()),
    ],
)
def test_a_sweep_evicts_the_least_recently_used_not_leased(
    blobs: list[Listed],
    markers: list[Listed],
    leases: list[Lease],
    budget: int,
    evict: tuple[str, ...],
    held: tuple[str, ...],
) -> None:
    plan = plan_sweep(blobs, markers, leases, budget, now=10.0)
    assert (plan.evict, plan.held) == (evict, held)
    assert plan.total == sum(size for _, size, _ in blobs)
    sizes = {blob_digest(key): size for key, size, _ in blobs}
    assert plan.kept == plan.total - sum(sizes[d] for d in evict)
    if plan.total > budget and not held:
        assert plan.kept <= low_water(budget)


def test_stale_objects_are_cleaned_and_foreign_ones_left() -> None:
    blobs = [
        blob(A, 50, 1),
        blob(B, 50, 2),
        ("blobs/sha256/zz/" + C, 999, 0),  # a wrong shard: not ours
        ("blobs/sha256/" + C[:2] + "/" + C + ".partial", 999, 0),
    ]
    markers = [marker(A, 3), marker(D, 3), ("access/notahex", 0, 0)]
    leases = [lease(B, 10 - CLEAN_AFTER), lease(C, 11 - CLEAN_AFTER), lease(D, 50)]
    plan = plan_sweep(blobs, markers, leases, budget=60, now=10.0)
    assert plan.total == 100 and plan.evict == (B,)  # A was read at 3
    # D's marker (no blob), B's lease (expired long ago); C's lease expired only just: kept (its
    # holder may be renewing it); B's marker: it has none
    assert plan.stale == tuple(sorted([access_key(D), lease_key(B, "h1")]))
    evicting_a_marked = plan_sweep(blobs, markers, [], budget=10, now=10.0)
    assert evicting_a_marked.evict == (B, A)
    assert access_key(A) in evicting_a_marked.stale


@pytest.mark.parametrize(
    ("key", "digest"),
    [
        (blob_key(A), A),
        (f"blobs/sha256/{A[:2]}/{A}/x", None),
        (f"blobs/sha256/{B[:2]}/{A}", None),
        (f"blobs/sha512/{A[:2]}/{A}", None),
        (f"blobs/sha256/{A[:2]}/{A.upper()}", None),
        ("state/state.db", None),
    ],
)
def test_only_blob_keys_name_blobs(key: str, digest: str | None) -> None:
    assert blob_digest(key) == digest


@pytest.mark.parametrize(
    ("key", "body", "expires"),
    [
        (f"leases/{A}/h1", lease_body(12.5), 12.5),
        (f"leases/{A}/h1", b"garbage", 0.0),  # protects nothing: cleaned
        (f"leases/{A}/h1", b"nan", 0.0),
        (f"leases/{A}/h1", b"\xff", 0.0),
        (f"leases/{A}", lease_body(12.5), None),  # no holder
        ("leases/xyz/h1", lease_body(12.5), None),
        (f"other/{A}/h1", lease_body(12.5), None),
    ],
)
def test_lease_objects_read_as_leases(key: str, body: bytes, expires: float | None) -> None:
    found = read_lease(key, body)
    assert (found.expires if found is not None else None) == expires
    if found is not None:
        assert (found.key, found.digest) == (key, A)


@pytest.mark.parametrize("holder", ["", "a/b", "x" * 65, "é"])
def test_a_lease_holder_must_fit_in_a_key(holder: str) -> None:
    with pytest.raises(ValueError, match="holder"):
        lease_key(A, holder)


@pytest.mark.parametrize(
    ("evict", "expired", "now", "left"),
    [
        ((A, B), [], [], (A, B)),
        ((A, B), [], [lease_key(A, "late")], (B,)),  # a read began since the listing
        ((A, B), [lease_key(A, "dead")], [lease_key(A, "dead")], (A, B)),
        ((A, B), [lease_key(A, "dead")], [lease_key(A, "dead"), lease_key(A, "x")], (B,)),
    ],
)
def test_blobs_leased_since_the_listing_are_not_deleted(
    evict: tuple[str, ...], expired: list[str], now: list[str], left: tuple[str, ...]
) -> None:
    assert still_evictable(evict, expired, now) == left


def test_the_budget_is_a_size_of_the_cache_store() -> None:
    _, config = load_settings(["--cache-store", "s3://b/p", "--cache-store-size", "500G"])
    assert config.cache_store_size == 500 << 30
    assert load_settings(["--cache-store", "s3://b/p"])[1].cache_store_size is None
    with pytest.raises(UsageError, match="--cache-store-size needs --cache-store"):
        load_settings(["--cache-store-size", "500G"])
    with pytest.raises(UsageError, match="no unit"):
        load_settings(["--cache-store", "s3://b/p", "--cache-store-size", "500"])


# -- against the moto server ----------------------------------------------------------------


def blobs_in(store: ObjectStore) -> dict[str, int]:
    return {digest: size for key, size in store.list("blobs") if (digest := blob_digest(key))}


def put_blobs(store: ObjectStore, scratch: Path, sizes: list[int]) -> list[str]:
    """Commit blobs of these sizes (random bytes), in order; their digests."""
    digests = []
    for i, size in enumerate(sizes):
        data = hashlib.sha256(f"{scratch}{i}".encode()).digest() * (size // 32 + 1)
        scratch.write_bytes(data[:size])
        digest = hashlib.sha256(data[:size]).hexdigest()
        assert store.put_new(blob_key(digest), scratch)
        digests.append(digest)
    return digests


@pytest.fixture
def store(bucket: str, moto_url: str) -> ObjectStore:
    return open_object_store(bucket, moto_url)


async def test_a_blob_read_by_another_instance_is_not_evicted(
    nursery: trio.Nursery, store: ObjectStore, tmp_path: Path
) -> None:
    digests = put_blobs(store, tmp_path / "scratch", [3000, 4000, 5000])
    reading, sweeping = SharedStore(store), SharedStore(store)
    reader = BucketBudget(reading, 1_000_000, holder="reader")
    sweeper = BucketBudget(sweeping, 1)  # no blob fits: all would go
    cancel = trio.CancelScope()
    ended = trio.Event()

    async def read(*, task_status: trio.TaskStatus[None]) -> None:
        with cancel:
            async with trio.open_nursery() as inner:
                await inner.start(reader.hold_lease, digests[0])
                task_status.started()
                await trio.sleep_forever()
        ended.set()

    await nursery.start(read)
    assert [key for key, _ in store.list("leases")] == [lease_key(digests[0], "reader")]
    plan = await sweeper.sweep()
    assert plan is not None and plan.held == (digests[0],)
    assert set(plan.evict) == set(digests[1:])
    assert blobs_in(store) == {digests[0]: 3000}
    assert sweeper.evicted == 2 and sweeper.bucket_bytes == 3000
    cancel.cancel()  # the read ends: its lease is deleted
    with trio.fail_after(10):
        await ended.wait()
    assert store.list("leases") == [] and reader.held == {}
    await sweeper.sweep()
    assert blobs_in(store) == {}


async def test_an_expired_lease_protects_nothing_and_a_renewed_one_does(
    nursery: trio.Nursery, store: ObjectStore, tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """The lease expiries by a wall clock the test moves (the instances' clocks agree), the
    renewals by trio's clock, jumped."""
    wall = [1_000_000.0]
    digests = put_blobs(store, tmp_path / "scratch", [3000, 3000])
    live, dead = digests
    # another instance died while reading ``dead``: its lease was never deleted
    store.put_bytes(lease_key(dead, "gone"), lease_body(wall[0] + LEASE_TTL))
    reader = BucketBudget(SharedStore(store), 1, holder="reader", clock=lambda: wall[0])
    sweeper = BucketBudget(SharedStore(store), 1, clock=lambda: wall[0])
    await nursery.start(reader.hold_lease, live)
    plan = await sweeper.sweep()
    assert plan is not None and set(plan.held) == {live, dead} and plan.evict == ()
    for _ in range(round(2 * LEASE_TTL / LEASE_RENEW)):  # twice the TTL, renewed each time
        wall[0] += LEASE_RENEW
        written = reader.wait_lease_written
        mock_clock.jump(LEASE_RENEW)
        with trio.fail_after(10):
            await written()
    assert reader.held == {lease_key(live, "reader"): wall[0] + LEASE_TTL}
    plan = await sweeper.sweep()
    assert plan is not None and plan.held == (live,) and plan.evict == (dead,)
    assert blobs_in(store) == {live: 3000}
    # the dead one's lease is cleaned once long expired
    assert [key for key, _ in store.list("leases")] == sorted(
        [lease_key(live, "reader"), lease_key(dead, "gone")]
    )
    wall[0] += CLEAN_AFTER
    written = reader.wait_lease_written
    mock_clock.jump(LEASE_RENEW)
    with trio.fail_after(10):
        await written()
    await sweeper.sweep()
    assert [key for key, _ in store.list("leases")] == [lease_key(live, "reader")]


class GatedReads(S3Objects):
    """The moto bucket, whose blob reads wait at a gate the test opens (a read under way)."""

    def __init__(self, url: str, endpoint: str) -> None:
        super().__init__(parse_store_url(url), endpoint)
        self.reading = threading.Event()
        self.gate = threading.Event()

    def chunks(self, key: str) -> Iterator[bytes]:
        if key.startswith("blobs/"):
            self.reading.set()
            self.gate.wait(30)
        yield from super().chunks(key)


async def start_gated_read(
    nursery: trio.Nursery,
    hub: FakeHub,
    ca: trustme.CA,
    tls_files: TLSFiles,
    directory: Path,
    bucket: str,
    moto_url: str,
    store: ObjectStore,
) -> tuple[SharedStore, GatedReads, str, bytes, trio.Event]:
    """An instance with a budget whose client's GET of a blob only the bucket holds is under
    way, its read from the bucket waiting at the gate: the store, the gate, the digest, the
    blob and an event set once the client got all of it (and checked it)."""
    layer = make_layer(31, 50_000)
    hub.add_image("library/x", "latest", [layer])
    digest = hashlib.sha256(layer).hexdigest()
    (directory / "layer").write_bytes(layer)
    store.put_new(blob_key(digest), directory / "layer")
    proxy, _ = await run_instance(
        nursery,
        hub,
        tls_files,
        cache_store_size=10_000_000,
        **on_bucket(bucket, moto_url, directory / "one"),
    )
    shared = shared_of(proxy)
    gated = GatedReads(bucket, moto_url)
    shared.objects = gated
    done = trio.Event()

    async def client() -> None:
        answer = await RegistryClient(proxy.url, ca).request(f"/v2/library/x/blobs/sha256:{digest}")
        assert answer.status == 200 and answer.complete and answer.body == layer
        done.set()

    nursery.start_soon(client)
    await trio.to_thread.run_sync(gated.reading.wait, 30)
    return shared, gated, digest, layer, done


async def test_a_read_that_loses_its_blob_to_a_sweep_finishes_from_the_upstream(
    nursery: trio.Nursery,
    hub: FakeHub,
    ca: trustme.CA,
    tls_files: TLSFiles,
    tmp_path: Path,
    bucket: str,
    moto_url: str,
    store: ObjectStore,
) -> None:
    """The race leases leave open: a sweep that looked at the leases just before this read
    wrote its own deletes the blob as the read begins."""
    shared, gated, digest, _layer, done = await start_gated_read(
        nursery, hub, ca, tls_files, tmp_path, bucket, moto_url, store
    )
    store.delete(blob_key(digest))
    gated.gate.set()
    with trio.fail_after(10):
        await done.wait()  # the whole blob, verified: finished from the upstream
        await shared.wait_idle()
    assert shared.reads == 0 and store.list("leases") == []


async def test_a_read_from_the_bucket_holds_a_lease_while_it_lasts(
    nursery: trio.Nursery,
    hub: FakeHub,
    ca: trustme.CA,
    tls_files: TLSFiles,
    tmp_path: Path,
    bucket: str,
    moto_url: str,
    store: ObjectStore,
) -> None:
    shared, gated, digest, layer, done = await start_gated_read(
        nursery, hub, ca, tls_files, tmp_path, bucket, moto_url, store
    )
    assert shared.budget is not None
    assert [key for key, _ in store.list("leases")] == [lease_key(digest, shared.budget.holder)]
    sweeper = BucketBudget(SharedStore(store), 1)  # another instance: no blob fits
    plan = await sweeper.sweep()
    assert plan is not None and plan.held == (digest,) and blobs_in(store) == {digest: len(layer)}
    gated.gate.set()
    with trio.fail_after(10):
        await done.wait()
        await shared.wait_idle()
    assert store.list("leases") == []
    assert shared.reads == 1
    await sweeper.sweep()  # no longer read: it goes
    assert blobs_in(store) == {}


async def test_a_stream_of_distinct_blobs_keeps_the_bucket_within_its_budget(
    nursery: trio.Nursery,
    hub: FakeHub,
    ca: trustme.CA,
    tls_files: TLSFiles,
    tmp_path: Path,
    bucket: str,
    moto_url: str,
    store: ObjectStore,
) -> None:
    budget = 45_000  # one image's layer fits, not two: every pull after the first evicts
    layers = {}
    for i in range(3):
        layer = make_layer(40 + i, 30_000)
        layers[hashlib.sha256(layer).hexdigest()] = i
        hub.add_image(f"library/s{i}", "latest", [layer])
    proxy, _ = await run_instance(
        nursery,
        hub,
        tls_files,
        cache_store_size=budget,
        **on_bucket(bucket, moto_url, tmp_path / "one"),
    )
    shared = shared_of(proxy)
    budgeted = shared.budget
    assert budgeted is not None
    for i in range(3):
        await pull(proxy, ca, f"library/s{i}", "latest")
        with trio.fail_after(10):
            await shared.wait_idle()  # its commits, and the sweep they call for
        assert 0 < sum(blobs_in(store).values()) <= budget
    assert shared.commits == 6 and budgeted.evicted >= 2
    latest = blobs_in(store)
    assert budgeted.bucket_bytes == sum(latest.values())
    # a hit is an access, written to the store once per ACCESS_EVERY
    (kept,) = (digest for digest in latest if digest in layers)  # one layer fits
    client = RegistryClient(proxy.url, ca)
    answer = await client.request(f"/v2/library/s{layers[kept]}/blobs/sha256:{kept}")
    assert answer.status == 200 and answer.complete
    with trio.fail_after(10):
        await budgeted.wait_marked()
    assert [key for key, _ in store.list("access")] == [access_key(kept)]
    page = await fetch(proxy.url + "/metrics", ca)
    samples = metric_samples(page.body.decode())
    assert sample(samples, "hubproxy_store_evicted_total") == budgeted.evicted
    assert sample(samples, "hubproxy_store_bytes") == sum(latest.values())
    assert sample(samples, "hubproxy_store_limit_bytes") == budget


async def test_accesses_are_written_once_per_interval(
    store: ObjectStore, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    budget = BucketBudget(SharedStore(store), 1_000_000)
    # no sweep: A and B are not in the bucket, so a sweep (the one at start ran in a thread
    # beside these writes) deletes their markers as stale, and the listing below missed one
    # about one run in six
    budget.periodic = False
    await nursery.start(budget.run)
    for _ in range(3):
        budget.accessed(A)
        budget.accessed(B)
    await budget.wait_marked()
    assert [key for key, _ in store.list("access")] == sorted([access_key(A), access_key(B)])
    assert budget.markers_written == 2
    await trio.sleep(ACCESS_EVERY / 2)
    budget.accessed(A)  # within the interval: not written again
    await budget.wait_marked()
    assert budget.markers_written == 2
    await trio.sleep(ACCESS_EVERY / 2)
    budget.accessed(A)
    await budget.wait_marked()
    assert budget.markers_written == 3


async def test_the_bucket_is_swept_at_start_and_on_a_schedule(
    nursery: trio.Nursery, store: ObjectStore, tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    budget = BucketBudget(SharedStore(store), 1)
    await nursery.start(budget.run)
    await trio.testing.wait_all_tasks_blocked()  # the sweep at start, in its thread
    assert await budget.sweep() is None  # it was under way: this waited for it
    assert budget.sweeps >= 1
    put_blobs(store, tmp_path / "scratch", [100, 200])
    mock_clock.jump(SWEEP_EVERY)
    await trio.testing.wait_all_tasks_blocked()
    assert await budget.sweep() is None  # the scheduled one was under way
    assert blobs_in(store) == {} and budget.evicted == 2
    # a worker other than the first of --workers N sweeps only after its commits
    other = BucketBudget(SharedStore(store), 1)
    other.periodic = False
    await nursery.start(other.run)
    put_blobs(store, tmp_path / "scratch", [300])
    mock_clock.jump(SWEEP_EVERY)
    await trio.testing.wait_all_tasks_blocked()
    assert await budget.sweep() is None  # the first one's
    assert other.sweeps == 0 and budget.evicted == 3
