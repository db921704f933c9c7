"""The blob cache: content-addressed, verified, one upstream fetch per blob, bounded by LRU.

Theory of operation (after distribution's ``proxyblobstore``, with the in-flight map owned by
the store). A blob is stored under its sha256 digest in ``blobs/sha256/<2 hex>/<hex>``. On a miss
the proxy hands the upstream response to :meth:`BlobStore.run_fill`, which runs in a background
task so that it outlives the client that started it. A miss is one pass over the bytes:
each chunk the upstream connection returns goes, as the same buffer, to the fill's window in
memory (readers take it from there) and to a temporary file in ``tmp/``, and into the fill's
hash. While the disk is fast the event loop writes and hashes each chunk itself, just after
receiving it; a write that blocked for long (:mod:`~hubproxy.policy.diskpace`) moves the fills
to the store's :class:`DiskThread`, one worker thread for all fills, for a while, so a slow disk
does not stall the event loop (handing every chunk to a thread cost 0.6 CPU-seconds per GiB more
than doing the same work on the loop, and was no faster on a 1 GiB miss). At most
``AHEAD_OF_DISK`` chunks are handed to the thread and not yet written: a slow disk slows the
fill's receiving (and so the upstream's TCP window), never grows memory. When length and digest
match, the file is fsync'd and renamed into place, and otherwise discarded (counted and logged).

Every client, the first one included, reads through a :class:`BlobReader`. Following a fill, a
reader that keeps up gets each chunk as a view of the upstream's own buffer (the window keeps
the chunks not yet written plus ``KEPT_IN_MEMORY`` written ones, and once the fill is verified,
those of them its foremost reader has yet to take); one that fell behind reads the growing
file, and comes back to memory once it caught up. The fill waits for its foremost
reader (the client that caused it, mostly) only a moment: at most ``LEAD_WAIT`` per chunk for
that reader to come back within the window, and ``LEAD_WAIT_SHARE`` of its time in all. A
client keeping up, however fast the upstream, then takes every chunk from memory instead of
reading most of the blob back from the file; slow readers cannot make a fill take more than
4/3 of its time, so a slow client costs file reads, not memory nor the other clients' speed.
(Pacing the fill by that client without a bound would let one slow client stall every
follower, or hold its backlog in memory.)
Concurrent pulls cost one upstream fetch, and the first byte goes out at once. A reader never
hands out its last byte (the blob's, or a range's) before the fill verified the digest, so a
client can never complete a transfer of wrong bytes; a failed fill aborts every reader. A write
that fails ends the fill at once; its readers finish from the upstream with a Range request,
verified against the digest (the hash of what they sent comes from the fill's hash of the file
plus the chunks still in memory).

A fill is followed only by clients of the registry it comes from (:attr:`Fill.source`): the blob
store is shared by digest across registries, and a stalled upstream of one registry must never
hold a request for another (that request goes to its own upstream and streams uncached).

Bytes on disk are not trusted either. A file is trusted only as verified in this process: when
its fill matched the digest, or when a reader hashed every byte of it; with its identity then
(inode, size, mtime, ctime), which anything that writes into, truncates or replaces it through
the file system changes (ctime cannot be set back from user space). A reader of any other file,
or of a whole blob verified more than ``reverify_after`` ago (what the identity cannot see:
damage below the file system), hashes every byte it hands out and keeps the last one back until
the digest matches (the invariant of the fill path), so a damaged blob (a flipped byte, a
truncation) is never completed to a client; it is evicted and the next request refetches it
(:func:`~hubproxy.policy.cachepolicy.hit_needs_hashing`). Hashing every hit instead would cost
about 0.6 CPU-seconds per GiB, as much as the rest of serving it. A range of an untrusted file
makes its reader hash the whole blob around the range. A hit's hashing runs on the event loop
one ``READ_SIZE`` chunk at a time (sha256 is about 1.7 GB/s), read into the reader's one buffer
(no allocation per chunk).

The bound (``max_bytes``) covers every byte the store holds on disk: cached blobs, pinned ones
(open by a reader, so not evictable) included, plus the full size of every fill under way. A new
fill that would not fit after evicting what can be evicted is not started: that miss streams
uncached. (Making it wait instead would let one slow reader stall every miss.) Eviction is
least-recently-used and skips pinned and filling blobs. The index lives in memory and is rebuilt
from the directory at start (leftover temporary files from a crash are deleted then); a cache
larger than ``max_bytes`` then is cut down with one summary line.

The disk bounds the cache too: a fill starts only if the disk keeps :func:`free_space_margin`
free beside it (and beside every fill under way), so the cache never takes the last bytes other
programs on that disk need. The margin is proportionate: 64 MiB, or 5% of a smaller disk (a 64 MiB
margin would forbid most of a 100 MiB file system). A short disk is said at start (the startup
line's free space, and a WARNING) and once per episode when fills are skipped for it; the disk
does not make the cache evict (anything else filling the disk would empty the cache), so the fix
is free space or a ``--cache-size`` the disk can hold. A fill's writes run on the event loop
while they are fast, in the disk thread while the disk is slow; readers' file reads happen on
the event loop (page-cache speed); fsync, which can stall for long, runs in a thread.
"""

from __future__ import annotations

import enum
import hashlib
import itertools
import logging
import operator
import os
import re
import resource
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import trio

from ..net.buffers import BODIES
from ..net.fairness import serving
from ..policy.cachepolicy import IdentityFields, hit_needs_hashing, identity_settled
from ..policy.diskpace import DiskPace
from ..policy.errors import CacheFillFailed, ProxyError, RangeNotSatisfiable
from ..policy.sizes import describe_size, format_size

log = logging.getLogger("hubproxy.cache")

READ_SIZE = 256 * 1024
# a whole blob verified longer ago than this is hashed again as it is served (--reverify-after)
REVERIFY_AFTER = 24 * 3600.0
# A fill hands its writer thread at most this many chunks (of BODIES.chunk()) not yet written:
# the bound on what a slow disk makes it hold
AHEAD_OF_DISK = 2
# ... and keeps this many chunks already written in memory too, for readers just behind it
KEPT_IN_MEMORY = 2
# seconds a fill waits, per chunk, for its foremost reader to come back within the window: the
# client that caused a miss then takes every chunk from memory (it lagged 4 to 7 MiB behind on
# a 1 GiB miss, and read back from the file 84% of what it sent), while a reader slower than a
# chunk per wait cannot hold the fill for long
LEAD_WAIT = 0.01
# ... and in all at most this share of its time so far: however slow its readers, and however
# small the chunks (many transfers at once), a fill takes at most 4/3 of its time unpaced
LEAD_WAIT_SHARE = 0.25
FREE_SPACE_MARGIN = 64 * 1024 * 1024  # keep this much of the disk free (at most: see below)


class NoRoom(OSError):
    """A fill that does not fit beside the fills of other processes (--workers): uncached."""


class SharedFills(Protocol):
    """What the store asks of the processes it shares its directory with (``--workers``):
    :class:`hubproxy.cache.claims.Claims`."""

    def take(self, key: str, size: int, source: str, temp_path: Path) -> object: ...
    def release(self, key: str) -> None: ...
    def follow(self, store: BlobStore, key: str) -> Fill | None: ...
    def look_up(self, store: BlobStore, key: str) -> int | None: ...
    def evict(self, store: BlobStore, quiet: bool = False) -> tuple[list[int], bool]: ...
    def remove(
        self, store: BlobStore, keys: Iterable[str]
    ) -> tuple[list[tuple[str, int]], list[str]]: ...


