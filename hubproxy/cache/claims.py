"""Fills shared by the processes of ``--workers N``: one upstream fetch per blob across processes
over one cache directory, and one ``--cache-size`` bound for that directory.

Theory of operation. Within a process the store's in-memory :class:`~.store.Fill` lets clients
follow a fetch under way; another process cannot see it, so a fill also takes a *claim*: the
file ``tmp/<hex>.claim``, made exclusively (a fully written file hard-linked into place: like
``O_CREAT|O_EXCL`` it fails with EEXIST when the claim exists, and no process ever reads a
half-written claim), naming the owner (its pid, and that process's start time so that a reused
pid is not mistaken for the owner), the blob's size, the registry it comes from and the
temporary file it grows in.

A process that misses a blob claimed elsewhere follows the claim (:meth:`Claims.follow`): it
registers a local Fill whose ``written`` a watcher task moves as the temporary file grows
(polled every ``POLL`` seconds), so the store's readers work unchanged, and the invariant holds
as in one process: a reader never hands out a blob's last byte while its fill is FILLING. The
watcher sets DONE only once the final path holds the very inode it watched, which the owner
renames there only after the digest verified. Readers open that inode through the watcher's
descriptor (``/proc/self/fd/N``), so the rename cannot pull the file from under them.

The owner releases its claim after the rename, or after a failed fill deleted its file. A
follower that finds the claim gone without the final file fails its readers as a failed fill
does (resumable: a client mid-transfer finishes from the upstream with a Range request, verified
before its last byte). A claim whose owner is dead (its pid gone or reused) or whose file did
not grow for ``idle`` seconds (longer than the read timeout the owner's own fill fails after) is
broken: deleted with its temporary file, under ``claims.lock``, so that two processes judging
one claim dead never delete a claim taken after it. The next miss takes a new claim and fetches
the blob again.

The bound. Every eviction pass runs under ``evict.lock`` and starts from the directory itself:
every blob file with its size and mtime (the shared recency order: a process touches a blob it
serves at most once per ``TOUCH_EVERY``), plus every live claim at its full size, reserved.
The least recently used blobs that no claim names and no reader of this process holds go first,
until blobs and claims fit. A pass runs when a fill starts (its own claim already counted: a
fill that cannot fit beside the others' claims is refused and streams uncached), and when a
reader's release leaves this process's view over the limit; a commit needs none (the claim
had reserved the room). Since a fill is
counted from the moment its claim exists and the pass that admits it sees every other claim,
the directory holds at most ``max_bytes`` of blobs and fills, except for blobs deleted while a
reader in another process still had them open: their space returns when that reader closes, so
the worst-case overshoot is the size of the blobs other workers are sending at that moment. A
pass costs one ``lstat`` per cached blob (8 µs of CPU each on a loaded 2-core machine: 16 ms
for 2,000 blobs), once per miss; a hit costs one ``stat`` (7 µs instead of 0.2).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from .store import Fill, FillState, sha256_hex, unlink_quietly

if TYPE_CHECKING:
    from .store import BlobStore

log = logging.getLogger("hubproxy.cache")

POLL = 0.02  # seconds between two looks at a followed file's size
TOUCH_EVERY = 60.0  # a served blob's mtime (the shared recency) is moved at most this often
CLAIM_SUFFIX = ".claim"
CLAIMS_LOCK = "claims.lock"
EVICT_LOCK = "evict.lock"


class ClaimedElsewhere(FileExistsError):
    """Another process took the claim on this blob first: this miss streams uncached."""


@dataclass(frozen=True)
class Claim:
    """What a claim file says: who fills which blob, how large, into which temporary file."""

    key: str
    pid: int
    started: str  # the owner's start time (/proc/PID/stat): a reused pid is another process
    size: int
    source: str
    temp_name: str  # the temporary file's name in tmp/

    def encode(self) -> bytes:
        fields = {
            "pid": self.pid,
            "started": self.started,
            "size": self.size,
            "source": self.source,
            "temp": self.temp_name,
        }
        return json.dumps(fields).encode()

    @classmethod
    def decode(cls, key: str, data: bytes) -> Claim | None:
        """The claim in ``data``, or None if it is not one (a foreign or damaged file)."""
        try:
            fields = json.loads(data)
            claim = cls(
                key,
                int(fields["pid"]),
                str(fields["started"]),
                int(fields["size"]),
                str(fields["source"]),
                str(fields["temp"]),
            )
        except (ValueError, KeyError, TypeError):
            return None
        if "/" in claim.temp_name or not claim.temp_name.startswith(key):
            return None  # never let a claim name a file outside tmp/ (or another blob's)
        return claim


def process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks after boot, field 22 of
    ``/proc/PID/stat``), or None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: count from its closing one
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else None


def owner_alive(claim: Claim) -> bool:
    """Whether the process that took ``claim`` still runs (the same process, not a reused pid)."""
    return process_start(claim.pid) == claim.started


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing). Held for a few system
    calls, so taking it blocks the event loop no longer than a disk read would."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


@dataclass
class _Followed:
    """A claim this process follows, and the descriptor its readers open it through."""

    claim: Claim
    fill: Fill
    fd: int


class Claims:
    """The claims of one cache directory's ``tmp/``, as seen by this process."""

    def __init__(self, tmp_dir: Path, *, idle: float) -> None:
        self.tmp_dir = tmp_dir
        self.idle = idle  # a claim whose file did not grow for this long is broken
        self.pid = os.getpid()
        self.started = process_start(self.pid) or ""
        self.nursery: trio.Nursery | None = None  # where watchers run (the server's)
        self.owned: dict[str, Claim] = {}  # key -> the claim this process holds
        self.followed: dict[str, _Followed] = {}
        self.broken = 0  # claims of dead or stalled owners broken here

    def path(self, key: str) -> Path:
        return self.tmp_dir / f"{key}{CLAIM_SUFFIX}"

    def read(self, key: str) -> Claim | None:
        """The claim on ``key`` now, or None."""
        try:
            data = self.path(key).read_bytes()
        except FileNotFoundError:
            return None
        claim = Claim.decode(key, data)
        if claim is None:  # not ours to read: treat it as an owner long dead
            return Claim(key, 0, "", 0, "", f"{key}.unknown")
        return claim

    # -- owning ----------------------------------------------------------------------------

    def take(self, key: str, size: int, source: str, temp_path: Path) -> Claim:
        """Claim ``key`` for a fill into ``temp_path``; ClaimedElsewhere if another live process
        holds it (a dead one's claim is broken and taken)."""
        claim = Claim(key, self.pid, self.started, size, source, temp_path.name)
        staging = self.tmp_dir / f"{key}.{secrets.token_hex(6)}.claiming"
        fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, claim.encode())
        finally:
            os.close(fd)
        try:
            for _ in range(2):  # a dead owner's claim: broken, then taken once more
                try:
                    os.link(staging, self.path(key))
                except FileExistsError:
                    other = self.read(key)
                    if other is not None and owner_alive(other):
                        raise ClaimedElsewhere(
                            f"sha256:{key} is being fetched by pid {other.pid}"
                        ) from None
                    if other is not None:
                        self.break_claim(other, "its owner is gone")
                    continue
                self.owned[key] = claim
                return claim
            raise ClaimedElsewhere(f"sha256:{key}: its claim changed hands while taken")
        finally:
            os.unlink(staging)

    def release(self, key: str) -> None:
        """End this process's claim on ``key`` (its fill committed or failed)."""
        claim = self.owned.pop(key, None)
        if claim is not None:
            self._remove_if(claim)

    def _remove_if(self, claim: Claim) -> bool:
        """Delete the claim file if it still holds ``claim`` (under the lock: never another
        process's claim taken since)."""
        with locked(self.tmp_dir / CLAIMS_LOCK):
            if self.read(claim.key) != claim:
                return False
            unlink_quietly(self.path(claim.key))
            return True

    def break_claim(self, claim: Claim, why: str) -> None:
        """Delete a dead or stalled owner's claim and its temporary file."""
        if self._remove_if(claim):
            unlink_quietly(self.tmp_dir / claim.temp_name)
            self.broken += 1
            log.warning(
                "cache: the fill of sha256:%s by pid %d is abandoned (%s); the next request "
                "fetches it again",
                claim.key,
                claim.pid,
                why,
            )

    # -- following -------------------------------------------------------------------------

    def follow(self, store: BlobStore, key: str) -> Fill | None:
        """A local Fill following another process's claim on ``key`` (registered in the store,
        its watcher started), or None if there is none to follow."""
        if self.nursery is None or key in self.owned:
            return None
        claim = self.read(key)
        if claim is None:
            return None
        if not owner_alive(claim):
            self.break_claim(claim, "its owner is gone")
            return None
        try:
            fd = os.open(self.tmp_dir / claim.temp_name, os.O_RDONLY)
        except FileNotFoundError:
            return None  # finished (or failed) meanwhile: the index answers, or a new miss
        # readers open the watched inode itself: the owner's rename cannot move it away
        fill = Fill(key, claim.size, Path(f"/proc/self/fd/{fd}"), -1, claim.source)
        store.fills[key] = fill
        self.followed[key] = _Followed(claim, fill, fd)
        self.nursery.start_soon(self._watch, store, key)
        return fill

    async def _watch(self, store: BlobStore, key: str) -> None:
        """Move the followed fill as its file grows; DONE once the owner renamed the verified
        file into place, FAILED (resumable) if the claim ended otherwise or was broken."""
        followed = self.followed[key]
        claim, fill, fd = followed.claim, followed.fill, followed.fd
        final = store.path(key)
        inode = os.fstat(fd).st_ino
        grown_at = trio.current_time()
        try:
            while True:
                size = min(os.fstat(fd).st_size, claim.size)
                if size > fill.written:
                    # no window in memory here: what another process received is what it wrote
                    fill.received = fill.written = size
                    grown_at = trio.current_time()
                    fill._notify()
                if _holds(final, inode, claim.size):
                    fill.temp_path = final  # the descriptor below closes: readers use the name
                    fill.state = FillState.DONE
                    adopt(store, key, claim.size)
                    return
                if self.read(key) != claim:
                    # released: renamed (looked at once more, the release came after it) or
                    # failed
                    if _holds(final, inode, claim.size):
                        fill.temp_path = final
                        fill.state = FillState.DONE
                        adopt(store, key, claim.size)
                        return
                    self._fail(fill, "the worker filling it failed")
                    return
                if not owner_alive(claim):
                    self.break_claim(claim, "its owner is gone")
                    self._fail(fill, "the worker filling it died")
                    return
                if trio.current_time() - grown_at > self.idle:
                    self.break_claim(claim, f"its file did not grow for {self.idle:g}s")
                    self._fail(fill, "the worker filling it stalled")
                    return
                await trio.sleep(POLL)
        finally:
            if fill.state is FillState.FILLING:  # cancelled (shutdown)
                self._fail(fill, "cancelled")
            if store.fills.get(key) is fill:
                del store.fills[key]
            self.followed.pop(key, None)
            os.close(fd)
            fill._notify()

    @staticmethod
    def _fail(fill: Fill, why: str) -> None:
        fill.state = FillState.FAILED
        fill.error = why
        fill.disk_failed = True  # the upstream may well be fine: a client mid-way resumes there

    # -- the shared bound ------------------------------------------------------------------

    def live_claims(self) -> list[Claim]:
        """Every claim in tmp/ whose owner runs (claims of dead owners are broken on the way)."""
        claims = []
        for entry in os.scandir(self.tmp_dir):
            if not entry.name.endswith(CLAIM_SUFFIX):
                continue
            claim = self.read(entry.name[: -len(CLAIM_SUFFIX)])
            if claim is None:
                continue
            if owner_alive(claim):
                claims.append(claim)
            else:
                self.break_claim(claim, "its owner is gone")
        return claims

    def claimed_keys(self) -> set[str]:
        """The blobs being fetched by live processes now (``hubproxy cache rm`` skips them)."""
        return {claim.key for claim in self.live_claims()}

    def remove(
        self, store: BlobStore, keys: Iterable[str]
    ) -> tuple[list[tuple[str, int]], list[str]]:
        """``BlobStore.remove`` across processes: under the eviction lock, never a blob any
        live process is fetching; blobs another worker committed are adopted first."""
        keys = list(keys)
        with locked(self.tmp_dir.parent / EVICT_LOCK):
            claimed = self.claimed_keys()
            for key in keys:
                self.look_up(store, key)
            return store.remove_except(keys, set(store.fills) | claimed)

    def evict(self, store: BlobStore, quiet: bool = False) -> tuple[list[int], bool]:
        """One eviction pass over the whole directory (module docstring): the sizes evicted,
        and whether blobs and claims fit ``max_bytes`` after it."""
        with locked(self.tmp_dir.parent / EVICT_LOCK):
            rescan(store)
            claims = self.live_claims()
            claimed = {claim.key for claim in claims}
            # a blob both committed and still claimed (between rename and release) counts once
            reserved = sum(c.size for c in claims if c.key not in store.index)
            limit = store.max_bytes - reserved
            protected = set(store.pins) | set(store.fills) | claimed
            evicted = store.evict_down_to(limit, protected, quiet)
            return evicted, store.total <= limit

    def look_up(self, store: BlobStore, key: str) -> int | None:
        """``BlobStore.size_of`` across processes: a blob another process committed is adopted,
        one it evicted is forgotten, and a served blob's mtime moves (the shared recency)."""
        try:
            st = os.stat(store.path(key))
        except FileNotFoundError:
            size = store.index.pop(key, None)
            if size is not None:
                store.total -= size
                store.verified.pop(key, None)
            return None
        if key not in store.index:
            adopt(store, key, st.st_size)
        else:
            store.index.move_to_end(key)
        now = time.time()
        if now - st.st_mtime > TOUCH_EVERY:
            with contextlib.suppress(OSError):
                os.utime(store.path(key), (now, now))
                # our own touch: the bytes are the ones verified (and the other workers learn
                # it, or each would hash the blob again on its next read)
                store.carry_verification(key, st, os.stat(store.path(key)))
        return store.index[key]


