"""The bucket's size budget (``--cache-store-size``): access times, leases and sweeps.

Theory of operation. ``policy/bucketbudget.py`` says what lives in the store and how a sweep
decides; this module does the I/O, every call in a worker thread under the shared store's
limiter (as ``shared.py`` does):

- **access times**: a blob served here (a hit, a read from the store, a commit of a blob that
  was there already) is noted with :meth:`BucketBudget.accessed`; a background task rewrites
  its ``access/<hex>`` marker, at most once per ``ACCESS_EVERY`` per blob from this instance,
  so the writes are bounded by the blobs served, not by the requests;
- **leases**: a read from the store into the local cache holds ``leases/<hex>/<holder>``
  (:meth:`BucketBudget.hold_lease`), written before the first byte is asked for, renewed every
  ``LEASE_RENEW`` while the read lasts, deleted at its end; a process that dies leaves a lease
  that lapses at its expiry. A commit needs none: a put is atomic, the object appears whole
  with the newest time in the bucket, last in line for eviction;
- **sweeps** (:meth:`BucketBudget.sweep`): list ``blobs/``, ``access/`` and ``leases/`` (with
  the leases' bodies: few, one per read under way), decide (``plan_sweep``), list the leases
  again, and delete. One at a time in this process; at start, every ``SWEEP_EVERY``, and after a
  commit takes this instance's count of the bucket's bytes over the budget.

Races, and why they are harmless:

- two instances sweeping at once list much the same bucket and so choose much the same least
  recently used blobs; a delete of a key already gone succeeds, so the worst is a few more
  evictions than one sweep would make (blobs fetched from the upstream again), never a leased
  blob: each sweep skips those itself;
- a read from the store starting between a sweep's last look at the leases and its delete can
  lose its object. That read then fails as any failing store read does (``StoreReadFailed``):
  its clients finish from the upstream with a Range request, verified. Reading the leases again
  just before deleting keeps that window to the deletes themselves.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from typing import Protocol, TypeVar

import trio

from ..policy.bucketbudget import (
    ACCESS_DIR,
    BLOB_DIR,
    LEASE_DIR,
    Lease,
    Listed,
    SweepPlan,
    access_key,
    blob_digest,
    lease_body,
    lease_key,
    plan_sweep,
    read_lease,
    still_evictable,
)
from ..policy.sizes import format_size
from .objects import ObjectStore, blob_key

log = logging.getLogger("hubproxy.cache")

T = TypeVar("T")
ACCESS_EVERY = 600.0  # seconds: a blob's access marker is rewritten at most this often from here
TOUCHED_CAP = 65_536  # blobs whose last marker time is remembered (the oldest forgotten first)
PENDING_CAP = 4096  # markers waiting to be written; beyond, an access is not noted (try later)
LEASE_TTL = 120.0  # seconds a lease protects a read unless renewed
LEASE_RENEW = 30.0  # a lease is renewed this often while its read lasts
SWEEP_EVERY = 300.0  # seconds between periodic sweeps (each lists the whole bucket)
SWEEP_REST = 30.0  # after a sweep that could not get under the budget, commits wait this long
WARN_REST = 60.0  # one warning per failing kind of store call per this many seconds


class StoreRunner(Protocol):
    """What the budget needs of the shared store (``shared.SharedStore``)."""

    objects: ObjectStore

    async def run(self, function: Callable[..., T], *args: object) -> T: ...


class BucketBudget:
    """Keeps the shared store's blobs within ``budget`` bytes by evicting the least recently
    used, never one another instance is reading."""

    def __init__(
        self,
        shared: StoreRunner,
        budget: int,
        *,
        holder: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.shared = shared
        self.budget = budget
        self.holder = holder or secrets.token_hex(8)  # this process, in its lease keys
        self.clock = clock  # the wall clock lease expiries are written and judged by
        # sweep every SWEEP_EVERY (with --workers N, one worker does; all sweep after commits)
        self.periodic = True
        self.evicted = 0  # blobs this process deleted from the store (metrics)
        self.sweeps = 0  # sweeps completed
        self.markers_written = 0  # access markers written
        # the bucket's blob bytes at the last sweep, plus this process's commits since; None
        # before the first sweep
        self.bucket_bytes: int | None = None
        self.last_plan: SweepPlan | None = None
        self._sweeping = trio.Lock()
        self._again = False  # asked for a sweep while one ran: it runs once more
        self._swept = trio.Event()  # set when the sweep under way (and its repeats) ended
        self._quiet_until = 0.0  # trio time: no sweep after a commit before this
        self._touched: dict[str, float] = {}  # digest -> trio time of its last marker write
        self._pending: dict[str, None] = {}  # markers to write, in order
        self._wake = trio.Event()
        self._marked = trio.Event()  # set while no marker waits or is being written
        self._marked.set()
        self._warned: dict[str, float] = {}  # what failed -> trio time of its last warning
        self.held: dict[str, float] = {}  # this process's leases: key -> expiry last written
        self._lease_written = trio.Event()  # set (and replaced) at each lease write

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write access markers as blobs are served, and (``periodic``) sweep at start and
        every ``SWEEP_EVERY`` seconds; until cancelled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write_markers)
            task_status.started()
            while self.periodic:
                await self.sweep()
                await trio.sleep(SWEEP_EVERY)

    # -- access times --------------------------------------------------------------------------

    def accessed(self, digest: str) -> None:
        """Blob ``digest`` was served: its access marker is rewritten (in the background)
        unless this process did so within ``ACCESS_EVERY``."""
        now = trio.current_time()
        last = self._touched.get(digest)
        if last is not None and now - last < ACCESS_EVERY:
            return
        if digest in self._pending or len(self._pending) >= PENDING_CAP:
            return  # the store is behind: a later access notes it
        self._touched.pop(digest, None)  # re-inserted last: the dict stays in time order
        self._touched[digest] = now
        while len(self._touched) > TOUCHED_CAP:
            del self._touched[next(iter(self._touched))]  # the oldest: at worst written again
        self._pending[digest] = None
        if self._marked.is_set():
            self._marked = trio.Event()
        self._wake.set()

    async def wait_marked(self) -> None:
        """Wait until every noted access is written (tests)."""
        await self._marked.wait()

    async def _write_markers(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while self._pending:
                digest = next(iter(self._pending))
                try:
                    await self.shared.run(self.shared.objects.put_bytes, access_key(digest), b"")
                    self.markers_written += 1
                except Exception as exc:  # the client's own errors: the access is just lost
                    self._warn("cannot record blob accesses in", exc)
                finally:
                    del self._pending[digest]
            self._marked.set()

    # -- leases -------------------------------------------------------------------------------

    async def hold_lease(
        self, digest: str, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Hold this process's lease on blob ``digest`` until cancelled: written before
        ``started()``, renewed every ``LEASE_RENEW`` seconds, deleted at the end. A failing
        store only warns: the read goes on, unprotected (at worst it loses its object and its
        clients finish from the upstream)."""
        key = lease_key(digest, self.holder)
        self.accessed(digest)
        try:
            await self._put_lease(key)
            task_status.started()
            while True:
                await trio.sleep(LEASE_RENEW)
                await self._put_lease(key)
        finally:
            self.held.pop(key, None)
            with trio.CancelScope(shield=True):
                try:
                    await self.shared.run(self.shared.objects.delete, key)
                except Exception as exc:  # it lapses at its expiry
                    self._warn("cannot end a lease in", exc)

    async def _put_lease(self, key: str) -> None:
        expires = self.clock() + LEASE_TTL
        try:
            await self.shared.run(self.shared.objects.put_bytes, key, lease_body(expires))
        except Exception as exc:
            self._warn("cannot write a lease to", exc)
            return
        self.held[key] = expires
        self._lease_written.set()
        self._lease_written = trio.Event()

    async def wait_lease_written(self) -> None:
        """Wait for this process's next lease write (tests)."""
        await self._lease_written.wait()

    # -- sweeps -------------------------------------------------------------------------------

    async def committed(self, digest: str, size: int, created: bool) -> None:
        """This process committed blob ``digest`` (``created``: it was not there): counted
        into the bucket's bytes, and a sweep if that goes over the budget."""
        if not created:
            self.accessed(digest)
            return
        if self.bucket_bytes is not None:
            self.bucket_bytes += size
            if self.bucket_bytes <= self.budget:
                return
        if trio.current_time() >= self._quiet_until:
            await self.sweep()

    async def sweep(self) -> SweepPlan | None:
        """Evict least recently used blobs until the bucket is within the budget (see the
        module's docstring); the plan carried out, or None if the store failed (warned) or a
        sweep was under way (it sweeps once more when done instead)."""
        if self._sweeping.locked():
            # the bucket may have changed since that sweep listed it: it lists it once more,
            # and this caller (a commit: shared.py's wait_idle covers it) waits for that too
            self._again = True
            await self._swept.wait()
            return None
        async with self._sweeping:
            self._swept = trio.Event()
            try:
                while True:
                    self._again = False
                    plan = await self._sweep_once()
                    if not self._again:
                        return plan
            finally:
                self._swept.set()

    async def _sweep_once(self) -> SweepPlan | None:
        objects = self.shared.objects
        try:
            blobs, markers, leases = await self.shared.run(self._read_bucket)
        except Exception as exc:
            self._warn("cannot list", exc)
            self._quiet_until = trio.current_time() + SWEEP_REST
            return None
        plan = plan_sweep(blobs, markers, leases, self.budget, self.clock())
        evict = plan.evict
        if evict:
            expired = [lease.key for lease in leases if lease.digest in evict]
            try:
                keys = [key for key, _, _ in await self.shared.run(objects.listing, LEASE_DIR)]
            except Exception as exc:  # not without that look: a read may have begun
                self._warn("cannot list", exc)
                return None
            evict = still_evictable(evict, expired, keys)
        sizes = {blob_digest(key): size for key, size, _ in blobs}
        deleted, failure = await self.shared.run(
            _delete_all, objects, [blob_key(digest) for digest in evict]
        )
        # the markers of blobs still there are kept (a read began, a delete failed)
        kept = {access_key(digest) for digest in plan.evict if digest not in evict[:deleted]}
        stale = [key for key in plan.stale if key not in kept]
        await self.shared.run(_delete_all, objects, stale)  # best effort: stale is harmless
        freed = sum(sizes[digest] for digest in evict[:deleted])
        self.evicted += deleted
        self.sweeps += 1
        self.last_plan = plan
        self.bucket_bytes = plan.total - freed
        if failure is not None:
            self._warn("cannot delete blobs from", failure)
        if deleted:
            log.info(
                "cache store: evicted %d blob%s (%s) from %s, least recently used first: it "
                "held %s, over its budget of %s (--cache-store-size)",
                deleted,
                "" if deleted == 1 else "s",
                format_size(freed),
                objects.description,
                format_size(plan.total),
                format_size(self.budget),
            )
        if self.bucket_bytes > self.budget:
            self._quiet_until = trio.current_time() + SWEEP_REST
            if plan.held:
                log.info(
                    "cache store: %s holds %s, over its budget of %s, while %d blob%s are "
                    "read by an instance (kept until the reads end)",
                    objects.description,
                    format_size(self.bucket_bytes),
                    format_size(self.budget),
                    len(plan.held),
                    "" if len(plan.held) == 1 else "s",
                )
        else:
            self._quiet_until = 0.0
        return plan

    def _read_bucket(self) -> tuple[list[Listed], list[Listed], list[Lease]]:
        """In a worker thread: the bucket's blobs, access markers and leases."""
        objects = self.shared.objects
        blobs = objects.listing(BLOB_DIR)
        markers = objects.listing(ACCESS_DIR)
        leases = []
        for key, _size, _modified in objects.listing(LEASE_DIR):
            try:
                body = b"".join(objects.chunks(key))
            except FileNotFoundError:  # its read ended meanwhile
                continue
            lease = read_lease(key, body)
            if lease is not None:
                leases.append(lease)
        return blobs, markers, leases

    def _warn(self, what: str, exc: Exception) -> None:
        """One warning per kind of failure per ``WARN_REST`` (a failing store fails them all)."""
        now = trio.current_time()
        if now < self._warned.get(what, -WARN_REST) + WARN_REST:
            return
        self._warned[what] = now
        log.warning(
            "cache store: %s %s: %s (its --cache-store-size is kept the next time it answers)",
            what,
            self.shared.objects.description,
            exc,
        )


def _delete_all(objects: ObjectStore, keys: list[str]) -> tuple[int, Exception | None]:
    """In a worker thread: delete ``keys`` in order, stopping at the first failure; how many
    went, and that failure."""
    for done, key in enumerate(keys):
        try:
            objects.delete(key)
        except Exception as exc:  # the client's own error family
            return done, exc
    return len(keys), None
