"""Prometheus metrics for ``/metrics``: the text exposition format 0.0.4, with no dependency.

Theory of operation: every metric keeps its series in a dict from a tuple of label values (in
``labelnames`` order) to a number. Updating is a dict write, which is all a single-threaded trio
program needs: no locks. Rendering is a walk over those dicts through a few pure formatting
functions (``format_value``, ``escape_help``, ``escape_label_value``, ``format_sample``). The
``*Function`` metrics hold a callable instead of a dict and read it at render time, for figures
that another object already keeps (the cache's counts, ``/proc``).

A metric without labels exists, at zero, from the start; a labelled series appears when first
used, as Prometheus's own client libraries do. Using the wrong label names raises ValueError: it
is a programming error, never something a peer can cause.

``HubMetrics`` builds hubproxy's own metrics in their own ``Registry``.
"""

from __future__ import annotations

import functools
import math
import operator
import os
import re
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol, TypeVar

from .. import __version__
from ..net.buffers import BODIES
from ..net.pacing import CAPS as BANDWIDTH_CAPS
from ..net.pacing import PacingFigures
from ..policy.accounting import (
    IDENTITIES,
    PullAccounting,
    RanLow,
    RateLimitWatch,
    Recovered,
    WindowCounts,
)
from .activity import Activity
from .trends import TrendRing

if TYPE_CHECKING:
    from ..cache.manifests import ManifestStore
    from ..cache.store import BlobStore
    from ..net.pool import Pool
    from ..net.server import ConnectionFigures

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LabelValues = tuple[str, ...]
_HEADER_NAME = operator.itemgetter(0)
LabelPairs = tuple[tuple[str, str], ...]
Sample = tuple[str, LabelPairs, float]  # full sample name, labels, value
SeriesFunction = Callable[[], "float | Mapping[LabelValues, float]"]

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
_EXACT_INTEGERS = 2.0**53  # beyond this a float's integer digits are no longer exact

# -- formatting (pure) ---------------------------------------------------------------------------


def format_value(value: float) -> str:
    """A sample value as Prometheus writes it: ``+Inf``, ``-Inf``, ``NaN``; integers without a
    fraction or exponent (``76``, not ``76.0`` or ``7.6e1``); other floats by ``repr``, which is
    the shortest text that reads back to the same float."""
    value = float(value)  # an int (a bucket count) is a float to the type checker, not to 3.11
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < _EXACT_INTEGERS:
        return str(int(value))
    return repr(value)


def escape_help(text: str) -> str:
    """``# HELP`` text: only backslash and newline are escaped (format 0.0.4)."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def escape_label_value(text: str) -> str:
    """A label value between double quotes: backslash, double quote and newline escaped."""
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def format_sample(name: str, labels: LabelPairs, value: float) -> str:
    """One sample line, without its newline."""
    if not labels:
        return f"{name} {format_value(value)}"
    pairs = ",".join(f'{key}="{escape_label_value(val)}"' for key, val in labels)
    return f"{name}{{{pairs}}} {format_value(value)}"


# -- primitives ----------------------------------------------------------------------------------


class Metric:
    """A metric family: a name, a help text, a type, label names, and its samples."""

    kind: ClassVar[str] = "untyped"
    suffixes: ClassVar[tuple[str, ...]] = ("",)  # sample names are ``name + suffix``
    reserved_labels: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        if not _METRIC_NAME.match(name):
            raise ValueError(f"not a metric name: {name!r}")
        for label in labelnames:
            if not _LABEL_NAME.match(label) or label.startswith("__"):
                raise ValueError(f"not a label name: {label!r}")
            if label in self.reserved_labels:
                raise ValueError(f"label {label!r} is reserved for a {self.kind}")
        if len(set(labelnames)) != len(labelnames):
            raise ValueError(f"repeated label names: {labelnames!r}")
        self.name = name
        self.help = help
        self.labelnames: tuple[str, ...] = tuple(labelnames)
        self._values_of = _values_getter(self.labelnames)

    @property
    def sample_names(self) -> frozenset[str]:
        """Every name this family's lines may carry, for the registry's clash check."""
        return frozenset({self.name} | {self.name + suffix for suffix in self.suffixes})

    def _key(self, labels: Mapping[str, str]) -> LabelValues:
        # on every request: the common case (the right names) costs one C call
        if len(labels) == len(self.labelnames):
            try:
                return self._values_of(labels)
            except KeyError:
                pass
        if labels.keys() != set(self.labelnames):
            raise ValueError(
                f"{self.name} takes labels {sorted(self.labelnames)}, not {sorted(labels)}"
            )
        return tuple(str(labels[name]) for name in self.labelnames)

    def _pairs(self, key: LabelValues) -> LabelPairs:
        return tuple(zip(self.labelnames, key, strict=True))

    def samples(self) -> Iterator[Sample]:
        raise NotImplementedError

    def render(self) -> str:
        """The family's ``# HELP``, ``# TYPE`` and sample lines, each ending in a newline."""
        # In format 0.0.4 a counter's HELP and TYPE lines name its samples, ``x_total``, as the
        # Go and Python clients write them: a parser reads ``# TYPE x counter`` followed by
        # ``x_total`` samples as a counter with no samples plus a stray untyped metric.
        family = self.name + self.suffixes[0] if self.kind == "counter" else self.name
        lines = [f"# HELP {family} {escape_help(self.help)}", f"# TYPE {family} {self.kind}"]
        lines += [format_sample(*sample) for sample in self.samples()]
        return "\n".join(lines) + "\n"


def _values_getter(names: tuple[str, ...]) -> Callable[[Mapping[str, str]], LabelValues]:
    """A function from labels to their values in ``names`` order (KeyError if one is
    missing): ``itemgetter``, a tuple as it is for two names or more."""
    if len(names) >= 2:
        return operator.itemgetter(*names)
    if names:
        name = names[0]
        return lambda labels: (labels[name],)
    return lambda labels: ()


class _Series(Metric):
    """A family whose series are numbers kept here, one per tuple of label values."""

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help, labelnames)
        self._values: dict[LabelValues, float] = {}
        if not self.labelnames:
            self._values[()] = 0.0

    def get(self, **labels: str) -> float:
        """The current value of one series (0 if it was never used)."""
        return self._values.get(self._key(labels), 0.0)

    def series(self) -> dict[LabelValues, float]:
        """A copy of every series: label values (in ``labelnames`` order) to value."""
        return dict(self._values)

    def samples(self) -> Iterator[Sample]:
        name = self.name + self.suffixes[0]
        for key in sorted(self._values):
            yield name, self._pairs(key), self._values[key]


