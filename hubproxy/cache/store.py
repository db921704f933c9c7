"""The blob cache: content-addressed, verified, one upstream fetch per blob, bounded by LRU.

Theory of operation (after distribution's ``proxyblobstore``, with the in-flight map owned by
the store). A blob is stored under its sha256 digest in ``blobs/sha256/<2 hex>/<hex>``. On a miss
the proxy hands the upstream response to :meth:`BlobStore.fill`, which runs in a background task
so that it outlives the client that started it: each chunk is hashed and written to a temporary
file in ``tmp/``; when length and digest match, the file is fsync'd and renamed into place, and
otherwise discarded (counted and logged). Every client, the first one included, reads through a
:class:`BlobReader`: from the growing temporary file while the fill runs (so the first byte goes
out at once and concurrent pulls cost one upstream fetch), and from the final file after. A reader
never hands out its last byte (the blob's, or a range's) before the fill verified the digest, so
a client can never complete a transfer of wrong bytes; a failed fill aborts every reader.

Eviction is least-recently-used and skips blobs that are being read (pinned) or filled. The index
lives in memory and is rebuilt from the directory at start (leftover temporary files from a crash
are deleted then). Plain file I/O happens on the event loop (page-cache speed); fsync, which can
stall for long, runs in a thread.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import os
import secrets
from collections import OrderedDict
from collections.abc import Iterable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import trio

from ..net.buffers import BODIES
from ..policy.errors import CacheFillFailed, ProxyError, RangeNotSatisfiable

log = logging.getLogger("hubproxy.cache")

READ_SIZE = 256 * 1024
FREE_SPACE_MARGIN = 64 * 1024 * 1024  # keep this much of the disk free when starting a fill


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
    stale_answers: int = 0
    sendfile_bytes: int = 0
    fills_completed: int = 0
    fills_failed: int = 0


def parse_size(text: str) -> int:
    """Parse ``20G``, ``512M``, ``1.5T`` or a byte count; raise ValueError otherwise."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = value[-1:] if value[-1:] in units else ""
    number = float(value[: len(value) - len(unit)] or "nan")
    if not number >= 0:
        raise ValueError(f"not a size: {text!r}")
    return int(number * units[unit])


