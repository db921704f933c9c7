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
from ..policy.registries import RegistryTable
from ..policy.urls import Url
from .clientconfig import CLIENTS, snippet
from .metrics import HubMetrics

Snippet = tuple[str, str, str]  # client, where it goes (and what else to do), text to paste

_SIZE_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
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
"""


def format_bytes(size: int) -> str:
    """A byte count for people: ``512 B``, ``1.5 KiB``, ``20 GiB`` (binary units, about three
    significant digits)."""
    if size < 1024:
        return f"{size} B"
    value = float(size)
    for unit in _SIZE_UNITS:
        value /= 1024
        # Round first, then decide: 1023.7 KiB reads better as "1.0 MiB" than as "1024 KiB".
        if value < 1023.5 or unit == _SIZE_UNITS[-1]:
            return f"{value:.1f} {unit}" if value < 9.95 else f"{value:.0f} {unit}"
    raise AssertionError("unreachable")


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


def _shown(url: Url) -> str:
    return str(url.origin) if url.target == "/" else str(url)  # no lone trailing slash


def registry_figures(table: RegistryTable) -> tuple[RegistryFigures, ...]:
    """Each registry of ``table``, in its order (the default first), with its upstreams."""
    return tuple(
        RegistryFigures(
            name=registry.name,
            primary=_shown(registry.upstreams[0]) if registry.upstreams else None,
            fallbacks=tuple(_shown(url) for url in registry.upstreams[1:]),
            default=registry.name == table.default,
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
    requests: int = 0
    rate_limited_last_hour: int = 0  # 429s received from upstreams in the last hour
    last_rate_limited_at: float | None = None
    ratelimit_remaining: tuple[tuple[str, float], ...] = ()  # upstream, latest value seen


def status_figures(
    metrics: HubMetrics,
    *,
    url: str,
    table: RegistryTable,
    now: float,
    name: str = "hubproxy",
    snippets: tuple[Snippet, ...] | None = None,
) -> StatusFigures:
    """The page's figures from the live metrics and the registries served (``table``); ``now``
    is the wall clock (``time.time()``). ``snippets`` defaults to ``client_snippets(url)``."""
    cache = metrics.cache() if metrics.cache is not None else None
    sources = metrics.response_bytes.series()
    remaining = metrics.ratelimit_remaining.series()
    return StatusFigures(
        url=url,
        name=name,
        version=metrics.version,
        registries=registry_figures(table),
        snippets=client_snippets(url) if snippets is None else snippets,
        now=now,
        started_at=metrics.started_at,
        cache_bytes=cache.bytes_used if cache else 0,
        cache_limit=cache.limit_bytes if cache else 0,
        cache_blobs=cache.blobs if cache else 0,
        cache_hit_ratio=metrics.hit_ratio(),
        bytes_from_cache=int(sources.get(("cache",), 0)),
        bytes_from_upstream=int(sources.get(("upstream",), 0)),
        requests=int(sum(metrics.requests.series().values())),
        rate_limited_last_hour=metrics.rate_limited_times.count(now),
        last_rate_limited_at=metrics.rate_limited_times.last,
        ratelimit_remaining=tuple(sorted((key[0], value) for key, value in remaining.items())),
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


def _registries(registries: Sequence[RegistryFigures]) -> list[str]:
    """One item per registry: its name, then its primary and its fallbacks, each labelled; the
    labels belong to one registry's upstreams, never to the list of registries."""
    if not registries:
        return ["<p>No upstream registry is configured.</p>"]
    items = []
    for registry in registries:
        name = f"<strong>{escape(registry.name)}</strong>"
        if registry.default:
            name += " (default)"
        if registry.primary is None:
            upstreams = ["no upstream configured"]
        else:
            upstreams = [f"{_link(registry.primary)} (primary)"]
        upstreams += [f"{_link(url)} (fallback)" for url in registry.fallbacks]
        items.append(f"<li>{name}: {', '.join(upstreams)}</li>")
    return ["<ul>", *items, "</ul>"]


def _figures(status: StatusFigures) -> list[str]:
    if status.cache_limit > 0:
        used = status.cache_bytes / status.cache_limit
        cache = (
            f"{escape(format_bytes(status.cache_bytes))} of "
            f"{escape(format_bytes(status.cache_limit))} ({escape(format_ratio(used))}), "
            f"{escape(format_count(status.cache_blobs))} blobs"
        )
    else:
        cache = "no cache configured: every blob comes from upstream"
    return [
        "<table>",
        _row("Requests served", escape(format_count(status.requests))),
        _row("Cache", cache),
        _row("Cache hit ratio", escape(format_ratio(status.cache_hit_ratio))),
        _row("Served from cache (saved)", escape(format_bytes(status.bytes_from_cache))),
        _row("Served from upstream", escape(format_bytes(status.bytes_from_upstream))),
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
    for upstream, remaining in status.ratelimit_remaining:
        rows.append(
            f"<tr><th>Pulls remaining at {escape(upstream)}</th>"
            f"<td>{escape(format_count(remaining))}</td></tr>"
        )
    return ["<table>", *rows, "</table>"]


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
        f"<title>{name}: Docker Hub mirror</title>",
        f"<style>{_STYLE}</style>",
        "</head>",
        "<body>",
        "<main>",
        f"<h1>{name}</h1>",
        f'<p class="sub">A Docker Hub registry mirror at {_link(status.url)}, '
        f"hubproxy {escape(status.version)}, up {escape(uptime)}.</p>",
        "<h2>Serving</h2>",
        *_registries(status.registries),
        "<h2>Figures</h2>",
        *_figures(status),
        "<h2>Upstream rate limits</h2>",
        *_rate_limits(status),
        "<h2>Use this mirror</h2>",
        *_snippets(status.snippets),
        "</main>",
        "</body>",
        "</html>",
    ]
    return ("\n".join(lines) + "\n").encode("utf-8")
