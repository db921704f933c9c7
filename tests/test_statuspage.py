"""The status page at ``/``: read back with the stdlib HTML parser, never by string matching
alone."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from html.parser import HTMLParser
from pathlib import Path

import pytest
import trio

from hubproxy import __version__
from hubproxy.cache.objects import LocalDirectory
from hubproxy.cache.peering import Peers
from hubproxy.cache.shared import STORE_REST, SharedStore
from hubproxy.ops.activity import (
    TransferFigures,
    Transfers,
    UpstreamCondition,
    UpstreamHealth,
    UpstreamState,
)
from hubproxy.ops.clientconfig import CLIENTS, snippet
from hubproxy.ops.metrics import CacheFigures, HubMetrics, RateLimit
from hubproxy.ops.statuspage import (
    PeerFigures,
    RegistryFigures,
    StatusFigures,
    StoreFigures,
    client_snippets,
    format_count,
    format_duration,
    format_ratio,
    format_time,
    peer_figures,
    registry_figures,
    render_status_page,
    status_figures,
    store_figures,
    without_credentials,
)
from hubproxy.ops.workermetrics import merge, snapshot
from hubproxy.policy.pulls import PullSummary
from hubproxy.policy.registries import Registry, RegistryTable, build_table
from hubproxy.policy.urls import base_url, parse_url

VOID = frozenset({"meta", "br", "hr", "img", "link", "input"})
HUB = "https://registry-1.docker.io"
FALLBACK = "https://mirror.gcr.io"
GHCR = "https://ghcr.io"
SERVED = (
    RegistryFigures(name="docker.io", primary=HUB, fallbacks=(FALLBACK,), default=True),
    RegistryFigures(name="ghcr.io", primary=GHCR),
)


class Page(HTMLParser):
    """Tags, text by enclosing elements, and any structural error, from one parse."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.doctype = ""
        self.tags: list[str] = []
        self.attributes: list[tuple[str, dict[str, str | None]]] = []
        self.stack: list[tuple[str, int]] = []  # open elements: tag, serial number
        self.errors: list[str] = []
        self.texts: list[tuple[tuple[tuple[str, int], ...], str]] = []

    def handle_decl(self, decl: str) -> None:
        self.doctype = decl

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attributes.append((tag, dict(attrs)))
        if tag not in VOID:
            self.stack.append((tag, len(self.tags)))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.errors.append(f"self-closing <{tag}/> in HTML5")

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            self.errors.append(f"end tag for void <{tag}>")
        elif not self.stack or self.stack[-1][0] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.texts.append((tuple(self.stack), data))

    def text(self) -> str:
        return "".join(data for _, data in self.texts)

    def inside(self, tag: str) -> list[str]:
        """The text of each outermost ``tag`` element, in document order."""
        found: dict[int, str] = {}
        for stack, data in self.texts:
            serials = [serial for name, serial in stack if name == tag]
            if serials:
                found[serials[0]] = found.get(serials[0], "") + data
        return list(found.values())


def parse(page: bytes) -> Page:
    parser = Page()
    parser.feed(page.decode("utf-8"))
    parser.close()
    assert parser.errors == []
    assert parser.stack == []  # every element closed
    return parser


NOW = 1_714_564_800.0  # 2024-05-01 12:00:00 UTC
OK = UpstreamState(UpstreamCondition.OK, last_ok=NOW - 10)
DEAD = UpstreamState(
    UpstreamCondition.UNREACHABLE,
    since=NOW - 125,
    error="cannot connect to registry-1.docker.io:443: connection refused",
)
LIMITED = UpstreamState(UpstreamCondition.RATE_LIMITED, until=NOW + 3600)
LAYER = "sha256:" + "ab" * 32


FIGURES = StatusFigures(
    url="https://mirror.example.com",
    name="office mirror",
    version="9.8.7",
    registries=SERVED,
    snippets=client_snippets("https://mirror.example.com"),
    now=1_714_564_800.0,  # 2024-05-01 12:00:00 UTC
    started_at=1_714_564_800.0 - (2 * 86400 + 3 * 3600 + 59),
    cache_bytes=3 * 2**30 // 2,
    cache_limit=20 * 2**30,
    cache_blobs=1234,
    cache_hit_ratio=0.875,
    bytes_from_cache=5 * 2**40,
    bytes_from_upstream=700 * 2**20,
    requests=98765,
    rate_limited_last_hour=3,
    last_rate_limited_at=1_714_564_800.0 - 300,
    ratelimits=((HUB, RateLimit(76.0, limit=100.0, window=21600.0, seen=NOW - 60)),),
)


