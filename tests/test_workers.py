"""``--workers N``: real processes on one port sharing one cache directory. One upstream fetch
per blob across them, a killed worker's fill taken over, SIGHUP reaching every worker, /metrics
summed; and the cross-process claims themselves, with a second real process."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import h11
import pytest
import trio
import trio.testing
import trustme

from hubproxy.cache.claims import ClaimedElsewhere, Claims, owner_alive, process_start
from hubproxy.cache.manifests import DATABASE
from hubproxy.cache.store import BlobStore, FillState
from hubproxy.ops.statuspage import format_count
from hubproxy.ops.workermetrics import Snapshot, merge
from hubproxy.policy.errors import CacheFillFailed
from hubproxy.settings import parse_workers
from tests.conftest import TLSFiles
from tests.fakehub import FakeHub, FetchResult, make_layer
from tests.registry_client import RegistryClient
from tests.test_blob_bounds import read_whole
from tests.test_process import HubproxyProcess, hubproxy_process
from tests.test_statuspage import _rows

CONNECTIONS = 16  # one worker of two gets them all with probability 2**-15


@contextlib.asynccontextmanager
async def two_workers(
    hub: FakeHub, tls_files: TLSFiles, cache: Path
) -> AsyncIterator[HubproxyProcess]:
    async with hubproxy_process(
        "--workers",
        "2",
        *("--cert", str(tls_files.cert_pem), "--key", str(tls_files.key_pem)),
        *("--upstream", hub.registry_url, "--upstream-ca", str(tls_files.ca_pem)),
        *("--library-prefix", "--cache-dir", str(cache)),
        *("--body-memory", "24M"),
    ) as running:
        with trio.fail_after(30):
            await running.wait_for(rb"2 workers serving on port \d+")
        yield running
        with trio.fail_after(30):
            running.process.send_signal(signal.SIGTERM)
            assert await running.process.wait() == 0


async def eventually(check: Callable[[], Awaitable[bool]]) -> None:
    """Wait until ``check`` holds, looking again every 20 ms: what another process does
    reaches this one by no trio.Event."""
    for _ in itertools.count():
        if await check():
            return
        await trio.sleep(0.02)


def cdn_gets(hub: FakeHub, digest: str) -> int:
    return sum(1 for r in hub.requests if r.server == "cdn" and digest in r.target)


async def pull_many(client: RegistryClient, path: str, count: int) -> list[FetchResult]:
    """``count`` requests at once, each on its own connection (spread over the workers)."""
    results: list[FetchResult] = []

    async def one() -> None:
        results.append(await client.request(path))

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(one)
    return results


@pytest.mark.parametrize("text", ["0", "129", "many", ""])
def test_workers_setting_refuses_what_is_not_a_count(text: str) -> None:
    with pytest.raises(ValueError, match="auto"):
        parse_workers(text)


def test_workers_setting_takes_a_count_or_auto() -> None:
    assert parse_workers("3") == 3
    assert parse_workers("auto") == len(os.sched_getaffinity(0))


async def test_one_fetch_across_workers_metrics_summed_sighup_to_all(
    hub: FakeHub, ca: trustme.CA, tls_files: TLSFiles, tmp_path: Path
) -> None:
    layer = make_layer(31, 600_000)
    hub.add_image("library/alpine", "3.20", [layer])
    digest = hashlib.sha256(layer).hexdigest()
    path = f"/v2/alpine/blobs/sha256:{digest}"
    stall = hub.stall_blob(f"sha256:{digest}", after=200_000)
    async with two_workers(hub, tls_files, tmp_path / "cache") as running:
        client = RegistryClient(running.url, ca)
        async with trio.open_nursery() as nursery:
            first: list[FetchResult] = []

            async def filling() -> None:
                first.append(await client.request(path))

            nursery.start_soon(filling)
            with trio.fail_after(30):
                await stall.reached.wait()  # the fill is under way, held mid-blob

                async def claimed() -> bool:
                    return len(list((tmp_path / "cache" / "tmp").glob("*.claim"))) == 1

                await eventually(claimed)
                results: list[FetchResult] = []

                async def follow_all() -> None:
                    results.extend(await pull_many(client, path, CONNECTIONS))

                nursery.start_soon(follow_all)
                # every follower is waiting on the fill (the metrics request itself is active
                # too) before the upstream goes on
                active = 'hubproxy_client_connections{state="active"}'

                async def all_following() -> bool:
                    metrics = (await client.request("/metrics")).body
                    return _value(metrics, active) >= CONNECTIONS + 2

                await eventually(all_following)
                stall.release.set()
        assert [r.status for r in first + results] == [200] * (CONNECTIONS + 1)
        assert all(r.body == layer for r in first + results)
        assert cdn_gets(hub, digest) == 1  # one fetch, whichever worker each client reached
        with trio.fail_after(30):
            # both workers answered the followers (the kernel spread the connections)
            await running.wait_for(rb"access\[w0\]: 127\.0\.0\.1 GET /v2/alpine/blobs/")
            await running.wait_for(rb"access\[w1\]: 127\.0\.0\.1 GET /v2/alpine/blobs/")
            metrics = (await client.request("/metrics")).body
        blob_200 = _value(metrics, 'hubproxy_requests_total{route="blob",status="200"}')
        assert blob_200 == CONNECTIONS + 1  # summed over both workers
        assert _value(metrics, "hubproxy_workers") == 2
        # --body-memory is the mirror's: each worker took half, and /metrics sums them
        assert _value(metrics, "hubproxy_body_memory_limit_bytes") == 24 * 1024 * 1024
        assert re.search(  # the first worker's startup line speaks for all
            rb"hubproxy\[w0\]: hubproxy listening on [^\n]*; body buffers 12 MiB per worker\n",
            running.output,
        )
        per_worker = [
            _value(metrics, f'hubproxy_worker_requests_total{{worker="{i}"}}') for i in (0, 1)
        ]
        assert all(count > 0 for count in per_worker)
        # the status page's counts are the whole mirror's too, whichever worker answers it
        page = (await client.request("/")).body
        served = dict(_rows(page))["Requests served"]
        assert served == format_count(sum(per_worker)) and sum(per_worker) > max(per_worker)
        running.process.send_signal(signal.SIGHUP)  # the supervisor passes it to each worker
        with trio.fail_after(30):
            await running.wait_for(rb"hubproxy\[w0\]: SIGHUP: reloaded the certificate")
            await running.wait_for(rb"hubproxy\[w1\]: SIGHUP: reloaded the certificate")


async def test_a_blob_hashed_in_one_worker_is_not_hashed_again_in_the_other(
    hub: FakeHub, ca: trustme.CA, tls_files: TLSFiles, tmp_path: Path
) -> None:
    """Each worker hashes a cached blob on its first read of it, unless another worker tells
    it that it hashed that very file (cache.confirmshare): 0.6 CPU-seconds per GiB saved per
    worker."""
    layer = make_layer(48, 300_000)
    hub.add_image("library/alpine", "3.22", [layer])
    digest = hashlib.sha256(layer).hexdigest()
    path = f"/v2/alpine/blobs/sha256:{digest}"
    blob_file = tmp_path / "cache" / "blobs" / "sha256" / digest[:2] / digest
    async with two_workers(hub, tls_files, tmp_path / "cache") as running:
        client = RegistryClient(running.url, ca)
        assert (await client.request(path)).body == layer  # the fill

        async def settled() -> bool:  # renamed into place (after the fill's last byte went
            # out), a file-clock tick ago (cache.store)
            try:
                return time.time_ns() - os.stat(blob_file).st_ctime_ns > 200_000_000
            except FileNotFoundError:
                return False

        async def told() -> bool:
            metrics = (await client.request("/metrics")).body
            return _value(metrics, "hubproxy_cache_verifications_received_total") >= 1

        with trio.fail_after(30):
            await eventually(settled)
            assert (await client.request(path)).body == layer  # hashed, and the other told
            await eventually(told)
        results = await pull_many(client, path, CONNECTIONS)
        assert all(r.status == 200 and r.body == layer for r in results)
        with trio.fail_after(30):  # the connections reached both workers
            await running.wait_for(rb"access\[w0\]: 127\.0\.0\.1 GET /v2/alpine/blobs/")
            await running.wait_for(rb"access\[w1\]: 127\.0\.0\.1 GET /v2/alpine/blobs/")
        metrics = (await client.request("/metrics")).body
        assert _value(metrics, "hubproxy_cache_hits_hashed_total") == 1


async def test_a_killed_workers_fill_is_taken_over(
    hub: FakeHub, ca: trustme.CA, tls_files: TLSFiles, tmp_path: Path
) -> None:
    layer = make_layer(32, 500_000)
    hub.add_image("library/alpine", "3.20", [layer])
    digest = hashlib.sha256(layer).hexdigest()
    path = f"/v2/alpine/blobs/sha256:{digest}"
    stall = hub.stall_blob(f"sha256:{digest}", after=100_000)
    cache = tmp_path / "cache"
    async with two_workers(hub, tls_files, cache) as running:
        client = RegistryClient(running.url, ca)
        async with trio.open_nursery() as nursery:

            async def doomed() -> None:
                with contextlib.suppress(OSError, trio.BrokenResourceError, h11.ProtocolError):
                    result = await client.request(path)
                    assert not result.complete or result.body == layer  # never wrong bytes

            nursery.start_soon(doomed)
            with trio.fail_after(30):
                await stall.reached.wait()

                async def claimed() -> bool:
                    return bool(list((cache / "tmp").glob("*.claim")))

                await eventually(claimed)  # the fill started when the head arrived
                (claim,) = (cache / "tmp").glob("*.claim")
                owner = Claims(cache / "tmp", idle=60).read(digest)
                assert owner is not None and claim.name == f"{digest}.claim"
                os.kill(owner.pid, signal.SIGKILL)  # the owner dies mid-fill
                await running.wait_for(rb"was killed by SIGKILL after \d+s; starting it again")
                stall.release.set()
        with trio.fail_after(30):
            # one miss at a time: concurrent misses each ask the upstream before one fill wins
            results = [await client.request(path)]
            results += await pull_many(client, path, 3)
        assert [r.body == layer for r in results] == [True] * 4  # verified bytes, served
        assert cdn_gets(hub, digest) == 2  # fetched again after the owner died
        assert (cache / "blobs" / "sha256" / digest[:2] / digest).read_bytes() == layer
        assert not list((cache / "tmp").glob(f"{digest}*"))  # no claim or partial file left


def _value(metrics: bytes, sample: str) -> float:
    match = re.search(rb"(?m)^" + re.escape(sample.encode()) + rb" (\S+)$", metrics)
    assert match is not None, sample
    return float(match.group(1))


# -- the claims, with a second real process ------------------------------------------------------


async def _other_process() -> trio.Process:
    """A process that runs until killed: a claim's owner that is not this one."""
    return await trio.lowlevel.open_process(
        [sys.executable, "-c", "import time; time.sleep(60)"], stdin=subprocess.DEVNULL
    )


