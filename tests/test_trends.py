"""The status page's trends, pure: the SVG chart builder (ops.charts), the ring of samples and
the per-minute figures made from it (ops.trends), and the sampler on trio's autojump clock."""

from __future__ import annotations

import json
import math
import re
from typing import Any

import pytest
import trio
import trio.testing

from hubproxy.ops.charts import Series, line_chart, nice_ceiling, path_data
from hubproxy.ops.metrics import HubMetrics
from hubproxy.ops.statuspage import render_status_page, status_figures
from hubproxy.ops.trends import (
    POINTS,
    Families,
    Totals,
    TrendRing,
    has_data,
    sample_trends,
    totals_from,
    trend_figures,
)
from hubproxy.ops.workermetrics import merge, snapshot
from hubproxy.policy.registries import RegistryTable
from tests.test_statuspage import parse

PATHS = re.compile(r'<path class="series" data-series="([^"]*)" d="([^"]*)"')


def runs(d: str) -> list[int]:
    """The number of points of each run (``M`` then ``L``s) of a path's data."""
    found: list[int] = []
    for command in re.findall(r"[ML]", d):
        if command == "M":
            found.append(1)
        else:
            found[-1] += 1
    return found


@pytest.mark.parametrize(
    ("value", "ceiling"),
    [
        (0.0, 1.0),
        (-3.0, 1.0),
        (math.nan, 1.0),
        (math.inf, 1.0),
        (0.7, 1.0),
        (1.0, 1.0),
        (1.2, 2.0),
        (2.2, 2.5),
        (3.0, 5.0),
        (7.0, 10.0),
        (99.0, 100.0),
        (101.0, 200.0),
        (240_000.0, 250_000.0),
        (0.013, 0.02),
    ],
)
def test_nice_ceiling(value: float, ceiling: float) -> None:
    assert nice_ceiling(value) == pytest.approx(ceiling)


@pytest.mark.parametrize(
    ("points", "expected_runs"),
    [
        ([(-60.0, 1.0), (-30.0, 2.0), (0.0, 3.0)], [3]),
        ([(-60.0, 1.0), (-30.0, None), (-20.0, 2.0), (0.0, 3.0)], [1, 2]),  # a gap breaks it
        ([(-60.0, None), (0.0, None)], []),
        ([(-90.0, 5.0), (-30.0, 1.0), (0.0, math.nan)], [1]),  # before the span; NaN a gap
        ([], []),
    ],
)
def test_path_data_runs(points: list[tuple[float, float | None]], expected_runs: list[int]) -> None:
    d = path_data(points, span=60.0, top=4.0, width=100.0, height=50.0)
    assert runs(d) == expected_runs


def test_path_data_places_points_in_the_plot() -> None:
    d = path_data(
        [(-60.0, 0.0), (0.0, 4.0), (-30.0, 99.0)], span=60.0, top=4.0, width=100, height=50
    )
    coordinates = [tuple(map(float, pair.split())) for pair in re.split(r"[ML]", d)[1:]]
    xs = [x for x, _ in coordinates]
    ys = [y for _, y in coordinates]
    assert xs[0] < xs[2] < xs[1]  # -60 left, now right
    assert ys[0] > ys[1]  # 0 at the bottom, the top value at the top
    assert ys[2] == ys[1]  # a value above the top is drawn at the top, not outside


def test_line_chart_is_self_contained_svg() -> None:
    chart = line_chart(
        'Bytes <served> & "kept"',
        [
            Series("cache", ((-120.0, 10.0), (-60.0, 20.0), (0.0, 30.0))),
            Series("<script>", ((-60.0, 1.0), (0.0, 2.0))),
        ],
        span=3600.0,
        label=lambda value: f"{value:g} B/s",
    )
    assert chart.startswith("<svg ") and chart.endswith("</svg>")
    assert "<script>" not in chart and "&lt;script&gt;" in chart
    assert 'aria-label="Bytes &lt;served&gt; &amp; &quot;kept&quot;"' in chart
    assert "href" not in chart and "url(" not in chart  # nothing fetched
    paths = PATHS.findall(chart)
    assert [name for name, _ in paths] == ["cache", "&lt;script&gt;"]
    assert [runs(d) for _, d in paths] == [[3], [2]]
    assert "50 B/s" in chart and "25 B/s" in chart  # the top of the axis: 50, and its middle
    assert "no data yet" not in chart
    page = f"<!DOCTYPE html><html><body>{chart}</body></html>".encode()
    parse(page)  # every element closed, none self-closing


def test_line_chart_without_data() -> None:
    chart = line_chart("Requests", [Series("requests", ((-60.0, None),))])
    assert "no data yet" in chart and "<path" not in chart


def totals(when: float, **figures: Any) -> Totals:
    return Totals(when=when, **figures)


def test_trend_figures_are_rates_per_interval() -> None:
    samples = [
        totals(0.0, bytes_cache=0, bytes_upstream=0, hits=0, misses=0, requests=0),
        totals(60.0, bytes_cache=6000, bytes_upstream=600, hits=3, misses=1, requests=10),
        totals(120.0, bytes_cache=6000, bytes_upstream=1200, hits=3, misses=1, requests=10),
        # a worker restarted and the sum went down: no negative rate
        totals(180.0, bytes_cache=100, bytes_upstream=1200, hits=3, misses=1, requests=20),
        totals(210.0, bytes_cache=3100, bytes_upstream=1200, hits=4, misses=1, requests=30),
    ]
    trends = trend_figures(samples, now=210.0)
    assert trends.bytes_cache == ((-150.0, 100.0), (-90.0, 0.0), (-30.0, 0.0), (0.0, 100.0))
    assert trends.bytes_upstream == ((-150.0, 10.0), (-90.0, 10.0), (-30.0, 0.0), (0.0, 0.0))
    assert trends.requests == ((-150.0, 10.0), (-90.0, 0.0), (-30.0, 10.0), (0.0, 20.0))
    assert trends.hit_ratio == ((-150.0, 0.75), (-90.0, None), (-30.0, None), (0.0, 1.0))
    assert trend_figures(samples[:1], now=0.0).requests == ()  # one sample: no interval yet
    assert trend_figures([samples[0], samples[0]], now=0.0).requests == ()  # no time passed