def test_structure_and_title() -> None:
    page = parse(render_status_page(FIGURES))
    assert page.doctype.lower() == "doctype html"
    assert page.tags[:3] == ["html", "head", "meta"]
    assert page.inside("title") == ["office mirror: Docker Hub mirror"]
    assert page.inside("h1") == ["office mirror"]
    assert ("meta", {"charset": "utf-8"}) in page.attributes
    # Self-contained: nothing loaded from elsewhere, nothing run.
    assert not {"script", "link", "img", "iframe", "object"} & set(page.tags)
    names = {name for _, attrs in page.attributes for name in attrs}
    assert not {name for name in names if name.startswith("on") or name in ("src", "srcset")}


def _upstream_rows(page_bytes: bytes) -> list[list[str]]:
    """The registries table, one list of cell texts per upstream row."""
    page = parse(page_bytes)
    return [row for row in _table_rows(page, "registries") if row[0] != "Registry"]


def _table_rows(page: Page, cls: str) -> list[list[str]]:
    """Each <tr> of the table with class ``cls``: the texts of its cells."""
    table = next(
        serial
        for serial, (tag, attrs) in enumerate(page.attributes, 1)
        if tag == "table" and attrs.get("class") == cls
    )
    rows: dict[int, dict[int, str]] = {}
    for stack, data in page.texts:
        if ("table", table) not in stack:
            continue
        row = next((serial for tag, serial in stack if tag == "tr"), None)
        cell = next((serial for tag, serial in stack if tag in ("td", "th")), None)
        if row is None or cell is None:
            continue
        cells = rows.setdefault(row, {})
        cells[cell] = cells.get(cell, "") + data
    found = []
    for serial in sorted(rows):
        # cells without text (a registry's name is shown on its first row only) count too
        cell_serials = [
            n
            for n, (tag, _) in enumerate(page.attributes, 1)
            if tag in ("td", "th") and _parent_row(page, n) == serial
        ]
        found.append([rows[serial].get(n, "") for n in cell_serials])
    return found


def _parent_row(page: Page, cell: int) -> int | None:
    """The serial of the <tr> a cell (by serial) is in: the last <tr> started before it."""
    rows = [n for n, (tag, _) in enumerate(page.attributes, 1) if tag == "tr" and n < cell]
    return rows[-1] if rows else None


def test_shows_what_it_serves() -> None:
    page = parse(render_status_page(FIGURES))
    text = page.text()
    assert "hubproxy 9.8.7" in text
    assert page.inside("strong") == ["docker.io", "ghcr.io"]
    links = [attrs["href"] for tag, attrs in page.attributes if tag == "a"]
    assert links == ["https://mirror.example.com", HUB, FALLBACK, GHCR]


def test_other_registries_are_not_fallbacks() -> None:
    """Each registry with its own upstreams, primary and fallbacks named as such: ghcr.io is a
    registry of its own, not a fallback of docker.io; docker.io's fallback has a row of its
    own, under docker.io, not folded into the primary's."""
    assert _upstream_rows(render_status_page(FIGURES)) == [
        ["docker.io (default)", HUB, "primary", "not asked yet"],
        ["", FALLBACK, "fallback", "not asked yet"],
        ["ghcr.io", GHCR, "primary", "not asked yet"],
    ]
    many = replace(
        FIGURES,
        registries=(
            RegistryFigures(name="ghcr.io", primary=GHCR),
            RegistryFigures(name="quay.io", primary="https://quay.io", fallbacks=(GHCR, HUB)),
        ),
    )
    raw = render_status_page(many)
    assert _upstream_rows(raw) == [
        ["ghcr.io", GHCR, "primary", "not asked yet"],
        ["quay.io", "https://quay.io", "primary", "not asked yet"],
        ["", GHCR, "fallback 1", "not asked yet"],
        ["", HUB, "fallback 2", "not asked yet"],
    ]
    assert "(default)" not in parse(raw).text()  # only the registry marked default says so