class Counter(_Series):
    """A value that only goes up. Named without ``_total``, which its exposition adds."""

    kind = "counter"
    suffixes = ("_total",)

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        if name.endswith("_total"):
            raise ValueError(f"name a counter without _total (it is added): {name!r}")
        super().__init__(name, help, labelnames)

    def inc(self, amount: float = 1.0, /, **labels: str) -> None:
        if amount < 0:
            raise ValueError(f"a counter only goes up, not by {amount}")
        key = self._key(labels) if labels or self.labelnames else ()
        self._values[key] = self._values.get(key, 0.0) + amount

    def inc_at(self, key: LabelValues, amount: float = 1.0) -> None:
        """``inc`` for the request path, several per request: ``key`` is the label values as
        strings in ``labelnames`` order, not checked (a keyword dict and its check cost more
        than the count itself)."""
        values = self._values
        values[key] = values.get(key, 0.0) + amount


class Gauge(_Series):
    """A value that goes up and down."""

    kind = "gauge"

    def set(self, value: float, /, **labels: str) -> None:
        # (no labels, the common case on the request path: no key to build)
        self._values[self._key(labels) if labels or self.labelnames else ()] = float(value)

    def inc(self, amount: float = 1.0, /, **labels: str) -> None:
        key = self._key(labels) if labels or self.labelnames else ()
        self._values[key] = self._values.get(key, 0.0) + amount

    def dec(self, amount: float = 1.0, /, **labels: str) -> None:
        self.inc(-amount, **labels)


class _FunctionSeries(Metric):
    """A family whose values are read from a callable at render time: a float without labels,
    or a mapping from label-value tuples to floats with them."""

    def __init__(
        self,
        name: str,
        help: str,
        function: SeriesFunction,
        labelnames: Sequence[str] = (),
    ) -> None:
        super().__init__(name, help, labelnames)
        self.function = function

    def series(self) -> dict[LabelValues, float]:
        """The callable's current values, checked against ``labelnames``."""
        found = self.function()
        if not self.labelnames:
            if isinstance(found, Mapping):
                raise ValueError(f"{self.name} has no labels but its function gave a mapping")
            return {(): float(found)}
        if not isinstance(found, Mapping):
            raise ValueError(f"{self.name} has labels but its function gave {found!r}")
        values: dict[LabelValues, float] = {}
        for key, value in found.items():
            if len(key) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, not {key!r}")
            values[tuple(str(part) for part in key)] = float(value)
        return values

    def samples(self) -> Iterator[Sample]:
        name = self.name + self.suffixes[0]
        values = self.series()
        for key in sorted(values):
            yield name, self._pairs(key), values[key]


class GaugeFunction(_FunctionSeries):
    """A gauge whose value another object keeps."""

    kind = "gauge"


class CounterFunction(_FunctionSeries):
    """A counter whose count another object keeps. Named without ``_total``."""

    kind = "counter"
    suffixes = ("_total",)

    def __init__(
        self,
        name: str,
        help: str,
        function: SeriesFunction,
        labelnames: Sequence[str] = (),
    ) -> None:
        if name.endswith("_total"):
            raise ValueError(f"name a counter without _total (it is added): {name!r}")
        super().__init__(name, help, function, labelnames)


@dataclass
class _Buckets:
    counts: list[int]  # per bucket, not cumulative; the last one is +Inf
    total: float = 0.0


class Histogram(Metric):
    """Observations counted into buckets by upper bound, plus their sum and count."""

    kind = "histogram"
    suffixes = ("_bucket", "_sum", "_count")
    reserved_labels = frozenset({"le"})

    def __init__(
        self,
        name: str,
        help: str,
        buckets: Sequence[float],
        labelnames: Sequence[str] = (),
    ) -> None:
        super().__init__(name, help, labelnames)
        bounds = [float(bound) for bound in buckets]
        if bounds and bounds[-1] == math.inf:
            bounds.pop()
        if not bounds or not all(math.isfinite(bound) for bound in bounds):
            raise ValueError(f"{name} needs finite bucket bounds, not {buckets!r}")
        if any(low >= high for low, high in pairwise(bounds)):
            raise ValueError(f"{name}'s bucket bounds must increase: {buckets!r}")
        self.bounds: tuple[float, ...] = (*bounds, math.inf)
        self._series: dict[LabelValues, _Buckets] = {}
        if not self.labelnames:
            self._series[()] = _Buckets([0] * len(self.bounds))

    def observe(self, value: float, /, **labels: str) -> None:
        key = self._key(labels)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _Buckets([0] * len(self.bounds))
        # ``le`` means "less than or equal": a value on a bound counts in that bound's bucket.
        # NaN compares false with everything; like Go's client it lands in +Inf only.
        index = len(self.bounds) - 1 if math.isnan(value) else bisect_left(self.bounds, value)
        series.counts[index] += 1
        series.total += value

    def count(self, **labels: str) -> int:
        """How many observations one series has had (0 if it was never used)."""
        series = self._series.get(self._key(labels))
        return 0 if series is None else sum(series.counts)

    def samples(self) -> Iterator[Sample]:
        for key in sorted(self._series):
            series = self._series[key]
            pairs = self._pairs(key)
            cumulative = 0
            for bound, count in zip(self.bounds, series.counts, strict=True):
                cumulative += count
                le = (("le", format_value(bound)),)
                yield f"{self.name}_bucket", pairs + le, cumulative
            yield f"{self.name}_sum", pairs, series.total
            yield f"{self.name}_count", pairs, cumulative


M = TypeVar("M", bound=Metric)


class Registry:
    """The metrics one ``/metrics`` endpoint exposes, in registration order."""

    def __init__(self) -> None:
        self._metrics: list[Metric] = []
        self._names: set[str] = set()

    def register(self, metric: M) -> M:
        """Add ``metric`` and return it; ValueError if any of its sample names is taken."""
        clash = metric.sample_names & self._names
        if clash:
            raise ValueError(f"metric names already registered: {sorted(clash)}")
        self._names |= metric.sample_names
        self._metrics.append(metric)
        return metric

    @property
    def metrics(self) -> tuple[Metric, ...]:
        """The metrics, in registration order (``--workers`` sums them across processes)."""
        return tuple(self._metrics)

    def render(self) -> bytes:
        """Every metric in the text exposition format 0.0.4 (see ``CONTENT_TYPE``)."""
        return "".join(metric.render() for metric in self._metrics).encode("utf-8")


# -- hubproxy's metrics --------------------------------------------------------------------------