class SharedTier(Protocol):
    """What the store and the pull-through driver ask of the object store shared by several
    instances (``--cache-store``): :class:`hubproxy.cache.shared.SharedStore`."""

    async def commit(self, key: str, size: int, path: Path) -> None: ...
    def accessed(self, key: str) -> None: ...
    async def fill_from_store(
        self, blobs: BlobStore, key: str, source: str, nursery: trio.Nursery
    ) -> bool: ...

    # --redirect-hits: whether the store holds a blob; a presigned URL of it; how many were sent
    redirects: int

    async def holds(self, key: str) -> bool: ...
    async def presigned(self, key: str) -> str | None: ...


class BodySource(Protocol):
    async def receive_body(self) -> bytes | bytearray | None: ...


@dataclass
class CacheStats:
    """Counters for the metrics endpoint (read-only from outside)."""

    hits: int = 0
    misses: int = 0
    bytes_from_cache: int = 0
    bytes_from_upstream: int = 0
    evictions: int = 0
    verification_failures: int = 0
    hits_hashed: int = 0  # readers of a cached blob that hashed it (hit_needs_hashing)
    stale_answers: int = 0
    sendfile_bytes: int = 0
    fills_completed: int = 0
    fills_failed: int = 0
    fill_memory_bytes: int = 0  # bytes readers took from a fill's memory (no file read)
    confirmations_shared: int = 0  # access confirmations sent to the other workers
    confirmations_received: int = 0  # and kept from them (cache.confirmshare)
    verifications_received: int = 0  # blob verifications kept from the other workers


@dataclass(frozen=True)
class DiskSpace:
    """The file system the cache lives on."""

    free: int  # bytes this process may still write (statvfs f_bavail)
    size: int  # the whole file system's size


def read_disk(path: Path) -> DiskSpace:
    """The free space and size of the file system holding ``path`` (OSError if unreadable)."""
    st = os.statvfs(path)
    return DiskSpace(free=st.f_bavail * st.f_frsize, size=st.f_blocks * st.f_frsize)


