"""The human status page at ``/``: what this mirror is, how to use it, and how it is doing.

``render_status_page`` is a pure function from a frozen ``StatusFigures`` to the bytes of a small,
self-contained HTML5 page: no script, no external stylesheet or font, so it works on an offline
network. Every interpolated value goes through ``html.escape``: upstream URLs, the mirror's name
and URL come from configuration, and a page that shows them must not become a way to inject
markup. ``status_figures`` gathers the live values from ``HubMetrics``, ``registry_figures`` the
registries served and their upstreams from the ``RegistryTable``, ``peer_figures`` and
``store_figures`` the other instances (``--peer``) and the shared store (``--cache-store``); the
caller supplies the clock readings, so nothing here reads one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from html import escape

from .. import __version__
from ..policy.accounting import OTHER
from ..policy.inventory import Image
from ..policy.proxies import hide_userinfo
from ..policy.pulls import PullSummary
from ..policy.registries import RegistryTable
from ..policy.sizes import format_decimal_size, format_size
from ..policy.urls import Url
from .activity import TransferFigures, UpstreamCondition, UpstreamHealth, UpstreamState
from .charts import Series, line_chart
from .clientconfig import CLIENTS, snippet
from .metrics import HubMetrics, PeerSource, RateLimit, StoreSource
from .trends import Families, TrendFigures, has_data, totals_from, trend_figures

Snippet = tuple[str, str, str]  # client, where it goes (and what else to do), text to paste

REFRESH_SECONDS = 10  # the page reloads itself this often
_DURATION_UNITS = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 0 auto; max-width: 56rem; padding: 1rem 2rem;
       color: #222; background: #fdfdfd; line-height: 1.45; }
h1 { margin-bottom: 0.2rem; }
.sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; }
th, td { text-align: left; padding: 0.2rem 1.2rem 0.2rem 0; vertical-align: top; }
th { font-weight: 600; }
pre { background: #f2f2f2; border: 1px solid #ddd; padding: 0.6rem 0.8rem; overflow-x: auto; }
code, pre { font-family: ui-monospace, monospace; font-size: 0.92em; }
.state { display: inline-block; padding: 0 0.45rem; border-radius: 0.25rem; font-weight: 600; }
.state-ok { background: #d7f0d9; color: #1b5e20; }
.state-unknown { background: #e8e8e8; color: #444; }
.state-bad { background: #c62828; color: #fff; }
.error { color: #b71c1c; }
.none { color: #666; }
.charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(24rem, 1fr));
          gap: 0.5rem 1.5rem; }
.charts figure { margin: 0; }
.charts figcaption { font-weight: 600; }
svg.chart { width: 100%; height: auto; display: block; }
.low { color: #b71c1c; font-weight: 600; }
"""


def format_duration(seconds: float) -> str:
    """A duration for people: the two largest units, ``45s``, ``5m 3s``, ``2h 5m``, ``3d 4h``."""
    if not seconds >= 1:  # also NaN, and a clock that went backwards
        return "0s"
    remaining = int(seconds)
    parts: list[str] = []
    for unit, size in _DURATION_UNITS:
        if remaining >= size or parts:
            count, remaining = divmod(remaining, size)
            parts.append(f"{count}{unit}")
        if len(parts) == 2:
            break
    if len(parts) == 2 and parts[1].startswith("0"):
        parts.pop()  # "2h" rather than "2h 0m"
    return " ".join(parts)


def format_ratio(ratio: float) -> str:
    """A fraction as a percentage with one decimal: ``87.5%``; ``-`` when unknown."""
    if not math.isfinite(ratio):
        return "-"
    return f"{ratio * 100:.1f}%"


def format_count(value: float) -> str:
    """A count with thousands separators, ``1,234``; a fraction keeps its decimals."""
    value = float(value)  # an int is a float to the type checker, but has no is_integer in 3.11
    if not math.isfinite(value):
        return "-"
    if value.is_integer():
        return f"{int(value):,}"
    return f"{value:,.2f}"


