"""Upstream trouble: episodes of 429s, server errors and failed connections, the lines they get,
and whether a registry's upstreams count as answering (``/readyz``).

Theory of operation. Each registry upstream has a :class:`Health`: when it last answered, when it
last failed and why, and the :class:`Episode` of trouble it is in, if any. The I/O side reports
every outcome of a request to the upstream itself (never to a redirect target: the CDN is not the
registry) with :func:`note_answer` or :func:`note_failure`, and logs the :data:`Note` it gets back:

- an episode starts with the first 429, 5xx or failed connection after a good answer, and ends at
  the next good answer (any other status: a 401 is the registry answering);
- its start is announced (a WARNING, with what to do) only when the trouble reached a client: no
  fallback took the request over (a failover has a line of its own). A 429 or 5xx is announced;
  a failed connection already gets a line per failed request where the request fails;
- while it lasts, at most one summary per :data:`SUMMARY_INTERVAL` ("10 more 429s in the last
  1m00s"), written when the next trouble comes after that interval: no timer is needed, and the
  end line counts whatever no summary did;
- its end is announced (INFO) when its start was;
- serving from the cache without revalidation (stale) is logged once per upstream and cause
  (:func:`note_stale`), and again only after the upstream answered well or the cause changed.

:func:`readiness` decides ``/readyz`` from the healths: an upstream that answered within
``recent`` seconds and has not failed since makes the registry ready; one whose every upstream
failed within ``retry`` seconds is not ready; anything else needs a probe (``GET /v2/``), whose
outcome is noted like any request's and decides again.

Plain values; times are passed in (trio's clock for durations, Unix time for HTTP dates).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from .failover import retry_after_seconds
from .headers import get_header
from .registries import BUILTIN_REGISTRIES, Registry, RegistryTable
from .urls import base_url

SUMMARY_INTERVAL = 60.0  # at most one "still ..." line per upstream in this long


class Kind(enum.Enum):
    """What kind of trouble an upstream is in."""

    RATE_LIMITED = "rate limited"
    SERVER_ERROR = "failing"
    UNREACHABLE = "unreachable"


_UNITS = {
    Kind.RATE_LIMITED: ("429", "429s"),
    Kind.SERVER_ERROR: ("server error", "server errors"),
    Kind.UNREACHABLE: ("failed connection", "failed connections"),
}


@dataclass(frozen=True)
class Cause:
    """Why an upstream is in trouble, in words (``rate limited (429)``, ``connection refused``);
    ``details`` are what its answer said about the limit (``retry after 60s``)."""

    kind: Kind
    words: str
    details: tuple[str, ...] = ()


@dataclass(frozen=True)
class Episode:
    cause: Cause
    since: float
    count: int = 1  # troubles in this episode
    unreported: int = 0  # troubles since the last line about it
    reported_at: float | None = None  # the last line about it; None: its start was not logged


@dataclass(frozen=True)
class Health:
    """What one upstream's recent answers and failures say about it."""

    last_ok: float = -math.inf  # its last answer that was not a 5xx (a 429 is an answer)
    last_failure: float = -math.inf  # its last 5xx or failed connection
    failure: Cause | None = None  # why it last failed
    episode: Episode | None = None
    stale_logged: Kind | None = None  # stale serving was logged for this kind of trouble

    @property
    def up(self) -> bool:
        """It answered, and has not failed since."""
        return self.last_ok > self.last_failure


# Notes: what the I/O side logs
@dataclass(frozen=True)
class Started:
    cause: Cause


@dataclass(frozen=True)
class Continuing:
    cause: Cause
    more: int
    over: float  # seconds since the last line


@dataclass(frozen=True)
class Ended:
    cause: Cause
    lasted: float
    count: int


Note = Started | Continuing | Ended


def status_cause(
    status: int, headers: Sequence[tuple[bytes, bytes]], wall_now: float
) -> Cause | None:
    """The trouble an answer's status means: 429 (with what the answer said about the limit),
    a 5xx, or None for an answer that is no trouble."""
    if status == 429:
        return Cause(Kind.RATE_LIMITED, "rate limited (429)", rate_limit_details(headers, wall_now))
    if status >= 500:
        return Cause(Kind.SERVER_ERROR, f"answered {status}")
    return None