ROUTES = ("ping", "manifest", "blob", "tags", "upload", "token", "search", "ops", "other")
RESPONSE_SOURCES = ("upstream", "cache")
_FROM_UPSTREAM, _FROM_CACHE = ((source,) for source in RESPONSE_SOURCES)
CACHE_KINDS = ("blob", "manifest")
CACHE_RESULTS = ("hit", "miss")
DENIAL_REASONS = ("network", "auth", "image", "rate")
UPSTREAM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
RATE_LIMIT_WINDOW = 3600.0  # the status page's "429s in the last hour"

_RATELIMIT_COUNT = re.compile(rb"[ \t]*[0-9]{1,15}(?:\.[0-9]+)?[ \t]*\Z")


def parse_ratelimit(value: bytes) -> float | None:
    """The count in a ``ratelimit-remaining`` (or ``-limit``) header, as Docker Hub sends it:
    ``76;w=21600`` -> 76.0 (the ``w`` parameter is the window in seconds). None for anything
    else: a peer's junk must not become a metric value."""
    match = _RATELIMIT_COUNT.match(value.split(b";", 1)[0])
    if match is None:
        return None
    return float(match.group(0).strip())


_PARAMETER_NUMBER = re.compile(rb"[ \t]*[0-9]{1,15}[ \t]*\Z")


def _parameter(value: bytes, name: bytes) -> float | None:
    """A numeric parameter of a ``ratelimit-*`` value: ``w`` of ``76;w=21600`` -> 21600.0."""
    for part in value.split(b";")[1:]:
        key, _, number = part.partition(b"=")
        if key.strip().lower() == name and _PARAMETER_NUMBER.match(number):
            return float(number.strip())
    return None


@dataclass(frozen=True)
class RateLimit:
    """What an upstream's latest ``ratelimit-*`` headers said. Docker Hub sends
    ``ratelimit-limit: 100;w=21600`` and ``ratelimit-remaining: 76;w=21600`` (``w``: the window
    in seconds); others send ``ratelimit-reset`` (seconds until the window resets)."""

    remaining: float
    limit: float | None = None
    window: float | None = None  # seconds
    reset: float | None = None  # Unix seconds
    seen: float = 0.0  # Unix seconds


def read_ratelimit(headers: Sequence[tuple[bytes, bytes]], *, wall: float) -> RateLimit | None:
    """The rate-limit figures of a response's headers, or None without a usable
    ``ratelimit-remaining``; ``wall`` is when they arrived (Unix seconds)."""
    if b"ratelimit-remaining" not in map(_HEADER_NAME, headers):
        return None  # (searched in C: twice per registry answer, and most say nothing of it)
    found: dict[bytes, bytes] = {}
    for key, value in headers:
        if key in (b"ratelimit-remaining", b"ratelimit-limit", b"ratelimit-reset"):
            found.setdefault(key, value)
    remaining_value = found.get(b"ratelimit-remaining")
    if remaining_value is None or (remaining := parse_ratelimit(remaining_value)) is None:
        return None
    limit_value = found.get(b"ratelimit-limit")
    limit = parse_ratelimit(limit_value) if limit_value is not None else None
    window = _parameter(remaining_value, b"w")
    if window is None and limit_value is not None:
        window = _parameter(limit_value, b"w")
    reset_value = found.get(b"ratelimit-reset")
    reset = parse_ratelimit(reset_value) if reset_value is not None else None
    return RateLimit(
        remaining=remaining,
        limit=limit,
        window=window,
        reset=wall + reset if reset is not None else None,
        seen=wall,
    )


def printable(value: bytes) -> str:
    """A peer's header value fit for a log line and a page: printable ASCII only."""
    return "".join(chr(b) for b in value if 0x21 <= b < 0x7F)


def resident_bytes(statm: str, page_size: int) -> float:
    """Resident set size from ``/proc/self/statm`` (pages: size resident shared ...)."""
    fields = statm.split()
    return float(int(fields[1]) * page_size)


@dataclass(frozen=True)
class CacheFigures:
    """What the blob cache reports to ``/metrics``; all zero when there is no cache."""

    bytes_used: int = 0
    blobs: int = 0
    limit_bytes: int = 0
    evictions: int = 0
    verification_failures: int = 0
    hits_hashed: int = 0  # reads of a cached blob that hashed it (--reverify-after)
    confirmations_shared: int = 0  # passed on here, sent to the other workers (--workers N)
    confirmations_received: int = 0  # passed on by another worker, kept here
    verifications_received: int = 0  # blob verifications another worker made, kept here
    pinned_bytes: int = 0
    filling_bytes: int = 0
    disk_free_bytes: int = 0  # free on the cache directory's disk


def cache_figures(store: BlobStore) -> CacheFigures:
    """The figures of an open ``BlobStore``: ``HubMetrics(cache=lambda: cache_figures(s))``."""
    return CacheFigures(
        bytes_used=store.total,
        blobs=len(store.index),
        limit_bytes=store.max_bytes,
        evictions=store.stats.evictions,
        verification_failures=store.stats.verification_failures,
        hits_hashed=store.stats.hits_hashed,
        confirmations_shared=store.stats.confirmations_shared,
        confirmations_received=store.stats.confirmations_received,
        verifications_received=store.stats.verifications_received,
        pinned_bytes=store.pinned_bytes,
        filling_bytes=store.filling_bytes,
        disk_free_bytes=store.disk_free(),
    )


@dataclass(frozen=True)
class ManifestFigures:
    """What the manifest store reports to ``/metrics``; all zero when there is no cache."""

    bytes_used: int = 0
    manifests: int = 0
    tags: int = 0
    limit_bytes: int = 0
    limit_entries: int = 0
    evictions: int = 0
    write_failures: int = 0
    uncached: int = 0


def manifest_figures(store: ManifestStore) -> ManifestFigures:
    """The figures of an open ``ManifestStore``: ``HubMetrics(manifests=lambda: ...)``."""
    return ManifestFigures(
        bytes_used=store.total,
        manifests=len(store.sizes),
        tags=store.tag_count,
        limit_bytes=store.max_bytes,
        limit_entries=store.max_entries,
        evictions=store.stats.evictions,
        write_failures=store.stats.write_failures,
        uncached=store.stats.uncached,
    )


class RecentEvents:
    """Times of recent events in a sliding window, e.g. the 429s of the last hour.

    The caller passes the times in (wall clock, as the status page shows them); this class
    never reads a clock. At most ``limit`` times are kept, so a flood costs bounded memory and
    ``count`` then reads "at least ``limit``"."""

    def __init__(self, window: float = RATE_LIMIT_WINDOW, limit: int = 10_000) -> None:
        self.window = window
        self._times: deque[float] = deque(maxlen=limit)
        self.last: float | None = None

    def add(self, when: float) -> None:
        self._times.append(when)
        self.last = when if self.last is None else max(self.last, when)

    def count(self, now: float) -> int:
        """How many events happened in the window ending at ``now``."""
        while self._times and self._times[0] <= now - self.window:
            self._times.popleft()
        return sum(1 for when in self._times if when <= now)