def test_registry_without_upstream() -> None:
    figures = replace(FIGURES, registries=(RegistryFigures(name="docker.io", primary=None),))
    raw = render_status_page(figures)
    assert _upstream_rows(raw) == [["docker.io", "no upstream configured"]]
    assert [attrs["href"] for tag, attrs in parse(raw).attributes if tag == "a"] == [FIGURES.url]


def _state_classes(page: Page) -> list[str]:
    return [
        attrs.get("class") or ""
        for tag, attrs in page.attributes
        if tag == "span" and "state" in (attrs.get("class") or "").split()
    ]


def test_upstream_states_are_shown_and_a_dead_one_is_red() -> None:
    """ok / rate-limited until T / unreachable since T with the last error; anything but ok in
    the red badge, its row marked down."""
    served = (
        RegistryFigures(
            name="docker.io",
            primary=HUB,
            fallbacks=(FALLBACK,),
            default=True,
            states=(DEAD, LIMITED),
        ),
        RegistryFigures(name="ghcr.io", primary=GHCR, states=(OK,)),
    )
    raw = render_status_page(replace(FIGURES, registries=served))
    rows = _upstream_rows(raw)
    assert [row[3] for row in rows] == [
        "unreachable since 2024-05-01 11:57:55 UTC (2m 5s ago): "
        "cannot connect to registry-1.docker.io:443: connection refused",
        "rate-limited until 2024-05-01 13:00:00 UTC (in 1h)",
        "ok last answer 2024-05-01 11:59:50 UTC (10s ago)",
    ]
    page = parse(raw)
    assert _state_classes(page) == ["state state-bad", "state state-bad", "state state-ok"]
    row_classes = [attrs.get("class") for tag, attrs in page.attributes if tag == "tr"]
    assert row_classes.count("upstream down") == 2
    assert row_classes.count("upstream") == 1
    assert ".state-bad { background: #c62828;" in raw.decode()  # red, white text


def test_registry_figures_from_the_table() -> None:
    hub = Registry("docker.io", (parse_url(HUB), parse_url(FALLBACK)), library_prefix=True)
    ghcr = Registry("ghcr.io", (parse_url(GHCR),))
    table = build_table(hub, [ghcr, Registry("docker.io", (parse_url(GHCR),))], [])
    assert registry_figures(table) == (
        RegistryFigures(name="docker.io", primary=HUB, fallbacks=(FALLBACK,), default=True),
        RegistryFigures(name="ghcr.io", primary=GHCR),
    )
    # a table whose default is another registry marks that one
    other = build_table(ghcr, [hub], [])
    assert [(r.name, r.default) for r in registry_figures(other)] == [
        ("ghcr.io", True),
        ("docker.io", False),
    ]
    # an upstream under a path keeps it; a bare origin is shown without the lone "/"
    prefixed = build_table(ghcr, [Registry("r.example", (parse_url("https://r.example/x/"),))], [])
    assert registry_figures(prefixed)[1].primary == "https://r.example/x/"
    empty = RegistryTable((Registry("docker.io", ()),))
    assert registry_figures(empty) == (
        RegistryFigures(name="docker.io", primary=None, default=True),
    )


def test_each_client_snippet_verbatim_in_a_pre() -> None:
    page = parse(render_status_page(FIGURES))
    pres = page.inside("pre")
    assert len(pres) == len(CLIENTS)
    for client in CLIENTS:
        text, hint = snippet(client, "https://mirror.example.com", None)
        assert text in pres
        assert client in page.inside("h3")
        assert hint[1:] in page.text()


def test_figures_appear() -> None:
    text = parse(render_status_page(FIGURES)).text()
    for expected in (
        "up 2d 3h",
        "1.5 GiB of 20 GiB (7.5%), 1,234 blobs",
        "87.5%",
        "5 TiB",
        "700 MiB",
        "98,765",
        "2024-05-01 11:55:00 UTC (5m ago)",
    ):
        assert expected in text
    rows = dict(_rows(render_status_page(FIGURES)))
    assert rows["429s in the last hour"] == "3"
    assert rows[f"Pulls remaining at {HUB}"] == (
        "76 of 100 per 6h (as of 2024-05-01 11:59:00 UTC (1m ago))"
    )
    assert rows["Requests served"] == "98,765"
    assert rows["Cache hit ratio"] == "87.5%"
    assert rows["Served from cache (saved)"] == "5 TiB"
    assert rows["Served from upstream"] == "700 MiB"