def format_time(when: float) -> str:
    """A Unix time as UTC, to the second: ``2024-05-01 12:00:00 UTC``."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(when))


def client_snippets(mirror_url: str, ca: str | None = None) -> tuple[Snippet, ...]:
    """Each client's configuration for ``mirror_url``, as ``(client, where, text)``; ``where``
    is clientconfig's hint, which names the file to paste into and what to do after. A client
    that cannot use the URL is left out."""
    found = []
    for client in CLIENTS:
        try:
            text, where = snippet(client, mirror_url, ca)
        except ValueError:
            continue
        found.append((client, where, text))
    return tuple(found)


@dataclass(frozen=True, kw_only=True)
class RegistryFigures:
    """One registry the mirror serves, as the page lists it."""

    name: str  # how clients name it: "docker.io"
    primary: str | None  # the upstream URL tried first; None: none configured
    fallbacks: tuple[str, ...] = ()  # tried in order when the primary fails
    default: bool = False  # an image that names no registry comes from this one
    # how each upstream is doing, the primary first then the fallbacks; () when not known
    states: tuple[UpstreamState, ...] = ()


def _shown(url: Url) -> str:
    return str(url.origin) if url.target == "/" else str(url)  # no lone trailing slash


def registry_figures(
    table: RegistryTable, health: UpstreamHealth | None = None, now: float = 0.0
) -> tuple[RegistryFigures, ...]:
    """Each registry of ``table``, in its order (the default first), with its upstreams and,
    given ``health`` and the wall clock ``now``, the state of each."""
    return tuple(
        RegistryFigures(
            name=registry.name,
            primary=_shown(registry.upstreams[0]) if registry.upstreams else None,
            fallbacks=tuple(_shown(url) for url in registry.upstreams[1:]),
            default=registry.name == table.default,
            states=()
            if health is None
            else tuple(health.state(str(url.origin), now) for url in registry.upstreams),
        )
        for registry in table.registries
    )


# What came of asking a peer for a blob (``cache.peering.Peers.note``), as the page's columns
PEER_RESULTS = ("filled", "passed", "upstream")


@dataclass(frozen=True, kw_only=True)
class PeerFigures:
    """One of the ``--peer`` instances, as the page lists it. Counts are blob misses this
    mirror sent to that instance as their owner, by what came of it."""

    url: str
    me: bool = False  # this instance (it never asks itself)
    resting_until: float | None = None  # wall clock: skipped until then after a failure
    filled: float = 0.0  # it sent the blob
    passed: float = 0.0  # its 403/404, passed on to the client
    upstream: float = 0.0  # down, silent or failing: the upstream was asked instead


@dataclass(frozen=True, kw_only=True)
class StoreFigures:
    """The shared object store under the cache (``--cache-store``)."""

    url: str  # where it is, never with credentials (``without_credentials``)
    commits: float = 0.0  # verified blobs put into it
    reads: float = 0.0  # blobs read from it into the local cache
    too_large: float = 0.0  # not committed for their size (kept locally)
    resting_until: float | None = None  # wall clock: lookups skip it until then (it failed)


@dataclass(frozen=True, kw_only=True)
class StatusFigures:
    """Everything the status page shows. Times are Unix seconds (wall clock)."""

    url: str  # the mirror's public URL
    name: str = "hubproxy"
    version: str = __version__
    registries: tuple[RegistryFigures, ...] = ()
    snippets: tuple[Snippet, ...] = ()
    now: float = 0.0
    started_at: float = 0.0
    cache_bytes: int = 0
    cache_limit: int = 0  # 0: no cache configured
    cache_blobs: int = 0
    cache_hit_ratio: float = 0.0
    bytes_from_cache: int = 0  # bytes the upstreams did not have to send: "bytes saved"
    bytes_from_upstream: int = 0
    requests: int = 0  # answered, the operator's own paths (this page too) left out
    disk_free: int | None = None  # bytes free on the cache's file system; None: no cache
    rate_limited_last_hour: int = 0  # 429s received from upstreams in the last hour
    last_rate_limited_at: float | None = None
    ratelimits: tuple[tuple[str, RateLimit], ...] = ()  # upstream, what it said last
    transfers: tuple[TransferFigures, ...] = ()  # responses being sent now
    pulls: tuple[PullSummary, ...] = ()  # the latest pulls, newest first
    prefetch: str | None = None  # the prefetch list's last round; None: no list
    trends: TrendFigures | None = None  # the last hour; None: not sampled (a test's figures)
    spending: Spending | None = None  # who spent the rate limit; None: not known
    largest: tuple[Image, ...] = ()  # cached images, largest first (cache/inventory.TOPS)
    most_pulled: tuple[Image, ...] = ()  # cached images, most pulled first
    bandwidth: str | None = None  # the caps and the addresses paced now; None: no cap
    peers: tuple[PeerFigures, ...] = ()  # --peer, in the list's order; (): none configured
    store: StoreFigures | None = None  # --cache-store; None: none configured


@dataclass(frozen=True, kw_only=True)
class AllowanceFigures:
    """One upstream allowance: a registry and the identity its pulls were counted against."""

    registry: str
    identity: str  # anonymous, operator, client (policy.accounting)
    remaining: float | None  # pulls left, as last said; None: never said
    limit: float | None = None
    low: bool = False  # under 10% of the limit
    upstream_pulls: float = 0.0  # manifest GETs sent upstream with it since the start
    window: float | None = None  # seconds, from the headers (this worker's last answer)
    source: str = ""  # docker-ratelimit-source (this worker's last answer)
    seen: float | None = None  # wall clock of this worker's last answer


@dataclass(frozen=True, kw_only=True)
class Spending:
    """Who spent the upstream's rate limit over the accounting window."""

    window: float  # seconds
    clients: tuple[tuple[str, float], ...] = ()  # top clients by pulls, then ("other", n)
    images: tuple[tuple[str, float], ...] = ()  # top images by client pulls, then other
    upstream_images: tuple[tuple[str, float], ...] = ()  # top images by upstream pulls
    allowances: tuple[AllowanceFigures, ...] = ()


