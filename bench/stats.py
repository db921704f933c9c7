"""Median/min/max over repetitions and hubproxy-to-other ratios (pure)."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Spread:
    median: float
    lo: float
    hi: float
    n: int


def spread(values: Iterable[float]) -> Spread | None:
    """Median and range of ``values``; None when there are none."""
    data = sorted(values)
    if not data:
        return None
    return Spread(statistics.median(data), data[0], data[-1], len(data))


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


# What each ratio compares, and which way is better: a bare "ratio: 0.78" left a reader to
# guess whether hubproxy used less CPU or ran slower.
METRICS = {
    "throughput": ("the throughput", True),
    "rps": ("the requests/s", True),
    "cpu-per-GiB": ("the CPU per GiB", False),
    "cpu-per-request": ("the CPU per request", False),
    "p99": ("the p99 latency", False),
}


@dataclass(frozen=True)
class Ratio:
    numerator: str
    denominator: str
    case: str
    metric: str
    value: float | None

    def line(self) -> str:
        """``hubproxy/nginx-tuned 1GiB-tls throughput ratio: 1.07 (1.07x the throughput:
        higher is better)``; ``n/a`` when not measured (a run failed verification)."""
        head = f"{self.numerator}/{self.denominator} {self.case} {self.metric} ratio: "
        if self.value is None:
            return head + "n/a"
        what, higher_better = METRICS[self.metric]
        better = "higher" if higher_better else "lower"
        return f"{head}{self.value:.2f} ({self.value:.2f}x {what}: {better} is better)"


def rotate(items: Sequence[T], k: int) -> list[T]:
    """``items`` starting at position ``k`` (mod len): a different first contestant each time."""
    if not items:
        return []
    k %= len(items)
    return [*items[k:], *items[:k]]
