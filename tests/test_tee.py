"""The one-pass miss: a fill hands the upstream's chunks to its readers from memory while a
worker thread writes and hashes them. First the store driven chunk by chunk, then hubproxy in
front of the fake Docker Hub over TLS."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import sys
import threading
import time
from collections import deque
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio
import trio.testing
import trustme

from hubproxy.cache import store as store_module
from hubproxy.cache.store import (
    AHEAD_OF_DISK,
    LEAD_WAIT,
    LEAD_WAIT_SHARE,
    BlobReader,
    BlobStore,
    Fill,
    FillState,
)
from hubproxy.net.buffers import BODIES
from hubproxy.policy.diskpace import DiskPace
from hubproxy.policy.errors import CacheFillFailed
from tests.conftest import StartProxy
from tests.fakehub import FakeHub, make_layer
from tests.registry_client import RegistryClient
from tests.test_cache import Feed, hexdigest, until_ended
from tests.wire import WireClient

CHUNK = 64 * 1024


@pytest.fixture(autouse=True)
def every_fill_uses_the_disk_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk always slow: fills would write on the event loop while the disk is fast
    (``policy.diskpace``); here the disk thread is what is tested."""
    monkeypatch.setattr(DiskPace, "writes_on_loop", lambda self, now: False)


def chunks_of(data: bytes, size: int = CHUNK) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


async def until_written(fill: Fill, count: int) -> None:
    """Wait until the writer thread wrote ``count`` bytes (the fill's own progress)."""
    while fill.state is FillState.FILLING and fill.written < count:
        await fill.wait_change(written=True)


async def fill_chunk_by_chunk(nursery: trio.Nursery, store: BlobStore, data: bytes) -> Fill:
    """Fill ``store`` with ``data`` from an upstream giving it ``CHUNK`` at a time; the ended
    fill."""
    fill = store.start_fill(hexdigest(data), len(data))
    feed = Feed()
    nursery.start_soon(store.run_fill, fill, feed, AsyncExitStack())
    for piece in [*chunks_of(data), None]:
        await feed.send.send(piece)
    await until_ended(fill)
    return fill


def gate_writes(monkeypatch: pytest.MonkeyPatch, gate: threading.Event) -> list[int]:
    """A slow disk: every cache write waits for ``gate`` (in the writer thread). The sizes of
    the writes that went through are listed."""
    real_write = store_module._write_all
    done: list[int] = []

    def slow_write(fd: int, data: bytes | bytearray) -> None:
        gate.wait()
        real_write(fd, data)
        done.append(len(data))

    monkeypatch.setattr(store_module, "_write_all", slow_write)
    return done


# -- the store ------------------------------------------------------------------------------------


