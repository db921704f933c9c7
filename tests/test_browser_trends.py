"""The status page's trend charts in a real browser: headless Chromium loads a live mirror's page
(one run: the DOM it built on stdout, and a screenshot) after an image was pulled through it.
The DOM holds the four inline SVG charts, each with a line of more than two points; the
screenshot is not one flat colour and has the charts' blue line in it.

The sampler takes a point a minute (its own test runs it on trio's autojump clock); here the
last ten minutes are laid into the page's ring up front, scaled from the mirror's real counts,
so the charts have a history without waiting ten minutes. Chromium is driven from the command
line (tests/test_browser.py's helpers); without it the test is skipped, saying so."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import trio
import trustme

from hubproxy.ops.trends import TrendRing, totals_from
from hubproxy.ops.workermetrics import snapshot
from tests.conftest import StartProxy
from tests.fakehub import FakeHub, make_layer
from tests.registry_client import RegistryClient
from tests.test_browser import CHROMIUM, chromium, png_rows
from tests.test_live_status import pull
from tests.test_statuspage import parse
from tests.test_trends import runs

# The charts sit below the registries and figures; the window leaves room under them, so a
# font or a wrapped line that makes the page taller does not push a chart out of the shot.
WINDOW = (1000, 1400)
MINUTES = 10


def chart_blue_pixels(row: bytearray, pixel: int) -> int:
    """How many pixels of a row are the charts' first line colour (charts.COLOURS[0], #1565c0),
    whole or blended into the page's near-white by antialiasing. A line's exact colour shows only
    where it falls on whole pixels, which depends on the values it draws, so it is not counted
    exactly (CI once counted 74 exact pixels where this machine counts 193-200). Blended with
    white at weight t, that blue has green above red by 80t and blue above green by 91t: counted
    from t of about 0.4. A link's blue (no green above red), the orange line, the teal and the
    grey grid lines are not."""
    red, green, blue = row[0::pixel], row[1::pixel], row[2::pixel]
    return sum(1 for r, g, b in zip(red, green, blue, strict=True) if g - r >= 32 and b - g >= 32)


pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed (apt-get install chromium): the status page's browser "
    "test needs it",
)


async def test_trend_charts_in_chromium(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    hub.add_image("library/alpine", "3.20", [make_layer(71, 30_000)])
    proxy = await start_proxy(tls=False, cache_dir=str(tmp_path / "cache"))
    for _ in range(2):  # a miss, then hits: both sources and a hit ratio
        await pull(RegistryClient(proxy.url, ca))

    metrics = proxy.proxy.metrics
    now = trio.current_time()
    live = totals_from(snapshot(metrics), now)
    ring = TrendRing()
    for minute in range(MINUTES):
        share = minute / MINUTES
        ring.add(
            replace(
                live,
                when=now - (MINUTES - minute) * 60.0,
                bytes_cache=live.bytes_cache * share,
                bytes_upstream=live.bytes_upstream * share * share,
                hits=live.hits * share,
                misses=live.misses * share,
                requests=live.requests * share,
                remaining=tuple((name, left + MINUTES - minute) for name, left in live.remaining),
            )
        )
    metrics.trends = ring  # the page reads the ring from here

    shot = tmp_path / "trends.png"
    dom = await chromium(
        tmp_path,
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        "--dump-dom",
        f"--screenshot={shot}",
        proxy.url + "/",
    )
    page = parse(dom)
    charts = [attrs for tag, attrs in page.attributes if tag == "svg"]
    assert [attrs.get("aria-label") for attrs in charts] == [
        "Bytes served per second, from the cache and from upstreams",
        "Cache hit ratio per minute",
        "Requests answered per minute",
        "Upstream rate limit: pulls remaining",
    ]
    lines = {
        attrs["data-series"]: sum(runs(attrs["d"] or ""))
        for tag, attrs in page.attributes
        if tag == "path" and attrs.get("class") == "series" and attrs.get("data-series")
    }
    # each chart's line crosses the ten minutes and the live point
    assert lines["cache"] > 2 and lines["upstream"] > 2, lines
    assert lines["hit ratio"] > 2 and lines["requests"] > 2, lines
    assert lines["docker.io client"] > 2, lines
    assert "no data yet" not in dom.decode()

    width, pixel, rows = png_rows(shot.read_bytes())
    assert (width, len(rows)) == WINDOW
    assert len({bytes(row) for row in rows}) > 1, "the screenshot is one flat colour"
    blue = sum(chart_blue_pixels(row, pixel) for row in rows)
    assert blue > 200, "no chart line in the screenshot"