def _rows(page_bytes: bytes) -> list[tuple[str, str]]:
    """The label/value rows (a <th> then a <td>) of every table."""
    page = parse(page_bytes)
    found = []
    for serial, (tag, _) in enumerate(page.attributes, 1):
        if tag != "tr":
            continue
        cells = [
            (cell_tag, n)
            for n, (cell_tag, _) in enumerate(page.attributes, 1)
            if cell_tag in ("th", "td") and _parent_row(page, n) == serial
        ]
        if [cell_tag for cell_tag, _ in cells] == ["th", "td"]:
            texts = ["".join(d for st, d in page.texts if (t, n) in st) for t, n in cells]
            found.append((texts[0], texts[1]))
    return found


def test_quiet_mirror_without_cache() -> None:
    figures = StatusFigures(url="http://127.0.0.1:5000", now=100.0, started_at=100.0)
    rows = dict(_rows(render_status_page(figures)))
    assert rows["Cache"].startswith("no cache configured")
    assert rows["Last 429"] == "never"
    assert rows["429s in the last hour"] == "0"
    text = parse(render_status_page(figures)).text()
    assert "No upstream registry is configured." in text
    assert "No client configuration" in text
    assert f"hubproxy {__version__}, up 0s" in text


HOSTILE = 'https://evil.example/<script>alert("x")</script>&amp;'


@pytest.mark.parametrize(
    "figures",
    [
        replace(
            FIGURES,
            registries=(RegistryFigures(name=HOSTILE, primary=HOSTILE, fallbacks=(HOSTILE,)),),
        ),
        replace(FIGURES, url=HOSTILE),
        replace(FIGURES, name=HOSTILE),
        replace(FIGURES, version=HOSTILE),
        replace(FIGURES, ratelimits=((HOSTILE, RateLimit(1.0)),)),
        replace(
            FIGURES,
            registries=(
                RegistryFigures(
                    name="docker.io", primary=HUB, states=(replace(DEAD, error=HOSTILE),)
                ),
            ),
        ),
        replace(FIGURES, transfers=(TransferFigures(HOSTILE, HOSTILE, 1, 2, 1.0),)),
        replace(
            FIGURES,
            pulls=(PullSummary(HOSTILE, HOSTILE, NOW, 1, 1, 1, 0, 1.0, True),),
        ),
        replace(FIGURES, snippets=((HOSTILE, HOSTILE, HOSTILE),)),
        replace(FIGURES, peers=(PeerFigures(url=HOSTILE, me=True), PeerFigures(url=HOSTILE))),
        replace(FIGURES, store=StoreFigures(url=HOSTILE)),
    ],
)
def test_everything_interpolated_is_escaped(figures: StatusFigures) -> None:
    raw = render_status_page(figures)
    assert b"<script" not in raw
    page = parse(raw)
    assert "script" not in page.tags
    assert HOSTILE in page.text() or HOSTILE[1:] in page.text()  # read back exactly


@pytest.mark.parametrize("url", ["javascript:alert(1)", "JavaScript:alert(1)", "data:text/html,x"])
def test_only_http_urls_become_links(url: str) -> None:
    served = (RegistryFigures(name="docker.io", primary=url, fallbacks=(url,)),)
    page = parse(render_status_page(replace(FIGURES, url=url, registries=served)))
    hrefs = [attrs["href"] for tag, attrs in page.attributes if tag == "a"]
    assert hrefs == []
    assert page.inside("code") == [url, url, url]  # the mirror's URL, the primary, the fallback


def test_client_snippets() -> None:
    found = client_snippets("https://mirror.example.com:8443", ca="/srv/ca.pem")
    assert [client for client, _, _ in found] == list(CLIENTS)
    for client, where, text in found:
        assert (text, where) == snippet(client, "https://mirror.example.com:8443", "/srv/ca.pem")
    assert "/etc/docker/daemon.json" in found[0][1]


def test_client_snippets_for_an_ipv6_mirror() -> None:
    """podman's mirror location is an image reference, which cannot name [2001:db8::1] for
    podman 4.3: the page leaves podman out and shows the others."""
    found = client_snippets("https://[2001:db8::1]:5000")
    assert [client for client, _, _ in found] == [c for c in CLIENTS if c != "podman"]
    loopback = client_snippets("https://[::1]:5000")
    assert [client for client, _, _ in loopback] == list(CLIENTS)
    assert 'location = "localhost:5000"' in dict((c, t) for c, _, t in loopback)["podman"]


