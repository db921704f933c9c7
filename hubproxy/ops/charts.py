"""Line charts as inline SVG for the status page: no script, no external font or stylesheet.

``line_chart`` is a pure function from a few ``Series`` (points of time and value) to the text
of one ``<svg>`` element, sized by its ``viewBox`` so the page's CSS scales it. Time runs along x
from ``-span`` seconds (left) to now (right); values along y from 0 to a round maximum. A point
whose value is None is a gap (the hit ratio of a minute without lookups): the line breaks there.
Every name written into the markup goes through ``html.escape``. Text uses the page's own font
(``font-family: inherit``), so nothing is fetched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape

WIDTH, HEIGHT = 560, 150  # the viewBox; the page scales it to its column
LEFT, RIGHT, TOP, BOTTOM = 64, 8, 10, 34  # margins: y labels left, x labels and legend below
COLOURS = ("#1565c0", "#ef6c00", "#2e7d32", "#6a1b9a", "#c62828", "#00838f")

Point = tuple[float, float | None]  # (seconds relative to now, <= 0; value, None: no value)


@dataclass(frozen=True)
class Series:
    """One line: its name (the legend) and its points, oldest first."""

    name: str
    points: tuple[Point, ...]


def nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 times a power of ten that is at least ``value`` (1 for
    nothing to show): the top of the y axis."""
    if not value > 0 or not math.isfinite(value):
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    for step in (1.0, 2.0, 2.5, 5.0, 10.0):
        if step * power >= value * (1 - 1e-12):
            return step * power
    return 10.0 * power  # not reached: 10 * power >= value always


def _coordinate(value: float) -> str:
    return f"{value:.1f}".rstrip("0").rstrip(".")


def path_data(
    points: Sequence[Point], *, span: float, top: float, width: float, height: float
) -> str:
    """An SVG path's ``d`` for ``points`` in a plot of ``width`` x ``height`` (offset by the
    margins): ``M`` starts a run, ``L`` continues it; a None value ends the run."""
    parts: list[str] = []
    drawing = False
    for when, value in points:
        if value is None or not math.isfinite(value) or when < -span:
            drawing = False
            continue
        x = LEFT + width * (1 + min(0.0, when) / span)
        y = TOP + height * (1 - min(max(value, 0.0), top) / top)
        parts.append(f"{'L' if drawing else 'M'}{_coordinate(x)} {_coordinate(y)}")
        drawing = True
    return " ".join(parts)


def _minutes(seconds: float) -> str:
    return "now" if seconds == 0 else f"-{seconds / 60:g} min"


def line_chart(
    title: str,
    series: Sequence[Series],
    *,
    span: float = 3600.0,
    label: Callable[[float], str] = lambda value: f"{value:g}",
    top: float | None = None,
) -> str:
    """One chart: ``title`` (read by screen readers and shown as a tooltip), ``series`` drawn
    in ``COLOURS`` order, the x axis the last ``span`` seconds, the y axis from 0 to ``top``
    (default: a round number above the largest value), its labels written by ``label``."""
    values = [v for s in series for w, v in s.points if v is not None and w >= -span]
    finite = [v for v in values if math.isfinite(v)]
    ceiling = top if top is not None and top > 0 else nice_ceiling(max(finite, default=0.0))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    lines = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label="{escape(title, quote=True)}" xmlns="http://www.w3.org/2000/svg" '
        'font-family="inherit" font-size="11">',
        f"<title>{escape(title)}</title>",
        f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="#fafafa" '
        'stroke="#ccc"></rect>',
    ]
    for share in (0.5, 1.0):  # gridlines and y labels: the middle and the top
        y = TOP + plot_h * (1 - share)
        lines.append(
            f'<line x1="{LEFT}" y1="{_coordinate(y)}" x2="{LEFT + plot_w}" y2="{_coordinate(y)}" '
            'stroke="#e3e3e3"></line>'
        )
        lines.append(
            f'<text x="{LEFT - 4}" y="{_coordinate(y + 4)}" text-anchor="end" fill="#555">'
            f"{escape(label(ceiling * share))}</text>"
        )
    lines.append(
        f'<text x="{LEFT - 4}" y="{TOP + plot_h + 4}" text-anchor="end" fill="#555">'
        f"{escape(label(0.0))}</text>"
    )
    for share in (0.0, 0.5, 1.0):  # x labels: the start of the span, its middle, now
        x = LEFT + plot_w * share
        anchor = ("start", "middle", "end")[int(share * 2)]
        lines.append(
            f'<text x="{_coordinate(x)}" y="{TOP + plot_h + 13}" text-anchor="{anchor}" '
            f'fill="#555">{_minutes(span * (1 - share))}</text>'
        )
    legend_x = float(LEFT)
    for index, line in enumerate(series):
        colour = COLOURS[index % len(COLOURS)]
        d = path_data(line.points, span=span, top=ceiling, width=plot_w, height=plot_h)
        if d:
            lines.append(
                f'<path class="series" data-series="{escape(line.name, quote=True)}" d="{d}" '
                f'fill="none" stroke="{colour}" stroke-width="2" stroke-linejoin="round"></path>'
            )
        legend_y = HEIGHT - 5
        lines.append(
            f'<rect x="{_coordinate(legend_x)}" y="{legend_y - 8}" width="10" height="3" '
            f'fill="{colour}"></rect>'
        )
        lines.append(
            f'<text x="{_coordinate(legend_x + 14)}" y="{legend_y}" fill="#333">'
            f"{escape(line.name)}</text>"
        )
        legend_x += 24 + 6.5 * len(line.name)
    if not values:
        lines.append(
            f'<text x="{LEFT + plot_w / 2:.0f}" y="{TOP + plot_h / 2:.0f}" text-anchor="middle" '
            'fill="#888">no data yet</text>'
        )
    lines.append("</svg>")
    return "\n".join(lines)
