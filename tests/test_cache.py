"""The blob cache: the store on its own (fills driven by the test, byte by byte), then hubproxy
with a cache in front of the fake Docker Hub."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import subprocess
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio
import trustme

from hubproxy.cache import store as store_module
from hubproxy.cache.store import (
    BlobReader,
    BlobStore,
    DiskSpace,
    DiskVerdict,
    Fill,
    FillState,
    byte_range,
    cached_blob_answer,
    choose_evictions,
    describe_disk,
    disk_warning,
    free_space_margin,
    judge_disk,
    sha256_hex,
)
from hubproxy.net.ktls import ktls_offered
from hubproxy.policy.errors import CacheFillFailed, RangeNotSatisfiable
from hubproxy.policy.sizes import SizeTooSmall, describe_size, format_size, parse_size
from tests.conftest import StartProxy
from tests.fakehub import FakeHub, fetch, make_layer
from tests.registry_client import RegistryClient
from tests.test_operations import metric_samples
from tests.wire import WireClient


def hexdigest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fill_the_disk_after(monkeypatch: pytest.MonkeyPatch, limit: int) -> None:
    """Make cache writes fail with ENOSPC once ``limit`` bytes were written (a disk filling up)."""
    real_write = store_module._write_all
    written = 0

    def filling_disk(fd: int, data: bytes | bytearray) -> None:
        nonlocal written
        if written > limit:
            raise OSError(errno.ENOSPC, "No space left on device")
        written += len(data)
        real_write(fd, data)

    monkeypatch.setattr(store_module, "_write_all", filling_disk)


async def take(reader: BlobReader) -> bytes | None:
    """The reader's next chunk as bytes (a chunk is a view, valid until the next call)."""
    chunk = await reader.next_chunk()
    return None if chunk is None else bytes(chunk)


class Feed:
    """A body source the test feeds chunk by chunk (zero-capacity: one chunk at a time)."""

    def __init__(self) -> None:
        self.send, self.receive = trio.open_memory_channel[bytes | None](0)

    async def receive_body(self) -> bytes | None:
        return await self.receive.receive()


async def until_ended(fill: Fill) -> None:
    """Wait until ``fill`` committed its file or failed (its readers may have completed
    before: they go on once the blob verified, not once the disk synced it)."""
    while fill.state is FillState.FILLING:
        await fill.wait_change()


# -- pure pieces ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("20G", 20 << 30),  # the short units are binary, as in docker
        ("20g", 20 << 30),
        ("20GiB", 20 << 30),
        ("20Gi", 20 << 30),  # Kubernetes' spelling
        ("20GB", 20 * 10**9),  # the B ones are decimal, as disks are sold
        ("2gb", 2 * 10**9),
        ("500MB", 500 * 10**6),
        ("500 MB", 500 * 10**6),
        ("512M", 512 << 20),
        ("1.5T", 3 << 39),
        ("1TB", 10**12),
        (".5G", 1 << 29),
        ("2048KiB", 2 << 20),
        ("2048K", 2 << 20),
        ("2000KB", 2 * 10**6),
        ("1048576B", 1 << 20),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "not a size: '' (try 500M or 20G)"),
        ("G", "not a size: 'G' (try 500M or 20G)"),
        ("-1G", "not a size: '-1G' (try 500M or 20G)"),
        ("lots", "not a size: 'lots' (try 500M or 20G)"),
        ("nan", "not a size: 'nan' (try 500M or 20G)"),
        ("1X", "not a size: '1X' (try 500M or 20G)"),
        (
            "20",
            "'20' has no unit: write 20G or 20GiB for 20 x 2^30 bytes, 20GB for 20 x 10^9 bytes "
            "(M, MB, T, TB likewise; B for bytes)",
        ),
    ],
)
def test_parse_size_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:  # noqa: PT011
        parse_size(text)
    assert str(info.value) == message


@pytest.mark.parametrize("text", ["0", "0G", "512K", "1000KB", "20B"])
def test_parse_size_refuses_less_than_a_mebibyte(text: str) -> None:
    with pytest.raises(SizeTooSmall) as info:
        parse_size(text)
    assert str(info.value) == f"{text!r} is less than 1 MiB"


@pytest.mark.parametrize(
    ("size", "shown"),
    [
        (677, "677 B"),
        (1024, "1 KiB"),
        (419_430, "410 KiB"),
        (8_283_750, "7.9 MiB"),
        (64 << 20, "64 MiB"),
        (20 << 30, "20 GiB"),
        (20 * 10**9, "18.6 GiB"),
        (3 << 39, "1.5 TiB"),
    ],
)
def test_format_size(size: int, shown: str) -> None:
    assert format_size(size) == shown


@pytest.mark.parametrize(
    ("size", "shown"),
    [
        (20 << 30, "20 GiB"),
        (20 * 10**9, "20 GB (18.6 GiB)"),
        (500 * 10**6, "500 MB (477 MiB)"),
        (3 << 29, "1.5 GiB"),
        (10**12, "1 TB (931 GiB)"),
    ],
)
def test_describe_size_shows_how_a_setting_was_read(size: int, shown: str) -> None:
    assert describe_size(size) == shown


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("bytes=0-99", (0, 100)),
        ("bytes=100-", (100, 1000)),
        ("bytes=-10", (990, 1000)),
        ("bytes=990-5000", (990, 1000)),
        ("bytes=-5000", (0, 1000)),
        ("bytes=0-0,5-9", None),  # several ranges: the whole blob is a valid answer
        ("items=0-9", None),
        ("bytes=9-1", None),
        ("bytes=a-b", None),
    ],
)
def test_byte_range(value: str, expected: tuple[int, int] | None) -> None:
    assert byte_range(value, 1000) == expected