CacheSource = Callable[[], CacheFigures | None]
ConnectionSource = Callable[[], "ConnectionFigures"]
CONNECTION_STATES = ("handshake", "idle", "active")
# the reasons a connection is refused (admission.Connection values), shown at 0 from the start
CONNECTION_REFUSALS = ("max-connections", "max-connections-per-client")


@dataclass(frozen=True)
class PoolFigures:
    """What the upstream connection pool reports to ``/metrics`` (see ``net/pool.py``)."""

    in_use: Mapping[LabelValues, float]  # (origin, lane) -> slots held now
    waiting: Mapping[LabelValues, float]  # (origin, lane) -> requests waiting for a slot now
    idle: Mapping[LabelValues, float]  # (origin,) -> idle pooled connections
    waits: Mapping[LabelValues, float]  # (origin, lane) -> requests that had to wait
    wait_timeouts: Mapping[LabelValues, float]  # (origin, lane) -> waits that ended in a 503
    swept: int  # idle connections the sweeper closed
    limits: Mapping[LabelValues, float]  # ("per_origin",), ("per_client",), ("reserve_small",)


def _series(items: Iterable[tuple[tuple[str, ...], int]]) -> dict[LabelValues, float]:
    return {key: float(value) for key, value in items}


def pool_figures(pool: Pool) -> PoolFigures:
    """The figures of a ``Pool``: ``metrics.pool = lambda: pool_figures(pool)``."""
    limits = pool.limits
    return PoolFigures(
        in_use=_series(pool.slots_in_use().items()),
        waiting=_series(pool.waiting().items()),
        idle=_series(((origin,), count) for origin, count in pool.idle_by_origin().items()),
        waits=_series(pool.waits.items()),
        wait_timeouts=_series(pool.wait_timeouts.items()),
        swept=pool.swept,
        limits={
            ("per_origin",): limits.per_origin,
            ("per_client",): limits.per_client,
            ("reserve_small",): limits.reserve,
        },
    )


PoolSource = Callable[[], PoolFigures]


class PeerSource(Protocol):
    """The --peer instances as /metrics and the status page read them
    (``cache.peering.Peers``)."""

    @property
    def names(self) -> tuple[str, ...]: ...  # each peer's origin, in the list's order

    @property
    def me(self) -> int: ...  # this instance's index in ``names``

    @property
    def resting_until(self) -> Sequence[float]: ...  # per peer, on trio's clock

    def resting(self) -> Mapping[tuple[str, ...], float]: ...

    def fetches(self) -> Mapping[tuple[str, ...], float]: ...


class Described(Protocol):
    @property
    def description(self) -> str: ...


class StoreSource(Protocol):
    """The --cache-store as /metrics and the status page read it
    (``cache.shared.SharedStore``)."""

    @property
    def objects(self) -> Described: ...  # its description: where the store is

    @property
    def commits(self) -> int: ...

    @property
    def reads(self) -> int: ...

    @property
    def too_large(self) -> int: ...

    @property
    def resting_until(self) -> float: ...  # on trio's clock: lookups skip the store until then


_NO_PACING = PacingFigures()
_NO_POOL = PoolFigures({}, {}, {}, {}, {}, 0, {})
ManifestSource = Callable[[], ManifestFigures | None]


