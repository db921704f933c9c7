"""The bucket's size budget (``--cache-store-size``): which blobs a sweep deletes from the shared
store. Pure functions over listings; the I/O is in ``cache/bucket.py``.

Every instance may sweep, so everything a sweep decides on lives in the store itself, under the
``--cache-store`` prefix beside the blobs (``blobs/sha256/ab/ab...``):

- ``access/<hex>``: an empty object rewritten (at most every few minutes per instance) when an
  instance serves the blob; its modification time, from the store's own clock, is the blob's
  last access. A blob without one was last used when it was committed (its own modification
  time), so both times come from one clock and instances' clocks never enter the order;
- ``leases/<hex>/<holder>``: an instance reading the blob from the store (``holder`` names the
  process); its body is the wall-clock time the lease expires, renewed while the read lasts and
  deleted at its end. A lease past its expiry protects nothing (its holder died) and is
  cleaned a while later.
  Expiry is the one place the instances' clocks meet: they must agree within a good part of
  ``LEASE_TTL`` (NTP keeps them within a second).

A sweep starts evicting only above the budget, and then evicts down to ``low_water(budget)``
(a tenth below it): the commits after a sweep get that much room before the next one must list
the bucket again. Oldest access first; a blob with a live lease is skipped, however old.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# the key prefixes a sweep lists (store prefixes name whole path segments: no slash)
BLOB_DIR = "blobs/sha256"
ACCESS_DIR = "access"
LEASE_DIR = "leases"

# An expired lease is deleted only this long after its expiry: its holder may be late renewing
# it (a stalled store, a paused process), and deleting it just as it is rewritten would leave
# that read unprotected until the next renewal.
CLEAN_AFTER = 600.0

_HEX = re.compile(r"[0-9a-f]{64}")
_HOLDER = re.compile(r"[0-9A-Za-z_.-]{1,64}")

# (key, size, modification time in Unix seconds): one object of a listing
Listed = tuple[str, int, float]


@dataclass(frozen=True)
class Lease:
    """An instance reading blob ``digest`` until ``expires`` (Unix seconds)."""

    key: str  # the lease object's key
    digest: str  # the blob's hex digest
    expires: float


@dataclass(frozen=True)
class SweepPlan:
    """What a sweep does: delete ``evict`` (blob digests, least recently used first) and the
    objects in ``stale`` (expired leases, access markers of blobs no longer there)."""

    total: int  # bytes of the blobs listed
    kept: int  # bytes left once ``evict`` is deleted
    evict: tuple[str, ...]
    held: tuple[str, ...]  # digests that would have gone but for a live lease
    stale: tuple[str, ...]


def low_water(budget: int) -> int:
    """What an eviction frees the bucket down to: a tenth below the budget."""
    return budget - budget // 10


def blob_digest(key: str) -> str | None:
    """The digest of a blob's key (``blobs/sha256/ab/ab<62 more>``), None for anything else
    (partial uploads of other tools, foreign objects: never counted, never deleted)."""
    if not key.startswith(BLOB_DIR + "/"):
        return None
    shard, _, digest = key[len(BLOB_DIR) + 1 :].partition("/")
    if _HEX.fullmatch(digest) is None or shard != digest[:2]:
        return None
    return digest


def access_key(digest: str) -> str:
    """The key of a blob's access marker."""
    return f"{ACCESS_DIR}/{digest}"


def lease_key(digest: str, holder: str) -> str:
    """The key of ``holder``'s lease on a blob (ValueError for a holder unfit for a key)."""
    if _HOLDER.fullmatch(holder) is None:
        raise ValueError(f"not a lease holder: {holder!r}")
    return f"{LEASE_DIR}/{digest}/{holder}"


def lease_body(expires: float) -> bytes:
    """What a lease object holds: its expiry."""
    return f"{expires:.3f}\n".encode()


def read_lease(key: str, body: bytes) -> Lease | None:
    """The lease a ``leases/`` object holds; None if it is not one (a foreign key). A body that
    does not parse is a lease expired long ago: it protects nothing and is cleaned."""
    digest, _, holder = key.removeprefix(LEASE_DIR + "/").partition("/")
    if not key.startswith(LEASE_DIR + "/") or _HEX.fullmatch(digest) is None or not holder:
        return None
    try:
        expires = float(body.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        expires = 0.0
    if expires != expires:  # NaN
        expires = 0.0
    return Lease(key, digest, expires)


def leased(leases: Iterable[Lease], now: float) -> frozenset[str]:
    """The digests with a live lease at ``now``."""
    return frozenset(lease.digest for lease in leases if lease.expires > now)


def plan_sweep(
    blobs: Sequence[Listed],
    markers: Sequence[Listed],
    leases: Sequence[Lease],
    budget: int,
    now: float,
) -> SweepPlan:
    """Which blobs to evict from a bucket listed as ``blobs`` (``blobs/sha256/``) and
    ``markers`` (``access/``), with ``leases`` read from ``leases/``, to keep it within
    ``budget`` bytes at wall-clock ``now``: none while the blobs fit, else the least recently
    used down to :func:`low_water`, skipping leased ones; plus the stale objects to clean."""
    last_access: dict[str, float] = {}
    sizes: dict[str, int] = {}
    for key, size, modified in blobs:
        digest = blob_digest(key)
        if digest is not None:
            sizes[digest] = size
            last_access[digest] = modified
    stale: list[str] = []
    marked: set[str] = set()
    for key, _size, modified in markers:
        digest = key.removeprefix(ACCESS_DIR + "/")
        if _HEX.fullmatch(digest) is None:
            continue  # not ours
        if digest in last_access:
            marked.add(digest)
            last_access[digest] = max(last_access[digest], modified)
        else:
            # its blob is gone (evicted, deleted as corrupt) or not committed yet: losing the
            # marker loses no blob, only recency, and a blob's commit time is recent anyway
            stale.append(key)
    live = leased(leases, now)
    stale.extend(lease.key for lease in leases if lease.expires + CLEAN_AFTER <= now)
    total = sum(sizes.values())
    kept = total
    evict: list[str] = []
    held: list[str] = []
    if total > budget:
        target = low_water(budget)
        for digest in sorted(last_access, key=lambda d: (last_access[d], d)):
            if kept <= target:
                break
            if digest in live:
                held.append(digest)
                continue
            evict.append(digest)
            kept -= sizes[digest]
            if digest in marked:
                stale.append(access_key(digest))
    return SweepPlan(total, kept, tuple(evict), tuple(held), tuple(sorted(set(stale))))


def still_evictable(
    evict: Sequence[str], expired: Iterable[str], lease_keys: Iterable[str]
) -> tuple[str, ...]:
    """``evict`` less the blobs leased since the sweep read the leases: ``lease_keys`` is
    ``leases/`` listed again just before deleting, ``expired`` the keys of the leases the sweep
    found expired (a dead instance's: they still protect nothing)."""
    gone = frozenset(expired)
    fresh = set()
    for key in lease_keys:
        if key not in gone:
            fresh.add(key.removeprefix(LEASE_DIR + "/").partition("/")[0])
    return tuple(digest for digest in evict if digest not in fresh)
