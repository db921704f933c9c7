"""The blob cache under abuse (issue 12): nobody queues behind a miss that is not filling the
cache, a stalled registry holds nobody else's pull, slow readers cannot push the cache past
``--cache-size``, and a blob damaged on disk is never completed to a client (``cache verify``).

Stalls are the fake hub's ``stall_blob``: held until the test releases them, so a request that
wrongly waited would hang; ``fail_after`` only turns such a hang into a failure."""

from __future__ import annotations

import hashlib
import io
import os
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio
import trio.testing
import trustme

from hubproxy.cache import store as store_module
from hubproxy.cache.store import BlobStore, FillState
from hubproxy.cli import cache_command, main
from hubproxy.policy.cachepolicy import hit_needs_hashing
from hubproxy.policy.errors import CacheFillFailed
from hubproxy.policy.registries import Registry
from hubproxy.policy.urls import base_url
from tests.conftest import RunningProxy, StartProxy
from tests.fakehub import FakeHub, fetch, make_layer
from tests.registry_client import RegistryClient
from tests.test_cache import take, until_ended
from tests.test_operations import metric_samples, sample
from tests.wire import WireClient

GUARD = 20  # seconds: only a request that waits for a held transfer gets anywhere near it


def hexdigest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def blob_path(digest: str, registry: str = "") -> str:
    query = f"?ns={registry}" if registry else ""
    return f"/v2/library/alpine/blobs/{digest}{query}"


def store_of(proxy: RunningProxy) -> BlobStore:
    assert proxy.proxy.pullthrough is not None
    return proxy.proxy.pullthrough.blobs


async def bearer(proxy: RunningProxy, ca: trustme.CA, registry: str = "") -> list[tuple[str, str]]:
    """A token for library/alpine (of ``registry``) as a client's Authorization header."""
    client = RegistryClient(proxy.url, ca)
    query = f"?ns={registry}" if registry else ""
    r = await client.request(f"/v2/library/alpine/tags/list{query}")
    assert r.status == 200
    [token] = client.tokens.values()
    return [("authorization", f"Bearer {token}")]


def cdn_gets(hub: FakeHub, digest: str) -> int:
    return sum(
        1
        for s in hub.requests
        if s.server == "cdn" and s.method == "GET" and digest[7:] in s.target
    )


# -- case 3: only a real fill makes others follow it -----------------------------------------


