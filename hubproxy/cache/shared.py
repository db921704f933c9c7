"""The shared store beside the local blob cache (``--cache-store``): commits, reads, state.

Theory of operation. The local cache stays the first tier and keeps its fast paths (fills
write a local temporary file while hashing; hits go out with ``sendfile``). This module adds the
second tier, an :class:`~hubproxy.cache.objects.ObjectStore` shared by every instance:

- **commit**: once a fill from the upstream verified and was renamed into place, the blob is put
  into the store create-only (:meth:`SharedStore.commit`, in the fill's background task, after
  its readers were released); an object already there is fine (the same digest);
- **read**: a blob neither on local disk nor being filled is looked up in the store
  (:meth:`SharedStore.fill_from_store`); if there, it becomes an ordinary local fill whose
  "upstream" is the store, so every rule of ``store.py`` holds unchanged: readers follow it,
  its last byte goes out only once its digest verified, a mismatch aborts every reader and
  nothing is committed locally. A blob that does not match its key in the store (changed
  behind our back) is deleted there too, so the next request fetches it from the upstream;
- **redirect** (``--redirect-hits``): a hit on a blob the store holds is answered with a
  presigned URL of it (:meth:`SharedStore.presigned`); whether the store holds it, this instance
  knows for a while after committing it, reading it or looking it up (:meth:`SharedStore.holds`;
  ``policy/redirecthits.py``);
- **state**: the manifest database (tags, manifests, which repositories anyone may read) is
  uploaded as a snapshot when hubproxy stops, and an instance starting on an empty cache
  directory begins from the newest one, so it starts warm. While instances run, each publishes
  what it learns and takes what it lacks object by object (``sharedstate.py``).

Every call into the store runs in a worker thread; at most ``STORE_THREADS`` at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import trio

from ..policy.redirecthits import KNOWN_ENTRIES, PRESIGN_EXPIRY, known_in_store
from ..policy.sizes import format_size
from .bucket import BucketBudget
from .objects import ObjectStore, StoreUnusable, blob_key, probe_conditional_put
from .store import BlobStore, Fill, FillState

log = logging.getLogger("hubproxy.cache")

T = TypeVar("T")
STORE_REST = 30.0  # seconds lookups skip the store after one failed (misses go upstream)
STORE_THREADS = 8  # calls into the store at once (each a worker thread blocked on the network)
# A create-only put is one PUT request (S3 has no conditional multipart upload in obstore), and
# obstore holds its whole body in memory: the bytes of the commits under way are bounded by
# this, and a larger blob is not committed (each instance keeps it in its own cache)
COMMIT_MEMORY = 256 * 1024 * 1024
STATE_KEY = "state/state.db"  # the manifest database's snapshot
PRESIGN_PROBE = "probe/presign"  # signed (never fetched) at start with --redirect-hits


class StoreReadFailed(OSError):
    """Reading a blob from the shared store failed (network, the object went away). An
    OSError, as a failed disk write is: the fill's failure is then ours, not the upstream's,
    so its readers finish from the upstream with a Range request, still verified
    (``Fill.disk_failed``)."""


class StoreBody:
    """A blob's bytes from the store, as a fill's body source (``BlobStore.run_fill``)."""

    def __init__(self, shared: SharedStore, key: str) -> None:
        self._shared = shared
        self._key = key
        self._chunks: Iterator[bytes] | None = None
        self.complete = False  # every byte came: a failed fill then means a digest mismatch

    async def receive_body(self) -> bytes | None:
        """The next chunk, None at the end; StoreReadFailed if the store fails."""
        if self._chunks is None:
            self._chunks = self._shared.objects.chunks(blob_key(self._key))
        try:
            chunk = await self._shared.run(_next_chunk, self._chunks)
        except Exception as exc:  # obstore's own errors, OSError: this read failed
            raise StoreReadFailed(f"reading sha256:{self._key} from the store: {exc}") from exc
        if chunk is None:
            self.complete = True
        return chunk


def _next_chunk(chunks: Iterator[bytes]) -> bytes | None:
    return next(chunks, None)


class SharedStore:
    """The object store shared by instances, driven from trio."""

    def __init__(self, objects: ObjectStore) -> None:
        self.objects = objects
        self.limiter = trio.CapacityLimiter(STORE_THREADS)
        self.commits = 0  # blobs this process put into the store (metrics, tests)
        self.reads = 0  # blobs read from the store into the local cache
        self.commit_memory = COMMIT_MEMORY
        self.committing_bytes = 0  # the sizes of the commits under way (held in memory)
        self._room = trio.Event()  # set when a commit ends: waiting ones look again
        self.too_large = 0  # blobs not committed for their size
        # the manifest state while running (cache/sharedstate.py): objects written, writes
        # dropped (queue full) or failed, facts taken from the store, manifests refused there
        self.state_writes = 0
        self.state_dropped = 0
        self.state_write_failures = 0
        self.state_reads = 0
        self.state_refused = 0
        self.working = 0  # commits and deletions under way
        self.resting_until = 0.0  # trio time: no lookups before (the store just failed one)
        self._idle = trio.Event()  # set while none is
        self._idle.set()
        self.budget: BucketBudget | None = None  # --cache-store-size (cache/bucket.py)
        self.redirects = 0  # hits answered with a presigned URL (--redirect-hits)
        # blob key -> trio time it was last known to be in the store (committed, read or looked
        # up here); at most KNOWN_ENTRIES, the least recently known dropped first
        self.known: OrderedDict[str, float] = OrderedDict()
        self.presign_resting_until = 0.0  # trio time: no URLs before (signing just failed)

    async def run(self, function: Callable[..., T], *args: object) -> T:
        """``function(*args)`` in a worker thread, under the store's limiter."""
        return await trio.to_thread.run_sync(function, *args, limiter=self.limiter)

    async def check(self, scratch: Path) -> None:
        """At start: the store must refuse a second create-only put of one key (StoreUnusable
        otherwise, or when it cannot be reached)."""
        try:
            await self.run(probe_conditional_put, self.objects, scratch)
        except StoreUnusable:
            raise
        except Exception as exc:
            raise StoreUnusable(
                f"cannot use the cache store {self.objects.description}: {exc} (check the "
                "bucket, --s3-endpoint and the AWS credentials)"
            ) from exc

    def note_stored(self, key: str) -> None:
        """Blob ``key`` is in the store now (``--redirect-hits`` need not look it up)."""
        self.known[key] = trio.current_time()
        self.known.move_to_end(key)
        while len(self.known) > KNOWN_ENTRIES:
            self.known.popitem(last=False)

    def forget_stored(self, key: str) -> None:
        """Blob ``key`` left the store (deleted as changed, evicted)."""
        self.known.pop(key, None)

    async def holds(self, key: str) -> bool:
        """Whether the store holds blob ``key``: known for a while after it was committed, read
        or looked up, else one lookup (a store resting after a failure holds nothing)."""
        if trio.current_time() < self.resting_until:
            return False
        if known_in_store(self.known.get(key), trio.current_time()):
            return True
        return await self.lookup(key) is not None

    async def lookup(self, key: str) -> int | None:
        """The size of blob ``key`` in the store (one HEAD), None if it is not there or the
        store fails (then it rests: lookups skip it for ``STORE_REST``, with one warning)."""
        if trio.current_time() < self.resting_until:
            return None
        try:
            size = await self.run(self.objects.size, blob_key(key))
        except Exception as exc:
            # one line per rest, not one per miss
            self.resting_until = trio.current_time() + STORE_REST
            log.warning(
                "cache store: cannot look up sha256:%s in %s: %s; misses go to the upstream "
                "for %gs",
                key,
                self.objects.description,
                exc,
                STORE_REST,
            )
            return None
        if size is None:
            self.forget_stored(key)
        else:
            self.note_stored(key)
        return size

    async def presigned(self, key: str) -> str | None:
        """A URL of blob ``key`` a client can GET for ``PRESIGN_EXPIRY`` (``--redirect-hits``);
        None if the store cannot sign one now (one warning, then hits are streamed for
        ``STORE_REST``). The URL carries a signature: never log it whole
        (``redirecthits.loggable_url``)."""
        if trio.current_time() < self.presign_resting_until:
            return None
        try:
            return await self.run(
                self.objects.presign, blob_key(key), timedelta(seconds=PRESIGN_EXPIRY)
            )
        except Exception as exc:  # the S3 client's own errors (no credentials to sign with)
            self.presign_resting_until = trio.current_time() + STORE_REST
            log.warning(
                "cache store: cannot presign sha256:%s in %s: %s; hits are streamed through "
                "this instance for %gs",
                key,
                self.objects.description,
                exc,
                STORE_REST,
            )
            return None

    async def check_presigning(self) -> None:
        """``--redirect-hits`` at start: the store must sign a URL (StoreUnusable if it cannot:
        no credentials to sign with, or a store without URLs). Signing is local: no request."""
        try:
            url = await self.run(self.objects.presign, PRESIGN_PROBE, timedelta(seconds=1))
        except Exception as exc:  # the S3 client's own errors
            raise StoreUnusable(
                f"--redirect-hits: cannot presign URLs of {self.objects.description}: {exc} "
                "(check the AWS credentials, or drop --redirect-hits)"
            ) from exc
        if url is None:
            raise StoreUnusable(
                f"--redirect-hits: {self.objects.description} has no URLs a client can fetch; "
                "use an S3 --cache-store or drop --redirect-hits"
            )

    async def wait_idle(self) -> None:
        """Wait until no commit or deletion is under way (tests; a clean handover)."""
        await self._idle.wait()

    @contextlib.contextmanager
    def _working(self) -> Iterator[None]:
        self.working += 1
        if self._idle.is_set():
            self._idle = trio.Event()
        try:
            yield
        finally:
            self.working -= 1
            if not self.working:
                self._idle.set()

    def accessed(self, key: str) -> None:
        """Blob ``key`` was served here: a later place in the bucket's recency order
        (``--cache-store-size``)."""
        if self.budget is not None:
            self.budget.accessed(key)

    async def commit(self, key: str, size: int, path: Path) -> None:
        """Put the verified blob at ``path`` into the store create-only, once its ``size``
        fits the commits' memory. A failure is one warning: this instance has the blob, the
        others fetch it themselves."""
        if size > self.commit_memory:
            self.too_large += 1
            log.info(
                "cache store: sha256:%s (%s) is not committed to %s: larger than the %s a "
                "commit may hold in memory",
                key,
                format_size(size),
                self.objects.description,
                format_size(self.commit_memory),
            )
            return
        with self._working():
            while self.committing_bytes and self.committing_bytes + size > self.commit_memory:
                await self._room.wait()
            self.committing_bytes += size
            try:
                created = await self._commit(key, path)
            finally:
                self.committing_bytes -= size
                self._room.set()
                self._room = trio.Event()
            if created is not None and self.budget is not None:
                await self.budget.committed(key, size, created)

    async def _commit(self, key: str, path: Path) -> bool | None:
        """Whether the put created the object (False: it was there); None if it failed."""
        try:
            fd = os.open(path, os.O_RDONLY)  # kept open: an eviction meanwhile cannot cut it
        except FileNotFoundError:
            return None
        try:
            created = await self.run(
                self.objects.put_new, blob_key(key), Path(f"/proc/self/fd/{fd}")
            )
        except Exception as exc:
            log.warning(
                "cache store: cannot commit sha256:%s to %s: %s", key, self.objects.description, exc
            )
            return None
        finally:
            os.close(fd)
        if created:
            self.commits += 1
        self.note_stored(key)  # created, or there already (the same digest)
        return created

    async def fill_from_store(
        self, blobs: BlobStore, key: str, source: str, nursery: trio.Nursery
    ) -> bool:
        """Start a local fill of ``key`` from the store if the store has it and the local
        cache has room; True if one was started (the caller then serves it as a hit)."""
        size = await self.lookup(key)
        # asked meanwhile: another request may have started a fill, or it landed locally
        if size is None or key in blobs.fills or blobs.size_of(key) is not None:
            return False
        if not blobs.can_fill(size):
            return False
        try:
            fill = blobs.start_fill(key, size, source)
        except OSError:
            return False
        nursery.start_soon(self._read_into, blobs, fill, StoreBody(self, key))
        return True

    async def _read_into(self, blobs: BlobStore, fill: Fill, body: StoreBody) -> None:
        with self._working():
            if self.budget is None:
                await self._read_verified(blobs, fill, body)
                return
            # --cache-store-size: a lease, so no instance's sweep deletes the object under
            # this read (one PUT before the first byte is asked for)
            async with trio.open_nursery() as nursery:
                await nursery.start(self.budget.hold_lease, fill.key)
                try:
                    await self._read_verified(blobs, fill, body)
                finally:
                    nursery.cancel_scope.cancel()

    async def _read_verified(self, blobs: BlobStore, fill: Fill, body: StoreBody) -> None:
        await blobs.run_fill(fill, body, AsyncExitStack(), commit=False)
        if fill.state is FillState.DONE:
            self.reads += 1
            self.note_stored(fill.key)
        elif body.complete:  # all of it came and it does not hash to its key
            log.warning(
                "cache store: sha256:%s in %s does not match its digest: deleted there, to be "
                "fetched from the upstream again",
                fill.key,
                self.objects.description,
            )
            self.forget_stored(fill.key)
            try:
                await self.run(self.objects.delete, blob_key(fill.key))
            except Exception as exc:
                log.warning("cache store: cannot delete sha256:%s: %s", fill.key, exc)

    # -- the manifest database ----------------------------------------------------------------

    def seed_state(self, database: Path) -> bool:
        """At start, before the manifest store opens: an empty cache directory begins from the
        store's snapshot, if any. Synchronous (nothing is served yet)."""
        if database.exists():
            return False
        partial = database.with_name(database.name + ".from-store")
        partial.unlink(missing_ok=True)
        try:
            found = self.objects.get_to(STATE_KEY, partial)
        except Exception as exc:
            log.warning("cache store: cannot read the manifest snapshot: %s", exc)
            partial.unlink(missing_ok=True)
            return False
        if found:
            os.replace(partial, database)
            log.info("cache store: manifests and tags taken from %s", self.objects.description)
        return found

    def save_state(self, database: Path) -> None:
        """When stopping, after the manifest store closed: upload a consistent snapshot of its
        database (SQLite's backup API), replacing the previous one. Synchronous."""
        if not database.exists():
            return
        snapshot = database.with_name(database.name + ".to-store")
        snapshot.unlink(missing_ok=True)
        try:
            source = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
            try:
                target = sqlite3.connect(snapshot)
                try:
                    source.backup(target)
                finally:
                    target.close()
            finally:
                source.close()
            self.objects.put(STATE_KEY, snapshot)
        except Exception as exc:
            log.warning("cache store: cannot save the manifest snapshot: %s", exc)
        finally:
            snapshot.unlink(missing_ok=True)
