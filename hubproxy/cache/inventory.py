"""The cache's inventory and its removals, for ``hubproxy cache ls|rm|refresh`` and the admin API.

Reading: :func:`read_state` takes one look at the cache directory, safe beside a running mirror:
the manifest state through its own read-only SQLite connection (committed rows: the WAL gives
it one consistent snapshot), the blobs by listing ``blobs/sha256/``. ``policy/inventory`` makes
the images of it. A mirror's own changes are written behind within moments; the admin API has
its writer commit them first, the command line sees what is committed (pull counts: at most a
minute behind).

Removing: the plan is made from such a look; the removal itself goes through a
:class:`~.manifests.ManifestStore`, whose journal tells every process on the directory to
forget the same (module docstring there), and deletes blob files the way eviction does: never a
blob being fetched (a fill of this process, or any live claim of ``--workers``), under the
eviction lock. In the mirror (:class:`Inventory`, the admin API) a blob a reader holds is
deleted once that reader closes; from the command line (:func:`remove_in_directory`), a reader
in a running mirror that has the file open goes on reading it, and one that had not opened it
yet finishes its transfer from the upstream (verified as ever), as after an eviction by
another worker.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from ..policy.inventory import (
    CacheState,
    Image,
    ImageRef,
    ManifestFacts,
    Removal,
    RemovalPlan,
    Totals,
    Usage,
    images,
    manifest_facts,
    plan_refresh,
    plan_removal,
    select,
    totals,
)
from .claims import CLAIM_SUFFIX, EVICT_LOCK, Claims, locked
from .manifests import DATABASE, ManifestStore, _json_pairs
from .store import BlobStore, sha256_hex, unlink_quietly

log = logging.getLogger("hubproxy.cache")

TOPS = 10  # images in each of the status page's tables
TOPS_EVERY = 60.0  # seconds a computed table is shown before it is computed again


def read_state(root: Path) -> CacheState:
    """The cache under ``root`` as it is now (OSError or sqlite3.Error if unreadable). Manifest
    bodies are parsed, not verified: nothing read here is served."""
    tags: dict[str, dict[str, str]] = {}
    links: dict[str, dict[str, str]] = {}
    manifests: dict[str, ManifestFacts] = {}
    sizes: dict[str, int] = {}
    usage: dict[str, Usage] = {}
    database = root / DATABASE
    if database.exists():
        conn = sqlite3.connect(database, isolation_level=None, timeout=5.0)
        try:
            conn.execute("PRAGMA query_only = ON")
            conn.execute("BEGIN")  # one snapshot for every table
            for name, text in conn.execute("SELECT name, accepts FROM tags"):
                tags[str(name)] = _json_pairs(text)
            for repository, digest, media_type in conn.execute(
                "SELECT repository, digest, media_type FROM links"
            ):
                links.setdefault(str(repository), {})[str(digest)] = str(media_type)
            for hexpart, size, body in conn.execute("SELECT hex, size, body FROM manifests"):
                if isinstance(body, bytes):
                    manifests[str(hexpart)] = manifest_facts(body)
                    sizes[str(hexpart)] = int(size)
            with contextlib.suppress(sqlite3.OperationalError):  # a database of before
                for name, pulls, hits, used in conn.execute(
                    "SELECT name, pulls, hits, used FROM usage"
                ):
                    usage[str(name)] = Usage(int(pulls), int(hits), float(used))
            conn.execute("COMMIT")
        finally:
            conn.close()
    return CacheState(tags, links, manifests, sizes, _blob_sizes(root), usage)


def _blob_sizes(root: Path) -> dict[str, int]:
    found: dict[str, int] = {}
    blob_dir = root / "blobs" / "sha256"
    with contextlib.suppress(FileNotFoundError):
        for prefix in os.scandir(blob_dir):
            if not prefix.is_dir(follow_symlinks=False):
                continue
            for entry in os.scandir(prefix.path):
                if sha256_hex("sha256:" + entry.name) is None or entry.name[:2] != prefix.name:
                    continue
                with contextlib.suppress(FileNotFoundError):  # removed meanwhile
                    found[entry.name] = entry.stat(follow_symlinks=False).st_size
    return found


@dataclass(frozen=True)
class Listing:
    images: list[Image]
    totals: Totals


def listing(state: CacheState, registry: str | None = None, glob: str | None = None) -> Listing:
    """The images of ``state`` selected by registry and repository glob, with their totals
    (ValueError for a bad glob)."""
    chosen = select(images(state), registry, glob)
    return Listing(chosen, totals(state, chosen))


@dataclass(frozen=True)
class Outcome:
    """What a removal did."""

    plan: RemovalPlan
    blobs_removed: int  # blob files deleted (or, read by a client now, once it is done)
    bytes_removed: int
    busy: tuple[str, ...]  # blobs being fetched: left alone

    def as_json(self) -> dict[str, object]:
        return {
            "removed": list(self.plan.removed),
            "manifests_removed": sum(1 for k, _ in self.plan.removals if k == Removal.MANIFEST),
            "blobs_removed": self.blobs_removed,
            "bytes_removed": self.bytes_removed,
            "blobs_kept_in_use_by_other_images": self.plan.kept_blobs,
            "blobs_being_fetched": [f"sha256:{key}" for key in self.busy],
        }


def plan(state: CacheState, ref: ImageRef, *, refresh: bool) -> RemovalPlan:
    """``rm`` or ``refresh`` of ``ref`` (NotCached, BadImageName)."""
    return plan_refresh(state, ref) if refresh else plan_removal(state, ref)


def remove_in_directory(root: Path, ref: ImageRef, *, refresh: bool = False) -> Outcome:
    """``hubproxy cache rm|refresh`` on a cache directory, beside a running mirror or not (module
    docstring). Blocks (SQLite, the eviction lock, unlinks): a command's work."""
    chosen = plan(read_state(root), ref, refresh=refresh)
    store = ManifestStore(root, max_bytes=1 << 62, max_entries=1 << 62)  # evicts nothing
    store.open()
    try:
        removed, busy = _delete_blob_files(root, chosen.blobs)
        store.remove([*chosen.removals, *((Removal.BLOB, key) for key, _ in removed)])
        if not store.flush(timeout=30.0):
            raise OSError(f"could not write the removal to {root / DATABASE}")
    finally:
        store.close()
    return Outcome(chosen, len(removed), sum(size for _, size in removed), tuple(busy))