def rate_limit_details(headers: Sequence[tuple[bytes, bytes]], wall_now: float) -> tuple[str, ...]:
    """What a 429 said about its limit: ``Retry-After`` (RFC 9110 section 10.2.3), the reset
    of the IETF RateLimit draft (``ratelimit-reset``, seconds), and Docker Hub's
    ``ratelimit-limit: 100;w=21600`` (100 pulls per 6 hours)."""
    details = []
    retry_after = get_header(headers, b"retry-after")
    if retry_after is not None:
        seconds = retry_after_seconds(retry_after, wall_now=wall_now, default=-1.0)
        if seconds >= 0:
            details.append(f"retry after {format_duration(seconds)}")
    reset = get_header(headers, b"ratelimit-reset")
    if reset is not None and reset.strip().isdigit():
        details.append(f"limit resets in {format_duration(float(reset.strip()))}")
    limit = get_header(headers, b"ratelimit-limit")
    if limit is not None:
        amount, _, window = limit.decode("latin-1").partition(";")
        if amount.strip().isdigit():
            text = f"limit {amount.strip()}"
            name, _, value = window.strip().partition("=")
            if name.strip() == "w" and value.strip().isdigit():
                text += f" per {format_duration(float(value.strip()))}"
            details.append(text)
    return tuple(details)


def note_answer(
    health: Health, now: float, cause: Cause | None, *, reached_client: bool
) -> tuple[Health, Note | None]:
    """An answer of the upstream itself; ``cause`` is what its status means (``status_cause``).
    ``reached_client``: no other upstream took the request over."""
    if cause is None:
        ended = None
        episode = health.episode
        if episode is not None and episode.reported_at is not None:
            ended = Ended(episode.cause, now - episode.since, episode.count)
        return Health(last_ok=now, last_failure=health.last_failure, failure=health.failure), ended
    if cause.kind is Kind.RATE_LIMITED:
        health = replace(health, last_ok=now)
    else:
        health = replace(health, last_failure=now, failure=cause)
    return _trouble(health, cause, now, announce=reached_client)


def note_failure(
    health: Health, now: float, cause: Cause, *, reached_client: bool
) -> tuple[Health, Note | None]:
    """A request that got no answer from the upstream (cannot resolve, refused, TLS, timeout).
    Its start is never announced here: the failed request has its own line."""
    del reached_client  # a failed request is logged where it fails, one line per request
    health = replace(health, last_failure=now, failure=cause)
    return _trouble(health, cause, now, announce=False)


def _trouble(
    health: Health, cause: Cause, now: float, *, announce: bool
) -> tuple[Health, Note | None]:
    episode = health.episode
    if episode is None or episode.cause.kind is not cause.kind:
        # a new episode (another kind of trouble is another episode: its own line)
        fresh = Episode(cause, since=now, reported_at=now if announce else None)
        return replace(health, episode=fresh), Started(cause) if announce else None
    episode = replace(episode, cause=cause, count=episode.count + 1)
    if episode.reported_at is None:
        if announce:  # it reaches clients now (a fallback stopped taking it over)
            episode = replace(episode, reported_at=now, unreported=0)
            return replace(health, episode=episode), Started(cause)
        return replace(health, episode=episode), None
    reported_at = episode.reported_at
    episode = replace(episode, unreported=episode.unreported + 1)
    if now - reported_at < SUMMARY_INTERVAL:
        return replace(health, episode=episode), None
    note = Continuing(cause, episode.unreported, now - reported_at)
    return replace(health, episode=replace(episode, reported_at=now, unreported=0)), note


def note_stale(health: Health, cause: Cause) -> tuple[Health, bool]:
    """The cache answered without revalidation because of ``cause``: whether to log it (once per
    upstream and kind of trouble, until the upstream answers well)."""
    if health.stale_logged is cause.kind:
        return health, False
    return replace(health, stale_logged=cause.kind), True


def stale_cause(health: Health) -> Cause:
    """Why an upstream that could not be asked is in trouble: its episode's cause."""
    if health.episode is not None:
        return health.episode.cause
    if health.failure is not None:
        return health.failure
    return Cause(Kind.UNREACHABLE, "not answering")


# -- lines ---------------------------------------------------------------------------------------


def started_line(origin: str, cause: Cause, advice: str) -> str:
    """The WARNING that opens an episode."""
    said = f"; {', '.join(cause.details)}" if cause.details else ""
    if cause.kind is Kind.RATE_LIMITED:
        return (
            f"upstream {origin} is rate limiting this mirror (429{said}): pulls of what the "
            f"cache lacks fail until the limit lifts; {advice}"
        )
    return (
        f"upstream {origin} {cause.words}{said}: pulls of what the cache lacks fail until it "
        f"recovers; {advice}"
    )


def continuing_line(origin: str, note: Continuing) -> str:
    """The WARNING that sums up an episode, at most once a minute."""
    one, many = _UNITS[note.cause.kind]
    what = one if note.more == 1 else many
    return (
        f"upstream {origin} still {note.cause.kind.value}: {note.more} more {what} "
        f"in the last {format_duration(note.over)}"
    )