def status_figures(
    metrics: HubMetrics,
    *,
    url: str,
    table: RegistryTable,
    now: float,
    name: str = "hubproxy",
    snippets: tuple[Snippet, ...] | None = None,
    monotonic: float = 0.0,
    disk_free: int | None = None,
    families: Families | None = None,
    trend_now: float | None = None,
    tops: tuple[tuple[Image, ...], tuple[Image, ...]] = ((), ()),
) -> StatusFigures:
    """The page's figures from the live metrics and the registries served (``table``); ``now``
    is the wall clock (``time.time()``), ``monotonic`` the clock transfers started on
    (``time.monotonic()``), ``disk_free`` the bytes free under the cache, ``tops`` the
    largest and the most pulled cached images. ``snippets`` defaults to
    ``client_snippets(url)``.

    ``families`` (a metrics snapshot, the whole mirror's under ``--workers``) gives the counts
    (requests, bytes, hit ratio, the peers' and the store's), who spent the rate limit, and the
    trends' live point; ``trend_now`` is trio's clock (``trio.current_time()``): the trends were
    sampled on it, and the peers' and the store's rests are kept on it (None: not known, so
    nothing is shown resting)."""
    cache = metrics.cache() if metrics.cache is not None else None
    sources = metrics.response_bytes.series()
    activity = metrics.activity
    figures = StatusFigures(
        url=url,
        name=name,
        version=metrics.version,
        registries=registry_figures(table, activity.upstreams, now),
        snippets=client_snippets(url) if snippets is None else snippets,
        now=now,
        started_at=metrics.started_at,
        cache_bytes=cache.bytes_used if cache else 0,
        cache_limit=cache.limit_bytes if cache else 0,
        cache_blobs=cache.blobs if cache else 0,
        cache_hit_ratio=metrics.hit_ratio(),
        bytes_from_cache=int(sources.get(("cache",), 0)),
        bytes_from_upstream=int(sources.get(("upstream",), 0)),
        requests=int(metrics.requests_served()),
        disk_free=disk_free,
        rate_limited_last_hour=metrics.rate_limited_times.count(now),
        last_rate_limited_at=metrics.rate_limited_times.last,
        ratelimits=tuple(sorted(metrics.ratelimits.items())),
        transfers=activity.transfers.figures(monotonic),
        pulls=activity.pulls.recent(),
        prefetch=metrics.prefetch_status,
        largest=tops[0],
        most_pulled=tops[1],
        bandwidth=bandwidth_line(metrics),
        peers=()
        if metrics.peers is None
        else peer_figures(metrics.peers, families, now=now, clock=trend_now),
        store=None
        if metrics.store is None
        else store_figures(metrics.store, families, now=now, clock=trend_now),
    )
    if families is None:
        return figures
    live = totals_from(families, trend_now if trend_now is not None else 0.0)
    lookups = live.hits + live.misses
    trends = None
    if trend_now is not None:
        trends = trend_figures((*metrics.trends.samples(), live), trend_now)
    return replace(
        figures,
        requests=int(live.requests),
        bytes_from_cache=int(live.bytes_cache),
        bytes_from_upstream=int(live.bytes_upstream),
        cache_hit_ratio=live.hits / lookups if lookups else 0.0,
        trends=trends,
        spending=spending_figures(metrics, families),
    )


def bandwidth_line(metrics: HubMetrics) -> str | None:
    """``10 MiB/s per client, 23.8 MiB/s in all; 2 addresses paced now``, or None without
    a cap (this process's caps: under --workers the total is its part)."""
    figures = metrics.connections() if metrics.connections is not None else None
    if figures is None or not figures.bandwidth.caps.on:
        return None
    caps = figures.bandwidth.caps
    parts = []
    if caps.client:
        parts.append(f"{format_size(caps.client)}/s per client")
    if caps.total:
        parts.append(f"{format_size(caps.total)}/s in all")
    paced = figures.bandwidth.paced_clients
    return f"{', '.join(parts)}; {paced} address{'' if paced == 1 else 'es'} paced now"