def _delete_blob_files(root: Path, keys: Sequence[str]) -> tuple[list[tuple[str, int]], list[str]]:
    """Delete blob files under the eviction lock, except those a live process is fetching (a
    claim of ``--workers``, or a fill's temporary file of a single mirror)."""
    if not keys:
        return [], []
    tmp_dir = root / "tmp"
    removed: list[tuple[str, int]] = []
    busy: list[str] = []
    blob_dir = root / "blobs" / "sha256"
    with locked(root / EVICT_LOCK):
        filling: set[str] = set()
        with contextlib.suppress(FileNotFoundError):
            filling = Claims(tmp_dir, idle=math.inf).claimed_keys()
            filling |= {
                entry.name.partition(".")[0]
                for entry in os.scandir(tmp_dir)
                if entry.name.endswith(".partial") and not entry.name.endswith(CLAIM_SUFFIX)
            }
        for key in keys:
            if key in filling:
                busy.append(key)
                continue
            path = blob_dir / key[:2] / key
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                continue
            unlink_quietly(path)
            removed.append((key, size))
    return removed, busy


class Inventory:
    """The running mirror's side: listings and removals for the admin API, the status page's
    tables. SQLite reads and manifest parsing run in a thread; the removal itself on the loop,
    where the stores live."""

    def __init__(self, blobs: BlobStore, manifests: ManifestStore) -> None:
        self.blobs = blobs
        self.manifests = manifests
        self.root = blobs.root
        self._lock = trio.Lock()  # one look or removal at a time
        self._tops: tuple[tuple[Image, ...], tuple[Image, ...]] = ((), ())
        self._tops_at = -math.inf

    async def state(self) -> CacheState:
        """The cache now, this process's changes written first."""
        await trio.to_thread.run_sync(self.manifests.wait_written, 10.0)
        return await trio.to_thread.run_sync(read_state, self.root)

    async def listing(self, registry: str | None, glob: str | None) -> Listing:
        async with self._lock:
            state = await self.state()
        return await trio.to_thread.run_sync(listing, state, registry, glob)

    async def remove(self, ref: ImageRef, *, refresh: bool = False) -> Outcome:
        """Remove (or refresh) ``ref`` in this mirror, and through the journal in every other
        process on the directory."""
        async with self._lock:
            state = await self.state()
            chosen = await trio.to_thread.run_sync(lambda: plan(state, ref, refresh=refresh))
            removed, busy = self.blobs.remove(chosen.blobs)
            self.manifests.remove([*chosen.removals, *((Removal.BLOB, k) for k, _ in removed)])
            self._tops_at = -math.inf
        for key, _ in removed:
            log.info("cache: removed sha256:%s", key)
        return Outcome(chosen, len(removed), sum(size for _, size in removed), tuple(busy))

    async def tops(self, now: float) -> tuple[tuple[Image, ...], tuple[Image, ...]]:
        """The largest and the most pulled images (``TOPS`` each), computed in a thread at most
        once per ``TOPS_EVERY`` seconds (``now``: a monotonic clock)."""
        async with self._lock:
            if now - self._tops_at >= TOPS_EVERY:
                state = await trio.to_thread.run_sync(read_state, self.root)
                self._tops = await trio.to_thread.run_sync(top_images, state)
                self._tops_at = now
            return self._tops


def top_images(state: CacheState) -> tuple[tuple[Image, ...], tuple[Image, ...]]:
    """The ``TOPS`` largest images and the ``TOPS`` most pulled (pulled at least once)."""
    found = images(state)
    largest = sorted(found, key=lambda i: (-i.size, i.shown))[:TOPS]
    pulled = sorted((i for i in found if i.pulls), key=lambda i: (-i.pulls, i.shown))[:TOPS]
    return tuple(largest), tuple(pulled)
