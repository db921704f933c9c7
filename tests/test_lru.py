"""Tests for hubproxy.cache.lru: a recency-ordered mapping over shards, against an OrderedDict
model, and the property it exists for: nothing per entry for the garbage collector to track."""

from __future__ import annotations

import gc
from collections import OrderedDict

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hubproxy.cache.lru import ShardedLRU

Op = tuple[str, int]
OPS = st.lists(
    st.tuples(st.sampled_from(["set", "touch", "del", "popold", "popnew"]), st.integers(0, 30)),
    max_size=200,
)


@given(OPS)
def test_behaves_like_an_ordered_dict(ops: list[Op]) -> None:
    lru: ShardedLRU[int, int] = ShardedLRU(shards=4)
    model: OrderedDict[int, int] = OrderedDict()
    for step, (op, key) in enumerate(ops):
        if op == "set":
            lru[key] = step
            model.pop(key, None)
            model[key] = step
        elif op == "touch" and key in model:
            lru.move_to_end(key)
            model.move_to_end(key)
        elif op == "del" and key in model:
            del lru[key]
            del model[key]
        elif op == "popold" and model:
            assert lru.popitem(last=False) == model.popitem(last=False)
        elif op == "popnew" and model:
            assert lru.popitem() == model.popitem()
        assert len(lru) == len(model)
        assert list(lru) == list(model)
        assert all((k in lru) == (k in model) for k in range(31))
    if model:
        assert lru.oldest() == next(iter(model.items()))
    assert dict(lru) == dict(model)


def test_mapping_helpers() -> None:
    lru: ShardedLRU[str, dict[str, str]] = ShardedLRU()
    assert lru.setdefault("a", {}) == {} and "a" in lru
    lru.setdefault("a", {"x": "y"})["k"] = "v"
    assert lru["a"] == {"k": "v"}
    assert lru.get("missing") is None and lru.pop("missing", {}) == {}
    assert lru.pop("a") == {"k": "v"} and not lru
    with pytest.raises(KeyError):
        lru.oldest()
    lru["b"] = {}
    lru.clear()
    assert len(lru) == 0 and list(lru) == []


def test_entries_add_nothing_the_garbage_collector_tracks() -> None:
    """The point of the module: 20,000 entries of str -> small dict of str leave no tracked
    object per entry (a full collection would otherwise walk them all, on the event loop)."""
    lru: ShardedLRU[str, dict[str, str]] = ShardedLRU()
    gc.collect()
    before = len(gc.get_objects())
    for i in range(20_000):
        lru[f"repo/{i}:tag"] = {"key": f"{i:064x}"}
    gc.collect()
    assert len(gc.get_objects()) - before < 200