@pytest.mark.parametrize("value", ["bytes=1000-", "bytes=5000-6000", "bytes=-0"])
def test_byte_range_not_satisfiable(value: str) -> None:
    with pytest.raises(RangeNotSatisfiable):
        byte_range(value, 1000)


def test_cached_blob_answer_headers() -> None:
    digest = "sha256:" + "a" * 64
    whole = cached_blob_answer(digest, 1000, None)
    assert (whole.status, whole.start, whole.end) == (200, 0, 1000)
    headers = dict(whole.headers)
    assert headers[b"content-length"] == b"1000"
    assert headers[b"docker-content-digest"] == digest.encode()
    part = cached_blob_answer(digest, 1000, b"bytes=10-19")
    assert (part.status, part.start, part.end) == (206, 10, 20)
    assert dict(part.headers)[b"content-range"] == b"bytes 10-19/1000"
    assert dict(part.headers)[b"content-length"] == b"10"


@pytest.mark.parametrize(
    ("digest", "expected"),
    [
        ("sha256:" + "0123456789abcdef" * 4, "0123456789abcdef" * 4),
        ("sha256:" + "a" * 63, None),  # too short
        ("sha256:" + "a" * 65, None),  # too long
        ("sha256:" + "A" * 64, None),  # digests are lowercase hex
        ("sha256:" + "g" * 64, None),  # not hex
        ("sha256:" + "a" * 63 + "/", None),
        ("sha256:" + "a" * 63 + ".", None),
        ("sha256:" + "a" * 62 + "..", None),  # no path tricks in the file name
        ("sha256:" + "a" * 63 + " ", None),
        ("sha256:" + "a" * 64 + "\n", None),  # a trailing newline, which $ would let pass
        ("sha256:" + "a" * 63 + "\u0661", None),  # a digit, but not ASCII hex
        ("sha512:" + "a" * 64, None),
        ("sha256" + "a" * 64, None),
        ("a" * 64, None),
        ("", None),
    ],
)
def test_sha256_hex(digest: str, expected: str | None) -> None:
    assert sha256_hex(digest) == expected


def test_choose_evictions_is_lru_and_skips_protected() -> None:
    lru = [("a", 10), ("b", 10), ("c", 10), ("d", 10)]
    assert choose_evictions(lru, 40, 25, set()) == ["a", "b"]
    assert choose_evictions(lru, 40, 25, {"a"}) == ["b", "c"]
    assert choose_evictions(lru, 40, 40, set()) == []


# -- the store ------------------------------------------------------------------------------------


