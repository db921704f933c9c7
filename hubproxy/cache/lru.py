"""A recency-ordered mapping that never stalls to grow: the manifest store's in-memory indexes.

An ``OrderedDict`` of 100,000 entries rebuilds its whole table when it grows past a power of two
(21,845, 43,690, 87,381 entries...): about 10 ms at 43,690 entries on a small machine, three of
them in one ``put`` when three indexes grow together, all on the event loop. :class:`ShardedLRU`
spreads the keys over 64 ordered shards by hash, so a shard's growth copies 1/64 of the entries,
and keeps the order global: every entry carries the sequence number of its last use, each shard
is in use order, so the least recently used entry overall is the oldest of the 64 shard heads.

Plain data structure: no I/O, no clock.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from collections.abc import Iterator, MutableMapping
from typing import TypeVar, overload

K = TypeVar("K")
V = TypeVar("V")
T = TypeVar("T")

SHARDS = 64


class ShardedLRU(MutableMapping[K, V]):
    """A mapping ordered by last use (insertion or :meth:`move_to_end`), oldest first.

    Each shard is an ordered mapping of the values themselves and a plain mapping of the
    sequence numbers (ints): no per-entry object the cyclic garbage collector must track, so a
    full collection with 100,000 entries stays short too."""

    def __init__(self, shards: int = SHARDS) -> None:
        self._values: list[OrderedDict[K, V]] = [OrderedDict() for _ in range(shards)]
        self._seqs: list[dict[K, int]] = [{} for _ in range(shards)]
        self._count = itertools.count()
        self._len = 0

    def _index(self, key: object) -> int:
        return hash(key) % len(self._values)

    def __len__(self) -> int:
        return self._len

    def __contains__(self, key: object) -> bool:
        seqs = self._seqs
        return key in seqs[hash(key) % len(seqs)]

    def __getitem__(self, key: K) -> V:
        values = self._values
        return values[hash(key) % len(values)][key]

    @overload
    def get(self, key: K, /) -> V | None: ...
    @overload
    def get(self, key: K, default: V | T, /) -> V | T: ...

    def get(self, key: K, default: object = None, /) -> object:
        # (Mapping's get goes through __getitem__ and a KeyError: several per request)
        values = self._values
        return values[hash(key) % len(values)].get(key, default)

    def __setitem__(self, key: K, value: V) -> None:
        """Set ``key`` and make it the most recently used."""
        index = self._index(key)
        values, seqs = self._values[index], self._seqs[index]
        if key in seqs:
            values.move_to_end(key)
        else:
            self._len += 1
        values[key] = value
        seqs[key] = next(self._count)

    def move_to_end(self, key: K) -> None:
        """Mark ``key`` as the most recently used (KeyError if absent)."""
        index = hash(key) % len(self._values)
        self._values[index].move_to_end(key)
        self._seqs[index][key] = next(self._count)

    def __delitem__(self, key: K) -> None:
        index = self._index(key)
        del self._values[index][key]
        del self._seqs[index][key]
        self._len -= 1

    def oldest(self) -> tuple[K, V]:
        """The least recently used entry (KeyError when empty)."""
        best: tuple[int, int, K] | None = None
        for index, values in enumerate(self._values):
            if values:
                key = next(iter(values))
                seq = self._seqs[index][key]
                if best is None or seq < best[0]:
                    best = (seq, index, key)
        if best is None:
            raise KeyError("oldest of an empty ShardedLRU")
        return best[2], self._values[best[1]][best[2]]

    def popitem(self, last: bool = True) -> tuple[K, V]:
        """Remove and return the least (``last=False``) or most recently used entry."""
        if last:
            key = list(self)[-1]
            value = self[key]
        else:
            key, value = self.oldest()
        del self[key]
        return key, value

    def __iter__(self) -> Iterator[K]:
        """Every key, least recently used first (a merge of the shards: for tests, reports and
        the rare full walk, not the request path)."""
        shards = zip(self._values, self._seqs, strict=True)
        merged = heapq.merge(*(_in_order(values, seqs) for values, seqs in shards))
        return (key for _seq, key in merged)

    def clear(self) -> None:
        for values, seqs in zip(self._values, self._seqs, strict=True):
            values.clear()
            seqs.clear()
        self._len = 0


def _in_order(values: OrderedDict[K, V], seqs: dict[K, int]) -> Iterator[tuple[int, K]]:
    """One shard's keys with their sequence numbers, in its (use) order."""
    for key in values:
        yield seqs[key], key