@pytest.mark.parametrize(
    "url", ["https://mirror.example.com/v2/", "ftp://mirror.example.com", "not a url", ""]
)
def test_client_snippets_unusable_url_omitted(url: str) -> None:
    assert client_snippets(url) == ()


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.9, "0s"),
        (-5, "0s"),
        (math.nan, "0s"),
        (1, "1s"),
        (59.9, "59s"),
        (60, "1m"),
        (63, "1m 3s"),
        (3600, "1h"),
        (3600 + 5, "1h"),  # two units: hours and minutes
        (2 * 3600 + 5 * 60 + 9, "2h 5m"),
        (86400, "1d"),
        (3 * 86400 + 4 * 3600 + 59, "3d 4h"),
        (400 * 86400, "400d"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    ("ratio", "text"),
    [(0.0, "0.0%"), (0.875, "87.5%"), (1.0, "100.0%"), (1 / 3, "33.3%"), (math.nan, "-")],
)
def test_format_ratio(ratio: float, text: str) -> None:
    assert format_ratio(ratio) == text


@pytest.mark.parametrize(
    ("value", "text"),
    [(0, "0"), (76.0, "76"), (1234567, "1,234,567"), (2.5, "2.50"), (math.inf, "-")],
)
def test_format_count(value: float, text: str) -> None:
    assert format_count(value) == text


def test_format_time() -> None:
    assert format_time(0) == "1970-01-01 00:00:00 UTC"
    assert format_time(1_714_564_800.9) == "2024-05-01 12:00:00 UTC"


@dataclass
class Record:
    """A response's progress, as ``net.server.AccessRecord`` keeps it."""

    client: str
    bytes_sent: int
    length: int | None
    started: float


def test_status_figures_from_metrics() -> None:
    metrics = HubMetrics(version="9.8.7", started_at=1000.0)
    metrics.cache = lambda: CacheFigures(bytes_used=2**30, blobs=7, limit_bytes=2**34)
    metrics.requests.inc(1, route="blob", status="200")
    metrics.requests.inc(2, route="manifest", status="404")
    metrics.requests.inc(5, route="ops", status="200")  # the page itself, /metrics: not served
    metrics.response_bytes.inc(4096, source="cache")
    metrics.response_bytes.inc(100, source="upstream")
    metrics.cache_requests.inc(1, kind="blob", result="hit")
    metrics.cache_requests.inc(1, kind="blob", result="miss")
    metrics.note_rate_limited(HUB, when=1000.0)
    metrics.note_rate_limited(HUB, when=9000.0)
    metrics.note_ratelimit_headers(FALLBACK, [(b"ratelimit-remaining", b"12;w=60")], 9500.0)
    metrics.note_ratelimit_headers(
        HUB,
        [
            (b"ratelimit-limit", b"100;w=21600"),
            (b"ratelimit-remaining", b"76;w=21600"),
            (b"ratelimit-reset", b"300"),
        ],
        9900.0,
    )
    activity = metrics.activity
    activity.upstreams.failed(FALLBACK, "connection refused", wall=9990.0)
    activity.upstreams.answered(HUB, 200, wall=9999.0, until=None)
    activity.transfers.begin("library/alpine " + LAYER[:19], Record("10.0.0.5", 500, 2000, 40.0))
    activity.pulls.manifest(
        client="10.0.0.5",
        repository="library/alpine",
        reference="3.20",
        method="GET",
        layers=frozenset({LAYER}),
        size=900,
        now=41.0,
        wall=9995.0,
    )

    table = build_table(
        Registry("docker.io", (parse_url(HUB), parse_url(FALLBACK))),
        [Registry("ghcr.io", (parse_url(GHCR),))],
        [],
    )
    figures = status_figures(
        metrics,
        url="https://mirror.example.com",
        table=table,
        now=10000.0,
        monotonic=50.0,
        disk_free=5 * 2**30,
    )
    unknown = UpstreamState(UpstreamCondition.UNKNOWN)
    assert figures == StatusFigures(
        url="https://mirror.example.com",
        version="9.8.7",
        registries=(
            replace(
                SERVED[0],
                states=(
                    UpstreamState(UpstreamCondition.OK, last_ok=9999.0),
                    UpstreamState(
                        UpstreamCondition.UNREACHABLE, since=9990.0, error="connection refused"
                    ),
                ),
            ),
            replace(SERVED[1], states=(unknown,)),
        ),
        snippets=client_snippets("https://mirror.example.com"),
        now=10000.0,
        started_at=1000.0,
        cache_bytes=2**30,
        cache_limit=2**34,
        cache_blobs=7,
        cache_hit_ratio=0.5,
        bytes_from_cache=4096,
        bytes_from_upstream=100,
        requests=3,
        disk_free=5 * 2**30,
        rate_limited_last_hour=1,
        last_rate_limited_at=9000.0,
        ratelimits=(  # sorted by upstream
            (FALLBACK, RateLimit(12.0, window=60.0, seen=9500.0)),
            (HUB, RateLimit(76.0, limit=100.0, window=21600.0, reset=10200.0, seen=9900.0)),
        ),
        transfers=(
            TransferFigures("10.0.0.5", "library/alpine sha256:abababababab", 500, 2000, 10.0),
        ),
        pulls=(PullSummary("10.0.0.5", "library/alpine:3.20", 9995.0, 0, 1, 900, 0, 0.0, False),),
    )
    rows = dict(_rows(render_status_page(figures)))
    assert rows["Requests served"] == "3"
    assert rows["Free disk (cache)"] == "5 GiB free"
    assert rows[f"Pulls remaining at {HUB}"] == (
        "76 of 100 per 6h, resets 1970-01-01 02:50:00 UTC (in 3m 20s) "
        "(as of 1970-01-01 02:45:00 UTC (1m 40s ago))"
    )