async def test_readers_follow_a_fill_and_never_get_the_last_byte_early(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    data = os.urandom(300_000)
    store = BlobStore(tmp_path, 1 << 30)
    store.open()
    key = hexdigest(data)
    fill = store.start_fill(key, len(data))
    feed = Feed()
    nursery.start_soon(store.run_fill, fill, feed, AsyncExitStack())
    reader = store.reader(key)
    await feed.send.send(data[:100_000])
    assert await take(reader) == data[:100_000]  # as bytes arrive, not at the end
    await feed.send.send(data[100_000:])
    got = await take(reader)
    assert got == data[100_000:-1]  # everything but the last byte before verification
    await feed.send.send(None)
    assert await take(reader) == data[-1:]
    assert await reader.next_chunk() is None
    reader.close()
    await until_ended(fill)  # committed: after its readers completed
    assert fill.state is FillState.DONE
    assert store.size_of(key) == len(data)
    assert store.path(key).read_bytes() == data
    assert list(store.tmp_dir.iterdir()) == []


async def test_a_range_of_a_filling_blob_holds_its_last_byte_until_verified(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """A range that ends before the blob does completes the client's transfer just as surely
    as the blob's own last byte: it must not complete before the fill verified the digest."""
    data = os.urandom(300_000)
    store = BlobStore(tmp_path, 1 << 30)
    store.open()
    key = hexdigest(data)
    fill = store.start_fill(key, len(data))
    feed = Feed()
    nursery.start_soon(store.run_fill, fill, feed, AsyncExitStack())
    reader = store.reader(key, 1000, 2000)
    await feed.send.send(data[:200_000])  # the whole range has arrived
    assert await take(reader) == data[1000:1999]  # all but the range's last byte
    await feed.send.send(data[200_000:])
    await feed.send.send(None)
    assert await take(reader) == data[1999:2000]
    assert await reader.next_chunk() is None
    reader.close()


async def test_a_range_of_a_failing_fill_never_completes(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    data = os.urandom(300_000)
    store = BlobStore(tmp_path, 1 << 30)
    store.open()
    key = hexdigest(data)
    fill = store.start_fill(key, len(data))
    feed = Feed()
    nursery.start_soon(store.run_fill, fill, feed, AsyncExitStack())
    reader = store.reader(key, 0, 100)
    wrong = bytearray(data)
    wrong[-1] ^= 0xFF  # bytes that will not verify
    await feed.send.send(bytes(wrong))
    assert await take(reader) == data[:99]
    await feed.send.send(None)
    with pytest.raises(CacheFillFailed):
        await reader.next_chunk()
    reader.close()
    assert fill.state is FillState.FAILED


async def test_wrong_bytes_fail_every_reader_and_cache_nothing(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    data = os.urandom(50_000)
    store = BlobStore(tmp_path, 1 << 30)
    store.open()
    key = hexdigest(data)
    fill = store.start_fill(key, len(data))
    feed = Feed()
    nursery.start_soon(store.run_fill, fill, feed, AsyncExitStack())
    reader = store.reader(key)
    # same length, wrong content (a fixed b"X" was right 1 time in 256: random data can start
    # with it)
    wrong = bytes([data[0] ^ 0xFF]) + data[1:]
    await feed.send.send(wrong)
    assert await take(reader) == wrong[:-1]
    await feed.send.send(None)
    with pytest.raises(CacheFillFailed):
        await reader.next_chunk()
    reader.close()
    assert store.size_of(key) is None
    assert not store.path(key).exists()
    assert list(store.tmp_dir.iterdir()) == []
    assert store.stats.verification_failures == 1


async def test_short_upstream_body_is_not_cached(nursery: trio.Nursery, tmp_path: Path) -> None:
    data = os.urandom(10_000)
    store = BlobStore(tmp_path, 1 << 30)
    store.open()
    fill = store.start_fill(hexdigest(data), len(data))
    feed = Feed()
    nursery.start_soon(store.run_fill, fill, feed, AsyncExitStack())
    reader = store.reader(hexdigest(data))
    await feed.send.send(data[:5000])
    assert await take(reader) == data[:5000]
    await feed.send.send(None)
    with pytest.raises(CacheFillFailed):
        await reader.next_chunk()
    reader.close()
    assert store.size_of(hexdigest(data)) is None


def _put(store: BlobStore, data: bytes) -> str:
    key = hexdigest(data)
    path = store.path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    store._add(key, len(data))
    return key


def test_eviction_keeps_the_store_bounded_and_spares_open_blobs(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, 25_000)
    store.open()
    first = _put(store, os.urandom(10_000))
    reader = store.reader(first)  # someone is reading the oldest blob
    second = _put(store, os.urandom(10_000))
    third = _put(store, os.urandom(10_000))  # over the limit: evict, but not the open one
    assert store.size_of(first) == 10_000
    assert store.size_of(second) is None
    assert not store.path(second).exists()
    assert store.size_of(third) == 10_000
    assert store.total <= 25_000
    reader.close()
    _put(store, os.urandom(10_000))
    assert store.total <= 25_000
    assert store.stats.evictions >= 2


def test_restart_rebuilds_the_index_and_removes_crash_leftovers(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, 1 << 30)
    store.open()
    kept = _put(store, os.urandom(1000))
    fill = store.start_fill("b" * 64, 5000)  # a fill that a crash interrupted
    os.write(fill.fd, b"partial")
    os.close(fill.fd)
    assert list(store.tmp_dir.iterdir())
    restarted = BlobStore(tmp_path, 1 << 30)
    restarted.open()
    assert restarted.size_of(kept) == 1000
    assert restarted.size_of("b" * 64) is None
    assert list(restarted.tmp_dir.iterdir()) == []
    assert restarted.total == 1000


def test_restart_indexes_many_blobs_quickly(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, 1 << 30)
    store.open()
    for i in range(2000):
        _put(store, i.to_bytes(4, "big"))
    restarted = BlobStore(tmp_path, 1 << 30)
    restarted.open()
    assert len(restarted.index) == 2000
    assert restarted.total == 8000


def test_a_blob_larger_than_the_cache_is_not_filled(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, 1000)
    store.open()
    assert not store.can_fill(1001)
    assert store.can_fill(1000)


# -- hubproxy with a cache ------------------------------------------------------------------------


def _cdn_gets(hub: FakeHub, digest: str) -> int:
    return sum(
        1
        for s in hub.requests
        if s.server == "cdn" and s.method == "GET" and digest[7:] in s.target
    )


async def test_second_pull_comes_from_the_cache(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    layer = make_layer(1, 1_000_000)
    hub.add_image("library/alpine", "3.20", [layer])
    digest = "sha256:" + hexdigest(layer)
    proxy = await start_proxy(cache_dir=str(tmp_path / "cache"))
    client = RegistryClient(proxy.url, ca)
    for _ in range(3):
        r = await client.request(f"/v2/library/alpine/blobs/{digest}")
        assert r.status == 200
        assert r.body == layer
        assert r.headers["docker-content-digest"] == digest
    assert _cdn_gets(hub, digest) == 1
    registry_gets = [
        s
        for s in hub.requests
        if s.server == "registry" and s.method == "GET" and digest in s.target
    ]
    assert len(registry_gets) <= 2  # the anonymous 401, then the one fetch
    stats = proxy.proxy.pullthrough.stats if proxy.proxy.pullthrough else None
    assert stats is not None and stats.hits == 2 and stats.fills_completed == 1
    # a new client (other credentials) is checked with a HEAD, which Docker Hub does not count
    other = RegistryClient(proxy.url, ca)
    r = await other.request(f"/v2/library/alpine/blobs/{digest}")
    assert r.body == layer
    assert _cdn_gets(hub, digest) == 1
    # ranges are served from the cached blob
    r = await client.request(
        f"/v2/library/alpine/blobs/{digest}", headers=[("range", "bytes=1000-1999")]
    )
    assert r.status == 206
    assert r.body == layer[1000:2000]
    assert r.headers["content-range"] == f"bytes 1000-1999/{len(layer)}"
    assert _cdn_gets(hub, digest) == 1


async def test_concurrent_pulls_of_a_missing_blob_fetch_it_once(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    layer = make_layer(2, 6_000_000)
    hub.add_image("library/alpine", "3.20", [layer])
    digest = "sha256:" + hexdigest(layer)
    proxy = await start_proxy(cache_dir=str(tmp_path / "cache"))
    token_client = RegistryClient(proxy.url, ca)
    assert (await token_client.request("/v2/library/alpine/tags/list")).status == 200
    auth = [("authorization", f"Bearer {token_client.tokens['']}")]
    first = await WireClient.connect(proxy.url, ca)
    await first.send_request("GET", f"/v2/library/alpine/blobs/{digest}", auth)
    assert (await first.receive_head()).status_code == 200
    results: list[bytes] = []

    async def pull() -> None:
        r = await fetch(f"{proxy.url}/v2/library/alpine/blobs/{digest}", ca, headers=auth)
        assert r.status == 200
        assert r.complete
        results.append(r.body)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for _ in range(7):
                nursery.start_soon(pull)
            await first.receive_body(limit=1_000_000)
            await first.aclose()  # the client that started the fill goes away half-way
    assert len(results) == 7
    assert all(body == layer for body in results)
    assert _cdn_gets(hub, digest) == 1


async def test_small_corrupted_blob_is_a_clear_502(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    """A blob that fails its digest check before any byte was sent is answered with a registry
    error (it used to be a connection cut without any response). One byte makes that certain:
    readers never get a blob's last byte before it is verified, so nothing can leave early."""
    layer = make_layer(4, 1)
    hub.add_image("library/alpine", "3.20", [layer])
    digest = "sha256:" + hexdigest(layer)
    hub.corrupt_blob(digest)
    proxy = await start_proxy(cache_dir=str(tmp_path / "cache"))
    client = RegistryClient(proxy.url, ca)
    r = await client.request(f"/v2/library/alpine/blobs/{digest}")
    assert r.status == 502
    assert r.json()["errors"][0]["code"] == "UNAVAILABLE"
    assert "digest" in r.json()["errors"][0]["message"]
    r = await client.request(f"/v2/library/alpine/blobs/{digest}")  # and the next pull heals
    assert r.status == 200 and r.body == layer


async def test_corrupted_blob_aborts_caches_nothing_and_heals(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    layer = make_layer(3, 2_000_000)
    hub.add_image("library/alpine", "3.20", [layer])
    digest = "sha256:" + hexdigest(layer)
    hub.corrupt_blob(digest)
    proxy = await start_proxy(cache_dir=str(tmp_path / "cache"))
    client = RegistryClient(proxy.url, ca)
    r = await client.request(f"/v2/library/alpine/blobs/{digest}")
    assert r.status == 200
    assert not r.complete  # aborted before the last byte: never wrong bytes with success
    assert len(r.body) < len(layer)
    assert proxy.proxy.pullthrough is not None
    store = proxy.proxy.pullthrough.blobs
    assert store is not None
    assert store.size_of(hexdigest(layer)) is None
    assert store.stats.verification_failures == 1
    r = await client.request(f"/v2/library/alpine/blobs/{digest}")  # the next pull heals
    assert r.complete and r.body == layer
    await proxy.fills_ended()
    assert store.size_of(hexdigest(layer)) == len(layer)


async def test_private_blob_is_never_served_from_cache_without_access(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    layer = make_layer(4, 500_000)
    hub.add_image("acme/secret", "v1", [layer])
    hub.add_user("alice", "s3cret")
    hub.make_private("acme/secret", "alice")
    digest = "sha256:" + hexdigest(layer)
    proxy = await start_proxy(cache_dir=str(tmp_path / "cache"))
    alice = RegistryClient(proxy.url, ca, credentials=("alice", "s3cret"))
    assert (await alice.request(f"/v2/acme/secret/blobs/{digest}")).body == layer
    await proxy.fills_ended()
    assert proxy.proxy.pullthrough is not None
    store = proxy.proxy.pullthrough.blobs
    assert store is not None and store.size_of(hexdigest(layer)) == len(layer)
    stranger = RegistryClient(proxy.url, ca)
    r = await stranger.request(f"/v2/acme/secret/blobs/{digest}")
    assert r.status == 401
    assert layer[:1000] not in r.body
    # nor under another repository name the stranger can read: blobs are repository-scoped
    hub.add_image("library/alpine", "3.20", [make_layer(5, 1000)])
    r = await stranger.request(f"/v2/library/alpine/blobs/{digest}")
    assert r.status == 404
    assert r.json()["errors"][0]["code"] == "BLOB_UNKNOWN"
    assert store.stats.hits == 0


async def test_blob_larger_than_the_cache_streams_uncached(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    layer = make_layer(6, 300_000)
    hub.add_image("library/alpine", "3.20", [layer])
    digest = "sha256:" + hexdigest(layer)
    proxy = await start_proxy(cache_dir=str(tmp_path / "cache"), cache_size=100_000)
    client = RegistryClient(proxy.url, ca)
    for _ in range(2):
        assert (await client.request(f"/v2/library/alpine/blobs/{digest}")).body == layer
    assert _cdn_gets(hub, digest) == 2


async def test_plain_http_hits_use_sendfile_and_keep_the_connection(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    layers = [make_layer(7, 3_000_000), make_layer(8, 10_000)]
    hub.add_image("library/alpine", "3.20", layers)
    proxy = await start_proxy(tls=False, cache_dir=str(tmp_path / "cache"))
    token_client = RegistryClient(proxy.url, ca)
    assert (await token_client.request("/v2/library/alpine/tags/list")).status == 200
    auth = [("authorization", f"Bearer {token_client.tokens['']}")]
    client = await WireClient.connect(proxy.url, ca)
    for _ in range(2):  # a miss (served from the growing file), then a hit
        for layer in layers:
            head, body = await client.request(
                "GET", f"/v2/library/alpine/blobs/sha256:{hexdigest(layer)}", auth
            )
            assert head.status_code == 200
            assert body == layer
    head, body = await client.request(  # and the connection still serves other requests
        "GET", "/v2/library/alpine/tags/list", auth
    )
    assert head.status_code == 200
    await client.aclose()
    assert proxy.proxy.pullthrough is not None
    assert proxy.proxy.pullthrough.stats.sendfile_bytes >= 2 * sum(map(len, layers))


@pytest.mark.parametrize("offered", ["as-here", "said-so"])
async def test_tls_hits_go_by_sendfile_where_the_kernel_encrypts(
    hub: FakeHub,
    start_proxy: StartProxy,
    ca: trustme.CA,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    offered: str,
) -> None:
    """With --ktls, a hit over TLS goes out with sendfile where the kernel took the
    connection's keys, and through OpenSSL elsewhere: the same bytes either way. This machine
    may offer neither Python 3.12 nor the kernel's tls module; "said-so" makes the server
    believe it does, so the socket-bound TLS stream serves every request, with OpenSSL
    encrypting."""
    if offered == "said-so":
        monkeypatch.setattr("hubproxy.net.server.ktls_offered", lambda: True)
    layers = [make_layer(7, 3_000_000), make_layer(8, 10_000)]
    hub.add_image("library/alpine", "3.20", layers)
    proxy = await start_proxy(ktls=True, cache_dir=str(tmp_path / "cache"))
    assert proxy.server.ktls == (offered == "said-so" or ktls_offered())
    token_client = RegistryClient(proxy.url, ca)
    assert (await token_client.request("/v2/library/alpine/tags/list")).status == 200
    auth = [("authorization", f"Bearer {token_client.tokens['']}")]
    client = await WireClient.connect(proxy.url, ca)
    for _ in range(2):  # a miss, then a hit
        for layer in layers:
            head, body = await client.request(
                "GET", f"/v2/library/alpine/blobs/sha256:{hexdigest(layer)}", auth
            )
            assert head.status_code == 200
            assert body == layer
    head, body = await client.request("GET", "/v2/library/alpine/tags/list", auth)
    assert head.status_code == 200
    await client.aclose()
    assert proxy.proxy.pullthrough is not None
    sent_by_sendfile = proxy.proxy.pullthrough.stats.sendfile_bytes
    kernel_tls = proxy.server.figures().kernel_tls  # hubproxy_kernel_tls_connections_total
    if ktls_offered():
        assert sent_by_sendfile >= sum(map(len, layers))
        assert kernel_tls >= 1
    else:
        assert sent_by_sendfile == 0
        assert kernel_tls == 0


async def test_a_full_disk_streams_uncached_instead_of_failing(
    hub: FakeHub,
    start_proxy: StartProxy,
    ca: trustme.CA,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    layer = make_layer(9, 400_000)
    hub.add_image("library/alpine", "3.20", [layer])
    monkeypatch.setattr(
        "hubproxy.cache.store.read_disk", lambda path: DiskSpace(1024 * 1024, 1 << 40)
    )
    proxy = await start_proxy(cache_dir=str(tmp_path / "cache"))
    client = RegistryClient(proxy.url, ca)
    r = await client.request(f"/v2/library/alpine/blobs/sha256:{hexdigest(layer)}")
    assert r.complete and r.body == layer  # 1 MiB free: below the margin, no fill
    assert proxy.proxy.pullthrough is not None
    assert proxy.proxy.pullthrough.blobs.size_of(hexdigest(layer)) is None


def test_fills_under_way_reserve_their_space(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, 1 << 40, disk=lambda path: DiskSpace(200 * 1024 * 1024, 1 << 40))
    store.open()
    size = 100 * 1024 * 1024
    assert store.can_fill(size)
    fill = store.start_fill("c" * 64, size)
    assert not store.can_fill(size)  # the first fill will need its 100 MiB too
    os.close(fill.fd)


async def test_access_to_one_repository_opens_no_other_cached_blob(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    """A client confirmed for a public repository asks for a private repository's cached layer
    under the public name: the upstream would say BLOB_UNKNOWN, and so must we."""
    secret_layer = make_layer(10, 200_000)
    hub.add_image("acme/secret", "v1", [secret_layer])
    hub.add_user("alice", "s3cret")
    hub.make_private("acme/secret", "alice")
    public_layer = make_layer(11, 1000)
    hub.add_image("library/alpine", "3.20", [public_layer])
    proxy = await start_proxy(cache_dir=str(tmp_path / "cache"))
    alice = RegistryClient(proxy.url, ca, credentials=("alice", "s3cret"))
    secret = f"sha256:{hexdigest(secret_layer)}"
    assert (await alice.request(f"/v2/acme/secret/blobs/{secret}")).body == secret_layer
    stranger = RegistryClient(proxy.url, ca)
    r = await stranger.request(f"/v2/library/alpine/blobs/sha256:{hexdigest(public_layer)}")
    assert r.body == public_layer  # access to library/alpine confirmed (and cached)
    r = await stranger.request(f"/v2/library/alpine/blobs/{secret}")
    assert r.status == 404
    assert secret_layer[:1000] not in r.body
    manifest = hub.add_image("acme/secret", "v2", [make_layer(12, 100)])
    assert (await alice.request(f"/v2/acme/secret/manifests/{manifest}")).status == 200
    r = await stranger.request(f"/v2/library/alpine/manifests/{manifest}")
    assert r.status == 404


@pytest.mark.parametrize("tls", [True, False])
async def test_a_disk_failing_mid_fill_does_not_fail_the_transfer(
    hub: FakeHub,
    start_proxy: StartProxy,
    ca: trustme.CA,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tls: bool,
) -> None:
    """ENOSPC half-way through a fill: the cache write fails, the clients' transfers do not
    (they finish from the upstream with a Range request, still verified against the digest)."""
    fill_the_disk_after(monkeypatch, 1_500_000)
    layer = make_layer(13, 4_000_000)
    hub.add_image("library/alpine", "3.20", [layer])
    digest = f"sha256:{hexdigest(layer)}"
    proxy = await start_proxy(tls=tls, cache_dir=str(tmp_path / "cache"))
    client = RegistryClient(proxy.url, ca)
    r = await client.request(f"/v2/library/alpine/blobs/{digest}")
    assert r.status == 200
    assert r.complete
    assert r.body == layer
    assert proxy.proxy.pullthrough is not None
    store = proxy.proxy.pullthrough.blobs
    assert store.size_of(hexdigest(layer)) is None
    assert store.stats.fills_failed == 1
    ranges = [s.headers.get("range") for s in hub.requests if s.server == "cdn"]
    assert any(value and value.startswith("bytes=") for value in ranges)


async def test_a_resumed_transfer_holds_its_last_byte_until_the_blob_verifies(
    hub: FakeHub,
    start_proxy: StartProxy,
    ca: trustme.CA,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The disk fails mid-fill and the rest comes from the upstream with a Range request, but
    the upstream's bytes are wrong: the client must never see a complete transfer."""
    fill_the_disk_after(monkeypatch, 1_500_000)
    layer = make_layer(14, 4_000_000)
    hub.add_image("library/alpine", "3.20", [layer])
    digest = f"sha256:{hexdigest(layer)}"
    hub.corrupt_blob(digest, times=2)  # a byte flipped at 2 MB: in the part that is resumed
    proxy = await start_proxy(cache_dir=str(tmp_path / "cache"))
    client = RegistryClient(proxy.url, ca)
    r = await client.request(f"/v2/library/alpine/blobs/{digest}")
    assert r.status == 200
    assert not r.complete
    assert len(r.body) < len(layer)
    ranges = [s.headers.get("range") for s in hub.requests if s.server == "cdn"]
    assert any(value and value.startswith("bytes=") for value in ranges)  # it was resumed
    assert proxy.proxy.pullthrough is not None
    assert proxy.proxy.pullthrough.stats.verification_failures == 1


# -- the disk under the cache ---------------------------------------------------------------------

TiB = 1 << 40
NEARLY_FULL = DiskSpace(free=8_283_750, size=TiB)  # 7.9 MiB free on a large disk
TINY = DiskSpace(free=8 << 20, size=8 << 20)  # an empty 8 MiB file system


@pytest.mark.parametrize(
    ("disk_size", "margin"),
    [
        (TiB, 64 << 20),
        (20 << 30, 64 << 20),
        (1280 << 20, 64 << 20),  # 1.25 GiB: where 5% reaches 64 MiB
        (100 << 20, 5 << 20),
        (8 << 20, 419_430),
        (0, 0),
    ],
)
def test_the_free_space_margin_is_proportionate(disk_size: int, margin: int) -> None:
    assert free_space_margin(disk_size) == margin


@pytest.mark.parametrize(
    ("cached", "disk", "verdict", "words"),
    [
        (
            0,
            DiskSpace(79 << 30, TiB),
            DiskVerdict(79 << 30, 64 << 20, 20 << 30),
            "up to 20 GiB; 79 GiB free on its disk",
        ),
        (
            0,
            NEARLY_FULL,
            DiskVerdict(8_283_750, 64 << 20, 0),
            "up to 20 GiB; 7.9 MiB free on its disk, below the 64 MiB kept free: "
            "blobs will not be cached",
        ),
        (
            0,
            TINY,
            DiskVerdict(8 << 20, 419_430, (8 << 20) - 419_430),
            "up to 20 GiB; 8 MiB free on its disk, 410 KiB kept free: the disk bounds it to "
            "7.6 MiB",
        ),
        (  # what the cache holds counts: its space is the cache's already
            5 << 30,
            DiskSpace(10 << 30, TiB),
            DiskVerdict(10 << 30, 64 << 20, (15 << 30) - (64 << 20)),
            "up to 20 GiB; 10 GiB free on its disk, 64 MiB kept free: the disk bounds it to "
            "14.9 GiB",
        ),
    ],
)
def test_how_the_disk_bounds_the_cache(
    cached: int, disk: DiskSpace, verdict: DiskVerdict, words: str
) -> None:
    assert judge_disk(20 << 30, cached, disk) == verdict
    assert describe_disk(20 << 30, verdict) == words


def test_the_warning_at_start_says_what_the_disk_allows() -> None:
    root = Path("/var/cache/hubproxy")
    assert disk_warning(root, 20 << 30, judge_disk(20 << 30, 0, DiskSpace(79 << 30, TiB))) is None
    assert disk_warning(root, 20 << 30, judge_disk(20 << 30, 0, NEARLY_FULL)) == (
        "cache: the disk of /var/cache/hubproxy has 7.9 MiB free, below the 64 MiB kept free "
        "for other programs: no blob will be cached; free space there, or point --cache-dir at "
        "a larger disk"
    )
    assert disk_warning(root, 20 * 10**9, judge_disk(20 * 10**9, 0, TINY)) == (
        "cache: the disk of /var/cache/hubproxy has 8 MiB free (410 KiB kept free): the cache "
        "can grow to 7.6 MiB, not the 20 GB (18.6 GiB) of --cache-size, and misses beyond that "
        "stream uncached; free space there, or set --cache-size to what the disk holds"
    )


def test_a_small_blob_fits_a_small_disk_but_not_the_last_bytes_of_a_large_one(
    tmp_path: Path,
) -> None:
    small = BlobStore(tmp_path / "small", 20 << 30, disk=lambda path: TINY)
    small.open()
    assert small.can_fill(677)  # 5% of 8 MiB is kept free, not 64 MiB
    assert not small.can_fill(8 << 20)
    large = BlobStore(tmp_path / "large", 20 << 30, disk=lambda path: NEARLY_FULL)
    large.open()
    assert not large.can_fill(677)  # the last 64 MiB of a large disk are not the cache's


def test_what_a_fill_evicts_counts_as_free_disk(tmp_path: Path) -> None:
    """A cache whose --cache-size fills the disk keeps working: a fill that evicts to fit the
    limit gives that space back, so it may start with less free than its size."""
    disk = DiskSpace((64 << 20) + 500, TiB)  # 500 bytes free beyond the margin
    full = BlobStore(tmp_path / "full", 3000, disk=lambda path: disk)
    roomy = BlobStore(tmp_path / "roomy", 10_000, disk=lambda path: disk)
    for store in (full, roomy):
        store.open()
        for seed in range(3):
            _put(store, bytes([seed]) * 1000)
    assert full.can_fill(1000)  # it evicts 1000 bytes to fit 3000: their space is its
    assert not roomy.can_fill(1000)  # it evicts nothing: 500 bytes are not enough


def test_fills_skipped_for_lack_of_disk_are_said_once_per_episode(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    disk = [DiskSpace(79 << 30, TiB)]
    store = BlobStore(tmp_path, 20 << 30, disk=lambda path: disk[0])
    caplog.set_level(logging.INFO, logger="hubproxy.cache")
    store.open()
    assert store.check_disk() == DiskVerdict(79 << 30, 64 << 20, 20 << 30)
    assert caplog.messages == []
    disk[0] = NEARLY_FULL
    assert not store.can_fill(677)
    assert not store.can_fill(677)
    assert not store.can_fill(10_000)
    short = (
        f"cache: a 677 B blob is not cached: the disk of {tmp_path} has 7.9 MiB free and 64 MiB "
        "is kept free; blobs stream uncached until there is room (free space there, or lower "
        "--cache-size and restart); said once until then"
    )
    assert caplog.messages == [short]
    assert caplog.records[0].levelno == logging.WARNING
    disk[0] = DiskSpace(79 << 30, TiB)
    assert store.can_fill(677)
    assert store.can_fill(677)
    again = f"cache: the disk of {tmp_path} has room again (79 GiB free): caching blobs again"
    assert caplog.messages == [short, again]
    disk[0] = NEARLY_FULL
    assert not store.can_fill(677)
    assert caplog.messages == [short, again, short]  # a new episode


def test_a_disk_too_short_at_start_is_a_warning_then_and_not_again_per_fill(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = BlobStore(tmp_path, 20 << 30, disk=lambda path: NEARLY_FULL)
    caplog.set_level(logging.INFO, logger="hubproxy.cache")
    store.open()
    assert store.check_disk() == DiskVerdict(8_283_750, 64 << 20, 0)
    assert not store.can_fill(677)
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (
            logging.WARNING,
            f"cache: the disk of {tmp_path} has 7.9 MiB free, below the 64 MiB kept free for "
            "other programs: no blob will be cached; free space there, or point --cache-dir at "
            "a larger disk",
        )
    ]


def test_unreadable_free_space_is_said_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def unreadable(path: Path) -> DiskSpace:
        raise OSError(errno.EIO, "Input/output error")

    store = BlobStore(tmp_path, 20 << 30, disk=unreadable)
    caplog.set_level(logging.INFO, logger="hubproxy.cache")
    store.open()
    assert store.check_disk() is None
    assert not store.can_fill(677)
    assert not store.can_fill(677)
    assert caplog.messages == [
        f"cache: cannot read the free space of {tmp_path}'s disk: [Errno 5] Input/output error",
        f"cache: cannot read the free space of {tmp_path}'s disk: [Errno 5] Input/output error; "
        "blobs stream uncached until there is room (free space there, or lower --cache-size "
        "and restart); said once until then",
    ]
    assert store.disk_free() == 0


def test_a_cache_shrunk_at_start_says_so_in_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = BlobStore(tmp_path, 1 << 30)
    store.open()
    keys = [_put(store, bytes([seed]) * 1_000_000) for seed in range(5)]
    for age, key in enumerate(keys):  # written in this order, seconds apart
        os.utime(store.path(key), ns=(age * 10**9, age * 10**9))
    caplog.set_level(logging.INFO, logger="hubproxy.cache")
    smaller = BlobStore(tmp_path, 2 << 20, disk=lambda path: DiskSpace(79 << 30, TiB))
    smaller.open()
    assert caplog.messages == ["cache: evicted 3 blobs (2.9 MiB) to fit --cache-size 2 MiB"]
    assert [smaller.size_of(key) for key in keys] == [None, None, None, 1_000_000, 1_000_000]
    assert smaller.stats.evictions == 3


async def test_a_short_disk_is_said_at_start_on_metrics_and_once_for_the_misses(
    hub: FakeHub,
    start_proxy: StartProxy,
    ca: trustme.CA,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    layers = [make_layer(20, 500), make_layer(21, 2000)]
    hub.add_image("library/alpine", "3.20", layers)
    disk = [NEARLY_FULL]
    monkeypatch.setattr(store_module, "read_disk", lambda path: disk[0])
    caplog.set_level(logging.INFO, logger="hubproxy")
    cache_dir = tmp_path / "cache"
    proxy = await start_proxy(cache_dir=str(cache_dir))
    (line,) = [m for m in caplog.messages if "listening on" in m]
    assert (
        f"; cache {cache_dir} (up to 20 GiB; 7.9 MiB free on its disk, below the 64 MiB kept "
        "free: blobs will not be cached);"
    ) in line
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"cache: the disk of {cache_dir} has 7.9 MiB free, below the 64 MiB kept free for other "
        "programs: no blob will be cached; free space there, or point --cache-dir at a larger "
        "disk"
    ]
    client = RegistryClient(proxy.url, ca)
    for _ in range(2):  # both pulls miss, without a line per miss
        for layer in layers:
            r = await client.request(f"/v2/library/alpine/blobs/sha256:{hexdigest(layer)}")
            assert r.complete and r.body == layer
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == warnings
    samples = metric_samples((await fetch(proxy.url + "/metrics", ca)).body.decode())
    assert samples[("hubproxy_cache_disk_free_bytes", frozenset())] == 8_283_750
    assert samples[("hubproxy_cache_bytes", frozenset())] == 0
    disk[0] = DiskSpace(79 << 30, TiB)  # space was freed: the next miss is cached
    r = await client.request(f"/v2/library/alpine/blobs/sha256:{hexdigest(layers[0])}")
    assert r.body == layers[0]
    assert f"cache: the disk of {cache_dir} has room again (79 GiB free): caching blobs again" in (
        caplog.messages
    )
    assert proxy.proxy.pullthrough is not None
    await proxy.fills_ended()
    assert proxy.proxy.pullthrough.blobs.size_of(hexdigest(layers[0])) == len(layers[0])


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """An empty 8 MiB tmpfs (needs root, as CI has); unmounted after the test."""
    where = tmp_path / "disk"
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(where)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


async def test_a_small_blob_is_cached_on_a_small_disk(
    hub: FakeHub,
    start_proxy: StartProxy,
    ca: trustme.CA,
    tiny_disk: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The issue's reproduction on a real 8 MiB file system: the blobs are cached, the startup
    line says how the disk bounds the cache, and once the disk is full the next miss streams
    uncached with one warning."""
    small, other = make_layer(22, 600), make_layer(23, 600)
    hub.add_image("library/alpine", "3.20", [small, other])
    caplog.set_level(logging.INFO, logger="hubproxy")
    proxy = await start_proxy(cache_dir=str(tiny_disk))
    (line,) = [m for m in caplog.messages if "listening on" in m]
    assert re.search(
        rf"; cache {tiny_disk} \(up to 20 GiB; \d\.\d MiB free on its disk, 410 KiB kept free: "
        r"the disk bounds it to \d\.\d MiB\);",
        line,
    ), line
    client = RegistryClient(proxy.url, ca)
    digest = f"sha256:{hexdigest(small)}"
    for _ in range(2):
        assert (await client.request(f"/v2/library/alpine/blobs/{digest}")).body == small
    assert _cdn_gets(hub, digest) == 1  # the second pull was a hit
    (tiny_disk / "ballast").write_bytes(bytes(os.statvfs(tiny_disk).f_bavail * 4096 - 100_000))
    caplog.clear()
    for _ in range(2):
        r = await client.request(f"/v2/library/alpine/blobs/sha256:{hexdigest(other)}")
        assert r.complete and r.body == other
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"cache: a {format_size(len(other))} blob is not cached: ")