def _rest_until(until: float, now: float, clock: float | None) -> float | None:
    """A rest kept on trio's clock (``until``; ``clock`` is that clock now) as wall clock."""
    if clock is None or until <= clock:
        return None
    return now + (until - clock)


def _counts(families: Families, name: str, labels: Sequence[str]) -> dict[tuple[str, ...], float]:
    """A family's samples by their ``labels``' values (summed over any other label)."""
    found: dict[tuple[str, ...], float] = {}
    for sample in families.get(name, {}).get("samples", ()):
        try:
            _, pairs, value = sample
            named = {str(k): str(v) for k, v in pairs}
            key = tuple(named.get(label, "") for label in labels)
            found[key] = found.get(key, 0.0) + float(value)
        except (TypeError, ValueError):
            continue  # another worker's snapshot from an older version
    return found


def peer_figures(
    source: PeerSource, families: Families | None, *, now: float, clock: float | None
) -> tuple[PeerFigures, ...]:
    """Each ``--peer`` instance, in the list's order: this one marked, the others with their
    rest (``now`` the wall clock, ``clock`` trio's, which the rests are kept on) and the blob
    misses sent to each by result (from ``families`` when given: the whole mirror's under
    ``--workers``; else this process's)."""
    counts = (
        _counts(families, "hubproxy_peer_fetches", ("peer", "result"))
        if families is not None
        else {tuple(key): value for key, value in source.fetches().items()}
    )
    found = []
    for index, name in enumerate(source.names):
        me = index == source.me
        filled, passed, upstream = (counts.get((name, result), 0.0) for result in PEER_RESULTS)
        found.append(
            PeerFigures(
                url=name,
                me=me,
                resting_until=None if me else _rest_until(source.resting_until[index], now, clock),
                filled=filled,
                passed=passed,
                upstream=upstream,
            )
        )
    return tuple(found)


def without_credentials(text: str) -> str:
    """``text`` (a store's description: ``s3://bucket/prefix at http://host:port``) with the
    user and password of every URL in it hidden (``policy.proxies.hide_userinfo``): the page
    shows where the store is, never how to get in."""
    return " ".join(hide_userinfo(word) for word in text.split(" "))


def store_figures(
    source: StoreSource, families: Families | None, *, now: float, clock: float | None
) -> StoreFigures:
    """The ``--cache-store``: where it is, its counts (from ``families`` when given, else this
    process's) and whether lookups skip it after a failure (``now`` and ``clock`` as for
    :func:`peer_figures`)."""
    if families is not None:
        commits, reads, too_large = (
            sum(_counts(families, f"hubproxy_store_{field_name}", ()).values())
            for field_name in ("commits", "reads", "too_large")
        )
    else:
        commits, reads, too_large = source.commits, source.reads, source.too_large
    return StoreFigures(
        url=without_credentials(source.objects.description),
        commits=float(commits),
        reads=float(reads),
        too_large=float(too_large),
        resting_until=_rest_until(source.resting_until, now, clock),
    )


def _ranked(families: Families, name: str, label: str) -> tuple[tuple[str, float], ...]:
    """A top-N gauge's series, largest first, ``other`` last (left out at 0)."""
    found: list[tuple[str, float]] = []
    other = 0.0
    for _, labels, value in families.get(name, {}).get("samples", ()):
        key = dict(labels).get(label, "")
        if key == OTHER:
            other += float(value)
        elif float(value) > 0:
            found.append((key, float(value)))
    found.sort(key=lambda item: (-item[1], item[0]))
    return (*found, (OTHER, other)) if other else tuple(found)


def spending_figures(metrics: HubMetrics, families: Families) -> Spending:
    """Who spent the rate limit, from a metrics snapshot (the counts) and this process's own
    latest allowances (where and when the upstream said so)."""
    by_key: dict[tuple[str, str], dict[str, float]] = {}
    for family, field_name in (
        ("hubproxy_ratelimit_remaining", "remaining"),
        ("hubproxy_ratelimit_limit", "limit"),
        ("hubproxy_ratelimit_low", "low"),
        ("hubproxy_upstream_pulls", "upstream_pulls"),
    ):
        for _, labels, value in families.get(family, {}).get("samples", ()):
            pairs = dict(labels)
            key = (pairs.get("registry", ""), pairs.get("identity", ""))
            by_key.setdefault(key, {})[field_name] = float(value)
    local = {(a.registry, a.identity): a for a in metrics.allowances.allowances()}
    allowances = []
    for (registry, identity), values in sorted(by_key.items()):
        seen = local.get((registry, identity))
        allowances.append(
            AllowanceFigures(
                registry=registry,
                identity=identity,
                remaining=values.get("remaining"),
                limit=values.get("limit"),
                low=bool(values.get("low")),
                upstream_pulls=values.get("upstream_pulls", 0.0),
                window=seen.window if seen else None,
                source=seen.source if seen else "",
                seen=seen.seen if seen else None,
            )
        )
    return Spending(
        window=metrics.accounting.window,
        clients=_ranked(families, "hubproxy_client_pulls", "client"),
        images=_ranked(families, "hubproxy_image_pulls", "image"),
        upstream_images=_ranked(families, "hubproxy_upstream_image_pulls", "image"),
        allowances=tuple(allowances),
    )