def adopt(store: BlobStore, key: str, size: int) -> None:
    """Enter a blob another process committed into this process's index (no eviction pass:
    the committing process ran one)."""
    if key not in store.index:
        store.total += size
    store.index[key] = size
    store.index.move_to_end(key)


def rescan(store: BlobStore) -> None:
    """Rebuild the store's index from the directory, least recently used (oldest mtime) first."""
    found: list[tuple[float, str, int]] = []
    for prefix in os.scandir(store.blob_dir):
        if not prefix.is_dir(follow_symlinks=False):
            continue
        for entry in os.scandir(prefix.path):
            if sha256_hex("sha256:" + entry.name) is None or entry.name[:2] != prefix.name:
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # evicted meanwhile by a process not holding the lock (verify)
            found.append((st.st_mtime, entry.name, st.st_size))
    found.sort()
    store.index = OrderedDict((key, size) for _, key, size in found)
    store.total = sum(store.index.values())
    for key in [key for key in store.verified if key not in store.index]:
        del store.verified[key]


def sweep_owner(tmp_dir: Path, pid: int) -> int:
    """Delete the claims (and their temporary files) of process ``pid``, which exited: the
    supervisor's cleanup after a worker died. How many there were."""
    swept = 0
    claims = Claims(tmp_dir, idle=0)
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(tmp_dir):
            if entry.name.endswith(CLAIM_SUFFIX):
                claim = claims.read(entry.name[: -len(CLAIM_SUFFIX)])
                if claim is not None and claim.pid == pid and claims._remove_if(claim):
                    unlink_quietly(tmp_dir / claim.temp_name)
                    swept += 1
    return swept


def _holds(final: Path, inode: int, size: int) -> bool:
    """Whether the final path holds the inode watched, whole (renamed there once verified)."""
    try:
        st = os.stat(final)
    except FileNotFoundError:
        return False
    return st.st_ino == inode and st.st_size == size
