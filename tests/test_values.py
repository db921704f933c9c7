"""policy.values: a dataclass frozen to the type checker, plain at run time."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mypy import api

from hubproxy.policy.values import immutable


@immutable
class Point:
    x: int
    y: int = 0
    secret: bytes | None = dataclasses.field(default=None, repr=False)


def test_a_value_compares_hashes_and_replaces_as_a_frozen_dataclass() -> None:
    a, b = Point(1, 2, b"token"), Point(1, 2, b"token")
    assert a == b and hash(a) == hash(b) and {a: 1}[b] == 1
    assert a != Point(1, 3, b"token")
    assert dataclasses.replace(a, y=5) == Point(1, 5, b"token")
    assert a.y == 2  # replace made a new one
    assert "token" not in repr(a)  # field(repr=False) as with dataclass
    assert [f.name for f in dataclasses.fields(a)] == ["x", "y", "secret"]


def test_the_type_checker_refuses_an_assignment_to_a_value(tmp_path: Path) -> None:
    """What keeps a value unchanged: mypy --strict (run with the tests) refuses to assign to
    it, as to a frozen dataclass, and accepts the same code reading it."""
    module = tmp_path / "uses_a_value.py"
    module.write_text(
        "from hubproxy.policy.flow import Plan\n"
        "def read(plan: Plan) -> str:\n"
        "    return plan.method\n"
        "def change(plan: Plan) -> None:\n"
        "    plan.method = 'HEAD'\n"
    )
    out, _, status = api.run(
        ["--strict", "--no-incremental", "--follow-imports=silent", str(module)]
    )
    assert status == 1
    assert f"{module.name}:5: error:" in out and "read-only" in out
    assert f"{module.name}:3:" not in out
