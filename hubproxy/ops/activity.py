"""What the mirror is doing now, for the status page and the log: transfers under way, how each
upstream is doing, and the pulls (``policy.pulls``).

Plain holders fed by the parts that see the events (``proxy``, ``forwarder``); none of them reads
a clock or does I/O: every time is passed in. Each is bounded: transfers by the connections open,
upstreams by the configuration (only configured upstream origins are fed in), pulls by
``policy.pulls``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Protocol

from ..policy.pulls import PullTracker


class Progress(Protocol):
    """What a transfer's progress is read from (``net.server.AccessRecord``)."""

    client: str
    bytes_sent: int
    length: int | None
    started: float  # monotonic seconds


@dataclass(frozen=True)
class TransferFigures:
    """One response being sent now."""

    client: str
    what: str  # "library/alpine:3.20" (a manifest) or "library/alpine sha256:0123456789ab"
    bytes: int  # sent so far
    size: int | None  # the whole body, when its length is known
    seconds: float  # since the request arrived

    @property
    def rate(self) -> float:
        """Bytes per second since the request arrived (0 in its first instant)."""
        return self.bytes / self.seconds if self.seconds > 0 else 0.0


class Transfers:
    """The manifest and blob responses under way, in the order they began."""

    def __init__(self) -> None:
        self._serial = itertools.count()
        self._live: dict[int, tuple[str, Progress]] = {}

    def __len__(self) -> int:
        return len(self._live)

    def begin(self, what: str, progress: Progress) -> int:
        """Follow a response; the returned key is for ``end``."""
        key = next(self._serial)
        self._live[key] = (what, progress)
        return key

    def end(self, key: int) -> None:
        self._live.pop(key, None)

    def figures(self, now: float) -> tuple[TransferFigures, ...]:
        """Each transfer now; ``now`` on the clock of ``Progress.started``."""
        return tuple(
            TransferFigures(
                client=progress.client,
                what=what,
                bytes=progress.bytes_sent,
                size=progress.length,
                seconds=max(0.0, now - progress.started),
            )
            for what, progress in self._live.values()
        )


class UpstreamCondition:
    """How an upstream answered lately, in the words the status page uses."""

    UNKNOWN = "not asked yet"
    OK = "ok"
    RATE_LIMITED = "rate-limited"
    FAILING = "failing"  # it answers, with 5xx
    UNREACHABLE = "unreachable"  # no answer: refused, reset, timed out, a TLS failure


@dataclass(frozen=True)
class UpstreamState:
    """One upstream's state at a moment. Times are Unix seconds."""

    condition: str  # an UpstreamCondition value
    since: float | None = None  # failing or unreachable since
    until: float | None = None  # rate-limited until
    error: str = ""  # the last failure, as the log says it
    last_ok: float | None = None  # the last answer that was not a failure

    @property
    def ok(self) -> bool:
        return self.condition in (UpstreamCondition.OK, UpstreamCondition.UNKNOWN)


@dataclass
class _Health:
    last_ok: float | None = None
    failing_since: float | None = None
    condition: str = UpstreamCondition.UNKNOWN
    error: str = ""
    rate_limited_until: float | None = None


class UpstreamHealth:
    """Each registry upstream's state from its answers (not its redirect targets')."""

    def __init__(self) -> None:
        self._upstreams: dict[str, _Health] = {}

    def answered(self, upstream: str, status: int, *, wall: float, until: float | None) -> None:
        """A response head from ``upstream``; ``until``: a 429's rest ends then (Unix s)."""
        health = self._upstreams.setdefault(upstream, _Health())
        if status >= 500:
            self._failing(health, UpstreamCondition.FAILING, f"answered {status}", wall)
            return
        health.failing_since, health.error = None, ""
        if status == 429:
            health.condition = UpstreamCondition.RATE_LIMITED
            health.rate_limited_until = until if until is not None else wall
        else:
            health.condition = UpstreamCondition.OK
            health.rate_limited_until = None
            health.last_ok = wall

    def failed(self, upstream: str, error: str, *, wall: float) -> None:
        """No answer from ``upstream``: ``error`` says why (one line, no credentials)."""
        health = self._upstreams.setdefault(upstream, _Health())
        self._failing(health, UpstreamCondition.UNREACHABLE, error, wall)

    @staticmethod
    def _failing(health: _Health, condition: str, error: str, wall: float) -> None:
        if health.failing_since is None:
            health.failing_since = wall
        health.condition, health.error = condition, error

    def state(self, upstream: str, now: float) -> UpstreamState:
        """The state of ``upstream`` at wall time ``now``: a rest that ended reads as ok."""
        health = self._upstreams.get(upstream)
        if health is None:
            return UpstreamState(UpstreamCondition.UNKNOWN)
        condition = health.condition
        until = health.rate_limited_until
        if condition == UpstreamCondition.RATE_LIMITED and until is not None and until <= now:
            condition, until = UpstreamCondition.OK, None
        return UpstreamState(
            condition,
            since=health.failing_since,
            until=until if condition == UpstreamCondition.RATE_LIMITED else None,
            error=health.error,
            last_ok=health.last_ok,
        )


class Activity:
    """Everything above for one mirror (``HubMetrics.activity``)."""

    def __init__(self) -> None:
        self.transfers = Transfers()
        self.upstreams = UpstreamHealth()
        self.pulls = PullTracker()