def sha256_hex(digest: str) -> str | None:
    """The hex part of a ``sha256:`` digest we can cache, else None (other algorithms pass)."""
    algorithm, _, hexpart = digest.partition(":")
    if algorithm != "sha256" or len(hexpart) != 64:
        return None
    if any(c not in "0123456789abcdef" for c in hexpart):
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
    """One blob being fetched into the cache; readers follow its progress."""

    def __init__(self, key: str, size: int, temp_path: Path, fd: int) -> None:
        self.key = key
        self.size = size
        self.temp_path = temp_path
        self.fd = fd  # the temporary file, open for writing until committed
        self.written = 0
        self.state = FillState.FILLING
        self.error = ""
        self.disk_failed = False  # the upstream was fine; writing the file was not
        self._progress = trio.Event()

    def _notify(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    async def wait_beyond(self, written: int) -> None:
        """Wait until more than ``written`` bytes are available, or the fill ended."""
        while self.state is FillState.FILLING and self.written <= written:
            await self._progress.wait()


class BlobStore:
    """The on-disk store, its LRU index, the in-flight fills and the counters."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.blob_dir = root / "blobs" / "sha256"
        self.tmp_dir = root / "tmp"
        self.index: OrderedDict[str, int] = OrderedDict()  # key -> size, least recent first
        self.total = 0
        self.pins: dict[str, int] = {}
        self.fills: dict[str, Fill] = {}
        # blob misses whose upstream answer is awaited: other clients wait for it, so that a
        # miss costs one upstream fetch (the fill it starts), not one per client
        self.pending: dict[str, trio.Event] = {}
        self.stats = CacheStats()

    # -- start-up --------------------------------------------------------------------------

    def open(self) -> None:
        """Create the directories, delete a crash's temporary files, and rebuild the index."""
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        for leftover in os.scandir(self.tmp_dir):
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
        self._evict()

    # -- lookups ----------------------------------------------------------------------------

    def path(self, key: str) -> Path:
        return self.blob_dir / key[:2] / key

    def size_of(self, key: str) -> int | None:
        """The size of a complete cached blob (marking it recently used), or None."""
        size = self.index.get(key)
        if size is not None:
            self.index.move_to_end(key)
        return size

    def can_fill(self, size: int) -> bool:
        """Whether a blob of ``size`` bytes may be cached at all (the disk and the limit)."""
        if size > self.max_bytes:
            return False  # larger than the whole cache: streamed, never cached
        try:
            free = shutil_free_bytes(self.root)
        except OSError:
            return False
        # fills under way will take the rest of their size too
        reserved = sum(fill.size - fill.written for fill in self.fills.values())
        return free - reserved >= size + FREE_SPACE_MARGIN

    # -- filling ----------------------------------------------------------------------------

    async def wait_pending(self, key: str) -> None:
        """Wait while another client's miss of ``key`` is waiting for the upstream's answer."""
        while (pending := self.pending.get(key)) is not None:
            await pending.wait()

    def mark_pending(self, key: str) -> None:
        """This client's miss of ``key`` goes upstream: others wait (release_pending ends it)."""
        self.pending[key] = trio.Event()

    def release_pending(self, key: str) -> None:
        pending = self.pending.pop(key, None)
        if pending is not None:
            pending.set()

    def start_fill(self, key: str, size: int) -> Fill:
        """Register a fill for ``key`` (the caller checked there is none) and open its file."""
        temp_path = self.tmp_dir / f"{key}.{secrets.token_hex(6)}.partial"
        fd = os.open(temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)  # OSError: no fill
        fill = Fill(key, size, temp_path, fd)
        self.fills[key] = fill
        return fill

    async def run_fill(self, fill: Fill, body: BodySource, exchange: AsyncExitStack) -> None:
        """Stream ``body`` into the fill's file, verify it, and commit or discard it.

        Owns ``exchange`` (the upstream connection's lending) and closes it when done.
        """
        hasher = hashlib.sha256()
        fd = fill.fd
        try:
            async with exchange:
                while (chunk := await body.receive_body()) is not None:
                    if fill.written + len(chunk) > fill.size:
                        raise CacheFillFailed("upstream sent more bytes than its Content-Length")
                    hasher.update(chunk)
                    _write_all(fd, chunk)
                    fill.written += len(chunk)
                    self.stats.bytes_from_upstream += len(chunk)
                    fill._notify()
            if fill.written != fill.size:
                raise CacheFillFailed(f"upstream sent {fill.written} of {fill.size} bytes")
            if hasher.hexdigest() != fill.key:
                self.stats.verification_failures += 1
                raise CacheFillFailed(
                    f"blob sha256:{fill.key} from upstream has digest sha256:{hasher.hexdigest()}"
                )
            await trio.to_thread.run_sync(os.fsync, fd)
            os.close(fd)
            fd = -1
            final = self.path(fill.key)
            final.parent.mkdir(exist_ok=True)
            os.replace(fill.temp_path, final)
            self._add(fill.key, fill.size)
            fill.state = FillState.DONE
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
                _unlink_quietly(fill.temp_path)
            self.fills.pop(fill.key, None)
            fill._notify()

    # -- reading ----------------------------------------------------------------------------

    def reader(self, key: str, start: int = 0, end: int | None = None) -> BlobReader:
        """A reader of bytes [start, end) of a cached or filling blob (pins it while open)."""
        fill = self.fills.get(key)
        size = fill.size if fill is not None else self.index[key]
        return BlobReader(self, key, fill, start, size if end is None else end, size)

    def pin(self, key: str) -> None:
        self.pins[key] = self.pins.get(key, 0) + 1

    def unpin(self, key: str) -> None:
        count = self.pins.get(key, 0) - 1
        if count > 0:
            self.pins[key] = count
        else:
            self.pins.pop(key, None)
            if self.total > self.max_bytes:
                self._evict()

    # -- the index --------------------------------------------------------------------------

    def _add(self, key: str, size: int) -> None:
        if key not in self.index:
            self.total += size
        self.index[key] = size
        self.index.move_to_end(key)
        self._evict()

    def _evict(self) -> None:
        protected = set(self.pins) | set(self.fills)
        for key in choose_evictions(self.index.items(), self.total, self.max_bytes, protected):
            size = self.index.pop(key)
            self.total -= size
            self.stats.evictions += 1
            _unlink_quietly(self.path(key))
            log.info("cache evicted sha256:%s (%d bytes)", key, size)


class BlobReader:
    """Chunks of one blob, from the growing file during a fill, never ahead of verification."""

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
        store.pin(key)
        BODIES.begin(self)  # its chunks share the body budget with upstream transfers

    def _open(self) -> None:
        path = self.fill.temp_path if self.fill is not None else self.store.path(self.key)
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            if self.fill is None or self.fill.state is not FillState.DONE:
                raise
            self._fd = os.open(self.store.path(self.key), os.O_RDONLY)  # renamed meanwhile

    async def next_span(self, limit: int = READ_SIZE) -> tuple[int, int, int] | None:
        """The next ``(fd, offset, count)`` that may be sent (count <= limit), None at the end.

        The position advances past the span: the caller sends all of it (with ``os.sendfile``,
        say) or gives up on the transfer. CacheFillFailed if the fill it follows failed.
        """
        if self.position >= self.end:
            return None
        available = await self._available()
        if self._fd < 0:
            self._open()
        span = (self._fd, self.position, min(limit, available - self.position))
        self.position += span[2]
        self.store.stats.bytes_from_cache += span[2]
        return span

    async def next_chunk(self) -> bytes | None:
        """The next chunk, None at the end; CacheFillFailed if the fill it follows failed."""
        if self.position >= self.end:
            return None
        available = await self._available()
        if self._fd < 0:
            self._open()
        want = min(BODIES.chunk(), available - self.position)
        chunk = os.pread(self._fd, want, self.position)
        if not chunk:
            raise CacheFillFailed(f"cached blob sha256:{self.key} is shorter than recorded")
        self.position += len(chunk)
        self.store.stats.bytes_from_cache += len(chunk)
        return chunk

    async def _available(self) -> int:
        """How far reading may go now: the end, or the verified-so-far part of a fill."""
        available = self.end
        fill = self.fill
        if fill is not None and fill.state is not FillState.DONE:
            # the last byte of the blob, and the last byte of a range (which completes the
            # client's transfer as surely), only go out once the digest is verified
            limit = self.end - 1
            while fill.state is FillState.FILLING and min(fill.written, limit) <= self.position:
                await fill.wait_beyond(fill.written)
            if fill.state is FillState.FAILED:
                raise CacheFillFailed(
                    f"cache fill failed: {fill.error}", resumable=fill.disk_failed
                )
            if fill.state is FillState.FILLING:
                available = min(fill.written, limit)
        return available

    def hash_sent(self, hasher: hashlib._Hash) -> None:
        """Feed ``hasher`` the bytes from the start of the blob up to the position (read back
        from the file, which stays readable through our descriptor even once unlinked)."""
        if self.position == 0:
            return
        if self._fd < 0:
            self._open()
        offset = 0
        while offset < self.position:
            data = os.pread(self._fd, min(READ_SIZE, self.position - offset), offset)
            if not data:
                raise CacheFillFailed("the partial file is shorter than what was sent")
            hasher.update(data)
            offset += len(data)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.store.unpin(self.key)
        BODIES.end(self)


def shutil_free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot delete %s: %s", path, exc)