def test_transfers_and_recent_pulls_are_listed() -> None:
    figures = replace(
        FIGURES,
        transfers=(
            TransferFigures(
                "10.0.0.5", "library/alpine sha256:abababababab", 3 * 2**20, 2**23, 2.0
            ),
            TransferFigures("10.0.0.7", "library/alpine:3.20", 0, None, 0.0),
        ),
        pulls=(
            PullSummary("10.0.0.5", "library/alpine:3.20", NOW - 3, 1, 3, 3_500_000, 0, 1.0, False),
            PullSummary("10.0.0.6", "library/nginx:1", NOW - 600, 3, 3, 35_000_000, 2, 1.2, True),
            PullSummary("10.0.0.6", "library/redis:7", NOW - 900, 1, 4, 1_000, 1, 0.5, True),
        ),
    )
    page = parse(render_status_page(figures))
    assert _table_rows(page, "transfers") == [
        ["Client", "Image or blob", "Sent", "Rate", "For"],
        ["10.0.0.5", "library/alpine sha256:abababababab", "3 MiB of 8 MiB (37.5%)",
         "1.5 MiB/s", "2s"],
        ["10.0.0.7", "library/alpine:3.20", "0 B", "0 B/s", "0s"],
    ]  # fmt: skip
    assert _table_rows(page, "pulls") == [
        ["When", "Image", "Client", "What"],
        ["2024-05-01 11:59:57 UTC (3s ago)", "library/alpine:3.20", "10.0.0.5",
         "under way, 1 of 3 layers, 3.5 MB, 0 from cache"],
        ["2024-05-01 11:50:00 UTC (10m ago)", "library/nginx:1", "10.0.0.6",
         "3 layers, 35.0 MB, 2 from cache, 1.2 s"],
        ["2024-05-01 11:45:00 UTC (15m ago)", "library/redis:7", "10.0.0.6",
         "1 of 4 layers (the client had the rest), 1.0 kB, 1 from cache, 0.5 s"],
    ]  # fmt: skip
    quiet = parse(render_status_page(FIGURES)).text()
    assert "No transfer under way." in quiet
    assert "No image pulled since the start." in quiet


def test_status_figures_without_cache() -> None:
    metrics = HubMetrics(started_at=0.0)
    figures = status_figures(metrics, url="http://127.0.0.1:5000", table=RegistryTable(()), now=1.0)
    assert (figures.cache_bytes, figures.cache_limit, figures.cache_blobs) == (0, 0, 0)
    assert figures.last_rate_limited_at is None