def _link(url: str) -> str:
    """An escaped link, or just escaped text for anything that is not http(s): a configured
    value must never become a ``javascript:`` link."""
    text = escape(url)
    if url.lower().startswith(("http://", "https://")):
        return f'<a href="{escape(url, quote=True)}">{text}</a>'
    return f"<code>{text}</code>"


def _row(label: str, value: str) -> str:
    """A table row; ``value`` is HTML already escaped by the caller."""
    return f"<tr><th>{escape(label)}</th><td>{value}</td></tr>"


def _when(when: float, now: float) -> str:
    """``2024-05-01 11:55:00 UTC (5m ago)``, or ``(in 5m)`` for a time to come."""
    if when > now:
        return f"{format_time(when)} (in {format_duration(when - now)})"
    return f"{format_time(when)} ({format_duration(now - when)} ago)"


def _state(state: UpstreamState | None, now: float) -> str:
    """An upstream's state as HTML: a badge (red when it is not ok), then the detail."""
    if state is None or state.condition == UpstreamCondition.UNKNOWN:
        return '<span class="state state-unknown">not asked yet</span>'
    if state.condition == UpstreamCondition.OK:
        badge = '<span class="state state-ok">ok</span>'
        if state.last_ok is None:
            return badge
        return f"{badge} last answer {escape(_when(state.last_ok, now))}"
    if state.condition == UpstreamCondition.RATE_LIMITED:
        label = "rate-limited"
        detail = f"until {_when(state.until, now)}" if state.until is not None else ""
    else:
        label = state.condition  # "unreachable" or "failing"
        detail = f"since {_when(state.since, now)}" if state.since is not None else ""
    html = f'<span class="state state-bad">{escape(label)}</span>'
    if detail:
        html += f" {escape(detail)}"
    if state.error:
        html += f': <span class="error">{escape(state.error)}</span>'
    return html


def _registries(registries: Sequence[RegistryFigures], now: float) -> list[str]:
    """One row per upstream, under the registry it belongs to: its role (primary, fallback 1,
    ...) and its state. The roles belong to one registry's upstreams: another registry is
    never anybody's fallback."""
    if not registries:
        return ["<p>No upstream registry is configured.</p>"]
    rows = ["<tr><th>Registry</th><th>Upstream</th><th>Role</th><th>State</th></tr>"]
    for registry in registries:
        name = f"<strong>{escape(registry.name)}</strong>"
        if registry.default:
            name += " (default)"
        if registry.primary is None:
            rows.append(f'<tr><td>{name}</td><td colspan="3">no upstream configured</td></tr>')
            continue
        upstreams = [(registry.primary, "primary")]
        many = len(registry.fallbacks) > 1
        upstreams += [
            (url, f"fallback {index}" if many else "fallback")
            for index, url in enumerate(registry.fallbacks, 1)
        ]
        for index, (url, role) in enumerate(upstreams):
            state = registry.states[index] if index < len(registry.states) else None
            bad = state is not None and not state.ok
            rows.append(
                f'<tr class="upstream{" down" if bad else ""}">'
                f"<td>{name if index == 0 else ''}</td><td>{_link(url)}</td>"
                f"<td>{role}</td><td>{_state(state, now)}</td></tr>"
            )
    return ['<table class="registries">', *rows, "</table>"]


def _figures(status: StatusFigures) -> list[str]:
    if status.cache_limit > 0:
        used = status.cache_bytes / status.cache_limit
        cache = (
            f"{escape(format_size(status.cache_bytes))} of "
            f"{escape(format_size(status.cache_limit))} ({escape(format_ratio(used))}), "
            f"{escape(format_count(status.cache_blobs))} blobs"
        )
    else:
        cache = "no cache configured: every blob comes from upstream"
    rows = [
        _row("Requests served", escape(format_count(status.requests))),
        _row("Cache", cache),
    ]
    if status.disk_free is not None:
        rows.append(_row("Free disk (cache)", escape(f"{format_size(status.disk_free)} free")))
    if status.prefetch is not None:
        rows.append(_row("Prefetch list", escape(status.prefetch)))
    if status.bandwidth is not None:
        rows.append(_row("Bandwidth caps", escape(status.bandwidth)))
    return [
        "<table>",
        *rows,
        _row("Cache hit ratio", escape(format_ratio(status.cache_hit_ratio))),
        _row("Served from cache (saved)", escape(format_size(status.bytes_from_cache))),
        _row("Served from upstream", escape(format_size(status.bytes_from_upstream))),
        "</table>",
    ]


