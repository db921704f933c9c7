"""Manifests and tag state in the shared store while instances run (``--cache-store``).

Theory of operation. Each instance keeps its manifest state locally (``manifests.py``); this
module publishes what that state learns from the upstreams to the shared store as it learns it,
and lets an instance that lacks a fact take another's, so that an instance started later (on an
empty cache directory, while the others run) answers as they would: a tag it never resolved
costs a HEAD (the access check) instead of a GET counted against the rate limit, and while the
upstream is down it serves the images the others cached. The keys and records are
``policy/statesharing.py``'s.

Writes (:meth:`SharedState.manifest_stored` and the other ``StateSink`` calls) never delay a
client: the call queues the write and returns; :data:`STATE_WRITERS` tasks put them in worker
threads. The queue is bounded (:data:`STATE_QUEUE` writes, :data:`STATE_QUEUE_BYTES` bytes);
beyond it a write is dropped, counted, and said once per episode (until the queue empties). A
manifest body and a link are immutable, put create-only, once per process (a bounded memory of
what was written); a tag or a readability answer is overwritten, but the same content only
:data:`STATE_REFRESH` after it was last written (``statesharing.rewrite_due``).

Reads (:meth:`SharedState.adopt_manifest`, :meth:`adopt_link`, :meth:`adopt_latest_readable`)
happen where the local state has nothing: a manifest this instance does not hold, and, while the
upstream cannot answer, a blob link or a readability answer a stale answer needs. A body read
from the store is hashed and taken only if it matches its digest; one that does not is deleted
there and never served. What is taken becomes ordinary local state (``ManifestStore.adopting``:
not published back), and every rule applies to it as to the instance's own: a hit after the
client's access check, a stale answer only for a digest linked in a repository anyone may read
(``cachepolicy.stale_allowed``). A lookup waits at most :data:`STATE_READ_PATIENCE`; a store that
fails or is slower makes lookups rest for ``shared.STORE_REST`` (misses go upstream).

Bounds. Locally, the manifest store's (``--manifest-cache-size``/``-entries``). In the store,
these objects stay when an instance evicts its copy: what bounds them there is the bucket's
budget, as for blobs (they are small: a tag record is ~200 bytes, a manifest a few KiB).

The snapshot of ``state.db`` at stop (``shared.py``) stays: a whole fleet restarted begins from
it in one read, with the usage counts ``hubproxy cache ls`` shows; these objects are what keeps a
running fleet's newcomers warm.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import trio

from ..policy.cachepolicy import Readability
from ..policy.statesharing import (
    LATEST_READABLE,
    ReadabilityRecord,
    TagRecord,
    decode_link,
    decode_readability,
    decode_tag,
    encode_readability,
    encode_tag,
    link_key,
    manifest_key,
    readability_key,
    rewrite_due,
    tag_key,
    take_readability,
)
from .manifests import MAX_MANIFEST, ManifestStore
from .objects import ObjectStore
from .shared import STORE_REST, SharedStore

log = logging.getLogger("hubproxy.cache")

STATE_WRITERS = 2  # writes under way at once (of the store's STORE_THREADS: blobs keep the rest)
STATE_QUEUE = 1024  # writes waiting at most
STATE_QUEUE_BYTES = 16 * 1024 * 1024  # and their bytes (manifest bodies, up to 4 MiB each)
STATE_REFRESH = 3600.0  # seconds before a tag or readability record is written again unchanged
STATE_RECENT = 20_000  # keys remembered as written (what is not rewritten)
STATE_READ_PATIENCE = 5.0  # seconds a client's lookup waits for the store at most
MAX_RECORD = 64 * 1024  # a tag, link or readability record larger than this is not one


@dataclass(frozen=True)
class StateWrite:
    key: str
    data: bytes
    create_only: bool  # immutable (a body, a link): an object there already is the same
    content: str  # what ``rewrite_due`` compares


class Refused(ValueError):
    """An object in the store is not what its key says (too large for one)."""


class SharedState:
    """The manifest state published to and taken from the shared store (a ``StateSink``)."""

    def __init__(self, shared: SharedStore, scratch: Path) -> None:
        self.shared = shared
        self.scratch = scratch  # temporary files of the writes (the cache's tmp/)
        self.queue_limit = STATE_QUEUE
        self.queue_bytes_limit = STATE_QUEUE_BYTES
        self.patience = STATE_READ_PATIENCE
        self._send, self._receive = trio.open_memory_channel[StateWrite](math.inf)
        self.queued = 0  # writes waiting or under way (bounded by queue_limit)
        self.queued_bytes = 0
        self._dropping = False  # an episode of drops, said once
        self._failing = False  # an episode of failed writes, said once
        self._written: OrderedDict[str, tuple[str, float]] = OrderedDict()  # key -> content, when
        self._idle = trio.Event()
        self._idle.set()

    @property
    def objects(self) -> ObjectStore:
        return self.shared.objects  # looked up each time: tests swap the store for a faulty one

    # -- writing -------------------------------------------------------------------------------

    def manifest_stored(self, hexpart: str, body: bytes) -> None:
        self._queue(StateWrite(manifest_key(hexpart), body, True, ""), refresh=math.inf)

    def tag_resolved(
        self, repository: str, tag: str, accept_key: str, hexpart: str, media_type: str
    ) -> None:
        key = tag_key(repository, tag, accept_key)
        if key is None:
            return
        record = TagRecord(f"sha256:{hexpart}", media_type, accept_key, time.time())
        self._queue(StateWrite(key, encode_tag(record), False, hexpart + media_type))

    def link_learned(self, repository: str, digest: str, media_type: str) -> None:
        key = link_key(repository, digest)
        if key is not None:
            data = media_type.encode("ascii", "replace")
            self._queue(StateWrite(key, data, True, media_type), refresh=math.inf)

    def readability_learned(self, repository: str, readability: Readability) -> None:
        key = readability_key(repository)
        if key is None:
            return
        data = encode_readability(ReadabilityRecord(repository, readability))
        self._queue(StateWrite(key, data, False, str(readability.anonymous)))
        if readability.anonymous:  # what an instance that knows no repository pings with
            self._queue(StateWrite(LATEST_READABLE, data, False, ""))

    def _queue(self, write: StateWrite, refresh: float = STATE_REFRESH) -> None:
        now = trio.current_time()
        if not rewrite_due(self._written.get(write.key), write.content, now, refresh):
            self._written.move_to_end(write.key)
            return
        if (
            self.queued >= self.queue_limit
            or self.queued_bytes + len(write.data) > self.queue_bytes_limit
        ):
            self.shared.state_dropped += 1
            if not self._dropping:
                self._dropping = True
                log.warning(
                    "cache store: the manifest state waiting for %s fills its queue (%d "
                    "writes); more is dropped until it drains (the store is slow or down: "
                    "other instances then ask the upstream for what this one learned)",
                    self.objects.description,
                    self.queued,
                )
            return
        self._remember(write.key, write.content, now)
        self.queued += 1
        self.queued_bytes += len(write.data)
        if self._idle.is_set():
            self._idle = trio.Event()
        self._send.send_nowait(write)

    def _remember(self, key: str, content: str, now: float) -> None:
        self._written[key] = (content, now)
        self._written.move_to_end(key)
        while len(self._written) > STATE_RECENT:
            self._written.popitem(last=False)

    async def run(self) -> None:
        """Put the queued writes into the store, :data:`STATE_WRITERS` at a time, until
        cancelled (what is still queued then is lost: the snapshot at stop has it)."""
        async with trio.open_nursery() as nursery:
            for _ in range(STATE_WRITERS):
                nursery.start_soon(self._writer, self._receive.clone())

    async def wait_idle(self) -> None:
        """Wait until no write is queued or under way (tests; a clean handover)."""
        await self._idle.wait()

    async def _writer(self, receive: trio.MemoryReceiveChannel[StateWrite]) -> None:
        async for write in receive:
            try:
                await self._write(write)
            finally:
                self.queued -= 1
                self.queued_bytes -= len(write.data)
                if not self.queued:
                    self._dropping = False
                    self._idle.set()

    async def _write(self, write: StateWrite) -> None:
        scratch = self.scratch / f"state.{secrets.token_hex(6)}"
        try:
            # abandoned when the instance stops: a write hanging on a silent store must not
            # hold the shutdown (its thread ends with the client's own timeouts)
            await trio.to_thread.run_sync(
                _put_bytes,
                self.objects,
                write,
                scratch,
                limiter=self.shared.limiter,
                abandon_on_cancel=True,
            )
        except Exception as exc:  # obstore's own errors, OSError: this write failed
            self.shared.state_write_failures += 1
            self._written.pop(write.key, None)  # written again when learned again
            if not self._failing:
                self._failing = True
                log.warning(
                    "cache store: cannot write %s to %s: %s (other instances ask the upstream "
                    "for what this one learned; said once until a write succeeds)",
                    write.key,
                    self.objects.description,
                    exc,
                )
            return
        self._failing = False
        self.shared.state_writes += 1

    # -- reading -------------------------------------------------------------------------------

    async def adopt_manifest(
        self,
        manifests: ManifestStore,
        repository: str,
        reference: str,
        accepted: frozenset[str],
        accept_key: str,
    ) -> bool:
        """A manifest this instance does not hold (by tag for this kind of client, or by
        digest in this repository), taken from the store if another instance published it,
        with the repository's readability; True if the local state now has it."""
        if reference.startswith("sha256:"):
            key = link_key(repository, reference)
            data = await self._read(key) if key is not None else None
            media_type = decode_link(data) if data is not None else None
            if not media_type:  # none, or a blob's link
                return False
            digest = reference
        else:
            key = tag_key(repository, reference, accept_key)
            data = await self._read(key) if key is not None else None
            record = decode_tag(data, accept_key) if data is not None else None
            if record is None:
                return False
            digest, media_type = record.digest, record.media_type
        hexpart = digest.removeprefix("sha256:")
        body = await self._read(manifest_key(hexpart), MAX_MANIFEST)
        if body is None:
            return False
        if hashlib.sha256(body).hexdigest() != hexpart:
            await self._refuse(hexpart)
            return False
        await self._adopt_readability(manifests, repository)
        with manifests.adopting():
            stored = manifests.put(
                repository,
                reference,
                accepted=accepted,
                media_type=media_type,
                body=body,
                claimed=digest,
            )
        if stored is None or not manifests.has_body(digest):
            return False
        self.shared.state_reads += 1
        return True

    async def adopt_link(self, manifests: ManifestStore, repository: str, digest: str) -> None:
        """What a stale answer for ``digest`` in ``repository`` needs and this instance lacks:
        that the upstream served it there, and whether anyone may read the repository."""
        if not manifests.linked(repository, digest):
            key = link_key(repository, digest)
            data = await self._read(key) if key is not None else None
            media_type = decode_link(data) if data is not None else None
            if media_type is not None:
                with manifests.adopting():
                    manifests.link(repository, digest, media_type)
                self.shared.state_reads += 1
        await self._adopt_readability(manifests, repository)

    async def adopt_latest_readable(self, manifests: ManifestStore) -> None:
        """The last repository any instance learned anyone may read (the ``/v2/`` ping while
        the upstream is down, in an instance that knows none yet)."""
        data = await self._read(LATEST_READABLE)
        record = decode_readability(data) if data is not None else None
        if record is not None:
            self._take(manifests, record)

    async def _adopt_readability(self, manifests: ManifestStore, repository: str) -> None:
        key = readability_key(repository)
        data = await self._read(key) if key is not None else None
        record = decode_readability(data) if data is not None else None
        if record is not None and record.repository == repository:
            self._take(manifests, record)

    def _take(self, manifests: ManifestStore, record: ReadabilityRecord) -> None:
        if take_readability(manifests.readability.get(record.repository), record.readability):
            with manifests.adopting():
                manifests.set_readability(record.repository, record.readability)

    async def _read(self, key: str, limit: int = MAX_RECORD) -> bytes | None:
        """The object ``key`` (None: not there, too large, or the store resting or failing)."""
        shared = self.shared
        if trio.current_time() < shared.resting_until:
            return None
        failure: Exception | None = None
        with trio.move_on_after(self.patience) as waiting:
            try:
                return await trio.to_thread.run_sync(
                    _read_object,
                    self.objects,
                    key,
                    limit,
                    limiter=shared.limiter,
                    abandon_on_cancel=True,
                )
            except Refused as exc:
                log.warning("cache store: %s", exc)
                shared.state_refused += 1
                return None
            except Exception as exc:  # obstore's own errors, OSError
                failure = exc
        why = f"no answer within {self.patience:g}s" if waiting.cancelled_caught else failure
        shared.resting_until = trio.current_time() + STORE_REST
        # one line per rest, as a blob lookup's (the rest is the same: every miss goes upstream)
        log.warning(
            "cache store: cannot look up %s in %s: %s; misses go to the upstream for %gs",
            key,
            self.objects.description,
            why,
            STORE_REST,
        )
        return None

    async def _refuse(self, hexpart: str) -> None:
        """A manifest in the store that does not hash to its digest: never served, and deleted
        there, so that the next instance to fetch it from the upstream puts it back."""
        self.shared.state_refused += 1
        log.warning(
            "cache store: manifest sha256:%s in %s does not match its digest: deleted there, "
            "to be fetched from the upstream again",
            hexpart,
            self.objects.description,
        )
        self._written.pop(manifest_key(hexpart), None)
        try:
            await self.shared.run(self.objects.delete, manifest_key(hexpart))
        except Exception as exc:
            log.warning("cache store: cannot delete manifest sha256:%s: %s", hexpart, exc)


def _put_bytes(objects: ObjectStore, write: StateWrite, scratch: Path) -> None:
    """In a worker thread: write ``write.data`` to the store under its key (through a
    temporary file: the store takes files)."""
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(write.data)
        if write.create_only:
            objects.put_new(write.key, scratch)
        else:
            objects.put(write.key, scratch)
    finally:
        scratch.unlink(missing_ok=True)


def _read_object(objects: ObjectStore, key: str, limit: int) -> bytes | None:
    """In a worker thread: the bytes of ``key``, None if it is not there; Refused beyond
    ``limit`` bytes."""
    data = bytearray()
    try:
        for chunk in objects.chunks(key):
            data += chunk
            if len(data) > limit:
                raise Refused(f"{key} is larger than {limit} bytes: not taken")
    except FileNotFoundError:
        return None
    return bytes(data)