async def test_nobody_waits_for_a_miss_that_is_not_filling_the_cache(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    """A blob larger than the cache streams uncached; while that transfer is held upstream, a
    HEAD and another GET of the same digest are answered (they used to queue behind it)."""
    layer = make_layer(30, 300_000)
    hub.add_image("library/alpine", "3.20", [layer])
    digest = f"sha256:{hexdigest(layer)}"
    stall = hub.stall_blob(digest, after=100_000)
    proxy = await start_proxy(cache_dir=str(tmp_path / "cache"), cache_size=200_000)
    auth = await bearer(proxy, ca)
    first = await WireClient.connect(proxy.url, ca)
    await first.send_request("GET", blob_path(digest), auth)
    assert (await first.receive_head()).status_code == 200
    await stall.reached.wait()
    with trio.fail_after(GUARD):
        head = await fetch(proxy.url + blob_path(digest), ca, method="HEAD", headers=auth)
        assert head.status == 200
        assert head.headers["content-length"] == str(len(layer))
        r = await fetch(proxy.url + blob_path(digest), ca, headers=auth)
        assert r.complete and r.body == layer
    stall.release.set()
    assert await first.receive_body() == layer
    await first.aclose()
    assert store_of(proxy).size_of(hexdigest(layer)) is None  # too large: never cached


async def test_a_miss_follows_a_fill_that_started_after_it_went_upstream(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    """Two misses of one digest: the first one's upstream hangs before answering; the second
    is not held by it, fills the cache, and the first then serves the cached blob."""
    layer = make_layer(31, 500_000)
    hub.add_image("library/alpine", "3.20", [layer])
    digest = f"sha256:{hexdigest(layer)}"
    stall = hub.stall_blob(digest)  # the first CDN GET: no answer until released
    proxy = await start_proxy(cache_dir=str(tmp_path / "cache"))
    auth = await bearer(proxy, ca)
    first = await WireClient.connect(proxy.url, ca)
    await first.send_request("GET", blob_path(digest), auth)
    await stall.reached.wait()
    with trio.fail_after(GUARD):
        r = await fetch(proxy.url + blob_path(digest), ca, headers=auth)
    assert r.complete and r.body == layer
    await proxy.fills_ended()
    store = store_of(proxy)
    assert store.size_of(hexdigest(layer)) == len(layer)
    stall.release.set()
    assert (await first.receive_head()).status_code == 200
    assert await first.receive_body() == layer
    await first.aclose()
    assert store.stats.fills_completed == 1


def ghcr_registry(ghcr: FakeHub) -> Registry:
    return Registry("ghcr.io", (base_url(ghcr.registry_url),))


async def test_a_black_holed_registry_never_holds_a_pull_through_another(
    hub: FakeHub, ghcr: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    layer = make_layer(32, 400_000)
    hub.add_image("library/alpine", "3.20", [layer])
    ghcr.add_image("library/alpine", "3.20", [layer])
    digest = f"sha256:{hexdigest(layer)}"
    stall = ghcr.stall_blob(digest)  # ghcr's storage never answers
    proxy = await start_proxy(cache_dir=str(tmp_path / "cache"), registries=(ghcr_registry(ghcr),))
    ghcr_auth = await bearer(proxy, ca, "ghcr.io")
    stuck = await WireClient.connect(proxy.url, ca)
    await stuck.send_request("GET", blob_path(digest, "ghcr.io"), ghcr_auth)
    await stall.reached.wait()
    with trio.fail_after(GUARD):
        r = await fetch(proxy.url + blob_path(digest), ca, headers=await bearer(proxy, ca))
    assert r.complete and r.body == layer
    stall.release.set()
    assert (await stuck.receive_head()).status_code == 200
    assert await stuck.receive_body() == layer
    await stuck.aclose()


async def test_a_stalled_fill_of_one_registry_never_holds_a_pull_through_another(
    hub: FakeHub, ghcr: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    """ghcr's transfer is filling the cache and stalls: a Docker Hub client of the same digest
    gets it from Docker Hub (streamed uncached), not from the stalled fill."""
    layer = make_layer(33, 600_000)
    hub.add_image("library/alpine", "3.20", [layer])
    ghcr.add_image("library/alpine", "3.20", [layer])
    digest = f"sha256:{hexdigest(layer)}"
    stall = ghcr.stall_blob(digest, after=200_000)
    proxy = await start_proxy(cache_dir=str(tmp_path / "cache"), registries=(ghcr_registry(ghcr),))
    ghcr_auth = await bearer(proxy, ca, "ghcr.io")
    filling = await WireClient.connect(proxy.url, ca)
    await filling.send_request("GET", blob_path(digest, "ghcr.io"), ghcr_auth)
    assert (await filling.receive_head()).status_code == 200
    await stall.reached.wait()
    store = store_of(proxy)
    assert hexdigest(layer) in store.fills
    with trio.fail_after(GUARD):
        r = await fetch(proxy.url + blob_path(digest), ca, headers=await bearer(proxy, ca))
    assert r.complete and r.body == layer
    assert cdn_gets(hub, digest) == 1  # from Docker Hub's own storage
    # a client of ghcr.io follows ghcr's fill as before (one upstream transfer)
    follower = await WireClient.connect(proxy.url, ca)
    await follower.send_request("GET", blob_path(digest, "ghcr.io"), ghcr_auth)
    assert (await follower.receive_head()).status_code == 200
    stall.release.set()
    assert await filling.receive_body() == layer
    assert await follower.receive_body() == layer
    await filling.aclose()
    await follower.aclose()
    assert cdn_gets(ghcr, digest) == 1
    await proxy.fills_ended()
    assert store.size_of(hexdigest(layer)) == len(layer)


# -- case 6: slow readers cannot push the cache past its size -----------------------------------


def _put(store: BlobStore, data: bytes) -> str:
    key = hexdigest(data)
    path = store.path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    store._add(key, len(data))
    return key


def test_pinned_and_filling_bytes_count_against_the_limit(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, 25_000)
    store.open()
    first = _put(store, os.urandom(10_000))
    second = _put(store, os.urandom(10_000))
    readers = [store.reader(first), store.reader(second)]  # two slow readers
    assert store.pinned_bytes == 20_000
    assert not store.can_fill(10_000)  # it would take the cache to 30,000 bytes
    assert store.can_fill(5_000)
    readers[0].close()
    assert store.pinned_bytes == 10_000
    assert store.can_fill(10_000)
    fill = store.start_fill("c" * 64, 10_000)  # room is made for all of it at once
    assert store.size_of(first) is None  # evicted: the unpinned one
    assert store.total + store.filling_bytes <= 25_000
    assert not store.can_fill(10_000)  # pinned 10,000 + filling 10,000
    readers[1].close()
    os.close(fill.fd)


async def test_slow_readers_do_not_push_the_cache_past_its_size(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    """A client reading a cached 8 MB blob stalls (it reads nothing): that blob cannot be
    evicted, so the next 8 MB miss does not fit a 12 MB cache beside it and streams uncached;
    the pinned bytes are on /metrics."""
    size = 8_000_000  # more than loopback's socket buffers take from a reader that stops
    first, second = make_layer(34, size), make_layer(35, size)
    hub.add_image("library/alpine", "3.20", [first, second])
    proxy = await start_proxy(cache_dir=str(tmp_path / "cache"), cache_size=12_000_000)
    store = store_of(proxy)
    auth = await bearer(proxy, ca)
    assert (
        await fetch(proxy.url + blob_path(f"sha256:{hexdigest(first)}"), ca, headers=auth)
    ).body == first
    slow = await WireClient.connect(proxy.url, ca)
    await slow.send_request("GET", blob_path(f"sha256:{hexdigest(first)}"), auth)
    assert (await slow.receive_head()).status_code == 200
    assert store.pinned_bytes == len(first)
    samples = metric_samples((await fetch(proxy.url + "/metrics", ca)).body.decode())
    assert sample(samples, "hubproxy_cache_pinned_bytes") == len(first)
    also_slow = await WireClient.connect(proxy.url, ca)
    await also_slow.send_request("GET", blob_path(f"sha256:{hexdigest(second)}"), auth)
    assert (await also_slow.receive_head()).status_code == 200
    assert hexdigest(second) not in store.fills  # no room beside the pinned blob: uncached
    assert store.total + store.filling_bytes <= 12_000_000
    assert await also_slow.receive_body() == second
    await also_slow.aclose()
    assert store.size_of(hexdigest(second)) is None
    await slow.aclose()
    r = await fetch(proxy.url + blob_path(f"sha256:{hexdigest(second)}"), ca, headers=auth)
    assert r.complete and r.body == second
    await proxy.fills_ended()
    assert store.size_of(hexdigest(second)) == len(second)  # the reader gone: room again
    assert store.total <= 12_000_000
    assert store.pinned_bytes == 0


# -- case 9: a blob damaged on disk is never completed ----------------------------------------


def flip_a_byte(path: Path) -> None:
    with open(path, "r+b") as file:
        file.seek(path.stat().st_size // 2)
        byte = file.read(1)
        file.seek(-1, io.SEEK_CUR)
        file.write(bytes([byte[0] ^ 0xFF]))


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "sendfile"])
@pytest.mark.parametrize("damage", ["flip", "truncate", "truncate-then-restart"])
async def test_a_damaged_cached_blob_is_never_completed_and_is_refetched(
    hub: FakeHub,
    start_proxy: StartProxy,
    ca: trustme.CA,
    tmp_path: Path,
    tls: bool,
    damage: str,
) -> None:
    layer = make_layer(36, 1_500_000)
    hub.add_image("library/alpine", "3.20", [layer])
    digest = f"sha256:{hexdigest(layer)}"
    cache = str(tmp_path / "cache")
    proxy = await start_proxy(tls=tls, cache_dir=cache)
    client = RegistryClient(proxy.url, ca)
    assert (await client.request(blob_path(digest))).body == layer
    await proxy.fills_ended()
    store = store_of(proxy)
    path = store.path(hexdigest(layer))
    if damage == "flip":
        flip_a_byte(path)
    else:
        truncate(path)
    if damage == "truncate-then-restart":  # indexed at the size found on disk
        proxy = await start_proxy(tls=tls, cache_dir=cache)
        client = RegistryClient(proxy.url, ca)
        store = store_of(proxy)
        assert store.size_of(hexdigest(layer)) == len(layer) // 2
    r = await client.request(blob_path(digest))
    assert r.status in (200, 502)
    assert not (r.status == 200 and r.complete)  # aborted before its last byte
    assert r.body != layer
    assert store.size_of(hexdigest(layer)) is None
    assert not path.exists()
    assert store.stats.verification_failures == 1
    r = await client.request(blob_path(digest))  # the next pull refetches it
    assert r.status == 200 and r.complete and r.body == layer
    await proxy.fills_ended()
    assert cdn_gets(hub, digest) == 2
    assert store.size_of(hexdigest(layer)) == len(layer)


class Whole:
    """A fill's body source: ``data`` in one chunk."""

    def __init__(self, data: bytes) -> None:
        self.data: bytes | None = data

    async def receive_body(self) -> bytes | None:
        data, self.data = self.data, None
        return data


async def filled_store(tmp_path: Path, data: bytes) -> tuple[BlobStore, str]:
    store = BlobStore(tmp_path, 1 << 30)
    store.open()
    key = hexdigest(data)
    fill = store.start_fill(key, len(data))
    await store.run_fill(fill, Whole(data), AsyncExitStack())
    await until_ended(fill)  # committed: after its readers completed
    assert fill.state is FillState.DONE
    return store, key


async def read_whole(store: BlobStore, key: str) -> bytes:
    reader = store.reader(key)
    try:
        chunks = []
        while (chunk := await reader.next_chunk()) is not None:
            chunks.append(bytes(chunk))
        return b"".join(chunks)
    finally:
        reader.close()


@pytest.mark.parametrize(
    ("whole", "unchanged", "verified_ago", "reverify_after", "hashed"),
    [
        (True, True, 10.0, 86400.0, False),  # verified here, unchanged, recently: trusted
        (True, True, 86400.0, 86400.0, True),  # too long ago: bit rot is only seen by hashing
        (True, True, 0.0, 0.0, True),  # --reverify-after 0: every whole read hashes
        (True, False, 10.0, 86400.0, True),  # changed on disk since
        (True, False, None, 86400.0, True),  # never verified in this process (a restart)
        (False, True, 86400.0 * 9, 86400.0, False),  # a range of an unchanged file
        (False, True, 1.0, 0.0, False),
        (False, False, 1.0, 86400.0, True),  # a range of a changed file: the whole blob
    ],
)
def test_which_reads_of_a_cached_blob_hash_it(
    whole: bool, unchanged: bool, verified_ago: float | None, reverify_after: float, hashed: bool
) -> None:
    assert (
        hit_needs_hashing(
            whole=whole,
            unchanged=unchanged,
            verified_ago=verified_ago,
            reverify_after=reverify_after,
        )
        is hashed
    )


def settled(ctime_ns: int, now_ns: int) -> bool:
    return True


async def test_a_verified_unchanged_blob_is_served_unhashed_until_reverify_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    """Hashing every hit costs as much CPU as serving it: a blob verified in this process
    (its fill) and unchanged since is served as it is, and hashed again once its verification
    is --reverify-after old (then trusted again)."""
    monkeypatch.setattr(store_module, "identity_settled", settled)  # no wall clock to wait for
    data = os.urandom(700_000)
    store, key = await filled_store(tmp_path, data)
    store.reverify_after = 3600.0
    assert await read_whole(store, key) == data
    assert store.stats.hits_hashed == 0
    await trio.sleep(3600)
    assert await read_whole(store, key) == data
    assert store.stats.hits_hashed == 1
    assert await read_whole(store, key) == data  # verified just now
    assert store.stats.hits_hashed == 1
    store.reverify_after = 0.0  # --reverify-after 0: every whole read
    assert await read_whole(store, key) == data
    assert await read_whole(store, key) == data
    assert store.stats.hits_hashed == 3


@pytest.mark.parametrize("change", ["truncate", "replace"])
async def test_a_trusted_blob_changed_on_disk_is_hashed_and_never_completed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    monkeypatch.setattr(store_module, "identity_settled", settled)
    data = os.urandom(700_000)
    store, key = await filled_store(tmp_path, data)
    path = store.path(key)
    if change == "truncate":
        truncate(path)
    else:  # the same size, another file (a restore from a backup, another tool)
        other = path.with_name("other")
        other.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
        os.replace(other, path)
    with pytest.raises(CacheFillFailed, match="damaged"):
        await read_whole(store, key)
    assert store.stats.hits_hashed == 1 and store.size_of(key) is None


async def test_a_file_changed_within_the_clock_tick_of_its_fill_is_not_trusted(
    tmp_path: Path,
) -> None:
    """A write in the same tick of the file system's clock as the fill's rename could leave
    the file's identity as it was: a file changed less than a tick ago (policy.cachepolicy.
    identity_settled) is hashed by its next reader whatever its identity says."""
    data = os.urandom(700_000)
    store, key = await filled_store(tmp_path, data)
    assert key not in store.verified
    flip_a_byte(store.path(key))
    with pytest.raises(CacheFillFailed, match="damaged"):
        await read_whole(store, key)


async def test_the_first_hit_after_a_fill_hashes_and_once_a_tick_has_passed_the_rest_do_not(
    tmp_path: Path,
) -> None:
    """Clients pulling a blob moments after it was fetched (a fleet starting one job): the first
    hit hashes the new file, and once the file system's timestamp tick has passed (a tenth of a
    second here: the test's file system keeps sub-second timestamps), the hits after it trust
    it. They used to hash it again until one ended two seconds after the fill, for every file
    system alike: 0.6 CPU-s per GiB each."""
    data = os.urandom(700_000)
    store, key = await filled_store(tmp_path, data)
    renamed = os.stat(store.path(key)).st_ctime_ns
    if renamed % 1_000_000_000 == 0:
        pytest.skip("the test's file system keeps whole-second timestamps")
    store.wall_clock = lambda: renamed + 50_000_000  # the first hit ends 50 ms after the fill
    assert await read_whole(store, key) == data
    assert store.stats.hits_hashed == 1 and key not in store.verified
    store.wall_clock = lambda: renamed + 150_000_000  # the next, 150 ms after it: hashed, trusted
    assert await read_whole(store, key) == data
    assert store.stats.hits_hashed == 2 and key in store.verified
    assert await read_whole(store, key) == data
    assert store.stats.hits_hashed == 2


async def test_a_range_of_a_changed_blob_is_checked_against_the_whole_digest(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A range of a blob verified and unchanged since is served as it is; once the file
    changed, a range is only completed after the whole blob hashed to its digest."""
    monkeypatch.setattr(store_module, "identity_settled", settled)
    data = os.urandom(700_000)
    store, key = await filled_store(tmp_path, data)
    reader = store.reader(key, 1000, 2000)
    assert await take(reader) == data[1000:2000]  # verified by its fill: no hashing
    reader.close()
    flip_a_byte(store.path(key))  # outside the range
    reader = store.reader(key, 1000, 2000)
    assert await take(reader) == data[1000:1999]
    with pytest.raises(CacheFillFailed):
        await reader.next_chunk()
    reader.close()
    assert store.size_of(key) is None
    assert not store.path(key).exists()


def test_cache_verify_reports_and_deletes_damaged_blobs(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, 1 << 30)
    store.open()
    good = _put(store, os.urandom(300_000))
    flipped = _put(store, os.urandom(300_000))
    cut = _put(store, os.urandom(300_000))
    flip_a_byte(store.path(flipped))
    truncate(store.path(cut))
    out, err = io.StringIO(), io.StringIO()
    assert cache_command(["verify", "--cache-dir", str(tmp_path)], stdout=out, stderr=err) == 1
    text = out.getvalue()
    assert flipped in text and cut in text and good not in text
    assert "3 blobs checked, 2 damaged" in text
    assert store.path(good).exists()
    assert not store.path(flipped).exists() and not store.path(cut).exists()
    out = io.StringIO()
    assert cache_command(["verify", "--cache-dir", str(tmp_path)], stdout=out, stderr=err) == 0
    assert "1 blobs checked, 0 damaged" in out.getvalue()


def test_cache_verify_through_main(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cache", "verify", "--cache-dir", str(tmp_path / "none")]) == 1
    assert "no blob cache" in capsys.readouterr().err
    assert main(["cache", "frobnicate"]) == 2
    store = BlobStore(tmp_path, 1 << 30)
    store.open()
    _put(store, b"hello")
    assert main(["cache", "verify", "--cache-dir", str(tmp_path)]) == 0
    assert "1 blobs checked, 0 damaged" in capsys.readouterr().out


async def test_a_blob_gone_between_the_decision_and_the_send_is_fetched_not_a_502(
    hub: FakeHub,
    start_proxy: StartProxy,
    ca: trustme.CA,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A follower closes its own upstream exchange before following the fill, and that
    awaits: meanwhile the blob can be evicted or its fill fail (seen in the soak, under load,
    as 502 "cached blob ... vanished"). Nothing was sent yet, so the upstream must answer."""
    from hubproxy.cache import pullthrough

    layer = make_layer(39, 200_000)
    hub.add_image("library/alpine", "3.20", [layer])
    digest = f"sha256:{hexdigest(layer)}"
    proxy = await start_proxy(cache_dir=str(tmp_path / "cache"))
    auth = await bearer(proxy, ca)
    # the store says "cached" at the decision, and the blob is gone when it is sent
    monkeypatch.setattr(pullthrough.PullThrough, "_blob_cached", lambda self, key, route: True)
    monkeypatch.setattr(pullthrough.PullThrough, "_confirmed", lambda self, request, route: True)
    with trio.fail_after(GUARD):
        r = await fetch(proxy.url + blob_path(digest), ca, headers=auth)
    assert r.status == 200 and r.complete and r.body == layer
    assert cdn_gets(hub, digest) == 1