def _peers(peers: Sequence[PeerFigures], now: float) -> list[str]:
    """One row per instance of the ``--peer`` list: this one marked; the others in use, or
    resting after a failure (red, until when), and what came of the misses sent to each."""
    rows = [
        "<tr><th>Instance</th><th>State</th><th>Blobs it sent</th>"
        "<th>Its 403/404 passed on</th><th>Upstream asked instead</th></tr>"
    ]
    for peer in peers:
        if peer.me:
            rows.append(
                f'<tr class="peer me"><td>{_link(peer.url)} (this instance)</td>'
                '<td colspan="4">owns its share of the blobs: fetches them from the upstream'
                "</td></tr>"
            )
            continue
        if peer.resting_until is None:
            state = '<span class="state state-ok">in use</span>'
        else:
            state = (
                '<span class="state state-bad">resting</span> '
                f"until {escape(_when(peer.resting_until, now))}: its blobs come from the "
                "upstream meanwhile"
            )
        counts = "".join(
            f"<td>{escape(format_count(value))}</td>"
            for value in (peer.filled, peer.passed, peer.upstream)
        )
        down = " down" if peer.resting_until is not None else ""
        rows.append(
            f'<tr class="peer{down}"><td>{_link(peer.url)}</td><td>{state}</td>{counts}</tr>'
        )
    return [
        "<p>Each blob has one owner among these instances: a miss here is fetched from its "
        "owner, which fetches it from the upstream once for all (counts since the start).</p>",
        '<table class="peers">',
        *rows,
        "</table>",
    ]


def _store(store: StoreFigures, now: float) -> list[str]:
    if store.resting_until is None:
        state = '<span class="state state-ok">in use</span>'
    else:
        state = (
            '<span class="state state-bad">resting</span> '
            f"after a failed lookup, until {escape(_when(store.resting_until, now))}: misses go "
            "to the upstream meanwhile"
        )
    return [
        '<table class="store">',
        _row("Store", f"<code>{escape(store.url)}</code>"),
        _row("State", state),
        _row("Blobs committed", escape(format_count(store.commits))),
        _row("Blobs read into the cache", escape(format_count(store.reads))),
        _row("Not committed for their size", escape(format_count(store.too_large))),
        "</table>",
    ]


def _rate_limits(status: StatusFigures) -> list[str]:
    if status.last_rate_limited_at is None:
        last = "never"
    else:
        ago = format_duration(status.now - status.last_rate_limited_at)
        last = f"{format_time(status.last_rate_limited_at)} ({ago} ago)"
    rows = [
        _row("429s in the last hour", escape(format_count(status.rate_limited_last_hour))),
        _row("Last 429", escape(last)),
    ]
    for upstream, limit in status.ratelimits:
        rows.append(
            f"<tr><th>Pulls remaining at {escape(upstream)}</th>"
            f"<td>{escape(_ratelimit(limit, status.now))}</td></tr>"
        )
    return ["<table>", *rows, "</table>"]


def _ratelimit(limit: RateLimit, now: float) -> str:
    """``76 of 100 per 6h, resets ... (as of ...)``: what the upstream's headers said."""
    text = format_count(limit.remaining)
    if limit.limit is not None:
        text += f" of {format_count(limit.limit)}"
    if limit.window is not None:
        text += f" per {format_duration(limit.window)}"
    if limit.reset is not None:
        text += f", resets {_when(limit.reset, now)}"
    return f"{text} (as of {_when(limit.seen, now)})"


def _transfers(transfers: Sequence[TransferFigures]) -> list[str]:
    if not transfers:
        return ['<p class="none">No transfer under way.</p>']
    rows = ["<tr><th>Client</th><th>Image or blob</th><th>Sent</th><th>Rate</th><th>For</th></tr>"]
    for transfer in transfers:
        sent = format_size(transfer.bytes)
        if transfer.size:
            share = format_ratio(transfer.bytes / transfer.size)
            sent += f" of {format_size(transfer.size)} ({share})"
        rows.append(
            f"<tr><td>{escape(transfer.client)}</td><td><code>{escape(transfer.what)}</code></td>"
            f"<td>{escape(sent)}</td><td>{escape(format_size(int(transfer.rate)))}/s</td>"
            f"<td>{escape(format_duration(transfer.seconds))}</td></tr>"
        )
    return ['<table class="transfers">', *rows, "</table>"]