def test_upstream_health_from_answers_and_failures() -> None:
    health = UpstreamHealth()
    assert health.state(HUB, 0.0) == UpstreamState(UpstreamCondition.UNKNOWN)
    health.answered(HUB, 200, wall=10.0, until=None)
    assert health.state(HUB, 11.0) == UpstreamState(UpstreamCondition.OK, last_ok=10.0)
    health.failed(HUB, "connection refused", wall=20.0)
    health.failed(HUB, "timed out", wall=30.0)  # still down since the first failure
    assert health.state(HUB, 31.0) == UpstreamState(
        UpstreamCondition.UNREACHABLE, since=20.0, error="timed out", last_ok=10.0
    )
    health.answered(HUB, 503, wall=40.0, until=None)
    assert health.state(HUB, 41.0) == UpstreamState(
        UpstreamCondition.FAILING, since=20.0, error="answered 503", last_ok=10.0
    )
    health.answered(HUB, 404, wall=50.0, until=None)  # an answer, not a failure: back up
    assert health.state(HUB, 51.0) == UpstreamState(UpstreamCondition.OK, last_ok=50.0)
    health.answered(HUB, 429, wall=60.0, until=120.0)
    limited = health.state(HUB, 61.0)
    assert (limited.condition, limited.until, limited.ok) == ("rate-limited", 120.0, False)
    assert health.state(HUB, 120.0).condition == UpstreamCondition.OK  # the rest is over
    assert health.state(FALLBACK, 61.0).condition == UpstreamCondition.UNKNOWN  # apart


def test_transfers_follow_their_records() -> None:
    transfers = Transfers()
    record = Record("10.0.0.5", 0, None, 100.0)
    key = transfers.begin("library/alpine:3.20", record)
    assert transfers.figures(100.0) == (
        TransferFigures("10.0.0.5", "library/alpine:3.20", 0, None, 0.0),
    )
    record.bytes_sent, record.length = 4000, 8000
    [now] = transfers.figures(102.0)
    assert (now.bytes, now.size, now.seconds, now.rate) == (4000, 8000, 2.0, 2000.0)
    transfers.end(key)
    transfers.end(key)  # twice is harmless
    assert transfers.figures(103.0) == () and len(transfers) == 0


# -- the other instances (--peer) and the shared store (--cache-store) -----------------------

PEER_URLS = ("https://10.0.0.1:5000", "https://10.0.0.2:5000", "https://10.0.0.3:5000")
PEERS = (
    PeerFigures(url=PEER_URLS[0], me=True),
    PeerFigures(url=PEER_URLS[1], filled=1200, passed=2, upstream=1),
    PeerFigures(url=PEER_URLS[2], resting_until=NOW + 20, filled=7, upstream=3),
)
STORE = StoreFigures(
    url="s3://mirror-cache/hubproxy at http://10.0.0.9:3900", commits=1234, reads=56, too_large=1
)


def test_peers_are_listed_this_one_marked_a_resting_one_red() -> None:
    raw = render_status_page(replace(FIGURES, peers=PEERS))
    page = parse(raw)
    assert "Instances (--peer)" in page.inside("h2")
    assert _table_rows(page, "peers") == [
        ["Instance", "State", "Blobs it sent", "Its 403/404 passed on", "Upstream asked instead"],
        [f"{PEER_URLS[0]} (this instance)",
         "owns its share of the blobs: fetches them from the upstream"],
        [PEER_URLS[1], "in use", "1,200", "2", "1"],
        [PEER_URLS[2], "resting until 2024-05-01 12:00:20 UTC (in 20s): its blobs come from the "
         "upstream meanwhile", "7", "0", "3"],
    ]  # fmt: skip
    row_classes = [attrs.get("class") for tag, attrs in page.attributes if tag == "tr"]
    assert [c for c in row_classes if c and c.startswith("peer")] == [
        "peer me",
        "peer",
        "peer down",
    ]
    assert _state_classes(page)[-2:] == ["state state-ok", "state state-bad"]  # after upstreams
    hrefs = [attrs["href"] for tag, attrs in page.attributes if tag == "a"]
    assert all(url in hrefs for url in PEER_URLS)  # each instance's own status page


def test_the_store_is_listed_and_a_resting_one_is_red() -> None:
    rows = dict(_rows(render_status_page(replace(FIGURES, store=STORE))))
    assert rows["Store"] == "s3://mirror-cache/hubproxy at http://10.0.0.9:3900"
    assert rows["State"] == "in use"
    assert rows["Blobs committed"] == "1,234"
    assert rows["Blobs read into the cache"] == "56"
    assert rows["Not committed for their size"] == "1"
    resting = replace(STORE, resting_until=NOW + 30)
    raw = render_status_page(replace(FIGURES, store=resting))
    assert dict(_rows(raw))["State"] == (
        "resting after a failed lookup, until 2024-05-01 12:00:30 UTC (in 30s): misses go to the "
        "upstream meanwhile"
    )
    assert _state_classes(parse(raw))[-1] == "state state-bad"