class HubMetrics:
    """hubproxy's metrics, registered in their own ``Registry``.

    ``cache`` is a callable returning the cache's ``CacheFigures`` (or None: no cache), and
    ``manifests`` the manifest store's ``ManifestFigures``; they may also be assigned later,
    once the cache is open. ``connections`` likewise returns the server's
    ``ConnectionFigures`` (``Server.figures``), once there is a server. ``proc`` is
    ``/proc/self`` except in tests.
    """

    def __init__(
        self,
        *,
        version: str = __version__,
        cache: CacheSource | None = None,
        manifests: ManifestSource | None = None,
        started_at: float | None = None,
        proc: Path = Path("/proc/self"),
    ) -> None:
        self.version = version
        self.cache = cache
        self.connections: ConnectionSource | None = None
        self.pool: PoolSource | None = None  # assigned by whoever owns the pool (the forwarder)
        # --peer and --cache-store, assigned by ops.operations when configured
        self.peers: PeerSource | None = None
        self.store: StoreSource | None = None
        self.manifests = manifests
        self.started_at = time.time() if started_at is None else started_at
        self.proc = proc
        self.rate_limited_times = RecentEvents()
        self.activity = Activity()  # transfers, upstream states, pulls: the status page's
        self.ratelimits: dict[str, RateLimit] = {}  # upstream origin -> its latest headers
        self.prefetch_status: str | None = None  # the prefetch list's last round, in words
        # who spent the rate limit (item 5): the app replaces it with the configured window
        self.accounting = PullAccounting()
        self.allowances = RateLimitWatch()  # per registry and identity, with the low warning
        self.trends = TrendRing()  # the status page's last hour, sampled by ops.trends
        self.registry = registry = Registry()

        self.requests = registry.register(
            Counter(
                "hubproxy_requests", "Requests answered, by route and status.", ("route", "status")
            )
        )
        self.response_bytes = registry.register(
            Counter(
                "hubproxy_response_bytes",
                "Response body bytes sent to clients, by source, counted as they leave (a long "
                "transfer moves it while it runs).",
                ("source",),
            )
        )
        self.cache_requests = registry.register(
            Counter(
                "hubproxy_cache_requests", "Cache lookups, by kind and result.", ("kind", "result")
            )
        )
        self.cache_hit_ratio = registry.register(
            GaugeFunction(
                "hubproxy_cache_hit_ratio",
                "Cache hits / lookups over blobs and manifests since start (0 if none).",
                self.hit_ratio,
            )
        )
        self.upstream_latency = registry.register(
            Histogram(
                "hubproxy_upstream_response_seconds",
                "Time from sending a request upstream to its response head.",
                UPSTREAM_BUCKETS,
                ("upstream",),
            )
        )
        self.upstream_rate_limited = registry.register(
            Counter(
                "hubproxy_upstream_rate_limited",
                "429 responses received from upstreams.",
                ("upstream",),
            )
        )
        self.failovers = registry.register(
            Counter(
                "hubproxy_failovers",
                "Requests moved from one upstream to another.",
                ("from_upstream", "to_upstream"),
            )
        )
        self.ratelimit_remaining = registry.register(
            Gauge(
                "hubproxy_upstream_ratelimit_remaining",
                "The latest ratelimit-remaining an upstream sent.",
                ("upstream",),
            )
        )
        self._register_accounting(registry)
        self.client_connections = registry.register(
            GaugeFunction(
                "hubproxy_client_connections",
                "Client connections open now, by state: TLS handshake, idle (waiting for a "
                "request), active (a request being served).",
                self._connection_states,
                ("state",),
            )
        )
        self.refused_connections = registry.register(
            CounterFunction(
                "hubproxy_refused_connections",
                "Client connections refused, by the limit they met.",
                self._connection_refusals,
                ("reason",),
            )
        )
        self.reclaimed_connections = registry.register(
            CounterFunction(
                "hubproxy_reclaimed_connections",
                "Idle client connections closed to make room under --max-connections.",
                self._reclaimed_connections,
            )
        )
        self.client_turns_waiting = registry.register(
            GaugeFunction(
                "hubproxy_client_turns_waiting",
                "Requests waiting for a turn of their address (--max-pending-per-client).",
                lambda: self._turn_figure("turn_waiting"),
            )
        )
        self.client_turn_waits = registry.register(
            CounterFunction(
                "hubproxy_client_turn_waits",
                "Requests that waited for a turn of their address (--max-pending-per-client).",
                lambda: self._turn_figure("turn_waits"),
            )
        )
        self.client_turn_timeouts = registry.register(
            CounterFunction(
                "hubproxy_client_turn_timeouts",
                "Requests answered 503 after waiting --pool-wait-timeout for a turn of their "
                "address.",
                lambda: self._turn_figure("turn_timeouts"),
            )
        )
        self.fair_share_waits = registry.register(
            CounterFunction(
                "hubproxy_fair_share_waits",
                "Units of TLS work (a handshake step, a chunk to decrypt or encrypt) held for a "
                "later scheduler round, so that a busier client address goes after a lighter one.",
                lambda: self._turn_figure("fair_share_waits"),
            )
        )
        self.kernel_tls_connections = registry.register(
            CounterFunction(
                "hubproxy_kernel_tls_connections",
                "Client TLS connections whose sending side the kernel encrypted (--ktls): hits "
                "on them went out with sendfile.",
                lambda: self._turn_figure("kernel_tls"),
            )
        )
        self.body_memory_limit = registry.register(
            GaugeFunction(
                "hubproxy_body_memory_limit_bytes",
                "--body-memory: the buffers of blob bodies in flight; chunks shrink from 256 KiB "
                "as more transfers run (each worker its part: summed, the mirror's).",
                lambda: float(BODIES.budget),
            )
        )
        self.body_transfers = registry.register(
            GaugeFunction(
                "hubproxy_body_transfers",
                "Blob bodies being moved now (upstream reads and cache readers), which share "
                "--body-memory.",
                lambda: float(BODIES.running),
            )
        )
        self.bandwidth_client_limit = registry.register(
            GaugeFunction(
                "hubproxy_bandwidth_client_limit_bytes_per_second",
                "--client-bandwidth: the most bytes per second sent to one client address "
                "(0: no cap).",
                lambda: float(self._bandwidth().caps.client or 0),
            )
        )
        self.bandwidth_total_limit = registry.register(
            GaugeFunction(
                "hubproxy_bandwidth_total_limit_bytes_per_second",
                "--total-bandwidth: the most bytes per second sent to all clients together "
                "(0: no cap).",
                lambda: float(self._bandwidth().caps.total or 0),
            )
        )
        self.bandwidth_delayed = registry.register(
            CounterFunction(
                "hubproxy_bandwidth_delayed_bytes",
                "Response bytes that waited for a bandwidth cap before being sent, by cap.",
                lambda: {(cap,): float(n) for cap, n in self._bandwidth_counts(True).items()},
                ("cap",),
            )
        )
        self.bandwidth_paced = registry.register(
            CounterFunction(
                "hubproxy_bandwidth_paced_seconds",
                "Time responses waited for a bandwidth cap, summed over responses, by cap.",
                lambda: {(cap,): float(n) for cap, n in self._bandwidth_counts(False).items()},
                ("cap",),
            )
        )
        self.bandwidth_paced_clients = registry.register(
            GaugeFunction(
                "hubproxy_bandwidth_paced_clients",
                "Client addresses with a response waiting for a bandwidth cap now.",
                lambda: float(self._bandwidth().paced_clients),
            )
        )
        self.denied = registry.register(
            Counter("hubproxy_denied_requests", "Requests refused, by reason.", ("reason",))
        )
        self.cache_bytes = registry.register(
            GaugeFunction(
                "hubproxy_cache_bytes",
                "Bytes of blobs in the cache.",
                lambda: self._cache().bytes_used,
            )
        )
        self.cache_blobs = registry.register(
            GaugeFunction(
                "hubproxy_cache_blobs", "Blobs in the cache.", lambda: self._cache().blobs
            )
        )
        self.cache_limit = registry.register(
            GaugeFunction(
                "hubproxy_cache_limit_bytes",
                "The cache's size limit (0: no cache).",
                lambda: self._cache().limit_bytes,
            )
        )
        self.cache_pinned = registry.register(
            GaugeFunction(
                "hubproxy_cache_pinned_bytes",
                "Bytes of cached blobs open by readers: not evictable, counted in the limit.",
                lambda: self._cache().pinned_bytes,
            )
        )
        self.cache_filling = registry.register(
            GaugeFunction(
                "hubproxy_cache_filling_bytes",
                "Full sizes of the cache fills under way, reserved within the limit.",
                lambda: self._cache().filling_bytes,
            )
        )
        self.cache_disk_free = registry.register(
            GaugeFunction(
                "hubproxy_cache_disk_free_bytes",
                "Bytes free on the cache directory's disk (0: no cache); fills keep 64 MiB of it "
                "(5% of a disk under 1.25 GiB) free.",
                lambda: self._cache().disk_free_bytes,
            )
        )
        self.cache_evictions = registry.register(
            CounterFunction(
                "hubproxy_cache_evictions",
                "Blobs evicted from the cache.",
                lambda: self._cache().evictions,
            )
        )
        self.cache_verification_failures = registry.register(
            CounterFunction(
                "hubproxy_cache_verification_failures",
                "Cache fills, and cached blobs read back, whose digest did not match.",
                lambda: self._cache().verification_failures,
            )
        )
        self.cache_hits_hashed = registry.register(
            CounterFunction(
                "hubproxy_cache_hits_hashed",
                "Reads of a cached blob that hashed it against its digest (a file not verified "
                "in this process, changed on disk, or verified longer ago than "
                "--reverify-after).",
                lambda: self._cache().hits_hashed,
            )
        )
        self.cache_confirmations_shared = registry.register(
            CounterFunction(
                "hubproxy_access_confirmations_shared",
                "Access confirmations a manifest passed on in this worker, sent to the other "
                "workers of --workers N.",
                lambda: self._cache().confirmations_shared,
            )
        )
        self.cache_confirmations_received = registry.register(
            CounterFunction(
                "hubproxy_access_confirmations_received",
                "Access confirmations another worker of --workers N passed on, kept here.",
                lambda: self._cache().confirmations_received,
            )
        )
        self.cache_verifications_received = registry.register(
            CounterFunction(
                "hubproxy_cache_verifications_received",
                "Cached blobs another worker of --workers N hashed to their digest (or carried "
                "a verification of across its own mtime move), kept here for the same file: "
                "not hashed again on their next read.",
                lambda: self._cache().verifications_received,
            )
        )
        self.upstream_slots = registry.register(
            GaugeFunction(
                "hubproxy_upstream_slots_in_use",
                "Connections to an upstream origin in use now, by lane (bulk: blob bodies; "
                "small: tokens, manifests, pings, HEADs).",
                lambda: self._pool().in_use,
                ("origin", "lane"),
            )
        )
        self.upstream_slot_waiting = registry.register(
            GaugeFunction(
                "hubproxy_upstream_slot_waiting",
                "Requests waiting now for a connection to an upstream origin, by lane.",
                lambda: self._pool().waiting,
                ("origin", "lane"),
            )
        )
        self.upstream_idle = registry.register(
            GaugeFunction(
                "hubproxy_upstream_idle_connections",
                "Idle pooled connections to an upstream origin.",
                lambda: self._pool().idle,
                ("origin",),
            )
        )
        self.upstream_slot_waits = registry.register(
            CounterFunction(
                "hubproxy_upstream_slot_waits",
                "Requests that had to wait for a connection to an upstream origin, by lane.",
                lambda: self._pool().waits,
                ("origin", "lane"),
            )
        )
        self.upstream_slot_wait_timeouts = registry.register(
            CounterFunction(
                "hubproxy_upstream_slot_wait_timeouts",
                "Waits for a connection to an upstream origin that timed out (a 503 answer).",
                lambda: self._pool().wait_timeouts,
                ("origin", "lane"),
            )
        )
        self.upstream_swept = registry.register(
            CounterFunction(
                "hubproxy_upstream_idle_swept",
                "Idle pooled connections closed for being past the keep-alive or closed by "
                "the upstream.",
                lambda: self._pool().swept,
            )
        )
        self.upstream_slot_limits = registry.register(
            GaugeFunction(
                "hubproxy_upstream_slot_limit",
                "Connection slots per upstream origin: per_origin in all, per_client for one "
                "client address, reserve_small never taken by blob transfers.",
                lambda: self._pool().limits,
                ("limit",),
            )
        )
        self.manifest_bytes_in_flight = registry.register(
            Gauge(
                "hubproxy_manifest_bytes_in_flight",
                "Bytes of manifests being buffered from upstreams now (--manifest-memory).",
            )
        )
        self.manifest_memory_limit = registry.register(
            Gauge(
                "hubproxy_manifest_memory_limit_bytes",
                "The --manifest-memory limit (0: no cache).",
            )
        )
        self.manifest_bytes_sending = registry.register(
            Gauge(
                "hubproxy_manifest_bytes_sending",
                "Bytes of manifest bodies held for sending to clients now, each counted once.",
            )
        )
        self.manifest_send_waits = registry.register(
            Counter(
                "hubproxy_manifest_send_waits",
                "Manifest senders that waited for room to hold their body (--manifest-memory: "
                "a quarter of it per client address, at least one 4 MiB manifest).",
            )
        )
        registry.register(
            GaugeFunction(
                "hubproxy_peer_resting",
                "1 for a --peer skipped now after a failure (down, silent past --peer-timeout, "
                "an error): its blobs are fetched from the upstream meanwhile; 0 for the others.",
                lambda: self.peers.resting() if self.peers is not None else {},
                ("peer",),
            )
        )
        registry.register(
            CounterFunction(
                "hubproxy_peer_fetches",
                "Blob misses sent to their owner among the --peer instances, by what came of "
                "it: filled (from its answer), passed (its 403/404), upstream (asked there "
                "instead).",
                lambda: self.peers.fetches() if self.peers is not None else {},
                ("peer", "result"),
            )
        )
        for name, help_text, field_name in (
            ("hubproxy_store_commits", "Blobs committed to the --cache-store.", "commits"),
            ("hubproxy_store_reads", "Blobs read from the --cache-store into the cache.", "reads"),
            (
                "hubproxy_store_too_large",
                "Blobs not committed to the --cache-store for their size (kept locally).",
                "too_large",
            ),
            (
                "hubproxy_store_redirects",
                "Blob hits answered with a 307 to a presigned URL of the --cache-store "
                "(--redirect-hits): their bytes went from the store to the client.",
                "redirects",
            ),
            (
                "hubproxy_store_state_writes",
                "Manifests, tags, links and readability answers written to the --cache-store.",
                "state_writes",
            ),
            (
                "hubproxy_store_state_writes_dropped",
                "Writes of manifest state dropped: their queue to the --cache-store was full.",
                "state_dropped",
            ),
            (
                "hubproxy_store_state_write_failures",
                "Writes of manifest state the --cache-store failed.",
                "state_write_failures",
            ),
            (
                "hubproxy_store_state_reads",
                "Manifests, links and readability answers taken from the --cache-store (this "
                "instance had none).",
                "state_reads",
            ),
            (
                "hubproxy_store_state_refused",
                "Manifests in the --cache-store refused: they do not match their digest "
                "(deleted there, never served).",
                "state_refused",
            ),
        ):
            registry.register(
                CounterFunction(
                    name,
                    help_text,
                    functools.partial(self._store_count, field_name),
                )
            )
        registry.register(
            CounterFunction(
                "hubproxy_store_evicted",
                "Blobs this instance evicted from the --cache-store, least recently used first "
                "(--cache-store-size).",
                functools.partial(self._budget_figure, "evicted"),
            )
        )
        registry.register(
            GaugeFunction(
                "hubproxy_store_bytes",
                "Bytes of blobs in the --cache-store at this instance's last sweep, plus what it "
                "committed since (--cache-store-size; 0 without one).",
                functools.partial(self._budget_figure, "bucket_bytes"),
            )
        )
        registry.register(
            GaugeFunction(
                "hubproxy_store_limit_bytes",
                "The --cache-store-size budget (0: none).",
                functools.partial(self._budget_figure, "budget"),
            )
        )
        self.manifest_fetch_waits = registry.register(
            Counter(
                "hubproxy_manifest_fetch_waits",
                "Manifest misses that waited before asking the upstream: their client's "
                "manifests already filled its share of --manifest-memory unread.",
            )
        )
        self.manifest_send_wait_timeouts = registry.register(
            Counter(
                "hubproxy_manifest_send_wait_timeouts",
                "Manifest senders answered 503 after waiting --read-timeout for room.",
            )
        )
        self.negative_cache_hits = registry.register(
            Counter(
                "hubproxy_negative_cache_hits",
                "Manifest requests answered 404 from memory: the upstream said 404 to the same "
                "request within --negative-ttl.",
            )
        )
        self.negative_cache_entries = registry.register(
            Gauge(
                "hubproxy_negative_cache_entries",
                "Upstream 404s to manifests remembered now (at most --manifest-cache-entries).",
            )
        )
        self.manifest_fetches_shared = registry.register(
            Counter(
                "hubproxy_manifest_fetches_shared",
                "Manifest requests answered from another request's upstream fetch.",
            )
        )
        self.manifest_bytes = registry.register(
            GaugeFunction(
                "hubproxy_manifest_cache_bytes",
                "Bytes of manifests in the cache.",
                lambda: self._manifests().bytes_used,
            )
        )
        self.manifest_count = registry.register(
            GaugeFunction(
                "hubproxy_manifest_cache_manifests",
                "Manifests in the cache.",
                lambda: self._manifests().manifests,
            )
        )
        self.manifest_tags = registry.register(
            GaugeFunction(
                "hubproxy_manifest_cache_tags",
                "Tags known (per kind of client) in the cache.",
                lambda: self._manifests().tags,
            )
        )
        self.manifest_limit = registry.register(
            GaugeFunction(
                "hubproxy_manifest_cache_limit_bytes",
                "The manifest cache's size limit (0: no cache).",
                lambda: self._manifests().limit_bytes,
            )
        )
        self.manifest_entries_limit = registry.register(
            GaugeFunction(
                "hubproxy_manifest_cache_limit_entries",
                "The most manifests, tags, links and repositories kept (each).",
                lambda: self._manifests().limit_entries,
            )
        )
        self.manifest_evictions = registry.register(
            CounterFunction(
                "hubproxy_manifest_cache_evictions",
                "Manifests evicted from the cache.",
                lambda: self._manifests().evictions,
            )
        )
        self.manifest_write_failures = registry.register(
            CounterFunction(
                "hubproxy_manifest_cache_write_failures",
                "Writes of manifest state that failed (a full disk, an I/O error).",
                lambda: self._manifests().write_failures,
            )
        )
        self.manifest_uncached = registry.register(
            CounterFunction(
                "hubproxy_manifest_cache_uncached",
                "Verified manifests served without being stored (too large, or the disk behind).",
                lambda: self._manifests().uncached,
            )
        )
        self.build_info = registry.register(
            GaugeFunction(
                "hubproxy_build_info",
                "Always 1; the version is in the label.",
                lambda: {(version,): 1.0},
                ("version",),
            )
        )
        self.start_time = registry.register(
            Gauge("hubproxy_start_time_seconds", "When hubproxy started, in Unix seconds.")
        )
        self.start_time.set(self.started_at)
        self.resident_memory = registry.register(
            GaugeFunction(
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                self._resident_memory,
            )
        )
        self.open_fds = registry.register(
            GaugeFunction("process_open_fds", "Open file descriptors.", self._open_fds)
        )

    def _store_count(self, field_name: str) -> float:
        return float(getattr(self.store, field_name, 0))

    def _budget_figure(self, field_name: str) -> float:
        # --cache-store-size: the store's BucketBudget (cache/bucket.py), if it has one
        return float(getattr(getattr(self.store, "budget", None), field_name, None) or 0)

    def _cache(self) -> CacheFigures:
        figures = self.cache() if self.cache is not None else None
        return CacheFigures() if figures is None else figures

    def _connection_figures(self) -> ConnectionFigures | None:
        return self.connections() if self.connections is not None else None

    def _reclaimed_connections(self) -> float:
        figures = self._connection_figures()
        return figures.reclaimed if figures is not None else 0

    def _turn_figure(self, name: str) -> float:
        figures = self._connection_figures()
        return float(getattr(figures, name)) if figures is not None else 0.0

    def _bandwidth(self) -> PacingFigures:
        figures = self._connection_figures()
        return figures.bandwidth if figures is not None else _NO_PACING

    def _bandwidth_counts(self, delayed: bool) -> dict[str, float]:
        figures = self._bandwidth()
        counts = figures.delayed_bytes if delayed else figures.paced_seconds
        return {cap: float(counts.get(cap, 0)) for cap in BANDWIDTH_CAPS}

    def _connection_states(self) -> dict[LabelValues, float]:
        figures = self._connection_figures()
        if figures is None:
            return {(state,): 0.0 for state in CONNECTION_STATES}
        return {
            ("handshake",): figures.handshake,
            ("idle",): figures.idle,
            ("active",): figures.active,
        }

    def _connection_refusals(self) -> dict[LabelValues, float]:
        figures = self._connection_figures()
        refused = figures.refused if figures is not None else {}
        counts: dict[LabelValues, float] = {(reason,): 0.0 for reason in CONNECTION_REFUSALS}
        for reason, count in refused.items():
            counts[reason,] = count
        return counts

    def _pool(self) -> PoolFigures:
        return self.pool() if self.pool is not None else _NO_POOL

    def _manifests(self) -> ManifestFigures:
        figures = self.manifests() if self.manifests is not None else None
        return ManifestFigures() if figures is None else figures

    def _resident_memory(self) -> float:
        try:
            statm = (self.proc / "statm").read_text()
            return resident_bytes(statm, os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError, IndexError):  # not Linux, or /proc not mounted
            return 0.0

    def _open_fds(self) -> float:
        try:
            return float(len(os.listdir(self.proc / "fd")))
        except OSError:
            return 0.0

    def hit_ratio(self) -> float:
        """Cache hits / (hits + misses) over blob and manifest lookups; 0 before any."""
        hits = misses = 0.0
        for (kind, result), count in self.cache_requests.series().items():
            if kind in CACHE_KINDS and result == "hit":
                hits += count
            elif kind in CACHE_KINDS and result == "miss":
                misses += count
        return hits / (hits + misses) if hits + misses else 0.0

    def count_request(
        self, route: str, *, status: int, source: str, bytes_sent: int, caching: bool
    ) -> None:
        """One answered request: ``route`` is its label (``routing.route_label`` or "ops"),
        ``source`` where its body came from ("cache", "cache-fill", an upstream origin, or "-"
        for none), ``caching`` whether a cache is configured (hits and misses are counted).
        ``bytes_sent``: body bytes not counted yet by ``count_sent`` (0 when they all were)."""
        self.requests.inc_at((route, str(status or 499)))
        if caching and route in ("blob", "manifest"):
            if source in ("cache", "redirect"):  # redirect: a hit sent to the store's URL
                self.cache_requests.inc_at((route, "hit"))
            elif 200 <= status < 300:
                self.cache_requests.inc_at((route, "miss"))
        if bytes_sent:
            self.count_sent(route, source, bytes_sent)

    def count_sent(self, route: str, source: str, count: int) -> None:
        """Body bytes that just left for a client, counted as they leave (not when the
        response ends), so that ``hubproxy_response_bytes`` moves during a long transfer."""
        if source == "cache":
            self.response_bytes.inc_at(_FROM_CACHE, count)
        elif source not in ("-", "redirect") and route != "ops":
            self.response_bytes.inc_at(_FROM_UPSTREAM, count)

    def requests_served(self) -> float:
        """Requests answered, the operator's own (the status page, ``/metrics``, the health
        checks: route "ops") left out."""
        return sum(count for (route, _), count in self.requests.series().items() if route != "ops")

    def note_ratelimit(self, upstream: str, value: bytes) -> None:
        """Record an upstream's ``ratelimit-remaining`` header value, if it is a number."""
        remaining = parse_ratelimit(value)
        if remaining is not None:
            self.ratelimit_remaining.set(remaining, upstream=upstream)

    def note_ratelimit_headers(
        self, upstream: str, headers: Sequence[tuple[bytes, bytes]], wall: float
    ) -> None:
        """Record what a response head of ``upstream`` said of its rate limit, if anything:
        the remaining count for ``/metrics``, with the limit, window and reset for the page."""
        found = read_ratelimit(headers, wall=wall)
        if found is not None:
            self.ratelimit_remaining.set(found.remaining, upstream=upstream)
            self.ratelimits[upstream] = found

    def note_rate_limited(self, upstream: str, when: float) -> None:
        """Count a 429 from ``upstream`` received at wall-clock time ``when``."""
        self.upstream_rate_limited.inc(upstream=upstream)
        self.rate_limited_times.add(when)

    def _register_accounting(self, registry: Registry) -> None:
        """The pull accounting's families (see ``policy.accounting``). Per-client and per-image
        series are capped: the ``accounting.top_n`` largest, the rest as one ``other``."""
        self.pulls = registry.register(
            Counter(
                "hubproxy_pulls",
                "Pulls as Docker Hub counts them: manifest GETs answered 2xx to clients (HEADs "
                "and blobs are not pulls), by registry.",
                ("registry",),
            )
        )
        self.upstream_pulls = registry.register(
            Counter(
                "hubproxy_upstream_pulls",
                "Manifest GETs hubproxy sent upstream and got a manifest for (what the "
                "upstream's rate limit counts), by registry and identity (anonymous, operator: "
                "--registry-login, client: the client's own token).",
                ("registry", "identity"),
            )
        )
        top = "the --accounting-top largest, the rest summed as"
        self.client_pulls = registry.register(
            GaugeFunction(
                "hubproxy_client_pulls",
                "Pulls in the last --accounting-window by client address (an IPv6 /64) or "
                f'mirror user (user:NAME): {top} client="other".',
                lambda: self._ranking(lambda a: a.clients),
                ("client",),
            )
        )
        self.image_pulls = registry.register(
            GaugeFunction(
                "hubproxy_image_pulls",
                f'Pulls in the last --accounting-window by image: {top} image="other".',
                lambda: self._ranking(lambda a: a.images),
                ("image",),
            )
        )
        self.upstream_image_pulls = registry.register(
            GaugeFunction(
                "hubproxy_upstream_image_pulls",
                "Manifest GETs sent upstream in the last --accounting-window by image: "
                f'{top} image="other".',
                lambda: self._ranking(lambda a: a.upstream_images),
                ("image",),
            )
        )
        self.allowance_remaining = registry.register(
            Gauge(
                "hubproxy_ratelimit_remaining",
                "Pulls left, as the upstream's latest ratelimit-remaining said, by registry "
                "and identity.",
                ("registry", "identity"),
            )
        )
        self.allowance_limit = registry.register(
            Gauge(
                "hubproxy_ratelimit_limit",
                "The upstream's ratelimit-limit (pulls per window), by registry and identity.",
                ("registry", "identity"),
            )
        )
        self.allowance_low = registry.register(
            Gauge(
                "hubproxy_ratelimit_low",
                "1 while the pulls left are under 10% of the limit (the warning was logged).",
                ("registry", "identity"),
            )
        )

    def _ranking(self, table: Callable[[PullAccounting], WindowCounts]) -> dict[LabelValues, float]:
        # looked up at each render: the app replaces ``accounting`` with the configured one
        accounting = self.accounting
        return table(accounting).top(time.monotonic(), accounting.top_n).labelled()

    def note_client_pull(self, *, registry: str, client: str, image: str) -> None:
        """A manifest GET answered 2xx to ``client`` (``accounting.client_name``)."""
        self.pulls.inc_at((registry,))
        self.accounting.client_pull(client=client, image=image, now=time.monotonic())

    def note_upstream_pull(self, *, registry: str, identity: str, image: str) -> None:
        """A manifest GET hubproxy sent upstream, answered 2xx."""
        if identity not in IDENTITIES:
            raise ValueError(f"not an identity: {identity!r}")
        self.upstream_pulls.inc(registry=registry, identity=identity)
        self.accounting.upstream_pull(image=image, now=time.monotonic())

    def note_allowance(
        self,
        *,
        registry: str,
        identity: str,
        headers: Iterable[tuple[bytes, bytes]],
        wall: float,
    ) -> RanLow | Recovered | None:
        """What an upstream answer said of ``identity``'s rate limit at ``registry``; returns
        the warning (or recovery) to log, once per fall under 10%."""
        headers = list(headers)
        found = read_ratelimit(headers, wall=wall)
        if found is None:
            return None
        source = b""
        for key, value in headers:
            if key == b"docker-ratelimit-source":
                source = value[:64]
                break
        note = self.allowances.note(
            registry=registry,
            identity=identity,
            remaining=found.remaining,
            limit=found.limit,
            window=found.window,
            source=printable(source),
            wall=wall,
        )
        labels = {"registry": registry, "identity": identity}
        self.allowance_remaining.set(found.remaining, **labels)
        if found.limit is not None:
            self.allowance_limit.set(found.limit, **labels)
        current = self.allowances.latest(registry, identity)
        self.allowance_low.set(float(current is not None and current.low), **labels)
        return note

    def render(self) -> bytes:
        return self.registry.render()