def _pull_detail(pull: PullSummary) -> str:
    if pull.layers_total is None:
        count = f"{pull.layers} blob{'s' if pull.layers != 1 else ''}"
    elif pull.layers == pull.layers_total:
        count = f"{pull.layers} layer{'s' if pull.layers != 1 else ''}"
    elif not pull.done:
        count = f"{pull.layers} of {pull.layers_total} layers"
    else:
        count = f"{pull.layers} of {pull.layers_total} layers (the client had the rest)"
    parts = [count, format_decimal_size(pull.bytes), f"{pull.from_cache} from cache"]
    if pull.done:
        parts.append(f"{pull.seconds:.1f} s")
    else:
        parts.insert(0, "under way")
    return ", ".join(parts)


def _pulls(pulls: Sequence[PullSummary], now: float) -> list[str]:
    if not pulls:
        return ['<p class="none">No image pulled since the start.</p>']
    rows = ["<tr><th>When</th><th>Image</th><th>Client</th><th>What</th></tr>"]
    for pull in pulls:
        rows.append(
            f"<tr><td>{escape(_when(pull.started_wall, now))}</td>"
            f"<td><code>{escape(pull.image)}</code></td><td>{escape(pull.client)}</td>"
            f"<td>{escape(_pull_detail(pull))}</td></tr>"
        )
    return ['<table class="pulls">', *rows, "</table>"]


def _per_second(value: float) -> str:
    return f"{format_size(int(value))}/s"


def _per_minute(value: float) -> str:
    return f"{value:.3g}/min" if value else "0"


def _chart(title: str, chart: str) -> list[str]:
    return ["<figure>", f"<figcaption>{escape(title)}</figcaption>", chart, "</figure>"]


def _trends(trends: TrendFigures | None) -> list[str]:
    """The last hour as four inline SVG charts (``charts``), one point a minute."""
    if trends is None:
        return ['<p class="none">No trends sampled.</p>']
    span = trends.span
    bytes_chart = line_chart(
        "Bytes served per second, from the cache and from upstreams",
        [Series("cache", trends.bytes_cache), Series("upstream", trends.bytes_upstream)],
        span=span,
        label=_per_second,
    )
    ratio_chart = line_chart(
        "Cache hit ratio per minute",
        [Series("hit ratio", trends.hit_ratio)],
        span=span,
        label=format_ratio,
        top=1.0,
    )
    requests_chart = line_chart(
        "Requests answered per minute",
        [Series("requests", trends.requests)],
        span=span,
        label=_per_minute,
    )
    remaining_chart = line_chart(
        "Upstream rate limit: pulls remaining",
        [Series(name, points) for name, points in trends.remaining],
        span=span,
        label=format_count,
    )
    lines = ['<div class="charts">']
    lines += _chart("Bytes served (cache, upstream)", bytes_chart)
    lines += _chart("Cache hit ratio", ratio_chart)
    lines += _chart("Requests", requests_chart)
    lines += _chart("Upstream pulls remaining", remaining_chart)
    lines.append("</div>")
    if not has_data(trends.requests):
        lines.append('<p class="none">The charts fill in as minutes pass (one point a minute).</p>')
    return lines


def _allowance(allowance: AllowanceFigures, now: float) -> str:
    if allowance.remaining is None:
        return "not said"
    text = format_count(allowance.remaining)
    if allowance.limit is not None:
        text += f" of {format_count(allowance.limit)}"
    if allowance.window:
        text += f" per {format_duration(allowance.window)}"
    if allowance.source:
        text += f", counted as {allowance.source}"
    if allowance.seen is not None:
        text += f" (as of {_when(allowance.seen, now)})"
    return text


def _ranking_table(
    css: str, heading: str, rows: Sequence[tuple[str, float]], empty: str
) -> list[str]:
    if not rows:
        return [f'<p class="none">{escape(empty)}</p>']
    lines = [f'<table class="{css}">', f"<tr><th>{escape(heading)}</th><th>Pulls</th></tr>"]
    for key, count in rows:
        shown = "<em>others</em>" if key == OTHER else f"<code>{escape(key)}</code>"
        lines.append(f"<tr><td>{shown}</td><td>{escape(format_count(count))}</td></tr>")
    lines.append("</table>")
    return lines


