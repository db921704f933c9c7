"""Failover policy: which upstream serves the next attempt, and how long a rate-limited one rests.

The upstreams of a registry are tried in order (the primary, then each ``--fallback``): the
nginx-to-Worker scheme people run today. An upstream that answered 429 is skipped until its
``Retry-After`` (RFC 9110 section 10.2.3: delta-seconds or an HTTP-date) has passed; one that could
not be reached rests for a shorter while, so every request does not pay a connect timeout. All
times are plain numbers passed in: ``now`` on trio's monotonic clock, ``wall_now`` in Unix
seconds for HTTP-dates.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC
from email.utils import parsedate_to_datetime

MAX_COOLDOWN = 3600.0


def retry_after_seconds(value: bytes | None, *, wall_now: float, default: float) -> float:
    """Seconds to wait from a ``Retry-After`` value; ``default`` when absent or unreadable."""
    if value is None:
        return default
    text = value.decode("ascii", "replace").strip()
    if text.isdigit():
        return min(float(text), MAX_COOLDOWN)
    try:
        parsed = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return default
    if parsed.tzinfo is None:  # asctime form: HTTP-dates are UTC (RFC 9110 section 5.6.7)
        parsed = parsed.replace(tzinfo=UTC)
    when = parsed.timestamp()
    return max(0.0, min(when - wall_now, MAX_COOLDOWN))


def choose_upstream(
    resting_until: Sequence[float], tried: frozenset[int], now: float
) -> int | None:
    """Pick the upstream for the next attempt, or None when no untried upstream is left.

    The first untried upstream that is not resting wins. If every untried one is resting and
    nothing has been tried yet, the one that becomes available first is used anyway: an answer
    (perhaps another 429) beats refusing the client outright.
    """
    untried = [i for i in range(len(resting_until)) if i not in tried]
    for index in untried:
        if resting_until[index] <= now:
            return index
    if untried and not tried:
        return min(untried, key=lambda i: resting_until[i])
    return None