def free_space_margin(disk_size: int) -> int:
    """What a fill leaves free on a disk of ``disk_size`` bytes: 64 MiB, or 5% of a disk smaller
    than 1.25 GiB (on a tiny disk 64 MiB would be most of it; 5% is what ext4 keeps back)."""
    return min(FREE_SPACE_MARGIN, disk_size // 20)


@dataclass(frozen=True)
class DiskVerdict:
    """How the disk bounds a cache of ``max_bytes`` holding ``cached`` bytes."""

    free: int  # free on the disk
    margin: int  # kept free
    bound: int  # how large the cache can grow: max_bytes, or less when the disk fills first

    @property
    def blocks_fills(self) -> bool:
        """No fill can start: the free space is within the margin already."""
        return self.free <= self.margin


def judge_disk(max_bytes: int, cached: int, disk: DiskSpace) -> DiskVerdict:
    """How far a cache bounded by ``max_bytes`` that holds ``cached`` bytes can grow on
    ``disk``: by its free space beyond the margin, and not past ``max_bytes``."""
    margin = free_space_margin(disk.size)
    bound = min(max_bytes, cached + max(0, disk.free - margin))
    return DiskVerdict(free=disk.free, margin=margin, bound=bound)


def describe_disk(max_bytes: int, verdict: DiskVerdict) -> str:
    """The startup line's words on the cache's bound: ``up to 20 GiB; 79 GiB free on its disk``,
    and what the disk changes."""
    said = f"up to {describe_size(max_bytes)}; {format_size(verdict.free)} free on its disk"
    if verdict.blocks_fills:
        return (
            f"{said}, below the {format_size(verdict.margin)} kept free: blobs will not be cached"
        )
    if verdict.bound < max_bytes:
        return (
            f"{said}, {format_size(verdict.margin)} kept free: the disk bounds it to "
            f"{format_size(verdict.bound)}"
        )
    return said


def disk_warning(root: Path, max_bytes: int, verdict: DiskVerdict) -> str | None:
    """The WARNING at start when the disk cannot hold the cache ``--cache-size`` allows, else
    None."""
    if verdict.blocks_fills:
        return (
            f"cache: the disk of {root} has {format_size(verdict.free)} free, below the "
            f"{format_size(verdict.margin)} kept free for other programs: no blob will be "
            "cached; free space there, or point --cache-dir at a larger disk"
        )
    if verdict.bound < max_bytes:
        return (
            f"cache: the disk of {root} has {format_size(verdict.free)} free "
            f"({format_size(verdict.margin)} kept free): the cache can grow to "
            f"{format_size(verdict.bound)}, not the {describe_size(max_bytes)} of --cache-size, "
            "and misses beyond that stream uncached; free space there, or set --cache-size to "
            "what the disk holds"
        )
    return None


_SIZE = operator.attrgetter("size")
_WRITTEN = operator.attrgetter("written")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")  # (not \Z-anchored: fullmatch; no "\n" slips past)


def sha256_hex(digest: str) -> str | None:
    """The hex part of a ``sha256:`` digest we can cache, else None (other algorithms pass)."""
    algorithm, _, hexpart = digest.partition(":")
    if algorithm != "sha256" or not _SHA256_HEX.fullmatch(hexpart):
        return None
    return hexpart


def choose_evictions(
    lru: Iterable[tuple[str, int]], total: int, limit: int, protected: set[str]
) -> list[str]:
    """The least recently used blobs to delete so that ``total`` fits ``limit``."""
    victims = []
    for key, size in lru:  # least recently used first
        if total <= limit:
            break
        if key in protected:
            continue
        victims.append(key)
        total -= size
    return victims


def byte_range(value: str, size: int) -> tuple[int, int] | None:
    """The [start, end) of a single ``bytes=`` range (RFC 9110 section 14.1.2).

    None means "serve the whole blob": no range, another unit, several ranges, or a malformed
    one (which a server may ignore). Raises RangeNotSatisfiable for a range beyond the end.
    """
    unit, _, spec = value.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = (part.strip() for part in spec.partition("-"))
    if not dash or not (first.isdigit() or first == "") or not (last.isdigit() or last == ""):
        return None
    if not first:
        if not last:
            return None
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable(value)
        return max(0, size - suffix), size
    start = int(first)
    end = int(last) + 1 if last else size
    if last and end <= start:
        return None  # invalid: ignored
    if start >= size:
        raise RangeNotSatisfiable(value)
    return start, min(end, size)


@dataclass(frozen=True)
class CachedAnswer:
    status: int
    headers: list[tuple[bytes, bytes]]
    start: int
    end: int


def cached_blob_answer(digest: str, size: int, range_header: bytes | None) -> CachedAnswer:
    """Status, headers and byte span for serving a cached blob, as a registry would."""
    span = byte_range(range_header.decode("latin-1"), size) if range_header else None
    start, end = span if span is not None else (0, size)
    headers = [
        (b"content-type", b"application/octet-stream"),
        (b"content-length", b"%d" % (end - start)),
        (b"docker-content-digest", digest.encode("ascii")),
        (b"etag", b'"%s"' % digest.encode("ascii")),
        (b"accept-ranges", b"bytes"),
        (b"docker-distribution-api-version", b"registry/2.0"),
    ]
    if span is None:
        return CachedAnswer(200, headers, 0, size)
    headers.append((b"content-range", b"bytes %d-%d/%d" % (start, end - 1, size)))
    return CachedAnswer(206, headers, start, end)


class FillState(enum.Enum):
    FILLING = "filling"
    DONE = "done"
    FAILED = "failed"


class Fill:
    """One blob being fetched into the cache; readers follow its progress.

    ``received`` bytes came from the upstream, ``written`` of them are in the file; the window
    holds the chunks not yet written plus the last few written ones (module docstring)."""

    def __init__(self, key: str, size: int, temp_path: Path, fd: int, source: str = "") -> None:
        self.key = key
        self.size = size
        self.source = source  # the registry it is fetched from: only its clients follow it
        self.temp_path = temp_path
        self.fd = fd  # the temporary file, open for writing until committed
        self.received = 0
        self.written = 0
        self.state = FillState.FILLING
        # every byte received, written and hashed to the digest (still FILLING while the file
        # is committed): readers may hand out their last byte
        self.verified = False
        self.error = ""
        self.disk_failed = False  # the upstream was fine; writing the file was not
        # the hash of the file's bytes [0, written): read only once its writer stopped
        self.hasher: hashlib._Hash | None = None
        self._window: deque[tuple[int, bytes | bytearray]] = deque()  # (offset, chunk)
        self.file_waiters = 0  # readers waiting for bytes to be written, not just received
        self._progress = trio.Event()
        self._positions: dict[object, int] = {}  # reader -> its position (follow)
        self._lead_moved: trio.Event | None = None  # set while the fill waits for its lead
        self.began = 0.0  # when the fill began receiving (trio's clock)
        self.waited = 0.0  # seconds it waited for its lead reader so far

    def _notify(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    def verify(self) -> None:
        """The whole blob matched its digest: its readers may complete their transfers now.
        Committing the file (its fsync, then the rename) is the cache's business, and must
        not hold the clients' last byte: a slow disk's fsync of a large blob takes seconds
        (the page cache's dirty bytes of it all go out), and a failed one leaves the
        verified bytes they read as good as they were."""
        self.verified = True
        self._notify()

    def push(self, chunk: bytes | bytearray) -> None:
        """A chunk came from the upstream: readers may have it from memory at once."""
        self._window.append((self.received, chunk))
        self.received += len(chunk)
        self._notify()

    def wrote(self, count: int) -> None:
        """``count`` more bytes are in the file: drop the window's chunks a reader just behind
        the fill no longer needs (it reads them from the file)."""
        self.written += count
        window = self._window
        kept = KEPT_IN_MEMORY * BODIES.chunk()
        while window:
            offset, chunk = window[0]
            end = offset + len(chunk)
            if end > self.written or self.written - end < kept:
                break
            window.popleft()
        if self.file_waiters:  # only readers of the file (sendfile) wait for writes
            self._notify()

    # -- pacing by the foremost reader --------------------------------------------------------

    def follow(self, reader: object, position: int) -> None:
        """``reader`` is at ``position`` (it takes more from here)."""
        self._positions[reader] = position
        if self._lead_moved is not None and not self.lead_behind():
            self._lead_moved.set()
        if self.state is FillState.DONE:
            self.keep_for_lead()

    def unfollow(self, reader: object) -> None:
        """``reader`` takes nothing more: it does not pace the fill."""
        if self._positions.pop(reader, None) is not None and self._lead_moved is not None:
            self._lead_moved.set()
        if self.state is FillState.DONE:
            self.keep_for_lead()

    def keep_for_lead(self) -> None:
        """Once the fill is done: keep only the chunks its foremost reader has yet to take,
        none once nobody follows. That reader (the client that caused the fill, mostly) is
        held back from the blob's last byte until the verdict, and a small blob is often
        received whole before its client sent much of it: dropping the window at the verdict
        made that client read back from the file 92% of 100 blobs of 1 MiB fetched 32 at once.
        Readers further behind read the file, as they did while the fill ran; what is kept is
        at most what the fill held the moment before (``wrote`` trims it)."""
        lead = max(self._positions.values(), default=self.size)
        window = self._window
        while window and window[0][0] + len(window[0][1]) <= lead:
            window.popleft()

    def lead_behind(self) -> bool:
        """Whether the foremost reader is more than a chunk behind: the next chunk received
        (and written) would push what it reads next out of the window."""
        if not self._positions:
            return False
        behind = self.received - max(self._positions.values())
        return behind > (KEPT_IN_MEMORY - 1) * BODIES.chunk()

    async def wait_for_lead(self) -> None:
        """Wait for the foremost reader to come within the window: up to ``LEAD_WAIT``, and
        only while the fill's waits stay under ``LEAD_WAIT_SHARE`` of its time."""
        now = trio.current_time()
        budget = (now - self.began) * LEAD_WAIT_SHARE - self.waited
        if budget <= 0:
            return
        with trio.move_on_after(min(LEAD_WAIT, budget)):
            while self.lead_behind():
                self._lead_moved = trio.Event()
                try:
                    await self._lead_moved.wait()
                finally:
                    self._lead_moved = None
        self.waited += trio.current_time() - now

    def view(self, start: int, stop: int) -> memoryview | None:
        """Bytes [start, stop) or fewer from the window (one chunk's, no copy); None if
        ``start`` is not held in memory any more."""
        for offset, chunk in self._window:
            end = offset + len(chunk)
            if offset <= start < end:
                return memoryview(chunk)[start - offset : min(end, stop) - offset]
        return None

    def ready(self, memory: bool) -> int:
        """How many bytes a reader may have: from memory (``received``) or the file."""
        return self.received if memory else self.written

    async def wait_change(self, written: bool = False) -> None:
        """Wait until bytes arrived, or the fill ended; ``written``: or bytes were written."""
        self.file_waiters += written
        try:
            await self._progress.wait()
        finally:
            self.file_waiters -= written


class DiskThread:
    """One worker thread that writes and hashes the chunks of every fill, in the order they
    were handed over, while the disk is slow (:mod:`~hubproxy.policy.diskpace`). One thread,
    not one per fill: thirty-two 1 MiB misses at once each with
    a thread of its own spent more CPU handing the GIL around than the writing saved (18.6 CPU-s
    per GiB against 13.3 inline, ``python -m bench --cases 100x1MiB-tls``). The thread runs
    while there is work and ends when the queue is empty (trio's thread cache makes the next
    start cheap), so no thread outlives the fills or the trio run that made them.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: deque[tuple[FillWriter, bytes | bytearray | None]] = deque()
        self._running = False
        self.starts = 0  # how often the thread was started (tests, metrics)

    def submit(self, writer: FillWriter, chunk: bytes | bytearray | None) -> None:
        """Queue ``chunk`` of ``writer``'s fill (None: its end); start the thread if idle."""
        with self._lock:
            self._queue.append((writer, chunk))
            if self._running:
                return
            self._running = True
            self.starts += 1
        trio.lowlevel.start_thread_soon(self._run, _ignore, name="cache disk writer")

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._running = False
                    return
                writer, chunk = self._queue.popleft()
            writer.work(chunk)


class FillWriter:
    """A fill's file writes and hashing, done by the store's :class:`DiskThread` beside the
    event loop.

    The event loop hands chunks over (:meth:`put`) and the thread writes each to the file, then
    hashes it (``hashlib`` and ``os.write`` release the GIL for large buffers, so this runs on
    another core while the loop decrypts and sends), reporting every written chunk back
    through the trio token. The fill's task keeps at most ``AHEAD_OF_DISK`` chunks' worth
    handed over and unwritten (:meth:`room`), so a slow disk slows the transfer and never
    grows memory; a slow disk also never stalls the event loop. A write error stops this
    fill's writing and calls ``on_error`` (the fill stops receiving); ``put``, ``finish`` and
    ``check`` raise it.
    """

    def __init__(
        self,
        fill: Fill,
        hasher: hashlib._Hash,
        on_error: Callable[[], None],
        disk: DiskThread,
        on_write: Callable[[float], None],
    ) -> None:
        self.fill = fill
        self.hasher = hasher
        self._on_error = on_error
        self._on_write = on_write  # how long each write took (the store's DiskPace)
        self._disk = disk
        self.error: BaseException | None = None
        self._token = trio.lowlevel.current_trio_token()
        self._changed = trio.Event()
        self._stopped = trio.Event()
        self._abort = False  # set from the loop: the thread skips what is left
        self._closed = False
        self._over = False  # thread side: the end was reported (an error, or the last chunk)

    # -- the disk thread ---------------------------------------------------------------------

    def work(self, chunk: bytes | bytearray | None) -> None:
        """In the disk thread: write and hash ``chunk``, or report the end (None)."""
        if self._over:
            return
        if chunk is None:
            self._over = True
            self._token.run_sync_soon(self._stop, None)
            return
        if self._abort:
            return
        try:
            took = _write_timed(self.fill.fd, chunk)
            self.hasher.update(chunk)
        except BaseException as exc:  # OSError from the disk; anything else is a bug
            self._over = True
            self._token.run_sync_soon(self._stop, exc)
            return
        self._token.run_sync_soon(self._wrote, len(chunk), took)

    # -- the event loop ---------------------------------------------------------------------

    def _wrote(self, count: int, took: float) -> None:
        self.fill.wrote(count)
        self._on_write(took)
        self._changed.set()

    def _stop(self, error: BaseException | None) -> None:
        self.error = error
        self._stopped.set()
        self._changed.set()
        if error is not None:
            self._on_error()

    def check(self) -> None:
        """Raise the error that stopped the writing, if any."""
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    async def put(self, chunk: bytes | bytearray) -> None:
        """Hand ``chunk`` to the thread; wait while too much is unwritten."""
        self._raise()
        self._disk.submit(self, chunk)
        limit = AHEAD_OF_DISK * BODIES.chunk()
        while self.fill.received - self.fill.written > limit and not self._stopped.is_set():
            self._changed = trio.Event()
            await self._changed.wait()
        self._raise()

    async def finish(self) -> None:
        """Wait until everything handed over is written and hashed (raises a write error)."""
        if not self._closed:
            self._closed = True
            self._disk.submit(self, None)
        await self._stopped.wait()
        self._raise()

    async def stop(self) -> None:
        """Stop writing, dropping what the thread did not write yet, and wait for it (shielded:
        the file is closed after, and the thread must not write into a closed descriptor)."""
        self._abort = True
        if not self._closed:
            self._closed = True
            self._disk.submit(self, None)
        with trio.CancelScope(shield=True):
            await self._stopped.wait()


def _ignore(result: object) -> None:
    """``start_thread_soon``'s delivery: the thread reports through the trio token itself."""


class BlobStore:
    """The on-disk store, its LRU index, the in-flight fills and the counters."""

    def __init__(
        self, root: Path, max_bytes: int, disk: Callable[[Path], DiskSpace] | None = None
    ) -> None:
        self.root = root
        self.max_bytes = max_bytes
        # how the disk's free space is read (tests give a plain function); looked up here, not
        # as a default argument, so that a replaced ``read_disk`` is the one used
        self.read_disk = disk if disk is not None else read_disk
        self.disk_short = False  # fills are being skipped for lack of disk (said once)
        self.blob_dir = root / "blobs" / "sha256"
        self.tmp_dir = root / "tmp"
        self.index: OrderedDict[str, int] = OrderedDict()  # key -> size, least recent first
        self.total = 0
        self.pins: dict[str, int] = {}
        self.fills: dict[str, Fill] = {}
        # blobs whose bytes were hashed and matched in this process, with the file's identity
        # then and when: one still identical is served without hashing (hit_needs_hashing)
        self.verified: dict[str, Verification] = {}
        # --workers N: tells the other workers of each verification made or carried here
        # (cache.confirmshare); they keep it for the very file they find (``keep_verified``)
        self.share_verification: Callable[[str, IdentityFields, float], None] | None = None
        self.wall_clock: Callable[[], int] = time.time_ns  # what file timestamps are read against
        self.reverify_after = REVERIFY_AFTER  # --reverify-after
        self.stats = CacheStats()
        # --workers N: fills and the bound shared with the other processes (cache/claims.py)
        self.claims: SharedFills | None = None
        self.disk_thread = DiskThread()  # writes and hashes fills' chunks while the disk is slow
        self.disk_pace = DiskPace()
        # removed (``hubproxy cache rm``) while a reader held them: key -> the file's inode,
        # deleted when the last reader closes (unless a new fill put another file there)
        self.doomed: dict[str, int] = {}
        # --cache-store: the object store verified blobs are committed to (cache/shared.py)
        self.shared: SharedTier | None = None

    # -- start-up --------------------------------------------------------------------------

    def open(self) -> None:
        """Create the directories, delete a crash's temporary files, and rebuild the index."""
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        # shared: the supervisor swept tmp/ before any worker ran; other workers' fills live
        for leftover in os.scandir(self.tmp_dir) if self.claims is None else ():
            os.unlink(leftover.path)
        found: list[tuple[float, str, int]] = []
        for prefix in os.scandir(self.blob_dir):
            if not prefix.is_dir(follow_symlinks=False):
                continue
            for entry in os.scandir(prefix.path):
                st = entry.stat(follow_symlinks=False)
                if sha256_hex("sha256:" + entry.name) is None or entry.name[:2] != prefix.name:
                    continue
                found.append((st.st_mtime, entry.name, st.st_size))
        found.sort()
        self.index = OrderedDict((key, size) for _, key, size in found)
        self.total = sum(self.index.values())
        # a smaller --cache-size than last time: one line for what it cost, not one per blob
        evicted = self._evict(quiet=True)
        if evicted:
            log.info(
                "cache: evicted %d blob%s (%s) to fit --cache-size %s",
                len(evicted),
                "" if len(evicted) == 1 else "s",
                format_size(sum(evicted)),
                describe_size(self.max_bytes),
            )

    def check_disk(self) -> DiskVerdict | None:
        """At start: how the disk bounds the cache (None if its free space cannot be read), with a
        WARNING when it cannot hold what ``--cache-size`` allows. The startup line is made from
        the same reading, so the two agree."""
        try:
            verdict = self.judge_disk()
        except OSError as exc:
            log.warning("cache: cannot read the free space of %s's disk: %s", self.root, exc)
            return None
        warning = disk_warning(self.root, self.max_bytes, verdict)
        if warning is not None:
            log.warning("%s", warning)
        # said now: the first skipped fill need not say it again
        self.disk_short = verdict.blocks_fills
        return verdict

    def judge_disk(self) -> DiskVerdict:
        """How the disk bounds the cache now (OSError if its free space cannot be read)."""
        return judge_disk(self.max_bytes, self.total, self.read_disk(self.root))

    def disk_free(self) -> int:
        """Bytes free on the cache's disk (0 if unreadable): for ``/metrics``."""
        try:
            return self.read_disk(self.root).free
        except OSError:
            return 0

    # -- lookups ----------------------------------------------------------------------------

    def path(self, key: str) -> Path:
        return self.blob_dir / key[:2] / key

    def size_of(self, key: str) -> int | None:
        """The size of a complete cached blob (marking it recently used), or None."""
        if self.claims is not None:
            return self.claims.look_up(self, key)
        size = self.index.get(key)
        if size is not None:
            self.index.move_to_end(key)
        return size

    def fill_of(self, key: str) -> Fill | None:
        """The fill under way of ``key``: this process's, or one it follows of another."""
        fill = self.fills.get(key)
        if fill is None and self.claims is not None and key not in self.index:
            fill = self.claims.follow(self, key)
        return fill

    @property
    def pinned_bytes(self) -> int:
        """Bytes of cached blobs open by readers (not evictable until their readers finish)."""
        # (in C: with 32 fills at once, a generator over them cost 5% of a 1 MiB miss's Python)
        return sum(map(self.index.get, self.pins, itertools.repeat(0)))

    @property
    def filling_bytes(self) -> int:
        """The full sizes of the fills under way (each will take all of it on disk)."""
        return sum(map(_SIZE, self.fills.values()))

    def can_fill(self, size: int) -> bool:
        """Whether a blob of ``size`` bytes may be cached now (the limit, the disk).

        What cannot be evicted (pinned blobs, fills under way) counts against the limit: a fill
        that would not fit beside it is refused, and that miss streams uncached."""
        if size > self.max_bytes:
            return False  # larger than the whole cache: streamed, never cached
        unevictable = self.pinned_bytes + self.filling_bytes
        if unevictable + size > self.max_bytes:
            return False
        try:
            disk = self.read_disk(self.root)
        except OSError as exc:
            self._note_disk_short(f"cannot read the free space of {self.root}'s disk: {exc}")
            return False
        # fills under way will take the rest of their size too; what this fill evicts to fit
        # the limit (start_fill does it) gives its space back
        reserved = self.filling_bytes - sum(map(_WRITTEN, self.fills.values()))
        evicting = max(0, self.total + self.filling_bytes + size - self.max_bytes)
        margin = free_space_margin(disk.size)
        if disk.free + evicting - reserved < size + margin:
            self._note_disk_short(
                f"a {format_size(size)} blob is not cached: the disk of {self.root} has "
                f"{format_size(disk.free)} free"
                + (
                    f" ({format_size(reserved)} of it promised to fills under way)"
                    if reserved
                    else ""
                )
                + f" and {format_size(margin)} is kept free"
            )
            return False
        if self.disk_short:
            self.disk_short = False
            log.info(
                "cache: the disk of %s has room again (%s free): caching blobs again",
                self.root,
                format_size(disk.free),
            )
        return True

    def _note_disk_short(self, what: str) -> None:
        """One WARNING per episode of fills skipped for lack of disk, not one per miss."""
        if not self.disk_short:
            self.disk_short = True
            log.warning(
                "cache: %s; blobs stream uncached until there is room (free space there, or "
                "lower --cache-size and restart); said once until then",
                what,
            )

    # -- filling ----------------------------------------------------------------------------

    def start_fill(self, key: str, size: int, source: str = "") -> Fill:
        """Register a fill for ``key`` from registry ``source`` (the caller checked there is
        none, and ``can_fill``) and open its file; evict to make room for all of it."""
        temp_path = self.tmp_dir / f"{key}.{secrets.token_hex(6)}.partial"
        fd = os.open(temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)  # OSError: no fill
        fill = Fill(key, size, temp_path, fd, source)
        if self.claims is not None:
            self._claim(fill)  # and its eviction pass, over the whole directory
            return fill
        self.fills[key] = fill
        self._evict()
        return fill

    def _claim(self, fill: Fill) -> None:
        """Shared: claim the fill across processes (its file exists first, so a follower finds
        it) and make room beside every other claim; an OSError leaves nothing behind."""
        assert self.claims is not None
        try:
            self.claims.take(fill.key, fill.size, fill.source, fill.temp_path)
            self.fills[fill.key] = fill
            _, fits = self.claims.evict(self)
            if not fits:
                raise NoRoom(f"a {format_size(fill.size)} blob does not fit beside other fills")
        except BaseException:
            self.fills.pop(fill.key, None)
            self.claims.release(fill.key)
            os.close(fill.fd)
            unlink_quietly(fill.temp_path)
            raise

    def _wrote_on_disk(self, took: float) -> None:
        """A fill's write took ``took`` seconds: the disk's pace decides where the next go."""
        if self.disk_pace.wrote(time.monotonic(), took):
            log.info(
                "cache: a write to %s took %.0f ms; fills are written by a worker thread for "
                "the next %.0f s, so the slow disk does not hold the other clients",
                self.root,
                took * 1000,
                self.disk_pace.hold,
            )

    async def run_fill(
        self, fill: Fill, body: BodySource, exchange: AsyncExitStack, commit: bool = True
    ) -> None:
        """Stream ``body`` into the fill's file, verify it, and commit or discard it.

        Owns ``exchange`` (the upstream connection's lending) and closes it when done. Each
        chunk goes to the window (readers take it from there), and is written and hashed here,
        or by the disk thread while the disk is slow (:mod:`~hubproxy.policy.diskpace`). With a
        shared store (``--cache-store``) and ``commit``, the verified blob is then put there
        too, after its readers were released (a fill read from that store passes
        ``commit=False``).
        """
        await self._run_fill(fill, body, exchange)
        if commit and self.shared is not None and fill.state is FillState.DONE:
            await self.shared.commit(fill.key, fill.size, self.path(fill.key))

    async def _run_fill(self, fill: Fill, body: BodySource, exchange: AsyncExitStack) -> None:
        # work for everyone following the fill, not for the client that happened to start it:
        # never held back by that client's fair share (net.fairness)
        serving.set(None)
        fd = fill.fd
        hasher = hashlib.sha256()
        writer: FillWriter | None = None
        fill.began = trio.current_time()
        try:
            try:
                async with exchange:
                    # a failed write ends the fill at once (its readers resume from the
                    # upstream), not when the upstream's next chunk comes
                    with trio.CancelScope() as receiving:
                        while (chunk := await body.receive_body()) is not None:
                            if fill.received + len(chunk) > fill.size:
                                raise CacheFillFailed(
                                    "upstream sent more bytes than its Content-Length"
                                )
                            fill.push(chunk)
                            self.stats.bytes_from_upstream += len(chunk)
                            if writer is None and (
                                fill.received == fill.size
                                or self.disk_pace.writes_on_loop(time.monotonic())
                            ):
                                # on the loop while the disk is fast (policy.diskpace); all of
                                # a blob in one piece too, so that the verdict (just after:
                                # reading the end of a Content-Length body does not wait) comes
                                # before any reader runs, and wrong bytes are a clear error
                                # answer, not a cut transfer
                                self._wrote_on_disk(_write_timed(fd, chunk))
                                hasher.update(chunk)
                                fill.wrote(len(chunk))
                                if fill.lead_behind():
                                    await fill.wait_for_lead()
                                continue
                            if writer is None:
                                writer = FillWriter(
                                    fill,
                                    hasher,
                                    receiving.cancel,
                                    self.disk_thread,
                                    self._wrote_on_disk,
                                )
                            await writer.put(chunk)
                            if fill.lead_behind():
                                await fill.wait_for_lead()
                    if receiving.cancelled_caught and writer is not None:
                        writer.check()
                if fill.received != fill.size:
                    raise CacheFillFailed(f"upstream sent {fill.received} of {fill.size} bytes")
                if writer is not None:
                    await writer.finish()
            finally:
                if writer is not None:
                    await writer.stop()
                fill.hasher = hasher  # its writer stopped: [0, written)
            if hasher.hexdigest() != fill.key:
                self.stats.verification_failures += 1
                raise CacheFillFailed(
                    f"blob sha256:{fill.key} from upstream has digest sha256:{hasher.hexdigest()}"
                )
            fill.verify()
            await trio.to_thread.run_sync(os.fsync, fd)
            os.close(fd)
            fd = -1
            final = self.path(fill.key)
            final.parent.mkdir(exist_ok=True)
            os.replace(fill.temp_path, final)
            self.fills.pop(fill.key, None)  # its bytes move from the fills to the index
            self.note_verified(fill.key, os.stat(final))
            self._add(fill.key, fill.size)
            fill.state = FillState.DONE
            fill.keep_for_lead()  # the rest of the window: what its foremost reader needs
            self.stats.fills_completed += 1
        except (ProxyError, OSError) as exc:
            # upstream faults arrive as ProxyError; an OSError here is the file (ENOSPC, EIO)
            fill.disk_failed = isinstance(exc, OSError)
            fill.state = FillState.FAILED
            fill.error = str(exc)
            self.stats.fills_failed += 1
            log.warning("cache fill of sha256:%s failed, nothing cached: %s", fill.key, exc)
        except Exception as exc:  # a bug: it must cost this fill, never the process
            fill.state = FillState.FAILED
            fill.error = "internal error"
            self.stats.fills_failed += 1
            log.exception("cache fill of sha256:%s failed by an internal error: %r", fill.key, exc)
        except BaseException:
            fill.state = FillState.FAILED
            fill.error = "cancelled"
            raise
        finally:
            if fd >= 0:
                os.close(fd)
            if fill.state is not FillState.DONE:
                unlink_quietly(fill.temp_path)
            if self.claims is not None:  # after the rename or the unlink: followers see which
                self.claims.release(fill.key)
            self.fills.pop(fill.key, None)
            fill._notify()

    # -- reading ----------------------------------------------------------------------------

    def reader(self, key: str, start: int = 0, end: int | None = None) -> BlobReader:
        """A reader of bytes [start, end) of a cached blob, else of its fill (pins it while
        open). A cached blob's reader checks the bytes against the digest (module docstring)."""
        cached = self.index.get(key)
        fill = self.fills.get(key) if cached is None else None
        size = fill.size if fill is not None else self.index[key]
        return BlobReader(self, key, fill, start, size if end is None else end, size)

    def note_verified(self, key: str, st: os.stat_result) -> None:
        """The file of ``key``, whose stat is ``st``, was just hashed and matched its digest."""
        if not identity_settled(st.st_ctime_ns, self.wall_clock()):
            # a write in the same tick of the file system's clock as the last change would
            # leave the identity as it is: trust only a file whose last change is older (a
            # fresh fill's file is hashed by its first reader, which then trusts it once a
            # tick has passed: a tenth of a second where timestamps have sub-second parts)
            self.verified.pop(key, None)
            return
        self._verified(key, Verification(FileIdentity.of(st), trio.current_time()))

    def carry_verification(self, key: str, before: os.stat_result, after: os.stat_result) -> None:
        """This process changed the file of ``key`` without writing into it (moved its mtime):
        a verification of the file as it was ``before`` carries to its identity ``after``.
        One of an older identity does not: the file changed since it was hashed."""
        known = self.verified.get(key)
        if known is not None and known.identity == FileIdentity.of(before):
            self._verified(key, Verification(FileIdentity.of(after), known.at))

    def _verified(self, key: str, verification: Verification) -> None:
        self.verified[key] = verification
        if self.share_verification is not None:
            self.share_verification(
                key, verification.identity.fields(), trio.current_time() - verification.at
            )

    def keep_verified(self, key: str, identity: IdentityFields, age: float) -> None:
        """Another worker hashed (``age`` seconds ago) the file of ``key`` that had
        ``identity`` to its digest: kept if that file is the one here now, and no later
        verification of it is."""
        try:
            now_identity = FileIdentity.of(os.stat(self.path(key)))
        except OSError:
            return
        if now_identity.fields() != identity:
            return
        at = trio.current_time() - age
        known = self.verified.get(key)
        if known is not None and known.identity == now_identity and known.at >= at:
            return
        self.verified[key] = Verification(now_identity, at)
        self.stats.verifications_received += 1

    def discard_damaged(self, key: str, why: str, inode: int | None = None) -> None:
        """Forget a cached blob whose bytes on disk do not match its digest, and delete it (its
        readers keep their open file until they close); the next request refetches it.

        ``inode``: the damaged file's, if known: a file refetched since then is left alone."""
        self.stats.verification_failures += 1
        if inode is not None:
            try:
                if os.stat(self.path(key)).st_ino != inode:
                    return  # already discarded and refetched
            except FileNotFoundError:
                pass
        self.verified.pop(key, None)
        size = self.index.pop(key, None)
        if size is None:
            return  # already discarded by another reader
        self.total -= size
        unlink_quietly(self.path(key))
        log.warning("cached blob sha256:%s is damaged (%s): deleted, to be refetched", key, why)

    def pin(self, key: str) -> None:
        self.pins[key] = self.pins.get(key, 0) + 1

    def unpin(self, key: str) -> None:
        count = self.pins.get(key, 0) - 1
        if count > 0:
            self.pins[key] = count
        else:
            self.pins.pop(key, None)
            inode = self.doomed.pop(key, None)
            if inode is not None and key not in self.index:
                _unlink_if(self.path(key), inode)
            if self.total + self.filling_bytes > self.max_bytes:
                self._evict()

    # -- removal (hubproxy cache rm, the admin API) ------------------------------------------

    def remove(self, keys: Iterable[str]) -> tuple[list[tuple[str, int]], list[str]]:
        """Delete cached blobs now: ``(removed (key, size), busy keys)``. A blob being fetched
        (here, or by another worker: its claim) is busy and left alone; one a reader of this
        process holds is forgotten at once and its file deleted when the last reader closes
        (a reader opens its file only at its first read). With ``--workers``, under the
        eviction lock, as an eviction pass: a reader in another worker that has the file open
        keeps reading it; one that had not opened it yet finishes from the upstream."""
        if self.claims is None:
            return self.remove_except(keys, set(self.fills))
        return self.claims.remove(self, keys)

    def remove_except(
        self, keys: Iterable[str], filling: set[str]
    ) -> tuple[list[tuple[str, int]], list[str]]:
        """:meth:`remove` of the keys not in ``filling`` (busy)."""
        removed, busy = [], []
        for key in keys:
            if key in filling:
                busy.append(key)
                continue
            size = self.index.pop(key, None)
            if size is None:
                continue
            self.total -= size
            self.verified.pop(key, None)
            path = self.path(key)
            if self.pins.get(key):
                try:
                    self.doomed[key] = os.stat(path).st_ino
                except FileNotFoundError:
                    pass
            else:
                unlink_quietly(path)
            removed.append((key, size))
        return removed, busy

    def forget(self, keys: Iterable[str]) -> None:
        """Forget blobs another process removed (its journal said so): their files are gone."""
        for key in keys:
            if os.path.exists(self.path(key)):
                continue  # fetched again since
            size = self.index.pop(key, None)
            if size is not None:
                self.total -= size
                self.verified.pop(key, None)

    # -- the index --------------------------------------------------------------------------

    def _add(self, key: str, size: int) -> None:
        self.doomed.pop(key, None)  # a new file: the removed one's readers are on their own
        if key not in self.index:
            self.total += size
        self.index[key] = size
        self.index.move_to_end(key)
        if self.claims is None:  # shared: its claim reserved the room when the fill started
            self._evict()

    def _evict(self, quiet: bool = False) -> list[int]:
        """Evict down to the limit; the sizes evicted. ``quiet``: the caller sums them up in
        one line instead of one line per blob."""
        if self.claims is not None:
            return self.claims.evict(self, quiet)[0]
        protected = set(self.pins) | set(self.fills)
        limit = self.max_bytes - self.filling_bytes  # room for every fill under way
        return self.evict_down_to(limit, protected, quiet)

    def evict_down_to(self, limit: int, protected: set[str], quiet: bool = False) -> list[int]:
        """Evict least recently used blobs, none of ``protected``, until the index holds at
        most ``limit`` bytes (or nothing evictable is left); the sizes evicted."""
        evicted = []
        for key in choose_evictions(self.index.items(), self.total, limit, protected):
            size = self.index.pop(key)
            self.total -= size
            self.verified.pop(key, None)
            self.stats.evictions += 1
            unlink_quietly(self.path(key))
            evicted.append(size)
            if not quiet:
                log.info("cache evicted sha256:%s (%d bytes)", key, size)
        return evicted


@dataclass(frozen=True)
class FileIdentity:
    """What changes when a file is rewritten, truncated or written into (not by bit rot)."""

    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileIdentity:
        return cls(st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def fields(self) -> IdentityFields:
        return (self.inode, self.size, self.mtime_ns, self.ctime_ns)


@dataclass(frozen=True)
class Verification:
    """A file whose bytes matched its digest: its identity then, and when (trio's clock)."""

    identity: FileIdentity
    at: float


class BlobReader:
    """Chunks of one blob, never ahead of verification.

    Following a fill, it reads the growing file and the fill verifies. Reading a cached blob,
    it verifies itself (module docstring): ``_hasher`` has seen bytes [0, ``_hashed``), and the
    reader's last byte goes out only once all ``size`` bytes hashed to the digest.
    """

    def __init__(
        self, store: BlobStore, key: str, fill: Fill | None, start: int, end: int, size: int
    ) -> None:
        self.store = store
        self.key = key
        self.fill = fill
        self.position = start
        self.end = end
        self.size = size
        self._fd = -1
        self._hasher: hashlib._Hash | None = None
        self._hashed = 0
        self._buffer: bytearray | None = None  # for bytes hashed but not handed out
        store.pin(key)
        BODIES.begin(self)  # its chunks share the body budget with upstream transfers
        if fill is not None:
            fill.follow(self, start)

    def _open(self) -> None:
        path = self.fill.temp_path if self.fill is not None else self.store.path(self.key)
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            if self.fill is None:
                # removed (cache rm, another worker's eviction) since it was looked up: not
                # damage; a whole GET finishes from the upstream (resumable), verified
                self.store.forget([self.key])
                raise CacheFillFailed(
                    f"cached blob sha256:{self.key} was removed", resumable=True
                ) from None
            if self.fill.state is not FillState.DONE:
                raise
            self._fd = os.open(self.store.path(self.key), os.O_RDONLY)  # renamed meanwhile
            return
        if self.fill is None:
            known = self.store.verified.get(self.key)
            if hit_needs_hashing(
                whole=self.position == 0 and self.end == self.size,
                unchanged=known is not None
                and known.identity == FileIdentity.of(os.fstat(self._fd)),
                verified_ago=None if known is None else trio.current_time() - known.at,
                reverify_after=self.store.reverify_after,
            ):
                self._hasher = hashlib.sha256()
                self.store.stats.hits_hashed += 1

    async def next_span(self, limit: int = READ_SIZE) -> tuple[int, int, int] | None:
        """The next ``(fd, offset, count)`` that may be sent (count <= limit), None at the end.

        The position advances past the span: the caller sends all of it (with ``os.sendfile``,
        say) or gives up on the transfer. CacheFillFailed if the fill it follows failed, or the
        cached blob proved damaged. A verifying reader reads each span once, ``READ_SIZE`` at a
        time through one buffer, to hash it before handing it out. Following a fill, a span
        only covers bytes already in the file.
        """
        if self.position >= self.end:
            return None
        available = await self._available(memory=False)
        if self._fd < 0:
            self._open()
        if self._hasher is not None:
            count = await self._verify_span(limit)
        else:
            count = min(limit, available - self.position)
        span = (self._fd, self.position, count)
        self.position += count
        self.store.stats.bytes_from_cache += count
        self._followed()
        return span

    def _followed(self) -> None:
        """Tell the fill it follows where it is now, and once it took its last byte."""
        if self.fill is not None:
            if self.position < self.end:
                self.fill.follow(self, self.position)
            else:
                self.fill.unfollow(self)

    async def next_chunk(self) -> memoryview | None:
        """The next chunk, None at the end; CacheFillFailed if the fill it follows failed or
        the cached blob proved damaged.

        The chunk is valid until the next call (it is a view of the fill's own buffer, or of
        this reader's, which the next read overwrites): send it before asking for more.
        Following a fill, a reader that keeps up gets the very bytes the upstream sent, from
        memory; one behind the fill's window reads the file.
        """
        if self.position >= self.end:
            return None
        available = await self._available(memory=True)
        if self._fd < 0:
            # at once, even for a reader served from memory: a failed fill unlinks its file,
            # and resuming from the upstream hashes what was sent from it (``hash_sent``)
            self._open()
        fill = self.fill
        chunk = fill.view(self.position, available) if fill is not None else None
        if chunk is not None:
            self.store.stats.fill_memory_bytes += len(chunk)
        else:
            count = min(BODIES.chunk(), available - self.position)
            if fill is not None and fill.state is FillState.FILLING:
                count = min(count, fill.written - self.position)  # behind the window
            if self._hasher is not None:
                chunk = await self._verify_next(count)
            else:
                chunk = self._read(self.position, count)
        self.position += len(chunk)
        self.store.stats.bytes_from_cache += len(chunk)
        self._followed()
        return chunk

    def _read(self, offset: int, count: int) -> memoryview:
        """``count`` bytes at ``offset`` into the reader's buffer (valid until the next read)."""
        view = self._scratch(count)[: min(count, READ_SIZE)]
        got = os.preadv(self._fd, [view], offset)
        if got < len(view):
            if self.fill is not None:  # never past what the fill wrote: the file was cut
                raise CacheFillFailed(f"the file of sha256:{self.key} is shorter than written")
            raise self._damaged("shorter than recorded")
        return view

    def _scratch(self, count: int) -> memoryview:
        """The reader's buffer, grown to ``count`` bytes if smaller (at most READ_SIZE). Reads
        ask for chunks of the body budget's size (``net.buffers``), so a hundred readers hold a
        hundred buffers of the small chunks a hundred transfers get, not of READ_SIZE; a view
        handed out before a growth keeps the old buffer alive until it is sent."""
        size = max(1, min(count, READ_SIZE))
        if self._buffer is None or len(self._buffer) < size:
            self._buffer = bytearray(size)
        return memoryview(self._buffer)

    def _damaged(self, why: str) -> CacheFillFailed:
        self.store.discard_damaged(self.key, why, os.fstat(self._fd).st_ino)
        return CacheFillFailed(f"cached blob sha256:{self.key} is damaged on disk ({why})")

    async def _verify_next(self, limit: int) -> memoryview:
        """The next bytes to hand out (at most ``limit``), hashed; the reader's last byte only
        once the whole blob verified."""
        hasher = self._hasher
        assert hasher is not None
        await self._hash_to(self.position)  # a range that starts later: hash what it skips
        last = self.end - 1
        if self.position < last:
            data = self._read(self.position, min(limit, last - self.position))
            if self._hashed == self.position:  # else: hashed already, for a range's sake
                hasher.update(data)
                self._hashed += len(data)
            return data
        # only the last byte is left: the rest of the blob first, then the verdict
        await self._hash_to(self.size)
        if hasher.hexdigest() != self.key:
            raise self._damaged(f"its bytes hash to sha256:{hasher.hexdigest()}")
        self.store.note_verified(self.key, os.fstat(self._fd))
        return self._read(last, 1)

    async def _verify_span(self, limit: int) -> int:
        """``_verify_next`` for a span sent from the file: its bytes are read into the
        reader's buffer only to be hashed (no allocation per span)."""
        hasher = self._hasher
        assert hasher is not None
        await self._hash_to(self.position)
        last = self.end - 1
        if self.position < last and self._hashed == self.position:
            want = min(limit, last - self.position)
            await self._hash_to(self.position + want)
            return want
        return len(await self._verify_next(limit))

    async def _hash_to(self, offset: int) -> None:
        """Hash the blob's bytes from where hashing stopped up to ``offset``, through the
        reader's buffer, one chunk at a time (other tasks get their turn in between)."""
        hasher = self._hasher
        assert hasher is not None
        if self._hashed >= offset:
            return
        view = self._scratch(BODIES.chunk())
        while self._hashed < offset:
            want = min(len(view), offset - self._hashed)
            got = os.preadv(self._fd, [view[:want]], self._hashed)
            if got < want:
                raise self._damaged("shorter than recorded")
            hasher.update(view[:got])
            self._hashed += got
            await trio.lowlevel.checkpoint()

    async def _available(self, memory: bool) -> int:
        """How far reading may go now: the end, or the part of a fill received so far
        (``memory``) or written to its file, short of what completes the transfer."""
        available = self.end
        fill = self.fill
        if fill is not None and fill.state is not FillState.DONE:
            # the last byte of the blob, and the last byte of a range (which completes the
            # client's transfer as surely), only go out once the digest is verified
            limit = self.end - 1
            while (
                fill.state is FillState.FILLING
                and not fill.verified
                and min(fill.ready(memory), limit) <= self.position
            ):
                await fill.wait_change(written=not memory)
            # verified, then failed to commit: a reader whose descriptor holds the (now
            # unlinked) file goes on with the verified bytes; one that has none cannot
            if fill.state is FillState.FAILED and not (fill.verified and self._fd >= 0):
                raise CacheFillFailed(
                    f"cache fill failed: {fill.error}", resumable=fill.disk_failed
                )
            if not fill.verified:
                available = min(fill.ready(memory), limit)
        return available

    def hash_sent(self, hasher: hashlib._Hash) -> hashlib._Hash:
        """A hash of the blob's bytes from its start up to the position: ``hasher`` fed from
        the file (which stays readable through our descriptor even once unlinked), or, for a
        reader that got bytes the failed fill never wrote, a copy of the fill's hash of the
        file fed the rest from the fill's window."""
        fill = self.fill
        if fill is not None and fill.hasher is not None and self.position > fill.written:
            hasher = fill.hasher.copy()  # the writer stopped: it covers [0, written)
            offset = fill.written
            while offset < self.position:
                view = fill.view(offset, self.position)
                if view is None:
                    raise CacheFillFailed("the bytes sent are neither in the file nor in memory")
                hasher.update(view)
                offset += len(view)
            return hasher
        if self.position == 0:
            return hasher
        if self._fd < 0:
            self._open()
        offset = 0
        while offset < self.position:
            data = os.pread(self._fd, min(READ_SIZE, self.position - offset), offset)
            if not data:
                raise CacheFillFailed("the partial file is shorter than what was sent")
            hasher.update(data)
            offset += len(data)
        return hasher

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self.fill is not None:
            self.fill.unfollow(self)
        self.store.unpin(self.key)
        BODIES.end(self)


@dataclass(frozen=True)
class StoreCheck:
    """What ``verify_store`` found: how many blobs it hashed, and the damaged ones it deleted
    (each with the digest its bytes actually have)."""

    checked: int
    damaged: list[tuple[Path, str]]


def verify_store(root: Path) -> StoreCheck:
    """Hash every blob of the store under ``root`` and delete those whose bytes do not match
    their name (``hubproxy cache verify``). Safe beside a running hubproxy: a blob deleted here
    fails its next reader once (nothing wrong is completed) and is refetched after."""
    checked = 0
    damaged: list[tuple[Path, str]] = []
    blob_dir = root / "blobs" / "sha256"
    for prefix in sorted(os.scandir(blob_dir), key=lambda e: e.name):
        if not prefix.is_dir(follow_symlinks=False):
            continue
        for entry in sorted(os.scandir(prefix.path), key=lambda e: e.name):
            if sha256_hex("sha256:" + entry.name) is None or entry.name[:2] != prefix.name:
                continue
            if not entry.is_file(follow_symlinks=False):
                continue
            with open(entry.path, "rb") as file:
                actual = hashlib.file_digest(file, "sha256").hexdigest()
            checked += 1
            if actual != entry.name:
                damaged.append((Path(entry.path), actual))
                unlink_quietly(Path(entry.path))
    return StoreCheck(checked, damaged)


def _unlink_if(path: Path, inode: int) -> None:
    """Delete ``path`` if it is still the file ``inode`` (not one put there since)."""
    try:
        if os.stat(path).st_ino == inode:
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot delete %s: %s", path, exc)


# Linux: resource use of the calling thread alone (absent elsewhere: every write is then timed
# whole, blocked or not)
_RUSAGE_THREAD: int | None = getattr(resource, "RUSAGE_THREAD", None)


def _write_timed(fd: int, data: bytes | bytearray) -> float:
    """Write all of ``data``; return how long that took if the thread slept in it (a voluntary
    context switch: the disk or the kernel's dirty-page throttling held the write), else 0.0.
    A write that took long only because another process had the CPU (this thread preempted:
    an involuntary switch, on a machine as busy as the benchmark's) does not make the disk
    slow: a worker thread would not write it sooner, and handing chunks over costs CPU."""
    switches = _voluntary_switches()
    started = time.monotonic()
    _write_all(fd, data)
    took = time.monotonic() - started
    return took if switches is None or _voluntary_switches() != switches else 0.0


def _voluntary_switches() -> int | None:
    """The calling thread's voluntary context switches so far (None where not counted)."""
    if _RUSAGE_THREAD is None:
        return None
    return resource.getrusage(_RUSAGE_THREAD).ru_nvcsw


def _write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def unlink_quietly(path: Path) -> None:
    """Delete ``path``; gone already is fine, any other failure is one warning line."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot delete %s: %s", path, exc)
