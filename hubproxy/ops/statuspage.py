"""The human status page at ``/``: what this mirror is, how to use it, and how it is doing.

``render_status_page`` is a pure function from a frozen ``StatusFigures`` to the bytes of a small,
self-contained HTML5 page: no script, no external stylesheet or font, so it works on an offline
network. Every interpolated value goes through ``html.escape``: upstream URLs, the mirror's name
and URL come from configuration, and a page that shows them must not become a way to inject
markup. ``status_figures`` gathers the live values from ``HubMetrics``, ``registry_figures`` the
registries served and their upstreams from the ``RegistryTable``; the caller supplies the clock
readings, so nothing here reads one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

from .. import __version__
from ..policy.inventory import Image
from ..policy.pulls import PullSummary
from ..policy.registries import RegistryTable
from ..policy.sizes import format_decimal_size, format_size
from ..policy.urls import Url
from .activity import TransferFigures, UpstreamCondition, UpstreamHealth, UpstreamState
from .clientconfig import CLIENTS, snippet
from .metrics import HubMetrics, RateLimit

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
    largest: tuple[Image, ...] = ()  # cached images, largest first (cache/inventory.TOPS)
    most_pulled: tuple[Image, ...] = ()  # cached images, most pulled first


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
    tops: tuple[tuple[Image, ...], tuple[Image, ...]] = ((), ()),
) -> StatusFigures:
    """The page's figures from the live metrics and the registries served (``table``); ``now``
    is the wall clock (``time.time()``), ``monotonic`` the clock transfers started on
    (``time.monotonic()``), ``disk_free`` the bytes free under the cache, ``tops`` the
    largest and the most pulled cached images. ``snippets`` defaults to
    ``client_snippets(url)``."""
    cache = metrics.cache() if metrics.cache is not None else None
    sources = metrics.response_bytes.series()
    activity = metrics.activity
    return StatusFigures(
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
        largest=tops[0],
        most_pulled=tops[1],
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
    return [
        "<table>",
        *rows,
        _row("Cache hit ratio", escape(format_ratio(status.cache_hit_ratio))),
        _row("Served from cache (saved)", escape(format_size(status.bytes_from_cache))),
        _row("Served from upstream", escape(format_size(status.bytes_from_upstream))),
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
        "<h2>Transfers in progress</h2>",
        *_transfers(status.transfers),
        "<h2>Recent pulls</h2>",
        *_pulls(status.pulls, status.now),
        "<h2>Cached images</h2>",
        *_images(status),
        "<h2>Upstream rate limits</h2>",
        *_rate_limits(status),
        "<h2>Use this mirror</h2>",
        *_snippets(status.snippets),
        "</main>",
        "</body>",
        "</html>",
    ]
    return ("\n".join(lines) + "\n").encode("utf-8")