async def test_a_reader_keeping_up_gets_the_upstreams_own_buffer(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """No file read for a reader that keeps up (the client that caused the fill): its chunk
    is a view of the very bytes object the upstream connection returned."""
    data = os.urandom(5 * CHUNK)
    store = BlobStore(tmp_path, 1 << 30)
    store.open()
    key = hexdigest(data)
    fill = store.start_fill(key, len(data))
    feed = Feed()
    nursery.start_soon(store.run_fill, fill, feed, AsyncExitStack())
    reader = store.reader(key)
    got = bytearray()
    for piece in chunks_of(data):
        await feed.send.send(piece)
        chunk = await reader.next_chunk()
        assert chunk is not None
        assert chunk.obj is piece  # the same buffer: not read back from the file
        got += chunk
    await feed.send.send(None)
    while (chunk := await reader.next_chunk()) is not None:
        got += chunk
    reader.close()
    assert bytes(got) == data
    await until_ended(fill)  # committed: after its readers completed
    assert fill.state is FillState.DONE
    assert store.path(key).read_bytes() == data


async def test_a_reader_behind_the_window_reads_the_file(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The fill waits for a reader only a moment (``LEAD_WAIT`` per chunk): one that fell
    behind what the fill keeps in memory reads the file instead, and still gets every byte."""
    data = os.urandom(40 * CHUNK)
    store = BlobStore(tmp_path, 1 << 30)
    store.open()
    key = hexdigest(data)
    fill = store.start_fill(key, len(data))
    feed = Feed()
    nursery.start_soon(store.run_fill, fill, feed, AsyncExitStack())
    reader = store.reader(key)
    pieces = chunks_of(data)
    for piece in pieces[:-1]:  # nobody reads meanwhile: the fill goes on at upstream speed
        await feed.send.send(piece)
    await until_written(fill, len(data) - CHUNK)
    assert fill.written == len(data) - CHUNK
    first = await reader.next_chunk()
    assert first is not None
    assert not any(first.obj is piece for piece in pieces)  # from the file
    got = bytearray(first)
    await feed.send.send(pieces[-1])
    await feed.send.send(None)
    while (chunk := await reader.next_chunk()) is not None:
        got += chunk
    reader.close()
    assert bytes(got) == data
    await until_ended(fill)  # committed: after its readers completed
    assert fill.state is FillState.DONE


async def test_a_blob_received_whole_before_its_client_read_goes_out_from_memory(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """A small blob often arrives whole, and is verified, before the client that caused the
    fill sent much of it: the chunks the fill still held then go out from memory (before, the
    window was dropped at the verdict and the client read them back from the file). Once that
    client took them, the fill holds nothing."""
    data = os.urandom(5 * CHUNK)  # within what a fill keeps in memory behind its writes
    assert len(data) <= store_module.KEPT_IN_MEMORY * BODIES.chunk()
    store = BlobStore(tmp_path, 1 << 30)
    store.open()
    key = hexdigest(data)
    fill = store.start_fill(key, len(data))
    feed = Feed()
    nursery.start_soon(store.run_fill, fill, feed, AsyncExitStack())
    reader = store.reader(key)
    pieces = chunks_of(data)
    for piece in [*pieces, None]:  # all of it before the client takes a byte
        await feed.send.send(piece)
    await until_ended(fill)
    assert fill.state is FillState.DONE
    got = bytearray()
    while (chunk := await reader.next_chunk()) is not None:
        assert any(chunk.obj is piece for piece in pieces)  # not read back from the file
        got += chunk
    assert bytes(got) == data
    assert store.stats.fill_memory_bytes == len(data)
    assert fill.view(len(data) - 1, len(data)) is None  # taken: no longer held
    reader.close()


async def test_once_done_a_fill_keeps_only_what_its_foremost_reader_has_yet_to_take(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """After the verdict the fill's memory only shrinks: the chunks behind its foremost
    reader are dropped as it moves on (a reader further behind reads them from the file, as
    it would have while the fill ran), and the rest once no reader follows the fill."""
    data = os.urandom(5 * CHUNK)
    store = BlobStore(tmp_path, 1 << 30)
    store.open()
    key = hexdigest(data)
    fill = store.start_fill(key, len(data))
    feed = Feed()
    nursery.start_soon(store.run_fill, fill, feed, AsyncExitStack())
    ahead, behind = store.reader(key), store.reader(key)
    pieces = chunks_of(data)
    for piece in [*pieces, None]:
        await feed.send.send(piece)
    await until_ended(fill)
    taken = bytearray()
    for _ in range(3):
        chunk = await ahead.next_chunk()
        assert chunk is not None
        taken += chunk
    assert len(taken) == 3 * CHUNK
    assert fill.view(0, 1) is None and fill.view(2 * CHUNK, 2 * CHUNK + 1) is None  # dropped
    assert fill.view(3 * CHUNK, 3 * CHUNK + 1) is not None  # the foremost reader's next
    first = await behind.next_chunk()
    assert first is not None and not any(first.obj is piece for piece in pieces)  # the file
    assert bytes(first) == data[: len(first)]
    assert len(first) < len(data)
    ahead.close()  # it leaves: the one behind is the foremost now, and still needs the rest
    assert fill.view(len(first), len(first) + 1) is not None
    behind.close()  # nobody follows
    assert fill.view(len(data) - 1, len(data)) is None


def hold_fsync(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Make ``os.fsync`` wait (in its disk thread) until the returned event is set: a slow
    disk's sync of a large blob, held as long as the test needs (at most 10 s)."""
    synced = threading.Event()
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        synced.wait(10)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    return synced


async def test_a_slow_fsync_does_not_hold_the_clients_last_byte(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last byte waits for the verdict only: the file's fsync (seconds for a large blob on
    a slow disk) and rename come after, and the blob is cached once they are done. Before,
    the client waited for the disk at 100%."""
    synced = hold_fsync(monkeypatch)
    data = os.urandom(5 * CHUNK)
    store = BlobStore(tmp_path, 1 << 30)
    store.open()
    key = hexdigest(data)
    fill = store.start_fill(key, len(data))
    feed = Feed()
    nursery.start_soon(store.run_fill, fill, feed, AsyncExitStack())
    reader = store.reader(key)
    for piece in [*chunks_of(data), None]:
        await feed.send.send(piece)
    got = bytearray()
    with trio.fail_after(5):
        while (chunk := await reader.next_chunk()) is not None:
            got += chunk
    reader.close()
    assert bytes(got) == data
    assert fill.verified and fill.state.value == "filling"  # the disk still syncing
    assert store.size_of(key) is None
    synced.set()
    await until_ended(fill)
    assert fill.state is FillState.DONE
    assert store.size_of(key) == len(data) and store.path(key).read_bytes() == data


async def test_a_failed_fsync_after_the_verdict_leaves_the_readers_bytes_good(
    nursery: trio.Nursery,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A disk that fails the fsync of a verified blob: nothing is cached, and a reader that
    holds the file goes on with the verified bytes to the end; one that never opened it (the
    file is gone) fails as from any failed fill, resumable from the upstream."""

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    data = os.urandom(5 * CHUNK)
    store = BlobStore(tmp_path, 1 << 30)
    store.open()
    key = hexdigest(data)
    fill = store.start_fill(key, len(data))
    feed = Feed()
    nursery.start_soon(store.run_fill, fill, feed, AsyncExitStack())
    reading, idle = store.reader(key), store.reader(key)
    pieces = chunks_of(data)
    await feed.send.send(pieces[0])
    first = await reading.next_chunk()  # it holds the file from here on
    assert first is not None
    got = bytearray(first)
    for piece in [*pieces[1:], None]:
        await feed.send.send(piece)
    await until_ended(fill)
    assert fill.verified and fill.state is FillState.FAILED
    assert store.size_of(key) is None and not fill.temp_path.exists()
    assert "Input/output error" in caplog.text
    while (chunk := await reading.next_chunk()) is not None:
        got += chunk
    reading.close()
    assert bytes(got) == data
    with pytest.raises(CacheFillFailed) as failed:
        await idle.next_chunk()
    assert failed.value.resumable
    idle.close()


UPSTREAM = 0.001  # seconds for the upstream to deliver a chunk
SENDING = 0.00125  # a client sending one: slower, by less than the fill may wait for it
assert SENDING - UPSTREAM < LEAD_WAIT and SENDING - UPSTREAM <= SENDING * LEAD_WAIT_SHARE


class FastUpstream:
    """An upstream faster than the reader: a chunk every ``UPSTREAM`` seconds."""

    def __init__(self, data: bytes) -> None:
        self.pieces = deque(chunks_of(data))

    async def receive_body(self) -> bytes | None:
        await trio.sleep(UPSTREAM)
        return self.pieces.popleft() if self.pieces else None


def filled_from_a_fast_upstream(
    tmp_path: Path, data: bytes
) -> tuple[BlobStore, Fill, BlobReader, FastUpstream]:
    """A store, a fill of ``data`` not started yet, the reader that caused it, its upstream."""
    store = BlobStore(tmp_path, 1 << 30)
    store.open()
    key = hexdigest(data)
    fill = store.start_fill(key, len(data))
    return store, fill, store.reader(key), FastUpstream(data)


async def test_the_fill_waits_a_moment_for_its_foremost_reader(
    nursery: trio.Nursery,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The client that caused a miss takes every chunk from the upstream's own buffer, even
    with an upstream faster than it: the fill waits for it to come back within the window
    (before, it raced ahead and the client read most of the blob back from the file)."""
    monkeypatch.undo()  # writes on the loop: a thread would let the mock clock jump
    data = os.urandom(200 * CHUNK)  # its lag, unpaced, would grow past the window
    store, fill, reader, feed = filled_from_a_fast_upstream(tmp_path, data)
    nursery.start_soon(store.run_fill, fill, feed, AsyncExitStack())
    got = bytearray()
    while (chunk := await reader.next_chunk()) is not None:
        got += chunk
        await trio.sleep(SENDING)  # sending it takes the client a while
    reader.close()
    assert bytes(got) == data
    await until_ended(fill)  # committed: after its readers completed
    assert fill.state is FillState.DONE
    # the last chunk too: held back until the verdict, then from memory as well
    assert store.stats.fill_memory_bytes == len(data)


async def test_a_slow_reader_holds_the_fill_at_most_a_moment_per_chunk(
    nursery: trio.Nursery,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A slow reader does not pace the fill: it waits ``LEAD_WAIT_SHARE`` of its time at
    most, so it receives the blob in 4/3 of the upstream's time, and the reader finishes from
    the file."""
    monkeypatch.undo()  # writes on the loop: a thread would let the mock clock jump
    data = os.urandom(40 * CHUNK)
    store, fill, reader, feed = filled_from_a_fast_upstream(tmp_path, data)
    start = trio.current_time()
    nursery.start_soon(store.run_fill, fill, feed, AsyncExitStack())
    received_at: list[float] = []

    async def watch() -> None:
        while fill.received < len(data):
            await fill.wait_change()
        received_at.append(trio.current_time() - start)

    nursery.start_soon(watch)
    got = bytearray()
    taken_when_done = -1
    while (chunk := await reader.next_chunk()) is not None:
        got += chunk
        if fill.received == len(data) and taken_when_done < 0:
            taken_when_done = len(got)
        await trio.sleep(1.0)  # a slow client
    await until_ended(fill)
    reader.close()
    assert bytes(got) == data
    await until_ended(fill)  # committed: after its readers completed
    assert fill.state is FillState.DONE
    # the fill had it all while the reader was at its start (its fsync, in a thread, is not
    # timed: the mock clock jumps to the reader's next wake-up while a thread runs)
    assert 0 <= taken_when_done < len(data) // 4
    unpaced = (len(data) // CHUNK + 1) * UPSTREAM
    assert received_at and received_at[0] <= unpaced / (1 - LEAD_WAIT_SHARE) + 1e-9
    assert trio.current_time() - start >= 8  # the reader took its time...
    assert store.stats.fill_memory_bytes < len(data) // 2  # ...reading the file, mostly


async def test_a_slow_disk_holds_the_fill_back_instead_of_growing_memory(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the disk writes nothing, the fill takes at most ``AHEAD_OF_DISK`` chunks' worth
    more from the upstream; then it stops receiving (the upstream's TCP window closes)."""
    gate = threading.Event()
    written = gate_writes(monkeypatch, gate)
    data = os.urandom(64 * CHUNK)
    store = BlobStore(tmp_path, 1 << 30)
    store.open()
    key = hexdigest(data)
    fill = store.start_fill(key, len(data))
    feed = Feed()
    nursery.start_soon(store.run_fill, fill, feed, AsyncExitStack())
    pieces = chunks_of(data)
    try:
        taken = 0
        while True:
            await trio.testing.wait_all_tasks_blocked()
            try:
                feed.send.send_nowait(pieces[taken])
            except trio.WouldBlock:
                break  # the fill waits for the disk: it receives nothing more
            taken += 1
        assert written == []
        assert fill.received == taken * CHUNK
        assert fill.received <= AHEAD_OF_DISK * BODIES.chunk() + CHUNK
        assert taken < len(pieces)
    finally:
        gate.set()
    for piece in pieces[taken:]:
        await feed.send.send(piece)
    await feed.send.send(None)
    await until_ended(fill)
    assert fill.state is FillState.DONE
    assert store.path(key).read_bytes() == data


async def test_wrong_bytes_in_many_chunks_fail_a_reader_that_kept_up(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The reader that took every chunk from memory still never gets the last byte of wrong
    bytes: the fill's verdict comes first, and fails it."""
    data = os.urandom(6 * CHUNK)
    wrong = bytearray(data)
    wrong[CHUNK] ^= 0xFF
    store = BlobStore(tmp_path, 1 << 30)
    store.open()
    key = hexdigest(data)
    fill = store.start_fill(key, len(data))
    feed = Feed()
    nursery.start_soon(store.run_fill, fill, feed, AsyncExitStack())
    reader = store.reader(key)
    got = bytearray()
    for piece in chunks_of(bytes(wrong)):
        await feed.send.send(piece)
        chunk = await reader.next_chunk()
        assert chunk is not None
        got += chunk
    assert bytes(got) == bytes(wrong[:-1])  # everything but the last byte
    await feed.send.send(None)
    with pytest.raises(CacheFillFailed) as failed:
        await reader.next_chunk()
    assert not failed.value.resumable
    reader.close()
    assert store.size_of(key) is None
    assert list(store.tmp_dir.iterdir()) == []


async def test_a_disk_failure_after_a_reader_ran_ahead_of_the_file_can_be_resumed(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader got bytes from memory that never reached the file when the disk failed: the
    hash of what it sent (to resume from the upstream, still verified) comes from the fill's
    hash of the file plus the chunks still in memory."""
    real_write = store_module._write_all
    gate = threading.Event()
    writes = 0

    def failing_second_write(fd: int, data: bytes | bytearray) -> None:
        nonlocal writes
        writes += 1
        if writes == 2:
            gate.wait()
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(fd, data)

    monkeypatch.setattr(store_module, "_write_all", failing_second_write)
    data = os.urandom(6 * CHUNK)
    store = BlobStore(tmp_path, 1 << 30)
    store.open()
    key = hexdigest(data)
    fill = store.start_fill(key, len(data))
    feed = Feed()
    nursery.start_soon(store.run_fill, fill, feed, AsyncExitStack())
    reader = store.reader(key)
    pieces = chunks_of(data)
    try:
        for piece in pieces[:3]:
            await feed.send.send(piece)
            assert await reader.next_chunk() is not None
        assert reader.position == 3 * CHUNK
        assert fill.written <= CHUNK  # the second write hangs, then fails
    finally:
        gate.set()
    await until_ended(fill)  # at once: it does not wait for the upstream's next chunk
    assert fill.state is FillState.FAILED and fill.disk_failed
    with pytest.raises(CacheFillFailed) as failed:
        await reader.next_chunk()
    assert failed.value.resumable
    hasher = reader.hash_sent(hashlib.sha256())
    assert hasher.hexdigest() == hashlib.sha256(data[: 3 * CHUNK]).hexdigest()
    reader.close()


# -- hubproxy in front of the fake Docker Hub -----------------------------------------------------


def _cdn_gets(hub: FakeHub, digest: str) -> int:
    return sum(
        1
        for s in hub.requests
        if s.server == "cdn" and s.method == "GET" and digest[7:] in s.target
    )


async def _auth(proxy_url: str, ca: trustme.CA) -> list[tuple[str, str]]:
    token_client = RegistryClient(proxy_url, ca)
    assert (await token_client.request("/v2/library/alpine/tags/list")).status == 200
    return [("authorization", f"Bearer {token_client.tokens['']}")]


async def test_a_slow_follower_and_the_filling_client_both_get_verified_bytes(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    """The client that caused the fill reads it all while a follower reads a little and then
    nothing: the leader completes, the follower completes after, both with the right bytes,
    from one upstream fetch."""
    layer = make_layer(21, 6_000_000)
    hub.add_image("library/alpine", "3.20", [layer])
    digest = "sha256:" + hexdigest(layer)
    proxy = await start_proxy(cache_dir=str(tmp_path / "cache"))
    assert proxy.proxy.pullthrough is not None
    stats = proxy.proxy.pullthrough.stats
    auth = await _auth(proxy.url, ca)
    target = f"/v2/library/alpine/blobs/{digest}"
    with trio.fail_after(30):
        leader = await WireClient.connect(proxy.url, ca)
        await leader.send_request("GET", target, auth)
        assert (await leader.receive_head()).status_code == 200  # the fill is under way
        follower = await WireClient.connect(proxy.url, ca)
        await follower.send_request("GET", target, auth)
        assert (await follower.receive_head()).status_code == 200
        start = await follower.receive_body(limit=100_000)  # then it reads nothing for a while
        assert await leader.receive_body() == layer  # to EndOfMessage: complete
        rest = await follower.receive_body()
        assert start + rest == layer
        await leader.aclose()
        await follower.aclose()
    assert _cdn_gets(hub, digest) == 1
    assert proxy.proxy.pullthrough.blobs.size_of(hexdigest(layer)) == len(layer)
    assert stats.fill_memory_bytes > 0  # some of it went out without a file read


async def test_a_lone_client_that_leaves_mid_fill_does_not_stop_the_fill(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    """As distribution's proxy does: the fill outlives the client that caused it, even when no
    other client follows it, and the blob ends up cached (the next pull is a hit)."""
    layer = make_layer(22, 6_000_000)
    hub.add_image("library/alpine", "3.20", [layer])
    digest = "sha256:" + hexdigest(layer)
    proxy = await start_proxy(cache_dir=str(tmp_path / "cache"))
    assert proxy.proxy.pullthrough is not None
    store = proxy.proxy.pullthrough.blobs
    auth = await _auth(proxy.url, ca)
    with trio.fail_after(30):
        leader = await WireClient.connect(proxy.url, ca)
        await leader.send_request("GET", f"/v2/library/alpine/blobs/{digest}", auth)
        assert (await leader.receive_head()).status_code == 200
        part = await leader.receive_body(limit=200_000)
        assert part and layer.startswith(part)
        fill = store.fills[hexdigest(layer)]
        await leader.aclose()  # gone half-way
        await until_ended(fill)
    assert fill.state is FillState.DONE
    assert store.size_of(hexdigest(layer)) == len(layer)
    assert store.path(hexdigest(layer)).read_bytes() == layer
    r = await RegistryClient(proxy.url, ca).request(f"/v2/library/alpine/blobs/{digest}")
    assert r.complete and r.body == layer
    assert _cdn_gets(hub, digest) == 1


async def test_an_answer_from_the_cache_starts_no_watch_for_its_client(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    """A blob sent from the cache (its file, or a fill that goes on without the client) holds
    nothing for its client alone: a client reading it for longer than ``WATCH_AFTER`` gets no
    watch (a task, a cancel scope and the socket's registration with epoll per blob), and a
    departure is seen at the next send, as before the watch."""
    layer = make_layer(23, 3_000_000)
    hub.add_image("library/alpine", "3.20", [layer])
    digest = "sha256:" + hexdigest(layer)
    proxy = await start_proxy(cache_dir=str(tmp_path / "cache"))
    watches = proxy.server.watches
    auth = await _auth(proxy.url, ca)
    with trio.fail_after(30):
        for state in ("fill", "cached"):
            client = await WireClient.connect(proxy.url, ca)
            await client.send_request("GET", f"/v2/library/alpine/blobs/{digest}", auth)
            assert (await client.receive_head()).status_code == 200, state
            started = watches.started  # (a watch started before the head, on a slow machine)
            await trio.sleep(3 * watches.after)  # a slow client: the answer outlives the delay
            assert await client.receive_body() == layer, state
            assert watches.started == started, state
            await client.aclose()
    assert _cdn_gets(hub, digest) == 1


class _Transfer:
    """Stands for a running body transfer in ``BODIES`` (which holds weak references)."""


async def test_a_readers_buffer_follows_the_body_budget(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """With a hundred transfers running, a reader of a cached blob holds a buffer of their
    small chunk size, not of READ_SIZE: a hundred readers used to hold 25 MiB between them
    (``python -m bench.load`` peaked at 98-100 MiB instead of 89)."""
    data = os.urandom(8 * CHUNK)
    store = BlobStore(tmp_path, 1 << 30)
    store.open()
    fill = await fill_chunk_by_chunk(nursery, store, data)
    key = fill.key
    await until_ended(fill)  # committed: after its readers completed
    assert fill.state is FillState.DONE
    running = [_Transfer() for _ in range(100)]
    for transfer in running:
        BODIES.begin(transfer)
    try:
        small = BODIES.chunk()
        assert small < store_module.READ_SIZE
        reader = store.reader(key)
        got = bytearray()
        while (chunk := await reader.next_chunk()) is not None:
            assert len(chunk.obj) <= small  # type: ignore[arg-type]
            got += chunk
        reader.close()
        assert bytes(got) == data
    finally:
        for transfer in running:
            BODIES.end(transfer)


async def test_fills_write_on_the_loop_until_a_write_is_slow(
    nursery: trio.Nursery,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """While the disk is fast a fill writes and hashes on the event loop (a thread's hand-over
    costs more than it saves); a write that blocks moves the rest of that fill, and the next
    fill, to the disk thread, with one log line."""
    monkeypatch.undo()  # the real DiskPace
    caplog.set_level(logging.INFO, "hubproxy.cache")
    real_write = store_module._write_all
    where: list[str] = []  # per write: "loop" or "thread"

    def disk(fd: int, data: bytes | bytearray) -> None:
        on_loop = threading.current_thread() is threading.main_thread()
        where.append("loop" if on_loop else "thread")
        if len(where) == 3:
            time.sleep(0.1)  # the disk fell behind on its dirty pages
        real_write(fd, data)

    monkeypatch.setattr(store_module, "_write_all", disk)
    store = BlobStore(tmp_path, 1 << 30)
    store.open()
    for _ in range(2):
        data = os.urandom(8 * CHUNK)
        fill = await fill_chunk_by_chunk(nursery, store, data)
        await until_ended(fill)  # committed: after its readers completed
        assert fill.state is FillState.DONE
        assert store.path(fill.key).read_bytes() == data
    assert where == ["loop"] * 3 + ["thread"] * 13
    said = [r.getMessage() for r in caplog.records if "worker thread" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(f"cache: a write to {tmp_path} took ")


async def test_a_write_slowed_by_a_busy_cpu_keeps_fills_on_the_loop(
    nursery: trio.Nursery,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A write that takes long without sleeping (this thread kept from the CPU, as on the
    benchmark's busy machine; here a 30 ms busy loop) is not a slow disk: a worker thread
    would not write sooner, and handing chunks over costs CPU the machine lacks. Timed by the
    clock alone, it moved every fill to the thread for a minute."""
    monkeypatch.undo()  # the real DiskPace
    caplog.set_level(logging.INFO, "hubproxy.cache")
    real_write = store_module._write_all
    where: list[str] = []

    def busy(fd: int, data: bytes | bytearray) -> None:
        on_loop = threading.current_thread() is threading.main_thread()
        where.append("loop" if on_loop else "thread")
        real_write(fd, data)
        if len(where) == 3:
            # after the write (which lets go of the GIL) and holding the GIL throughout: a
            # thread of an earlier test that wanted it now would make this one wait for it
            # (a voluntary switch, as a blocked write is)
            until = time.monotonic() + 0.03
            while time.monotonic() < until:
                pass

    monkeypatch.setattr(store_module, "_write_all", busy)
    store = BlobStore(tmp_path, 1 << 30)
    store.open()
    data = os.urandom(8 * CHUNK)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1.0)  # no other thread takes the GIL from the busy loop
    try:
        fill = await fill_chunk_by_chunk(nursery, store, data)
    finally:
        sys.setswitchinterval(interval)
    await until_ended(fill)  # committed: after its readers completed
    assert fill.state is FillState.DONE
    assert store.path(fill.key).read_bytes() == data
    assert where == ["loop"] * 8
    assert not [r for r in caplog.records if "worker thread" in r.getMessage()]


async def test_a_request_while_a_verified_blob_is_synced_is_a_hit(
    hub: FakeHub,
    start_proxy: StartProxy,
    ca: trustme.CA,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Between the verdict and the rename the blob is the cache's: the client that caused the
    fill completes while the disk still syncs, and a second client gets the blob from there
    as a hit (``X-Cache: HIT``), the upstream sending it once."""
    synced = hold_fsync(monkeypatch)
    layer = make_layer(41, 300_000)
    hub.add_image("library/alpine", "3.20", [layer])
    digest = "sha256:" + hexdigest(layer)
    proxy = await start_proxy(cache_dir=str(tmp_path / "cache"))
    client = RegistryClient(proxy.url, ca)
    try:
        with trio.fail_after(10):
            first = await client.request(f"/v2/library/alpine/blobs/{digest}")
            second = await client.request(f"/v2/library/alpine/blobs/{digest}")
    finally:
        synced.set()
    assert first.complete and first.body == layer and first.headers["x-cache"] == "MISS"
    assert second.complete and second.body == layer and second.headers["x-cache"] == "HIT"
    assert _cdn_gets(hub, digest) == 1
    await proxy.fills_ended()