def test_a_single_mirror_shows_neither_peers_nor_store() -> None:
    page = parse(render_status_page(FIGURES))
    assert not {"Instances (--peer)", "Cache store"} & set(page.inside("h2"))
    assert not {"peers", "store"} & {attrs.get("class") for _, attrs in page.attributes}


@pytest.mark.parametrize(
    ("description", "shown"),
    [
        ("s3://mirror-cache/hubproxy", "s3://mirror-cache/hubproxy"),
        ("s3://b/p at http://127.0.0.1:3900", "s3://b/p at http://127.0.0.1:3900"),
        ("s3://b/p at https://key:secret@r2.example/x", "s3://b/p at https://***@r2.example/x"),
        ("s3://key:secret@b/p at http://k@h:1", "s3://***@b/p at http://***@h:1"),
        ("/srv/shared", "/srv/shared"),  # a local directory
    ],
)
def test_the_stores_url_never_shows_credentials(description: str, shown: str) -> None:
    assert without_credentials(description) == shown


async def test_peer_and_store_figures_from_their_sources(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """From the live objects: the peer list with this instance found in it, a peer put to rest
    by a failure (trio's clock turned into the wall clock), what came of asking each; the
    store's description and counts. Under --workers the counts are the whole mirror's (from the
    merged snapshot), the rests this process's."""
    peers = Peers(tuple(base_url(url) for url in PEER_URLS), 1, 2.0)
    for result in ("filled", "filled", "passed"):
        peers.note(0, result)
    peers.note(2, "upstream")
    peers.failed(2, "answered 503")
    shared = SharedStore(LocalDirectory(tmp_path / "store"))
    shared.objects.description = "s3://b/p at http://key:secret@10.0.0.9:3900"
    shared.commit_memory = 10
    await shared.commit("cd" * 32, 100, tmp_path / "blob")  # too large for it: kept locally
    shared.commits, shared.reads = 1, 2
    shared.resting_until = trio.current_time() + STORE_REST  # a lookup just failed
    metrics = HubMetrics(started_at=0.0)
    metrics.peers, metrics.store = peers, shared

    clock = trio.current_time()
    expected_peers = (
        PeerFigures(url=PEER_URLS[0], filled=2, passed=1),
        PeerFigures(url=PEER_URLS[1], me=True),
        PeerFigures(url=PEER_URLS[2], resting_until=NOW + 30, upstream=1),
    )
    expected_store = StoreFigures(
        url="s3://b/p at http://***@10.0.0.9:3900",
        commits=1,
        reads=2,
        too_large=1,
        resting_until=NOW + STORE_REST,
    )
    assert peer_figures(peers, None, now=NOW, clock=clock) == expected_peers
    assert store_figures(shared, None, now=NOW, clock=clock) == expected_store
    # once the rests are over (and with no clock to read them by) nothing is resting
    later = peer_figures(peers, None, now=NOW, clock=clock + 30)
    assert [p.resting_until for p in later] == [None, None, None]
    assert store_figures(shared, None, now=NOW, clock=None).resting_until is None

    table = RegistryTable(())
    figures = status_figures(
        metrics, url="https://mirror.example.com", table=table, now=NOW, trend_now=clock
    )
    assert (figures.peers, figures.store) == (expected_peers, expected_store)
    two_workers = merge([snapshot(metrics), snapshot(metrics)])
    figures = status_figures(
        metrics,
        url="https://mirror.example.com",
        table=table,
        now=NOW,
        families=two_workers,
        trend_now=clock,
    )
    assert figures.peers == (
        PeerFigures(url=PEER_URLS[0], filled=4, passed=2),
        PeerFigures(url=PEER_URLS[1], me=True),
        PeerFigures(url=PEER_URLS[2], resting_until=NOW + 30, upstream=2),
    )
    assert figures.store == replace(expected_store, commits=2, reads=4, too_large=2)
    no_peers = status_figures(HubMetrics(), url="https://m.example", table=table, now=NOW)
    assert (no_peers.peers, no_peers.store) == ((), None)