def test_trend_figures_remaining_per_allowance() -> None:
    samples = [
        totals(0.0, remaining=(("docker.io anonymous", 90.0),)),
        totals(60.0, remaining=(("docker.io anonymous", 80.0), ("ghcr.io client", 5.0))),
    ]
    trends = trend_figures(samples, now=60.0)
    assert trends.remaining == (
        ("docker.io anonymous", ((-60.0, 90.0), (0.0, 80.0))),
        ("ghcr.io client", ((0.0, 5.0),)),
    )


@pytest.mark.parametrize(
    ("points", "data"), [((), False), (((0.0, None),), False), (((0.0, 0.0),), True)]
)
def test_has_data(points: tuple[tuple[float, float | None], ...], data: bool) -> None:
    assert has_data(points) is data


def test_ring_is_fixed_size() -> None:
    ring = TrendRing(points=3)
    for minute in range(10):
        ring.add(totals(minute * 60.0, requests=minute))
    assert len(ring) == 4
    assert [sample.requests for sample in ring.samples()] == [6, 7, 8, 9]


def busy_metrics() -> HubMetrics:
    metrics = HubMetrics()
    metrics.requests.inc(5, route="manifest", status="200")
    metrics.requests.inc(2, route="ops", status="200")  # the operator's own: left out
    metrics.response_bytes.inc(1000, source="cache")
    metrics.response_bytes.inc(300, source="upstream")
    metrics.cache_requests.inc(3, kind="blob", result="hit")
    metrics.cache_requests.inc(1, kind="manifest", result="miss")
    metrics.allowance_remaining.set(42, registry="docker.io", identity="anonymous")
    return metrics


def test_totals_from_one_snapshot_and_from_a_merge() -> None:
    families = snapshot(busy_metrics())
    one = totals_from(families, 7.0)
    assert one == Totals(
        when=7.0,
        bytes_cache=1000,
        bytes_upstream=300,
        hits=3,
        misses=1,
        requests=5,
        remaining=(("docker.io anonymous", 42.0),),
    )
    # two workers: the counts summed, the remaining the lowest (what workermetrics merges)
    other = busy_metrics()
    other.allowance_remaining.set(40, registry="docker.io", identity="anonymous")
    both = totals_from(json_round_trip(merge([families, snapshot(other)])), 8.0)
    assert (both.bytes_cache, both.requests, both.hits) == (2000, 10, 6)
    assert both.remaining == (("docker.io anonymous", 40.0),)
    assert totals_from({}, 1.0) == Totals(when=1.0)
    assert totals_from({"hubproxy_requests": {"samples": [["x", "junk"]]}}, 1.0).requests == 0


def json_round_trip(families: Families) -> Families:
    value: Families = json.loads(json.dumps(families))
    return value


async def test_sampler_takes_one_sample_a_minute(autojump_clock: trio.testing.MockClock) -> None:
    metrics = busy_metrics()
    reads = 0

    async def read() -> Families:
        nonlocal reads
        reads += 1
        metrics.requests.inc(reads, route="blob", status="200")
        return snapshot(metrics)

    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        await nursery.start(sample_trends, metrics.trends, read)
        assert len(metrics.trends) == 1
        await trio.sleep(POINTS * 60.0 * 2 + 30)
        nursery.cancel_scope.cancel()
    samples = metrics.trends.samples()
    assert len(samples) == POINTS + 1  # the ring stays at an hour
    assert [round(s.when - start) % 60 for s in samples] == [0] * len(samples)  # on the minute
    trends = trend_figures(samples, now=samples[-1].when)
    assert len(trends.requests) == POINTS and has_data(trends.requests)
    assert trends.requests[-1] == (0.0, float(reads))  # each read added ``reads`` requests


def test_status_page_shows_the_trends_and_who_spent_the_limit() -> None:
    metrics = busy_metrics()
    for minute in range(5):
        metrics.requests.inc(10 * minute, route="manifest", status="200")
        metrics.trends.add(totals_from(snapshot(metrics), minute * 60.0))
    metrics.note_client_pull(registry="docker.io", client="10.1.2.3", image="library/alpine")
    figures = status_figures(
        metrics,
        url="http://127.0.0.1:5000",
        table=RegistryTable(()),
        now=1000.0,
        families=snapshot(metrics),
        trend_now=270.0,
    )
    assert figures.requests == 5 + sum(10 * minute for minute in range(5))
    html = render_status_page(figures)
    page = parse(html)
    assert page.tags.count("svg") == 4
    charts = dict(PATHS.findall(html.decode()))
    assert runs(charts["requests"]) == [5]  # four intervals and the live one
    assert "who spent the rate limit" in html.decode().lower()
    assert "10.1.2.3" in page.text() and "library/alpine" in page.text()
    # without the sampled figures (a caller that does not pass them): no charts, no failure
    plain = status_figures(metrics, url="http://127.0.0.1:5000", table=RegistryTable(()), now=0.0)
    assert plain.trends is None and plain.spending is None
    assert b"No trends sampled." in render_status_page(plain)