def _claim_as(claims: Claims, process: trio.Process, key: str, size: int, temp: Path) -> None:
    """Take a claim in the name of ``process`` (its pid and start time)."""
    claims.pid, claims.started = process.pid, process_start(process.pid) or ""
    try:
        claims.take(key, size, "", temp)
    finally:
        claims.pid = os.getpid()
        claims.started = process_start(claims.pid) or ""
    claims.owned.pop(key, None)  # the other process's, not ours to release


def _store_with_claims(
    tmp_path: Path, nursery: trio.Nursery, seed: int, size: int
) -> tuple[bytes, str, BlobStore, Claims]:
    """A blob, its key, an open store whose fills take cross-process claims, and its claims."""
    blob = make_layer(seed, size)
    store = BlobStore(tmp_path, 1 << 30)
    claims = store.claims = Claims(store.tmp_dir, idle=60)
    claims.nursery = nursery
    store.open()
    return blob, hashlib.sha256(blob).hexdigest(), store, claims


async def test_a_claim_follower_never_gets_the_last_byte_before_the_rename(
    tmp_path: Path, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    blob, key, store, claims = _store_with_claims(tmp_path, nursery, 33, 100_000)
    other = await _other_process()
    try:
        temp = store.tmp_dir / f"{key}.abc.partial"
        temp.write_bytes(blob)  # all bytes written, not yet verified and renamed
        _claim_as(Claims(store.tmp_dir, idle=60), other, key, len(blob), temp)
        with pytest.raises(ClaimedElsewhere):
            claims.take(key, len(blob), "", store.tmp_dir / f"{key}.mine.partial")
        fill = store.fill_of(key)
        assert fill is not None
        reader = store.reader(key)
        received = bytearray()
        with trio.move_on_after(10):  # the reader waits for the verdict (no time passes)
            while (chunk := await reader.next_chunk()) is not None:
                received += chunk
        assert bytes(received) == blob[:-1] and fill.state is FillState.FILLING
        final = store.path(key)
        final.parent.mkdir(exist_ok=True)
        os.replace(temp, final)  # what the owner does once the digest verified
        with trio.fail_after(10):
            while (chunk := await reader.next_chunk()) is not None:
                received += chunk
        reader.close()
        assert bytes(received) == blob and store.size_of(key) == len(blob)
    finally:
        other.kill()
        await other.wait()


async def test_a_dead_owners_claim_is_taken_over(
    tmp_path: Path, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    blob, key, store, claims = _store_with_claims(tmp_path, nursery, 34, 50_000)
    other = await _other_process()
    temp = store.tmp_dir / f"{key}.abc.partial"
    temp.write_bytes(blob[:1000])
    _claim_as(Claims(store.tmp_dir, idle=60), other, key, len(blob), temp)
    fill = store.fill_of(key)
    assert fill is not None
    owner = claims.read(key)
    assert owner is not None and owner_alive(owner)
    other.kill()
    await other.wait()
    with trio.fail_after(10):
        while fill.state is FillState.FILLING:  # the follower notices, and gives up
            await fill.wait_change()
    assert fill.state is FillState.FAILED and fill.disk_failed  # resumable upstream
    assert not temp.exists() and claims.read(key) is None  # broken, file and all
    mine = store.tmp_dir / f"{key}.mine.partial"
    assert claims.take(key, len(blob), "", mine).pid == os.getpid()


async def test_eviction_bounds_the_directory_across_processes(tmp_path: Path) -> None:
    """Two stores on one directory (as two workers): blobs the other one wrote count too."""
    first = BlobStore(tmp_path, 250_000)
    first.claims = Claims(first.tmp_dir, idle=60)
    first.open()
    second = BlobStore(tmp_path, 250_000)
    second.claims = Claims(second.tmp_dir, idle=60)
    second.open()

    async def fill(store: BlobStore, blob: bytes) -> None:
        key = hashlib.sha256(blob).hexdigest()
        started = store.start_fill(key, len(blob))
        chunks = [blob]

        class Body:
            async def receive_body(self) -> bytes | None:
                return chunks.pop() if chunks else None

        await store.run_fill(started, Body(), contextlib.AsyncExitStack())
        assert started.state is FillState.DONE
        # the shared recency is the files' mtimes, which the kernel stamps from a coarse clock
        # (ticks of a few ms): fills this quick may tie, so each is given its own second
        filled.append(key)
        os.utime(store.path(key), (1_700_000_000 + len(filled),) * 2)

    filled: list[str] = []
    blobs = [make_layer(40 + i, 100_000) for i in range(4)]
    await fill(first, blobs[0])
    await fill(second, blobs[1])
    await fill(first, blobs[2])  # 300,000 bytes would not fit: the oldest goes
    on_disk = sum(p.stat().st_size for p in (tmp_path / "blobs").rglob("*") if p.is_file())
    assert on_disk <= 250_000
    assert second.size_of(hashlib.sha256(blobs[0]).hexdigest()) is None  # evicted by the other
    assert second.size_of(hashlib.sha256(blobs[2]).hexdigest()) == len(blobs[2])  # adopted
    await fill(second, blobs[3])
    on_disk = sum(p.stat().st_size for p in (tmp_path / "blobs").rglob("*") if p.is_file())
    assert on_disk <= 250_000


def test_metrics_merge_sums_counters_and_takes_shared_gauges_once() -> None:
    def snap(requests: float, cache_bytes: float, started: float) -> Snapshot:
        return {
            "hubproxy_requests": {
                "kind": "counter",
                "help": "h",
                "samples": [["hubproxy_requests_total", [["route", "blob"]], requests]],
            },
            "hubproxy_cache_bytes": {
                "kind": "gauge",
                "help": "h",
                "samples": [["hubproxy_cache_bytes", [], cache_bytes]],
            },
            "hubproxy_start_time_seconds": {
                "kind": "gauge",
                "help": "h",
                "samples": [["hubproxy_start_time_seconds", [], started]],
            },
        }

    retired = {k: v for k, v in snap(5, 0, 0).items() if k == "hubproxy_requests"}
    merged = merge([snap(2, 100, 20), snap(3, 100, 10)], retired)
    assert merged["hubproxy_requests"]["samples"] == [
        ["hubproxy_requests_total", [["route", "blob"]], 10.0]
    ]
    assert merged["hubproxy_cache_bytes"]["samples"][0][2] == 100.0
    assert merged["hubproxy_start_time_seconds"]["samples"][0][2] == 10.0


async def test_a_pulls_confirmations_reach_every_worker(
    hub: FakeHub, ca: trustme.CA, tls_files: TLSFiles, tmp_path: Path
) -> None:
    """A manifest's confirmation passed on in one worker is kept in the others: the layers of a
    cached image ask the upstream nothing, whichever worker each connection reaches."""
    layers = [make_layer(41, 2000), make_layer(42, 3000)]
    hub.add_image("library/alpine", "3.21", layers)
    accept = [("accept", "application/vnd.docker.distribution.manifest.v2+json")]
    async with two_workers(hub, tls_files, tmp_path / "cache") as running:
        first = RegistryClient(running.url, ca)
        r = await first.request("/v2/alpine/manifests/3.21", headers=accept)
        document = json.loads(r.body)
        digests = [document["config"]["digest"]] + [d["digest"] for d in document["layers"]]
        for digest in digests:  # cached, each worker's access checks made
            results = await pull_many(first, f"/v2/alpine/blobs/{digest}", CONNECTIONS)
            assert [x.status for x in results] == [200] * CONNECTIONS
        state = tmp_path / "cache" / DATABASE

        async def linked() -> bool:  # the workers' links written where every worker reads them
            with contextlib.closing(sqlite3.connect(state)) as db:
                rows = db.execute(
                    "SELECT digest FROM links WHERE repository = 'library/alpine'"
                ).fetchall()
            return set(digests) <= {digest for (digest,) in rows}

        with trio.fail_after(30):
            await eventually(linked)
        second = RegistryClient(running.url, ca)  # a token of its own: nothing confirmed yet
        assert (await second.request("/v2/alpine/manifests/3.21", headers=accept)).status == 200
        seen = len(hub.requests)

        async def received() -> bool:
            metrics = (await second.request("/metrics")).body
            return _value(metrics, "hubproxy_access_confirmations_received_total") >= len(digests)

        with trio.fail_after(30):
            await eventually(received)
        for digest in digests:
            results = await pull_many(second, f"/v2/alpine/blobs/{digest}", CONNECTIONS)
            assert [x.status for x in results] == [200] * CONNECTIONS
            assert all(hashlib.sha256(x.body).hexdigest() == digest[7:] for x in results)
        asked = [s.target for s in hub.requests[seen:] if s.server == "registry"]
        assert not [target for target in asked if "/blobs/" in target]


def _two_stores_with_one_blob(tmp_path: Path, size: int) -> tuple[bytes, str, list[BlobStore]]:
    """Two workers' stores on one cache directory holding one blob, each telling the other of
    its verifications (the datagrams between them are tests/test_confirmshare.py's); their
    file clock far enough ahead that every file's identity is settled."""
    blob = make_layer(47, size)
    key = hashlib.sha256(blob).hexdigest()
    stores = []
    for _ in range(2):
        store = BlobStore(tmp_path, 1 << 30)
        store.claims = Claims(store.tmp_dir, idle=60)
        store.open()
        store.wall_clock = lambda: time.time_ns() + 10**10
        stores.append(store)
    path = stores[0].path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(blob)
    for store in stores:
        assert isinstance(store.claims, Claims)
        assert store.claims.look_up(store, key) == len(blob)  # adopted
    stores[0].share_verification = stores[1].keep_verified
    stores[1].share_verification = stores[0].keep_verified
    return blob, key, stores


async def test_a_blob_hashed_by_one_worker_is_not_hashed_again_by_another(tmp_path: Path) -> None:
    blob, key, (one, two) = _two_stores_with_one_blob(tmp_path, 300_000)
    assert await read_whole(one, key) == blob
    assert one.stats.hits_hashed == 1  # its first read of it: hashed, and told
    assert two.stats.verifications_received == 1
    assert await read_whole(two, key) == blob
    assert two.stats.hits_hashed == 0


async def test_a_touch_carries_a_verification_to_every_worker_but_never_over_a_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Moving a served blob's mtime (the shared recency) changes its identity: the worker that
    moved it carries its verification over and tells the others, who would otherwise hash the
    blob again. A file that changed since it was hashed is never carried over: its next read
    hashes it, and the damage is found."""
    monkeypatch.setattr("hubproxy.cache.claims.TOUCH_EVERY", -1.0)  # every look-up touches
    blob, key, (one, two) = _two_stores_with_one_blob(tmp_path, 300_000)
    assert await read_whole(one, key) == blob
    assert isinstance(one.claims, Claims)
    one.claims.look_up(one, key)  # touched: a new ctime
    assert two.stats.verifications_received == 2
    assert await read_whole(two, key) == blob
    assert await read_whole(one, key) == blob
    assert one.stats.hits_hashed + two.stats.hits_hashed == 1
    damaged = os.open(one.path(key), os.O_WRONLY)  # written into, then touched by a worker
    try:
        os.pwrite(damaged, b"\0" * 16, 1000)
    finally:
        os.close(damaged)
    one.claims.look_up(one, key)
    with pytest.raises(CacheFillFailed, match="damaged"):
        await read_whole(one, key)
    with pytest.raises(CacheFillFailed, match=r"damaged|removed"):  # (one deleted it)
        await read_whole(two, key)
