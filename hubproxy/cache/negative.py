"""The negative cache: manifests the upstream recently answered 404, kept in memory for a while.

A crash-looping pod, or a hundred nodes asked for a tag that does not exist, would make one
upstream request each. Instead a 404 is remembered (``cachepolicy.remember_negative``: only a 404,
only the primary upstream's) for ``--negative-ttl`` under a :class:`NegativeKey`, for the very
same credentials, or for anyone once ``cachepolicy.share_negative`` holds. An entry ends at its
expiry, when the upstream answers 200 for its path (a push is never hidden longer than that, and
usually less), or when the entry count limit evicts it (least recently used first).

Plain state: the clock (``trio.current_time()``) is passed in.
"""

from __future__ import annotations

from collections.abc import Callable

from ..policy.cachepolicy import NegativeKey
from .lru import ShardedLRU


class NegativeCache:
    """Remembered 404s, each until ``now + ttl`` when it was remembered; at most
    ``max_entries`` of them (``on_count`` hears how many there are after every change)."""

    def __init__(
        self, ttl: float, max_entries: int, on_count: Callable[[int], None] = lambda _: None
    ) -> None:
        self.ttl = ttl
        self.max_entries = max(1, max_entries)
        self._on_count = on_count
        self._until: ShardedLRU[NegativeKey, float] = ShardedLRU()
        # (registry, path) -> its keys: a 200 for a path ends every answer remembered for it
        self._by_path: dict[tuple[str, str], set[NegativeKey]] = {}

    def __len__(self) -> int:
        return len(self._until)

    def remember(self, key: NegativeKey, now: float) -> None:
        """Remember the 404 behind ``key`` until ``now + ttl`` (no-op with a ttl of 0)."""
        if self.ttl <= 0:
            return
        self._until[key] = now + self.ttl
        self._by_path.setdefault((key.registry, key.path), set()).add(key)
        while len(self._until) > self.max_entries:
            oldest, _ = self._until.oldest()
            self._drop(oldest)
        self._on_count(len(self._until))

    def answers(self, key: NegativeKey, now: float) -> bool:
        """Whether a remembered 404 answers ``key`` now (an expired one is dropped)."""
        until = self._until.get(key)
        if until is None:
            return False
        if until <= now:
            self._drop(key)
            self._on_count(len(self._until))
            return False
        self._until.move_to_end(key)
        return True

    def forget_path(self, registry: str, path: str) -> None:
        """The upstream answered 200 for ``path``: drop every 404 remembered for it (any
        credentials, any Accept)."""
        keys = self._by_path.pop((registry, path), None)
        if not keys:
            return
        for key in keys:
            del self._until[key]
        self._on_count(len(self._until))

    def _drop(self, key: NegativeKey) -> None:
        del self._until[key]
        group = (key.registry, key.path)
        keys = self._by_path.get(group)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_path[group]
