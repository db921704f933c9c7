"""Cached manifests: bytes by digest, per repository the media type each digest was served with,
tags to their last known digest per kind of client, and which repositories anyone may read.

Theory of operation. Everything lives in one SQLite database, ``state.db`` in the cache
directory (WAL journal, ``synchronous=FULL``: a commit is on disk when it returns, and a crash
or power loss leaves the last committed state). Manifest bodies are rows too, kept byte-exact (a
digest is over those bytes) and re-hashed whenever read back, so a damaged row is never served.
Rows rather than files: a body, the tags naming it and its eviction commit in one transaction
(no tag outlives its body, no orphan file escapes the bound), a batch of any size costs one
fsync instead of one per file plus the directory, and a 500-byte manifest takes 500 bytes, not
a 4 KiB block.

The event loop never waits for the disk. All state is indexed in memory, in least-recently-used
order, and every public method answers from there at once; each change is also recorded in a
*batch* (a dict per table, keyed by row, so a key changed twice is written once). One writer
thread owns the write connection: it takes the whole batch under a lock (a pointer swap) and
commits it in one transaction, while the loop goes on filling the next. Memory stays bounded:
the batch holds at most one entry per key of the bounded indexes, and bodies not yet committed
are capped at ``MAX_UNWRITTEN`` bytes (beyond that a manifest is served uncached: the disk is
behind). Reads of bodies that are not in memory go through a second, read-only connection.

Bounds (like the blob cache): the bytes of manifest bodies, and the number of manifests, of tags,
of (repository, digest) links and of repositories with a known readability. Beyond them the least
recently used go first; a manifest takes the tags that name it along.

Failures. A commit that fails (a full disk, an I/O error) never reaches a client: the request
was answered from memory. Its bodies are dropped from the index (asked upstream again next
time), the rest is retried a second later, and one warning a minute says what failed and what
to do. A database that is corrupt or of another shape is set aside (renamed with a timestamp)
with one warning, and the store starts empty. A ``state.json`` (with ``manifests/sha256/``) of
the versions before the database is imported once and renamed aside.

Inventory and removals (``hubproxy cache ls/rm/refresh``, the admin API). Each manifest GET
answered is counted per image name (``repo:tag`` or ``repo@digest``): pulls, hits (answered
without an upstream GET) and the wall-clock time of the last, as deltas in the batch, written
with the next commit (or alone every ``TOUCH_EVERY``), so counting costs a dict update, never a
write per request; several processes add their deltas to one row. A removal (of a tag, a
manifest, a link, a repository's links, or a blob) is done in memory and written with the batch,
together with a row of the ``removals`` journal. Every process on the directory (``--workers``
workers, and a ``hubproxy cache rm`` run beside them) reads the journal once a second in its
writer thread, and the event loop forgets what another process removed at its next call: a tag
refreshed or removed anywhere is asked upstream again everywhere within about a second. The
journal keeps a day (at most ``JOURNAL_KEEP`` rows); a process that missed rows (stopped for
longer) forgets every tag it holds, so it asks upstream rather than serve a removed one.

Several instances (``--cache-store``). What this store learns from the upstreams (a manifest
stored, a tag resolved, a digest linked, a readability answer) is also handed to its ``sink``,
which publishes it to the shared store in the background (``sharedstate.py``); what is taken
from there is changed here inside ``adopting()``, kept as any state and not published back.

Accept negotiation follows RFC 9110 section 12.5.1: a cached manifest is served only to a client
whose ``Accept`` names its media type (or ``*/*``, or ``type/*``) with a non-zero quality.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import re
import secrets
import shutil
import sqlite3
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import trio

from ..policy.cachepolicy import Readability, manifest_verified
from ..policy.inventory import Removal
from ..policy.values import immutable
from .lru import ShardedLRU

log = logging.getLogger("hubproxy.cache")

MAX_MANIFEST = 4 * 1024 * 1024  # distribution's limit on manifest size
MEMORY_LIMIT = 8 * 1024 * 1024  # verified manifests kept in memory
# a body larger than this is read and hashed in a worker thread by ``load``: 4 MiB costs the
# event loop about 5 ms (read, then sha256), a stall of every other client's step
READ_ON_LOOP = 64 * 1024
MAX_UNWRITTEN = 8 * 1024 * 1024  # bodies handed to the writer and not yet committed
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_ENTRIES = 50_000
WARN_EVERY = 60.0  # seconds between two warnings about failing writes
RETRY_AFTER = 1.0  # seconds before a failed batch is tried again
TOUCH_EVERY = 60.0  # recency (LRU order) alone is written at most this often
JOURNAL_POLL = 1.0  # seconds between two looks at the removals journal (other processes')
JOURNAL_KEEP = 10_000  # removals journal rows kept (and at most a day of them)
JOURNAL_AGE = 86400.0
MAX_USAGE_PENDING = 10_000  # image names with uncommitted pull counts before a write is due
SCHEMA_VERSION = 1
DATABASE = "state.db"
LEGACY_STATE = "state.json"

_HEX = re.compile(r"[0-9a-f]{64}\Z")
_DAMAGED_CODES = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})
_SCHEMA = (
    # body last: loading the index reads hex, size and used without touching overflow pages
    "CREATE TABLE manifests (hex TEXT PRIMARY KEY, size INTEGER NOT NULL,"
    " used INTEGER NOT NULL, body BLOB NOT NULL)",
    "CREATE TABLE tags (name TEXT PRIMARY KEY, accepts TEXT NOT NULL, seq INTEGER NOT NULL)",
    "CREATE TABLE links (repository TEXT NOT NULL, digest TEXT NOT NULL,"
    " media_type TEXT NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (repository, digest))",
    "CREATE TABLE readability (repository TEXT PRIMARY KEY, anonymous INTEGER NOT NULL,"
    " learned_at REAL NOT NULL, seq INTEGER NOT NULL)",
)
_TABLES = frozenset({"manifests", "tags", "links", "readability"})
# added later, to version 1 (an older hubproxy ignores tables it does not know)
_ADDED = (
    "CREATE TABLE IF NOT EXISTS usage (name TEXT PRIMARY KEY, pulls INTEGER NOT NULL,"
    " hits INTEGER NOT NULL, used REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS removals (id INTEGER PRIMARY KEY AUTOINCREMENT,"
    " origin TEXT NOT NULL, kind TEXT NOT NULL, name TEXT NOT NULL, at REAL NOT NULL)",
)


def accepts(accept_values: Sequence[bytes], media_type: str) -> bool:
    """Whether a client sending these ``Accept`` headers takes ``media_type``.

    No ``Accept`` at all means any media type (RFC 9110 section 12.5.1).
    """
    if not accept_values:
        return True
    wanted = media_type.lower()
    major = wanted.split("/", 1)[0]
    for value in accept_values:
        for item in value.decode("latin-1").split(","):
            kind, *params = (part.strip() for part in item.split(";"))
            if not kind:
                continue
            quality = 1.0
            for param in params:
                name, _, number = param.partition("=")
                if name.strip().lower() == "q":
                    try:
                        quality = float(number)
                    except ValueError:
                        quality = 0.0
            if not quality > 0:  # q=0 is "not acceptable" (section 12.4.2); so is q=nan
                continue
            kind = kind.lower()
            if kind in (wanted, "*/*", f"{major}/*"):
                return True
    return False


# The manifest media types a registry chooses between by Accept; a client's Accept is reduced to
# the subset of these it takes, so clients of one kind share one cached answer per tag, and no
# Accept header however odd can make more than 2**len(...) of them.
MANIFEST_TYPES = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.artifact.manifest.v1+json",
)


_MANIFEST_TYPE_SET = frozenset(MANIFEST_TYPES)


def takes(accept_values: Sequence[bytes], media_type: str) -> bool:
    """:func:`accepts`, for the request path: a media type a registry chooses between by
    Accept is looked up in the remembered :func:`accepted_types` (the Accept headers of a docker
    or containerd client name five to seven types, parsed on every manifest request otherwise)."""
    if media_type in _MANIFEST_TYPE_SET:
        return media_type in accepted_types(accept_values)
    return accepts(accept_values, media_type)


def accepted_types(accept_values: Sequence[bytes]) -> frozenset[str]:
    """The manifest media types a client sending these ``Accept`` headers takes (q > 0)."""
    values = tuple(accept_values)
    if sum(map(len, values)) > ACCEPT_MEMO_SIZE:
        return _types_taken(values)
    return _remembered_types(values)


# Clients of one kind send the same Accept headers on every manifest request: the answer for
# the last few dozen sets of headers of ordinary size is remembered (at most 64 x 2 KiB).
ACCEPT_MEMO = 64
ACCEPT_MEMO_SIZE = 2048


@functools.lru_cache(maxsize=ACCEPT_MEMO)
def _remembered_types(accept_values: tuple[bytes, ...]) -> frozenset[str]:
    return _types_taken(accept_values)


def _types_taken(accept_values: tuple[bytes, ...]) -> frozenset[str]:
    return frozenset(t for t in MANIFEST_TYPES if accepts(accept_values, t))


def _accept_key(accepted: frozenset[str]) -> str:
    # interned: 100,000 tags share a handful of these strings instead of a copy each
    return sys.intern(",".join(sorted(accepted)))


def accept_key(accepted: frozenset[str]) -> str:
    """The key a tag's answer is kept under for clients accepting ``accepted``."""
    return _accept_key(accepted)