def _spending(spending: Spending | None, now: float) -> list[str]:
    """Who spent the rate limit: each allowance, then the top clients and images."""
    if spending is None:
        return ['<p class="none">No pull accounting.</p>']
    window = format_duration(spending.window)
    lines = [
        f"<p>Pulls as Docker Hub counts them (manifest GETs; HEADs and blobs are free) in the "
        f"last {escape(window)}: by the mirror's clients, and those the mirror itself had to "
        f"make upstream (cache misses, moved tags).</p>"
    ]
    if spending.allowances:
        lines += [
            '<table class="allowances">',
            "<tr><th>Registry</th><th>Credential</th><th>Pulls left</th>"
            "<th>Upstream pulls since start</th></tr>",
        ]
        for allowance in spending.allowances:
            left = escape(_allowance(allowance, now))
            if allowance.low:
                left = f'<span class="low">{left} (under 10%)</span>'
            lines.append(
                f"<tr><td>{escape(allowance.registry)}</td><td>{escape(allowance.identity)}</td>"
                f"<td>{left}</td><td>{escape(format_count(allowance.upstream_pulls))}</td></tr>"
            )
        lines.append("</table>")
    else:
        lines.append('<p class="none">No upstream has said anything of a rate limit yet.</p>')
    lines.append("<h3>Top clients</h3>")
    lines += _ranking_table(
        "top-clients", "Client", spending.clients, f"No pulls in the last {window}."
    )
    lines.append("<h3>Top images</h3>")
    lines += _ranking_table(
        "top-images", "Image", spending.images, f"No pulls in the last {window}."
    )
    lines.append("<h3>Pulled from upstream</h3>")
    lines += _ranking_table(
        "upstream-images",
        "Image",
        spending.upstream_images,
        f"No upstream pulls in the last {window}: the cache answered.",
    )
    return lines


def _images(status: StatusFigures) -> list[str]:
    """The largest and the most pulled cached images (``hubproxy cache ls`` has them all)."""
    if not status.largest:
        return ['<p class="none">Nothing cached yet.</p>']
    lines: list[str] = []
    largest = [(i, format_size(i.size)) for i in status.largest]
    pulled = [(i, f"{format_count(i.pulls)} pulls") for i in status.most_pulled]
    for title, shown in (("Largest", largest), ("Most pulled", pulled)):
        if not shown:
            continue
        rows = [f"<tr><th>{title}</th><th></th><th>Last pull</th></tr>"]
        for image, figure in shown:
            when = _when(image.last_used, status.now) if image.last_used else "-"
            rows.append(
                f"<tr><td><code>{escape(image.shown)}</code></td>"
                f"<td>{escape(figure)}</td><td>{escape(when)}</td></tr>"
            )
        lines += ['<table class="images">', *rows, "</table>"]
    return lines


def _snippets(snippets: Sequence[Snippet]) -> list[str]:
    if not snippets:
        return ["<p>No client configuration can be made for this mirror's URL.</p>"]
    lines = []
    for client, where, text in snippets:
        lines += [
            "<section>",
            f"<h3>{escape(client)}</h3>",
            f"<p>{escape(where[:1].upper() + where[1:])}.</p>",
            f"<pre>{escape(text)}</pre>",
            "</section>",
        ]
    return lines


def render_status_page(status: StatusFigures) -> bytes:
    """The whole page, UTF-8 encoded (serve it as ``text/html; charset=utf-8``)."""
    name = escape(status.name)
    uptime = format_duration(status.now - status.started_at)
    lines = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        # transfers move while one watches: reload now and then (no script needed)
        f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">',
        f"<title>{name}: Docker Hub mirror</title>",
        f"<style>{_STYLE}</style>",
        "</head>",
        "<body>",
        "<main>",
        f"<h1>{name}</h1>",
        f'<p class="sub">A Docker Hub registry mirror at {_link(status.url)}, '
        f"hubproxy {escape(status.version)}, up {escape(uptime)}.</p>",
        "<h2>Serving</h2>",
        *_registries(status.registries, status.now),
        "<h2>Figures</h2>",
        *_figures(status),
        *(
            ["<h2>Instances (--peer)</h2>", *_peers(status.peers, status.now)]
            if status.peers
            else []
        ),
        *(["<h2>Cache store</h2>", *_store(status.store, status.now)] if status.store else []),
        "<h2>The last hour</h2>",
        *_trends(status.trends),
        "<h2>Transfers in progress</h2>",
        *_transfers(status.transfers),
        "<h2>Recent pulls</h2>",
        *_pulls(status.pulls, status.now),
        "<h2>Cached images</h2>",
        *_images(status),
        "<h2>Upstream rate limits</h2>",
        *_rate_limits(status),
        "<h2>Who spent the rate limit</h2>",
        *_spending(status.spending, status.now),
        "<h2>Use this mirror</h2>",
        *_snippets(status.snippets),
        "</main>",
        "</body>",
        "</html>",
    ]
    return ("\n".join(lines) + "\n").encode("utf-8")