def ended_line(origin: str, note: Ended) -> str:
    """The INFO that closes an episode."""
    one, many = _UNITS[note.cause.kind]
    return (
        f"upstream {origin} answers again: {note.cause.kind.value} for "
        f"{format_duration(note.lasted)} ({note.count} {one if note.count == 1 else many})"
    )


def stale_line(origin: str, cause: Cause, first: str) -> str:
    """The WARNING for serving from the cache without revalidation, once per episode."""
    return (
        f"upstream {origin} {cause.words}: serving from the cache without revalidation "
        f"(stale) until it answers again; first: {first}"
    )


def advice(kind: Kind, *, registry: str, default: bool, fallbacks: int, login: bool) -> str:
    """What the operator can do about trouble of a registry's upstream that reached clients:
    add a fallback, or (rate limits) pull with an account. A 5xx is the answer (the flow fails
    over on 429s and failed connections only), so a fallback would not take it."""
    if kind is Kind.SERVER_ERROR:
        return "the fault is at its end (fallbacks take over 429s and failed connections only)"
    if fallbacks:
        return "its fallbacks could not take the requests either"
    flag = "--fallback URL" if default else f"--registry-fallback {registry}=URL"
    todo = [f"add a fallback ({flag})"]
    if kind is Kind.RATE_LIMITED and not login:
        todo.append(f"pull with an account for a higher limit (--registry-login {registry}=FILE)")
    return " or ".join(todo)


def upstream_flag(registry: str, *, default: bool, index: int) -> str:
    """The flag that set upstream ``index`` of a registry."""
    if default:
        return "--upstream" if index == 0 else "--fallback"
    return f"--registry {registry}=URL" if index == 0 else f"--registry-fallback {registry}=URL"


def probed_registries(table: RegistryTable) -> list[Registry]:
    """The registries whose upstreams are checked at start: the default one, and each other one
    the operator configured (a built-in one left as it is was not: probing every public
    registry at each start would only say that the internet works)."""
    builtin = {name: (base_url(url),) for name, url, _ in BUILTIN_REGISTRIES}
    return [
        registry
        for registry in table.registries
        if registry.name == table.default
        or registry.upstreams != builtin.get(registry.name)
        or registry.upstream_ca is not None
        or registry.upstream_proxy is not None
        or registry.login is not None
    ]


def format_duration(seconds: float) -> str:
    """``45s``, ``2m05s``, ``6h``: short and exact enough for a log line."""
    whole = max(0, round(seconds))
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    hours, rest = divmod(whole, 3600)
    return f"{hours}h" if rest < 60 else f"{hours}h{rest // 60:02d}m"


# -- readiness -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Readiness:
    """``ok`` None: a probe must tell."""

    ok: bool | None
    detail: str


def readiness(
    origins: Sequence[str], healths: Sequence[Health], now: float, *, recent: float, retry: float
) -> Readiness:
    """Is some upstream of a registry answering (see the module docstring)?"""
    for origin, health in zip(origins, healths, strict=True):
        if health.up and now - health.last_ok < recent:
            limited = health.episode is not None and health.episode.cause.kind is Kind.RATE_LIMITED
            note = " (rate limited: 429)" if limited else ""
            return Readiness(
                True, f"{origin} answered {format_duration(now - health.last_ok)} ago{note}"
            )
    if healths and all(
        not h.up and h.failure is not None and now - h.last_failure < retry for h in healths
    ):
        failures = "; ".join(
            f"{origin}: {h.failure.words if h.failure else 'failed'} "
            f"{format_duration(now - h.last_failure)} ago"
            for origin, h in zip(origins, healths, strict=True)
        )
        return Readiness(False, failures)
    return Readiness(None, "no recent answer")


class LineThrottle:
    """At most one log line per key per ``interval`` seconds: the errors answered to clients
    (a dead upstream fails every request alike) get one line, then one a minute that says how
    many like it were not logged, never one per request. Bounded: beyond ``max_keys`` keys the
    oldest is forgotten (its next line comes at once)."""

    def __init__(self, interval: float = 60.0, max_keys: int = 256) -> None:
        self.interval = interval
        self.max_keys = max_keys
        self._last: dict[tuple[object, ...], tuple[float, int]] = {}  # key -> (logged at, held)

    def admit(self, key: tuple[object, ...], now: float) -> int | None:
        """None to hold the line back; else log it, with the count of lines held back since
        the last one for this key."""
        entry = self._last.pop(key, None)
        if entry is not None and now - entry[0] < self.interval:
            self._last[key] = (entry[0], entry[1] + 1)
            return None
        while len(self._last) >= self.max_keys:
            del self._last[next(iter(self._last))]
        self._last[key] = (now, 0)
        return entry[1] if entry is not None else 0