@immutable
class CachedManifest:
    digest: str  # "sha256:<hex>"
    media_type: str  # as the upstream served it in the repository it was asked for
    body: bytes


@dataclass
class ManifestStats:
    """Counters for the metrics endpoint (read-only from outside)."""

    evictions: int = 0  # manifests evicted to stay within the bounds
    write_failures: int = 0  # batches the writer could not commit (full disk, I/O error)
    uncached: int = 0  # verified manifests served without being stored


@dataclass
class _Batch:
    """Changes not yet committed, one entry per row (the latest wins); None deletes the row."""

    bodies: dict[str, tuple[bytes, int] | None] = field(default_factory=dict)  # hex -> body, used
    used: dict[str, int] = field(default_factory=dict)  # hex -> recency, alone
    tags: dict[str, tuple[str, int] | None] = field(default_factory=dict)  # name -> json, seq
    tag_used: dict[str, int] = field(default_factory=dict)  # name -> recency, alone
    links: dict[tuple[str, str], tuple[str, int] | None] = field(default_factory=dict)
    readability: dict[str, tuple[Readability, int] | None] = field(default_factory=dict)
    # image name -> (pulls, hits, last pull's wall time): added to the row, not replacing it
    usage: dict[str, tuple[int, int, float]] = field(default_factory=dict)
    removals: list[tuple[str, str]] = field(default_factory=list)  # (kind, name) for the journal

    def changed(self) -> bool:
        """Whether anything but recency and counts changed (those alone are not worth an fsync
        now, unless many names wait)."""
        return bool(
            self.bodies
            or self.tags
            or self.links
            or self.readability
            or self.removals
            or len(self.usage) >= MAX_USAGE_PENDING
        )

    def empty(self) -> bool:
        return not (self.changed() or self.used or self.tag_used or self.usage)

    def merge_back(self, failed: _Batch) -> None:
        """Take back a batch that could not be written, except the bodies it inserted (they
        are dropped: asked upstream again) and rows changed again since."""
        for hexpart, body in failed.bodies.items():
            if body is None:
                self.bodies.setdefault(hexpart, None)
        for name in ("used", "tags", "tag_used", "links", "readability"):
            mine, theirs = getattr(self, name), getattr(failed, name)
            for key, value in theirs.items():
                mine.setdefault(key, value)
        for key, (pulls, hits, used) in failed.usage.items():  # deltas: added up
            more = self.usage.get(key, (0, 0, 0.0))
            self.usage[key] = (pulls + more[0], hits + more[1], max(used, more[2]))
        self.removals[:0] = failed.removals


@dataclass(frozen=True)
class _Result:
    """What the writer tells the loop after a commit, or a failed one."""

    written: tuple[str, ...]  # bodies now on disk
    lost: tuple[str, ...]  # bodies that could not be written
    removed: tuple[tuple[str, str], ...] = ()  # other processes' removals (kind, name)
    gap: bool = False  # journal rows were pruned before this process read them


class _Damaged(Exception):
    """The database (or the old state file) is corrupt or of another shape."""


class StateSink(Protocol):
    """Where what this store learns from the upstreams is published besides (``--cache-store``:
    :class:`hubproxy.cache.sharedstate.SharedState`). Called on the event loop, under the
    store's lock: each call only queues, never waits."""

    def manifest_stored(self, hexpart: str, body: bytes) -> None: ...
    def tag_resolved(
        self, repository: str, tag: str, accept_key: str, hexpart: str, media_type: str
    ) -> None: ...
    def link_learned(self, repository: str, digest: str, media_type: str) -> None: ...
    def readability_learned(self, repository: str, readability: Readability) -> None: ...


