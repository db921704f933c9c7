"""The status page's trends: the last hour of the mirror's counters, one sample a minute.

Theory of operation. ``sample_trends`` runs for as long as the server does: once a minute it reads
the metrics as ``/metrics`` would give them (under ``--workers`` the whole mirror's sum, from the
same snapshots ``workermetrics`` merges, so whichever worker answers the page shows the same
charts) and keeps the cumulative figures (``Totals``) in a ``TrendRing``, a ring of ``POINTS + 1``
samples: fixed memory, whatever the traffic. The page turns consecutive samples into per-interval
figures (``trend_figures``): bytes per second from the cache and from upstreams, requests per
minute, the hit ratio of each interval, and each upstream allowance's remaining pulls as it
stood. A last point is made at render time from the live figures, so the newest minute shows
before it is over (its rates are over the part that passed).

Everything except ``sample_trends`` is pure: times are passed in (trio's clock: the sampler
sleeps on it, and tests move it with ``autojump_clock``).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import trio

POINTS = 60  # intervals kept: one hour of minutes
STEP = 60.0  # seconds between samples
MAX_ALLOWANCES = 6  # rate-limit lines on the chart (registries x identities; more are left out)

# a snapshot of the metrics: family name -> {"kind", "help", "samples": [[name, labels, value]]}
Families = dict[str, dict[str, Any]]


@dataclass(frozen=True)
class Totals:
    """Cumulative figures at one moment (``when``: trio's clock)."""

    when: float
    bytes_cache: float = 0.0
    bytes_upstream: float = 0.0
    hits: float = 0.0
    misses: float = 0.0
    requests: float = 0.0  # the operator's own paths left out
    remaining: tuple[tuple[str, float], ...] = ()  # ("docker.io anonymous", pulls left)


def _samples(families: Families, name: str) -> list[tuple[dict[str, str], float]]:
    family = families.get(name)
    if not isinstance(family, dict):
        return []
    found = []
    for sample in family.get("samples", ()):
        try:
            _, labels, value = sample
            found.append(({str(k): str(v) for k, v in labels}, float(value)))
        except (TypeError, ValueError):
            continue  # another worker's snapshot from an older version: skip what does not read
    return found


def totals_from(families: Families, when: float) -> Totals:
    """The figures the trends follow, from a metrics snapshot (``workermetrics.snapshot`` or a
    merge of several)."""
    by_source = {
        labels.get("source"): value
        for labels, value in _samples(families, "hubproxy_response_bytes")
    }
    hits = misses = requests = 0.0
    for labels, value in _samples(families, "hubproxy_cache_requests"):
        if labels.get("result") == "hit":
            hits += value
        elif labels.get("result") == "miss":
            misses += value
    for labels, value in _samples(families, "hubproxy_requests"):
        if labels.get("route") != "ops":
            requests += value
    remaining = sorted(
        (f"{labels.get('registry', '')} {labels.get('identity', '')}", value)
        for labels, value in _samples(families, "hubproxy_ratelimit_remaining")
    )
    return Totals(
        when=when,
        bytes_cache=by_source.get("cache", 0.0),
        bytes_upstream=by_source.get("upstream", 0.0),
        hits=hits,
        misses=misses,
        requests=requests,
        remaining=tuple(remaining[:MAX_ALLOWANCES]),
    )


class TrendRing:
    """The last ``points + 1`` samples (``points`` intervals), oldest first."""

    def __init__(self, points: int = POINTS, step: float = STEP) -> None:
        self.step = step
        self._samples: deque[Totals] = deque(maxlen=points + 1)

    def __len__(self) -> int:
        return len(self._samples)

    def add(self, totals: Totals) -> None:
        self._samples.append(totals)

    def samples(self) -> tuple[Totals, ...]:
        return tuple(self._samples)


Point = tuple[float, float | None]


@dataclass(frozen=True)
class TrendFigures:
    """Per-interval figures for the charts; x is seconds before ``now`` (<= 0)."""

    bytes_cache: tuple[Point, ...] = ()  # bytes per second
    bytes_upstream: tuple[Point, ...] = ()
    requests: tuple[Point, ...] = ()  # per minute
    hit_ratio: tuple[Point, ...] = ()  # 0..1, None for an interval without lookups
    remaining: tuple[tuple[str, tuple[Point, ...]], ...] = ()  # per allowance, as it stood
    span: float = POINTS * STEP


def _rate(after: float, before: float, seconds: float, per: float = 1.0) -> float:
    # a sum that went down (a worker restarted before its counts were retired) is no negative rate
    return max(0.0, after - before) / seconds * per


def trend_figures(
    samples: Sequence[Totals], now: float, span: float = POINTS * STEP
) -> TrendFigures:
    """The charts' points from consecutive samples (oldest first; a live one may end them):
    each interval's figures placed at its end."""
    cache: list[Point] = []
    upstream: list[Point] = []
    requests: list[Point] = []
    ratio: list[Point] = []
    for before, after in pairwise(samples):
        seconds = after.when - before.when
        if seconds <= 0:
            continue
        x = after.when - now
        cache.append((x, _rate(after.bytes_cache, before.bytes_cache, seconds)))
        upstream.append((x, _rate(after.bytes_upstream, before.bytes_upstream, seconds)))
        requests.append((x, _rate(after.requests, before.requests, seconds, per=60.0)))
        hits = max(0.0, after.hits - before.hits)
        lookups = hits + max(0.0, after.misses - before.misses)
        ratio.append((x, hits / lookups if lookups else None))
    lines: dict[str, list[Point]] = {}
    for sample in samples:
        for name, value in sample.remaining:
            if name in lines or len(lines) < MAX_ALLOWANCES:
                lines.setdefault(name, []).append((sample.when - now, value))
    return TrendFigures(
        bytes_cache=tuple(cache),
        bytes_upstream=tuple(upstream),
        requests=tuple(requests),
        hit_ratio=tuple(ratio),
        remaining=tuple((name, tuple(points)) for name, points in sorted(lines.items())),
        span=span,
    )


def has_data(points: Sequence[Point]) -> bool:
    """Whether a chart line has a value to draw."""
    return any(value is not None and math.isfinite(value) for _, value in points)


async def sample_trends(
    ring: TrendRing,
    read: Callable[[], Awaitable[Families]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Sample ``read()`` into ``ring`` now and every ``ring.step`` seconds, until cancelled.
    The samples keep to a fixed grid: a slow read does not make the minutes drift."""
    start = trio.current_time()
    ring.add(totals_from(await read(), start))
    task_status.started()
    ticks = 1
    while True:
        await trio.sleep_until(start + ticks * ring.step)
        ticks = max(ticks + 1, math.floor((trio.current_time() - start) / ring.step) + 1)
        ring.add(totals_from(await read(), trio.current_time()))