class ManifestStore:
    """Manifests and their state, bounded and written behind by one thread.

    Every method is synchronous and answers from memory at once (callable from the event
    loop), but for bodies: ``get`` reads one from the database when it is not in memory, and
    the event loop's ``load`` reads a large one in a worker thread. ``open`` (at start) and
    ``flush``/``close`` (at shutdown, or from a thread) block.
    """

    def __init__(
        self,
        root: Path,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_entries: int = DEFAULT_MAX_ENTRIES,
    ) -> None:
        self.root = root
        self.db_path = root / DATABASE
        self.legacy_state = root / LEGACY_STATE
        self.legacy_dir = root / "manifests"
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.stats = ManifestStats()
        # the indexes, least recently used first
        self.sizes: ShardedLRU[str, int] = ShardedLRU()  # hex -> body size
        self.total = 0  # bytes of bodies
        self.tags: ShardedLRU[str, dict[str, str]] = ShardedLRU()  # "repo:tag" -> {key: hex}
        # repository -> {digest: media type} of what the upstream served in it ("" for blobs)
        self.links: ShardedLRU[str, dict[str, str]] = ShardedLRU()
        self.readability: ShardedLRU[str, Readability] = ShardedLRU()  # the anonymous answer
        self.tag_count = 0
        self.link_count = 0
        # hex -> tag names naming it; tuples, not sets: a tuple of strings is not tracked by
        # the garbage collector, and 100,000 tracked sets made every full collection a stall
        self._tagged: ShardedLRU[str, tuple[str, ...]] = ShardedLRU()
        self._verified: OrderedDict[str, bytes] = OrderedDict()  # hex -> body, checked once
        self._verified_bytes = 0
        self._unwritten: dict[str, bytes] = {}  # hex -> body handed to the writer
        self._unwritten_bytes = 0
        self._seq = 0  # recency: larger is more recent
        # shared with the writer thread, under _cond; ``_lock`` is its lock, taken alone where
        # nobody is told (a Condition's own ``with`` is a Python call, twice per cached manifest)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._batch = _Batch()
        self._writing = False
        self._urgent = False  # a flush waits: write now, recency too
        self._closing = False
        self._failures = 0
        self._results: deque[_Result] = deque()  # appended by the writer, read by the loop
        self._warned_at = -math.inf
        self._unwarned = 0
        self._reader: sqlite3.Connection | None = None
        # the worker threads' connection for large bodies (``load``), opened on first use
        self._bulk_reader: sqlite3.Connection | None = None
        self._bulk_lock = threading.Lock()
        self._bulk_limiter = trio.CapacityLimiter(1)
        self._thread: threading.Thread | None = None
        # the removals journal: this process's rows are told apart by origin; read up to seen
        self._origin = secrets.token_hex(8)
        self._journal_seen = 0
        self._journal_asked = self._journal_read = 0  # read_journal_now's tickets
        # blobs another process removed: the blob store forgets them (set by the assembly)
        self.on_blobs_removed: Callable[[list[str]], None] | None = None
        # --cache-store: what is learned from the upstreams is published there too; what is
        # taken from there (``adopting``) is not published back
        self.sink: StateSink | None = None
        self._adopting = False

    # -- opening ---------------------------------------------------------------------------

    def open(self) -> None:
        """Open (or create) the database, import an old ``state.json`` once, load the indexes
        and start the writer. A damaged database is set aside and the store starts empty.
        Raises OSError if the cache directory cannot be used at all."""
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            self._open_database()
        except _Damaged as exc:
            self._set_aside(self.db_path, str(exc), ("", "-wal", "-shm"))
            self._reset()
            self._open_database()
        self._reader = _open_reader(self.db_path)
        self._thread = threading.Thread(target=self._run, name="hubproxy-manifests", daemon=True)
        self._thread.start()

    def _open_database(self) -> None:
        try:
            conn = _connect(self.db_path)
        except sqlite3.Error as exc:
            raise OSError(f"cannot open {self.db_path}: {exc}") from exc
        try:
            _prepare(conn)
            self._import_legacy(conn)
            self._load(conn)
        except sqlite3.Error as exc:
            if getattr(exc, "sqlite_errorcode", None) in _DAMAGED_CODES:
                raise _Damaged(str(exc)) from exc
            raise OSError(f"cannot use {self.db_path}: {exc}") from exc
        finally:
            conn.close()

    def _reset(self) -> None:
        self.sizes.clear()
        self.tags.clear()
        self.links.clear()
        self.readability.clear()
        self._tagged.clear()
        self.total = self.tag_count = self.link_count = 0
        self._batch = _Batch()

    def _set_aside(self, path: Path, why: str, suffixes: Sequence[str] = ("",)) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        for suffix in suffixes:
            source = path.with_name(path.name + suffix)
            with contextlib.suppress(FileNotFoundError):
                if suffix == "-shm":  # an index of the WAL, rebuilt from it: nothing to keep
                    source.unlink()
                else:
                    source.rename(path.with_name(f"{path.name}.damaged-{stamp}{suffix}"))
        log.warning(
            "cache state %s is damaged (%s); set aside as %s.damaged-%s, starting with an "
            "empty manifest cache",
            path,
            why,
            path.name,
            stamp,
        )

    def _import_legacy(self, conn: sqlite3.Connection) -> None:
        """Import the ``state.json`` and ``manifests/sha256/`` of older versions, once."""
        if not self.legacy_state.exists() and not self.legacy_dir.exists():
            return
        tags: dict[str, dict[str, str]] = {}
        links: dict[str, dict[str, str]] = {}
        readability: dict[str, Readability] = {}
        if self.legacy_state.exists():
            try:
                tags, links, readability = _legacy_state(self.legacy_state.read_bytes())
            except (_Damaged, OSError) as exc:
                self._set_aside(self.legacy_state, str(exc))
        seq = 0
        present = set()
        conn.execute("BEGIN IMMEDIATE")
        for path in _legacy_files(self.legacy_dir / "sha256"):
            body = path.read_bytes()
            if hashlib.sha256(body).hexdigest() != path.name:
                continue  # damaged: never imported
            seq += 1
            present.add(path.name)
            conn.execute(
                "INSERT OR REPLACE INTO manifests VALUES (?, ?, ?, ?)",
                (path.name, len(body), seq, body),
            )
        for name, keyed in tags.items():
            kept = {k: h for k, h in keyed.items() if h in present}
            if kept:
                seq += 1
                conn.execute(
                    "INSERT OR REPLACE INTO tags VALUES (?, ?, ?)", (name, json.dumps(kept), seq)
                )
        for repository, digests in links.items():
            for digest, media_type in digests.items():
                seq += 1
                conn.execute(
                    "INSERT OR REPLACE INTO links VALUES (?, ?, ?, ?)",
                    (repository, digest, media_type, seq),
                )
        for repository, answer in readability.items():
            seq += 1
            conn.execute(
                "INSERT OR REPLACE INTO readability VALUES (?, ?, ?, ?)",
                (repository, int(answer.anonymous), answer.learned_at, seq),
            )
        conn.execute("COMMIT")
        if self.legacy_state.exists():
            self.legacy_state.rename(self.legacy_state.with_name(LEGACY_STATE + ".migrated"))
        shutil.rmtree(self.legacy_dir, ignore_errors=True)
        log.info("imported %d manifests and their state from %s", len(present), LEGACY_STATE)

    def _load(self, conn: sqlite3.Connection) -> None:
        """Fill the indexes from the database, oldest first, and drop what is beyond bounds."""
        # first: a removal committed while the rest is read is then applied after (again)
        self._journal_seen = _journal_end(conn)
        seq = 0
        for hexpart, size, used in conn.execute(
            "SELECT hex, size, used FROM manifests ORDER BY used"
        ):
            if isinstance(hexpart, str) and _HEX.match(hexpart) and isinstance(size, int):
                self.sizes[sys.intern(hexpart)] = size
                self.total += size
            else:
                self._batch.bodies[str(hexpart)] = None
            seq = max(seq, used if isinstance(used, int) else 0)
        for name, text, row_seq in conn.execute("SELECT name, accepts, seq FROM tags ORDER BY seq"):
            keyed = _json_pairs(text)
            kept = {sys.intern(k): h for k, h in keyed.items() if h in self.sizes}
            if kept:
                self.tags[name] = kept
                self.tag_count += len(kept)
                for hexpart in set(kept.values()):
                    self._tagged[hexpart] = (*self._tagged.get(hexpart, ()), name)
            if kept != keyed:
                self._batch.tags[name] = (json.dumps(kept), row_seq) if kept else None
            seq = max(seq, row_seq if isinstance(row_seq, int) else 0)
        for repository, digest, media_type, row_seq in conn.execute(
            "SELECT repository, digest, media_type, seq FROM links ORDER BY seq"
        ):
            self.links.setdefault(repository, {})[digest] = sys.intern(str(media_type))
            self.links.move_to_end(repository)
            self.link_count += 1
            seq = max(seq, row_seq if isinstance(row_seq, int) else 0)
        for repository, anonymous, learned_at, row_seq in conn.execute(
            "SELECT repository, anonymous, learned_at, seq FROM readability ORDER BY seq"
        ):
            if isinstance(learned_at, int | float):
                self.readability[repository] = Readability(bool(anonymous), float(learned_at))
            seq = max(seq, row_seq if isinstance(row_seq, int) else 0)
        self._seq = seq
        self._evict()

    # -- reading -----------------------------------------------------------------------------

    def get(self, repository: str, digest: str) -> CachedManifest | None:
        """The manifest ``digest`` as served in ``repository``, or None if the upstream never
        served it there (or it is not cached, or its stored bytes are damaged). Reads and hashes
        the body on the calling thread: ``load`` is the event loop's way for large bodies."""
        hexpart, media_type = self._served(repository, digest)
        if not hexpart:
            return None
        body = self._body(hexpart)
        if body is None:
            return None
        self._touch(hexpart)
        return CachedManifest(digest, media_type, body)

    async def load(self, repository: str, digest: str) -> CachedManifest | None:
        """``get`` for the event loop: a body that is neither in memory nor small is read and
        verified in a worker thread (one at a time; waiting for that turn is cancellable)."""
        hexpart, media_type = self._served(repository, digest)
        if not hexpart:
            return None
        size = self.sizes.get(hexpart)
        if size is None:
            return None
        body = self._in_memory(hexpart)
        if body is None and size <= READ_ON_LOOP:
            body = self._read_on_loop(hexpart)
            if body is None:
                return None
        elif body is None:
            body, trouble = await trio.to_thread.run_sync(
                self._read_verified, hexpart, limiter=self._bulk_limiter
            )
            # back on the loop: the store may have changed meanwhile (dropped, evicted, rewritten)
            if hexpart not in self.sizes:
                return None
            if body is None:
                self._forget_unreadable(hexpart, trouble)
                return None
            self._remember_verified(hexpart, body)
        self._touch(hexpart)
        return CachedManifest(digest, media_type, body)

    def _served(self, repository: str, digest: str) -> tuple[str, str]:
        """(hex, media type) of ``digest`` if the upstream served it in ``repository``."""
        self._settle()
        linked = self.links.get(repository)
        media_type = linked.get(digest) if linked is not None else None
        if not media_type:
            return "", ""
        self.links.move_to_end(repository)
        return digest.removeprefix("sha256:"), media_type

    def has_body(self, digest: str) -> bool:
        """Whether the bytes of manifest ``digest`` are here (for whichever repository)."""
        self._settle()
        return digest.removeprefix("sha256:") in self.sizes

    def tag(self, repository: str, tag: str, accepted: frozenset[str]) -> str | None:
        """The digest ``tag`` named when last fetched by a client accepting ``accepted``."""
        self._settle()
        name = f"{repository}:{tag}"
        keyed = self.tags.get(name)
        hexpart = keyed.get(_accept_key(accepted)) if keyed is not None else None
        if hexpart is None:
            return None
        self.tags.move_to_end(name)
        with self._lock:
            self._batch.tag_used[name] = self._next()
        return f"sha256:{hexpart}"

    def linked(self, repository: str, digest: str) -> bool:
        """Whether the upstream served ``digest`` under ``repository`` (a blob or manifest)."""
        self._settle()
        linked = self.links.get(repository)
        if linked is None or digest not in linked:
            return False
        self.links.move_to_end(repository)
        return True

    def linked_shared(self, repository: str, digest: str) -> bool:
        """:meth:`linked`, or else as the database says: another process on the directory (a
        worker of ``--workers``) may have learned the link since this one loaded it. A link
        found there is kept in memory too. One indexed read, on the event loop's connection:
        for the rare questions (a manifest's confirmation passed on), not for every request."""
        if self.linked(repository, digest):
            return True
        if self._reader is None:
            return False
        try:
            row = self._reader.execute(
                "SELECT media_type FROM links WHERE repository = ? AND digest = ?",
                (repository, digest),
            ).fetchone()
        except sqlite3.Error:
            return False  # busy or damaged: not known now (the upstream is asked instead)
        if row is None:
            return False
        with self._cond:
            linked = self.links.setdefault(repository, {})
            if digest not in linked:
                self.link_count += 1
            linked[digest] = sys.intern(str(row[0]))
            self.links.move_to_end(repository)
            self._evict()
        return True

    def _in_memory(self, hexpart: str) -> bytes | None:
        body = self._verified.get(hexpart)
        if body is not None:
            self._verified.move_to_end(hexpart)
            return body
        return self._unwritten.get(hexpart)

    def _body(self, hexpart: str) -> bytes | None:
        if hexpart not in self.sizes:
            return None
        body = self._in_memory(hexpart)
        if body is not None:
            return body
        return self._read_on_loop(hexpart)

    def _read_on_loop(self, hexpart: str) -> bytes | None:
        """A body not in memory, read and verified on the calling thread (None if unreadable:
        then forgotten)."""
        assert self._reader is not None, "ManifestStore.open() was not called"
        body, trouble = _read_body(self._reader, hexpart)
        if body is None:
            self._forget_unreadable(hexpart, trouble)
            return None
        self._remember_verified(hexpart, body)
        return body

    def _read_verified(self, hexpart: str) -> tuple[bytes | None, str]:
        """``_read_body`` on the worker threads' own connection (a worker thread's side)."""
        with self._bulk_lock:
            if self._bulk_reader is None:
                try:
                    self._bulk_reader = _open_reader(self.db_path)
                except sqlite3.Error as exc:
                    return None, f"error: {exc}"
            return _read_body(self._bulk_reader, hexpart)

    def _forget_unreadable(self, hexpart: str, trouble: str) -> None:
        """Drop a body whose row is damaged or gone; a read error is a miss this time only."""
        if trouble.startswith("error"):  # busy or damaged: a miss now, asked upstream
            log.info("cannot read cached manifest sha256:%s: %s", hexpart, trouble[7:])
            return
        # a damaged row is never served; fetched again, it is stored afresh. A row that is
        # gone was evicted by another process on this directory (--workers): no damage
        if trouble == "gone":
            log.debug("cached manifest sha256:%s was evicted elsewhere; dropping it", hexpart)
        else:
            log.warning("cached manifest sha256:%s is damaged; dropping it", hexpart)
        with self._cond:
            self._drop(hexpart)
            self._cond.notify_all()

    def _remember_verified(self, hexpart: str, body: bytes) -> None:
        """Keep recently served manifests in memory (bounded): no disk read or hash per hit."""
        if hexpart not in self._verified:
            self._verified_bytes += len(body)
        self._verified[hexpart] = body
        while self._verified_bytes > MEMORY_LIMIT and self._verified:
            _key, old = self._verified.popitem(last=False)
            self._verified_bytes -= len(old)

    # -- changing ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def adopting(self) -> Iterator[None]:
        """Changes made inside come from the shared store (another instance's): they are kept
        as any, but not published back to it."""
        self._adopting = True
        try:
            yield
        finally:
            self._adopting = False

    def _sink(self) -> StateSink | None:
        return None if self._adopting else self.sink

    def put(
        self,
        repository: str,
        reference: str,
        *,
        accepted: frozenset[str],
        media_type: str,
        body: bytes,
        claimed: str | None,
        sha256_hex: str | None = None,
    ) -> str | None:
        """Verify and store a manifest fetched for ``reference`` (a tag or its digest) by a
        client accepting ``accepted``; return its digest.

        Nothing is stored, and no tag moves, unless the body hashes to the digest it was asked
        by and to ``claimed`` (the upstream's ``Docker-Content-Digest``, if it sent one): None.
        Never raises for the disk: a manifest that cannot be kept now (larger than the bound,
        or the writer too far behind) is counted and its digest returned, to be served uncached.
        """
        hexpart = sys.intern(sha256_hex or hashlib.sha256(body).hexdigest())
        digest = f"sha256:{hexpart}"
        if not manifest_verified(reference, digest, claimed):
            return None
        self._settle()
        with self._cond:
            if hexpart in self.sizes:
                self.sizes.move_to_end(hexpart)
                self._batch.used[hexpart] = self._next()
            elif len(body) > self.max_bytes or self._unwritten_bytes + len(body) > MAX_UNWRITTEN:
                self.stats.uncached += 1
                return digest
            else:
                self.sizes[hexpart] = len(body)
                self.total += len(body)
                self._unwritten[hexpart] = body
                self._unwritten_bytes += len(body)
                self._batch.bodies[hexpart] = (body, self._next())
            self._remember_verified(hexpart, body)
            sink = self._sink()
            if sink is not None:  # (stored before too: the sink writes each body once)
                sink.manifest_stored(hexpart, body)
            if not reference.startswith("sha256:"):
                key = _accept_key(accepted)
                self._set_tag(f"{repository}:{reference}", key, hexpart)
                if sink is not None:
                    sink.tag_resolved(repository, reference, key, hexpart, media_type)
            self._set_link(repository, digest, sys.intern(media_type))
            self._evict()
            self._cond.notify_all()
        return digest

    def link(self, repository: str, digest: str, media_type: str = "") -> None:
        """Record that the upstream served ``digest`` under ``repository`` (a manifest with
        ``media_type``; a blob with none).

        Registries scope blobs and manifests to repositories; a stale answer (the upstream
        down) may only give a digest under a repository that was seen to hold it.
        """
        self._settle()
        linked = self.links.get(repository, {})
        if digest in linked and (not media_type or linked[digest] == media_type):
            self.links.move_to_end(repository)
            return
        with self._cond:
            self._set_link(repository, digest, sys.intern(media_type or linked.get(digest, "")))
            self._evict()
            self._cond.notify_all()

    def set_readability(self, repository: str, readability: Readability) -> None:
        """Record whether an anonymous client may pull ``repository``, and when that was
        learned (wall clock)."""
        self._settle()
        with self._cond:
            self.readability[repository] = readability
            self.readability.move_to_end(repository)
            self._batch.readability[repository] = (readability, self._next())
            if (sink := self._sink()) is not None:
                sink.readability_learned(repository, readability)
            self._evict()
            self._cond.notify_all()

    def _next(self) -> int:
        self._seq += 1
        return self._seq

    def _touch(self, hexpart: str) -> None:
        self.sizes.move_to_end(hexpart)
        with self._lock:
            self._batch.used[hexpart] = self._next()

    def _set_tag(self, name: str, key: str, hexpart: str) -> None:
        keyed = self.tags.setdefault(name, {})
        old = keyed.get(key)
        if old is None:
            self.tag_count += 1
        elif old != hexpart:
            self._untag(name, old, keyed, key)
        keyed[key] = hexpart
        self.tags.move_to_end(name)
        names = self._tagged.get(hexpart, ())
        if name not in names:
            self._tagged[hexpart] = (*names, name)
        self._batch.tags[name] = (json.dumps(keyed), self._next())

    def _untag(self, name: str, hexpart: str, keyed: dict[str, str], key: str) -> None:
        """Forget that ``name`` names ``hexpart`` unless another of its keys still does."""
        if not any(h == hexpart for k, h in keyed.items() if k != key):
            self._unname(hexpart, name)

    def _unname(self, hexpart: str, name: str) -> None:
        names = tuple(n for n in self._tagged.get(hexpart, ()) if n != name)
        if names:
            self._tagged[hexpart] = names
        else:
            self._tagged.pop(hexpart, None)

    def _set_link(self, repository: str, digest: str, media_type: str) -> None:
        linked = self.links.setdefault(repository, {})
        if digest not in linked:
            self.link_count += 1
        if linked.get(digest) != media_type and (sink := self._sink()) is not None:
            sink.link_learned(repository, digest, media_type)
        linked[digest] = media_type
        self.links.move_to_end(repository)
        self._batch.links[(repository, digest)] = (media_type, self._next())

    def _drop(self, hexpart: str) -> None:
        """Forget manifest ``hexpart`` and the tags naming it (under the lock, as every change
        of the batch)."""
        size = self.sizes.pop(hexpart, None)
        if size is None:
            return
        self.total -= size
        self._forget_unwritten(hexpart)
        body = self._verified.pop(hexpart, None)
        if body is not None:
            self._verified_bytes -= len(body)
        self._batch.bodies[hexpart] = None
        self._batch.used.pop(hexpart, None)
        for name in self._tagged.pop(hexpart, ()):
            keyed = self.tags.get(name)
            if keyed is None:
                continue
            for key in [k for k, h in keyed.items() if h == hexpart]:
                del keyed[key]
                self.tag_count -= 1
            self._write_tag(name, keyed)

    def _write_tag(self, name: str, keyed: dict[str, str]) -> None:
        if keyed:
            self._batch.tags[name] = (json.dumps(keyed), self._next())
        else:
            self.tags.pop(name, None)
            self._batch.tags[name] = None
            self._batch.tag_used.pop(name, None)

    def _forget_unwritten(self, hexpart: str) -> None:
        body = self._unwritten.pop(hexpart, None)
        if body is not None:
            self._unwritten_bytes -= len(body)

    def _evict(self) -> None:
        """Keep within the bounds: least recently used first."""
        while self.sizes and (self.total > self.max_bytes or len(self.sizes) > self.max_entries):
            self._drop(self.sizes.oldest()[0])
            self.stats.evictions += 1
        while self.tag_count > self.max_entries and self.tags:
            name, keyed = self.tags.popitem(last=False)
            for hexpart in set(keyed.values()):
                self._unname(hexpart, name)
            self.tag_count -= len(keyed)
            self._batch.tags[name] = None
            self._batch.tag_used.pop(name, None)
        while self.link_count > self.max_entries and self.links:
            repository, linked = self.links.oldest()
            digest = next(iter(linked))
            del linked[digest]
            if not linked:
                del self.links[repository]
            self.link_count -= 1
            self._batch.links[(repository, digest)] = None
        while len(self.readability) > self.max_entries:
            repository, _answer = self.readability.popitem(last=False)
            self._batch.readability[repository] = None

    def _settle(self) -> None:
        """Take in what the writer reported: bodies now on disk leave memory; bodies it could
        not write are forgotten (asked upstream again), unless stored again since."""
        while self._results:
            result = self._results.popleft()
            if result.removed or result.gap:
                self._apply_removals(result.removed, result.gap)
            for hexpart in result.written:
                self._forget_unwritten(hexpart)
            if result.lost:
                with self._cond:
                    for hexpart in result.lost:
                        if self._batch.bodies.get(hexpart) is None:
                            self._drop(hexpart)
                    self._cond.notify_all()

    # -- inventory: counts and removals --------------------------------------------------------

    def settle(self) -> None:
        """Take in what the writer reported (other processes' removals included) now: for the
        callers that reach a cache without asking this store anything first (blobs)."""
        if self._results:
            self._settle()

    def note_pull(self, name: str, *, hit: bool, now: float) -> None:
        """Count a manifest GET answered for image ``name`` (``repo:tag`` or ``repo@digest``);
        ``hit``: without an upstream GET of its own. ``now``: the wall clock."""
        with self._cond:
            usage = self._batch.usage
            pulls, hits, _ = usage.get(name, (0, 0, 0.0))
            usage[name] = (pulls + 1, hits + hit, now)
            if len(usage) >= MAX_USAGE_PENDING:
                self._cond.notify_all()

    def remove(self, removals: Iterable[tuple[str, str]]) -> None:
        """Forget each ``(kind, name)`` (:class:`Removal`), delete it from the database and
        journal it, so that every other process on the directory forgets it too."""
        self._settle()
        with self._cond:
            for kind, name in removals:
                self._forget(kind, name)
                self._batch.removals.append((kind, name))
            self._cond.notify_all()

    def _apply_removals(self, removed: Sequence[tuple[str, str]], gap: bool) -> None:
        """What other processes removed (from the journal); a gap in it: every tag is
        forgotten here (asked upstream again) rather than one removed served."""
        blobs = []
        with self._cond:
            if gap:
                log.info("missed removals made by other processes: forgetting every cached tag")
                self.tags.clear()
                self._tagged.clear()
                self.tag_count = 0
            for kind, name in removed:
                if kind == Removal.BLOB:
                    blobs.append(name)
                else:
                    self._forget(kind, name)
            self._cond.notify_all()
        if blobs and self.on_blobs_removed is not None:
            self.on_blobs_removed(blobs)

    def _forget(self, kind: str, name: str) -> None:
        """Forget one removal here, writing its deletion (under the lock). Written even when
        another process removed it: a write of this process still under way cannot bring the
        row back for good."""
        if kind == Removal.TAG:
            keyed = self.tags.pop(name, None)
            if keyed is not None:
                for hexpart in set(keyed.values()):
                    self._unname(hexpart, name)
                self.tag_count -= len(keyed)
            self._batch.tags[name] = None
            self._batch.tag_used.pop(name, None)
        elif kind == Removal.MANIFEST:
            self._drop(name)
            self._batch.bodies[name] = None
        elif kind == Removal.LINK:
            repository, _, digest = name.rpartition("@")
            linked = self.links.get(repository)
            if linked is not None and linked.pop(digest, None) is not None:
                self.link_count -= 1
                if not linked:
                    del self.links[repository]
            self._batch.links[(repository, digest)] = None
        elif kind == Removal.REPOSITORY:
            for digest in self.links.pop(name, {}):
                self.link_count -= 1
                self._batch.links[(name, digest)] = None
            if self.readability.pop(name, None) is not None:
                self._batch.readability[name] = None

    # -- writing (the writer thread) ---------------------------------------------------------

    def flush(self, timeout: float | None = None) -> bool:
        """Block until every change so far is committed (recency too); False if a write
        failed or ``timeout`` passed first. For shutdown and tests, never the event loop."""
        done = self.wait_written(timeout)
        self._settle()
        return done

    def read_journal_now(self, timeout: float | None = None) -> bool:
        """Block until the writer read the removals journal once more (it does every second
        anyway): for the command line and tests, never the event loop. The loop takes what it
        read in at its next call."""
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                return False
            self._journal_asked += 1
            ticket = self._journal_asked
            self._cond.notify_all()
            return self._cond.wait_for(lambda: self._journal_read >= ticket, timeout)

    def wait_written(self, timeout: float | None = None) -> bool:
        """:meth:`flush` without taking in the writer's reports: callable from any thread (the
        event loop takes them in at its next call)."""
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                return False
            failures = self._failures
            self._urgent = True
            self._cond.notify_all()
            self._cond.wait_for(
                lambda: (self._batch.empty() and not self._writing) or self._failures > failures,
                timeout,
            )
            return self._batch.empty() and not self._writing and self._failures == failures

    def close(self) -> None:
        """Write what is pending and stop the writer (blocking: from a thread, or at exit)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        with self._bulk_lock:
            if self._bulk_reader is not None:
                self._bulk_reader.close()
                self._bulk_reader = None
        self._settle()

    def _run(self) -> None:
        conn = _connect(self.db_path)
        try:
            conn.execute("PRAGMA synchronous = FULL")
            # the WAL is reset after each checkpoint; without a limit it keeps the size of
            # the largest batch ever written
            conn.execute(f"PRAGMA journal_size_limit = {MAX_UNWRITTEN * 2}")
            self._write_loop(conn)
        finally:
            conn.close()

    def _write_loop(self, conn: sqlite3.Connection) -> None:
        touched = time.monotonic()  # recency and counts alone are written this often
        while True:
            with self._cond:
                self._cond.wait_for(
                    lambda: (
                        self._batch.changed()
                        or self._urgent
                        or self._closing
                        or self._journal_asked != self._journal_read
                    ),
                    JOURNAL_POLL,
                )
                due = self._batch.changed() or self._urgent or self._closing
                if self._batch.empty() or not (due or time.monotonic() - touched >= TOUCH_EVERY):
                    if due:
                        self._urgent = False
                        self._cond.notify_all()
                        if self._closing:
                            return
                    batch = None
                else:
                    batch, self._batch = self._batch, _Batch()
                    self._writing = True
            if batch is None:
                self._read_journal(conn)
                continue
            touched = time.monotonic()
            failure = _write(conn, batch, self._origin)
            inserted = tuple(h for h, body in batch.bodies.items() if body is not None)
            with self._cond:
                self._writing = False
                if failure is None:
                    self._results.append(_Result(written=inserted, lost=()))
                else:
                    self._failures += 1
                    self.stats.write_failures += 1
                    self._batch.merge_back(batch)
                    self._results.append(_Result(written=(), lost=inserted))
                    self._warn(failure)
                self._urgent = False
                self._cond.notify_all()
                if failure is not None:
                    if self._closing:
                        return  # nothing more to do: the state on disk is the last committed
                    self._cond.wait_for(lambda: self._closing or self._urgent, RETRY_AFTER)
            self._read_journal(conn)

    def _read_journal(self, conn: sqlite3.Connection) -> None:
        """In the writer thread: hand the loop the removals other processes journalled since
        the last look (one indexed query; a busy database is asked again next time)."""
        with self._cond:
            asked = self._journal_asked
        try:
            rows = conn.execute(
                "SELECT id, origin, kind, name FROM removals WHERE id > ? ORDER BY id LIMIT ?",
                (self._journal_seen, JOURNAL_KEEP),
            ).fetchall()
        except sqlite3.Error:
            rows = []
        result = None
        if rows:
            # only pruning leaves holes (AUTOINCREMENT never reuses an id)
            gap = rows[0][0] != self._journal_seen + 1
            self._journal_seen = rows[-1][0]
            theirs = tuple(
                (str(kind), str(name)) for _, origin, kind, name in rows if origin != self._origin
            )
            if theirs or gap:
                result = _Result(written=(), lost=(), removed=theirs, gap=gap)
        with self._cond:
            if result is not None:
                self._results.append(result)
            self._journal_read = asked
            self._cond.notify_all()

    def _warn(self, failure: Exception) -> None:
        now = time.monotonic()
        if now - self._warned_at < WARN_EVERY:
            self._unwarned += 1
            return
        log.warning(
            "cannot store manifests in %s: %s; serving them uncached until it works again "
            "(free space on that disk, or lower --cache-size or --manifest-cache-size)%s",
            self.db_path,
            failure,
            f" ({self._unwarned} more failures since the last warning)" if self._unwarned else "",
        )
        self._warned_at = now
        self._unwarned = 0


# -- the database --------------------------------------------------------------------------------


def _connect(
    path: Path, *, check_same_thread: bool = True, timeout: float = 5.0
) -> sqlite3.Connection:
    # autocommit mode: transactions are explicit (BEGIN IMMEDIATE ... COMMIT)
    return sqlite3.connect(
        path, isolation_level=None, check_same_thread=check_same_thread, timeout=timeout
    )


def _read_body(reader: sqlite3.Connection, hexpart: str) -> tuple[bytes | None, str]:
    """The stored body of ``hexpart`` if it hashes to it, else (None, why): "gone", "damaged"
    or "error: ..." (safe on any thread, given a connection no other thread uses meanwhile)."""
    try:
        row = reader.execute("SELECT body FROM manifests WHERE hex = ?", (hexpart,)).fetchone()
    except sqlite3.Error as exc:
        return None, f"error: {exc}"
    if row is None:
        return None, "gone"
    body = row[0]
    if not isinstance(body, bytes) or hashlib.sha256(body).hexdigest() != hexpart:
        return None, "damaged"
    return body, ""


def _open_reader(path: Path) -> sqlite3.Connection:
    """The event loop's connection: opened and read once (WAL recovery, the shared-memory
    index) before the writer starts, so that its reads never meet a busy database afterwards
    (they do not wait: busy timeout 0). That first read waits, though: with ``--workers`` another
    process may be creating or vacuuming the database at that moment."""
    reader = _connect(path, check_same_thread=False)
    try:
        reader.execute("PRAGMA query_only = ON")
        reader.execute("SELECT count(*) FROM tags").fetchone()
        reader.execute("PRAGMA busy_timeout = 0")
    except BaseException:
        reader.close()
        raise
    return reader


def _prepare(conn: sqlite3.Connection) -> None:
    """Check the database and create its tables when new; raise _Damaged if it is not ours."""
    conn.execute("PRAGMA journal_mode = WAL")
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if version == 0 and not tables:
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")  # the file shrinks after evictions
        conn.execute("VACUUM")  # auto_vacuum takes effect on an empty database by a vacuum
        _create_schema(conn)
        _add_tables(conn)
        return
    if version != SCHEMA_VERSION or not _TABLES <= tables:
        raise _Damaged(f"not a hubproxy {DATABASE}: version {version}, tables {sorted(tables)}")
    _add_tables(conn)
    # no PRAGMA quick_check (seconds at 100 MiB): loading scans every b-tree page but the
    # bodies' overflow pages, which are hashed when read; damage there raises SQLITE_CORRUPT


def _create_schema(conn: sqlite3.Connection) -> None:
    """Create the tables of a new database, unless another process (``--workers``, all starting
    on one new cache directory) created them since this one looked."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        if not conn.execute("SELECT count(*) FROM sqlite_master WHERE type='table'").fetchone()[0]:
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _add_tables(conn: sqlite3.Connection) -> None:
    """The tables added to version 1 (pull counts, the removals journal), where missing."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        for statement in _ADDED:
            conn.execute(statement)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _journal_end(conn: sqlite3.Connection) -> int:
    """The id of the last removal ever journalled (pruned rows included), 0 if none."""
    try:
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'removals'").fetchone()
    except sqlite3.OperationalError:  # no table yet
        return 0
    return int(row[0]) if row is not None and isinstance(row[0], int) else 0


def _write(conn: sqlite3.Connection, batch: _Batch, origin: str = "") -> Exception | None:
    """Commit ``batch`` in one transaction; the error if it could not be (rolled back)."""
    try:
        conn.execute("BEGIN IMMEDIATE")
        # first: links set again since (later in this batch) are inserted after
        repositories = [(name,) for kind, name in batch.removals if kind == Removal.REPOSITORY]
        conn.executemany("DELETE FROM links WHERE repository = ?", repositories)
        conn.executemany("DELETE FROM readability WHERE repository = ?", repositories)
        conn.executemany(
            "DELETE FROM manifests WHERE hex = ?",
            [(h,) for h, body in batch.bodies.items() if body is None],
        )
        conn.executemany(
            "INSERT OR REPLACE INTO manifests VALUES (?, ?, ?, ?)",
            [(h, len(b[0]), b[1], b[0]) for h, b in batch.bodies.items() if b is not None],
        )
        conn.executemany(
            "UPDATE manifests SET used = ? WHERE hex = ?", [(u, h) for h, u in batch.used.items()]
        )
        gone = [(n,) for n, t in batch.tags.items() if t is None]
        conn.executemany("DELETE FROM tags WHERE name = ?", gone)
        conn.executemany("DELETE FROM usage WHERE name = ?", gone)
        conn.executemany(
            "INSERT OR REPLACE INTO tags VALUES (?, ?, ?)",
            [(n, *t) for n, t in batch.tags.items() if t is not None],
        )
        conn.executemany(
            "UPDATE tags SET seq = ? WHERE name = ?", [(s, n) for n, s in batch.tag_used.items()]
        )
        conn.executemany(
            "DELETE FROM links WHERE repository = ? AND digest = ?",
            [key for key, value in batch.links.items() if value is None],
        )
        conn.executemany(
            "INSERT OR REPLACE INTO links VALUES (?, ?, ?, ?)",
            [(*key, *value) for key, value in batch.links.items() if value is not None],
        )
        conn.executemany(
            "DELETE FROM readability WHERE repository = ?",
            [(r,) for r, value in batch.readability.items() if value is None],
        )
        conn.executemany(
            "INSERT OR REPLACE INTO readability VALUES (?, ?, ?, ?)",
            [
                (r, int(value[0].anonymous), value[0].learned_at, value[1])
                for r, value in batch.readability.items()
                if value is not None
            ],
        )
        if batch.usage:
            _write_usage(conn, batch.usage)
        if batch.removals:
            now = time.time()
            conn.executemany(
                "INSERT INTO removals (origin, kind, name, at) VALUES (?, ?, ?, ?)",
                [(origin, kind, name, now) for kind, name in batch.removals],
            )
            conn.execute(
                "DELETE FROM removals WHERE at < ? OR id <= (SELECT max(id) FROM removals) - ?",
                (now - JOURNAL_AGE, JOURNAL_KEEP),
            )
        conn.execute("COMMIT")
        if batch.bodies:
            conn.execute("PRAGMA incremental_vacuum")
    except (sqlite3.Error, OSError) as exc:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        return exc
    return None


def _write_usage(conn: sqlite3.Connection, usage: dict[str, tuple[int, int, float]]) -> None:
    """Add pull counts to their rows; keep at most ``USAGE_ROWS`` rows (the names pulled
    longest ago go first: a tag evicted or removed takes its row along, a digest pulled once
    and gone does not)."""
    conn.executemany(
        "INSERT INTO usage VALUES (?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET"
        " pulls = pulls + excluded.pulls, hits = hits + excluded.hits,"
        " used = max(used, excluded.used)",
        [(name, *counts) for name, counts in usage.items()],
    )
    excess = conn.execute("SELECT count(*) FROM usage").fetchone()[0] - USAGE_ROWS
    if excess > 0:
        conn.execute(
            "DELETE FROM usage WHERE name IN (SELECT name FROM usage ORDER BY used LIMIT ?)",
            (excess,),
        )


USAGE_ROWS = 2 * DEFAULT_MAX_ENTRIES  # pull-count rows kept in the database


# -- the state file of older versions ------------------------------------------------------------


def _legacy_state(
    data: bytes,
) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, str]], dict[str, Readability]]:
    """Tags, links and readability from an old ``state.json``; raise _Damaged if it is not
    JSON or not of its shape. Entries of an older format (no learned-at times, one media type
    for every registry) are dropped: re-learned."""
    try:
        state = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise _Damaged(f"not JSON: {exc}") from None
    sections = ("tags", "links", "readability")
    if not isinstance(state, dict) or any(
        not isinstance(state.get(name, {}), dict) for name in sections
    ):
        raise _Damaged("not the shape of a hubproxy state file")
    tags = {
        str(name): {str(k): v for k, v in keyed.items() if isinstance(v, str) and _HEX.match(v)}
        for name, keyed in state.get("tags", {}).items()
        if isinstance(keyed, dict)
    }
    links: dict[str, dict[str, str]] = {}
    for repository, digests in state.get("links", {}).items():
        if isinstance(digests, dict):
            links[str(repository)] = {str(d): str(t) for d, t in digests.items()}
        elif isinstance(digests, list):  # the oldest format: blob-like links, no types
            links[str(repository)] = {str(d): "" for d in digests}
    readability = {}
    for repository, answer in state.get("readability", {}).items():
        if isinstance(answer, dict):
            anonymous, learned_at = answer.get("anonymous"), answer.get("learned_at")
            if isinstance(anonymous, bool) and isinstance(learned_at, int | float):
                readability[str(repository)] = Readability(anonymous, float(learned_at))
    return tags, links, readability


def _legacy_files(directory: Path) -> Iterator[Path]:
    try:
        paths = list(directory.iterdir())
    except OSError:
        return
    for path in paths:
        if _HEX.match(path.name) and path.is_file() and path.stat().st_size <= MAX_MANIFEST:
            yield path


def _json_pairs(text: object) -> dict[str, str]:
    """A JSON object of strings to hex digests, or {} for anything else."""
    try:
        value = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        return {}
    if not isinstance(value, dict):
        return {}
    return {str(k): v for k, v in value.items() if isinstance(v, str) and _HEX.match(v)}
