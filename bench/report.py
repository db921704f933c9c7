"""Output: ``results.md`` (environment, method, the issue's table, the targets, a table per
case, ratios, problems, contestant logs), ``results.json`` (all of it plus every run),
``throughput.png`` (matplotlib, optional); the summary lines (:mod:`bench.targets`) are printed
last."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.cases import Case, human_size
from bench.results import BASELINE, FLOOR_OF, HUBPROXY, RunRecord, Summary
from bench.stats import METRICS, Ratio, Spread

COLOURS = {
    "hubproxy": "#2a7ab9",
    "hubproxy-pass": "#9cc3e4",
    "hubproxy-miss": "#2a7ab9",
    "hubproxy-hit": "#15406b",
    "nginx-recipe": "#d9822b",
    "nginx-tuned": "#3d9a50",
    "direct": "#8c8c8c",
}
_LOG_LEVELS = re.compile(
    r"\b(WARNING|ERROR|CRITICAL|Traceback|\[warn\]|\[error\]|\[crit\]|"
    r"\[alert\]|\[emerg\])"
)
_TIMESTAMP = re.compile(r"^\S+ \S+ ")


@dataclass(frozen=True)
class LogScan:
    name: str
    path: str
    lines: int
    samples: list[str]


def scan_log(name: str, path: Path, shown: str, samples: int = 8) -> LogScan:
    """Warning/error lines of a contestant's log (``shown`` as its path in the report); samples
    are distinct modulo timestamps and numbers."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return LogScan(name, shown, 0, [])
    hits = [line for line in text.splitlines() if _LOG_LEVELS.search(line)]
    seen: dict[str, str] = {}
    for line in hits:
        key = re.sub(r"\d+", "N", _TIMESTAMP.sub("", line))
        if key not in seen and len(seen) < samples:
            seen[key] = line[:400]
    return LogScan(name, shown, len(hits), list(seen.values()))


def _fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _spread(s: Spread | None, digits: int = 0) -> str:
    if s is None:
        return "—"
    return f"{s.median:,.{digits}f} [{s.lo:,.{digits}f}-{s.hi:,.{digits}f}]"


def _verified(s: Summary) -> str:
    mark = "✓" if s.all_verified else "✗"
    return f"{mark} {s.verified}/{s.runs}"


def case_table(
    case: Case, contestants: Sequence[str], summaries: dict[tuple[str, str], Summary]
) -> str:
    rows: list[str] = []
    if case.kind == "blobs":
        rows.append(
            "| contestant | MB/s median [min-max] | proxy CPU-s/GiB | proxy peak RSS MB | "
            "client CPU-s/GiB | origin CPU-s/GiB | sha256 verified |"
        )
        rows.append("|---|---:|---:|---:|---:|---:|---|")
        for name in contestants:
            s = summaries.get((case.name, name))
            if s is None:
                continue
            rows.append(
                f"| {name} | {_spread(s.throughput)} | {_fmt(s.proxy_cpu_per_gib)} | "
                f"{_fmt(s.peak_rss_mb, 1)} | {_fmt(s.client_cpu_per_gib)} | "
                f"{_fmt(s.origin_cpu_per_gib)} | {_verified(s)} |"
            )
    else:
        rows.append(
            "| contestant | req/s median [min-max] | p50 ms | p99 ms median [min-max] | "
            "proxy CPU-µs/req | proxy peak RSS MB | client CPU-µs/req | bytes verified |"
        )
        rows.append("|---|---:|---:|---:|---:|---:|---:|---|")
        for name in contestants:
            s = summaries.get((case.name, name))
            if s is None:
                continue
            rows.append(
                f"| {name} | {_spread(s.throughput)} | {_fmt(s.p50_ms)} | {_spread(s.p99_ms, 2)} | "
                f"{_fmt(s.proxy_cpu_us_per_req, 0)} | {_fmt(s.peak_rss_mb, 1)} | "
                f"{_fmt(s.client_cpu_us_per_req, 0)} | {_verified(s)} |"
            )
    return "\n".join(rows)


_ISSUE_COLUMNS = (
    ("hubproxy-pass", "hubproxy `--no-cache`"),
    ("hubproxy-miss", "hubproxy miss (empty cache)"),
    ("hubproxy-hit", "hubproxy hit"),
)


def _issue_cell(case: Case, mine: Summary | None, base: Summary) -> str:
    if mine is None or mine.throughput is None or not mine.all_verified:
        return "—" if mine is None else "not verified"
    if case.kind == "small":
        share = ""
        if base.throughput is not None and base.all_verified:
            share = f" ({mine.throughput.median / base.throughput.median:.2f}x)"
        p99 = f", p99 {mine.p99_ms.median:.0f} ms" if mine.p99_ms else ""
        return (
            f"{mine.throughput.median:,.0f} req/s{share} at "
            f"{_fmt(mine.proxy_cpu_us_per_req, 0)} µs{p99}"
        )
    if base.throughput is None or not base.all_verified:
        return f"{mine.throughput.median:,.0f} MB/s"
    speed = mine.throughput.median / base.throughput.median
    cpu = "—"
    if mine.proxy_cpu_per_gib is not None and base.proxy_cpu_per_gib:
        cpu = f"{mine.proxy_cpu_per_gib / base.proxy_cpu_per_gib:.2f}x"
    return f"{speed:.2f}x speed, {cpu} CPU"


def issue_table(cases: Sequence[Case], summaries: dict[tuple[str, str], Summary]) -> str:
    """The issue's table: a row per case, nginx-tuned's figures and hubproxy's as ratios to
    them (blobs: speed and CPU per GiB; small requests: req/s, CPU per request, p99)."""
    rows = [
        "| case | nginx-tuned | " + " | ".join(title for _, title in _ISSUE_COLUMNS) + " |",
        "|---|---|" + "---|" * len(_ISSUE_COLUMNS),
    ]
    for case in cases:
        base = summaries.get((case.name, BASELINE))
        if base is None or base.throughput is None:
            continue
        if case.kind == "small":
            tuned = (
                f"{base.throughput.median:,.0f} req/s, {_fmt(base.proxy_cpu_us_per_req, 0)} "
                f"µs/req" + (f", p99 {base.p99_ms.median:.0f} ms" if base.p99_ms else "")
            )
        else:
            tuned = f"{base.throughput.median:,.0f} MB/s, {_fmt(base.proxy_cpu_per_gib)} CPU-s/GiB"
        cells = [_issue_cell(case, summaries.get((case.name, n)), base) for n, _ in _ISSUE_COLUMNS]
        rows.append(f"| {case.name} | {tuned} | " + " | ".join(cells) + " |")
    return "\n".join(rows) if len(rows) > 2 else ""


def floor_table(cases: Sequence[Case], summaries: dict[tuple[str, str], Summary]) -> str:
    """The floors beside the issue's table: a row per case, each floor contestant's figures as
    ratios to nginx-tuned (as :func:`issue_table` gives hubproxy's), then hubproxy's CPU as a
    multiple of its floor's (per GiB, or per request). Empty when the run measured no floor."""
    rows = [
        "| case | " + " | ".join(f"`{FLOOR_OF[n]}`" for n, _ in _ISSUE_COLUMNS) + " |",
        "|---|" + "---|" * len(_ISSUE_COLUMNS),
    ]
    for case in cases:
        base = summaries.get((case.name, BASELINE))
        if base is None or base.throughput is None:
            continue
        cells = []
        for name, _ in _ISSUE_COLUMNS:
            floor = summaries.get((case.name, FLOOR_OF[name]))
            mine = summaries.get((case.name, name))
            cell = _issue_cell(case, floor, base)
            if floor is not None and mine is not None and floor.all_verified and mine.all_verified:
                per = "per request" if case.kind == "small" else "per GiB"
                a, b = (
                    (mine.proxy_cpu_us_per_req, floor.proxy_cpu_us_per_req)
                    if case.kind == "small"
                    else (mine.proxy_cpu_per_gib, floor.proxy_cpu_per_gib)
                )
                if a is not None and b:
                    cell += f"; hubproxy {a / b:.2f}x its CPU {per}"
            cells.append(cell)
        if all(cell == "—" for cell in cells):
            continue
        rows.append(f"| {case.name} | " + " | ".join(cells) + " |")
    return "\n".join(rows) if len(rows) > 2 else ""


def case_ratio_line(case: Case, ratios: Sequence[Ratio]) -> str:
    parts = []
    for r in ratios:
        if r.case == case.name:
            shown = "n/a" if r.value is None else f"{r.value:.2f}"
            better = "higher" if METRICS[r.metric][1] else "lower"
            parts.append(
                f"{r.numerator}/{r.denominator} {r.metric} **{shown}** ({better} is better)"
            )
    return "Ratios: " + " · ".join(parts) if parts else ""


def render_markdown(
    *,
    command: str,
    wall_seconds: float,
    environment: dict[str, str],
    method: Sequence[str],
    cases: Sequence[Case],
    contestants: Sequence[str],
    summaries: dict[tuple[str, str], Summary],
    ratios: Sequence[Ratio],
    logs: Sequence[LogScan],
    chart_note: str,
    summary_lines: Sequence[str] = (),
) -> str:
    out = ["# hubproxy blob benchmark", ""]
    out.append(f"`{command}` — wall time {wall_seconds:.0f} s.")
    out += ["", "## Environment", "", "| | |", "|---|---|"]
    out += [f"| {key} | {value} |" for key, value in environment.items()]
    out += ["", "## Method", ""]
    out += [f"- {line}" for line in method]
    table = issue_table(cases, summaries)
    if table:
        out += ["", "## hubproxy against nginx-tuned (medians of this run)", "", table]
    floors = floor_table(cases, summaries)
    if floors:
        out += ["", "## The stack's floor against nginx-tuned, and hubproxy against it", ""]
        out += [floors]
    if summary_lines:
        out += ["", "## Targets (issue 14) and per-core, per-transfer figures", "", "```"]
        out += list(summary_lines)
        out += ["```"]
    out += ["", "## Results", ""]
    for case in cases:
        out += [f"### {case.name}", "", case.describe() + ".", ""]
        out.append(case_table(case, contestants, summaries))
        line = case_ratio_line(case, ratios)
        if line:
            out += ["", line]
        out.append("")
    if chart_note:
        out += [chart_note, ""]
    out += ["## Ratios (same run, medians)", "", "```"]
    out += [r.line() for r in ratios]
    out += ["```", ""]
    problems = [(s, p) for s in summaries.values() for p in s.problems]
    if problems:
        out += ["## Verification and run problems", ""]
        out += [f"- {s.case} {s.contestant}: {p}" for s, p in problems]
        out.append("")
    out += [
        "## Contestant logs (warnings and errors)",
        "",
        "Paths are inside the run's temporary directory (kept with `--keep`).",
        "",
    ]
    for scan in logs:
        out.append(f"- {scan.name}: {scan.lines} line(s) in `{scan.path}`")
        out += [f"    - `{sample}`" for sample in scan.samples]
    out.append("")
    return "\n".join(out)


def _default(value: Any) -> Any:
    return asdict(value) if hasattr(value, "__dataclass_fields__") else str(value)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=_default))


def write_json(
    path: Path,
    *,
    command: str,
    wall_seconds: float,
    environment: dict[str, str],
    settings: dict[str, Any],
    cases: Sequence[Case],
    contestants: Sequence[str],
    summaries: dict[tuple[str, str], Summary],
    ratios: Sequence[Ratio],
    records: Sequence[RunRecord],
    logs: Sequence[LogScan],
    summary_lines: Sequence[str] = (),
) -> None:
    data = {
        "command": command,
        "wall_seconds": wall_seconds,
        "environment": environment,
        "settings": settings,
        "cases": [{**asdict(c), "description": c.describe()} for c in cases],
        "contestants": list(contestants),
        "summaries": [{**asdict(s), "all_verified": s.all_verified} for s in summaries.values()],
        "ratios": [asdict(r) for r in ratios],
        "summary_lines": list(summary_lines),
        "runs": [{**asdict(r), "sha256_verified": r.verified, "mb_per_s": r.mbps} for r in records],
        "logs": [asdict(scan) for scan in logs],
    }
    path.write_text(json.dumps(_jsonable(data), indent=2) + "\n")


def read_summaries(path: Path) -> tuple[list[Case], list[str], dict[tuple[str, str], Summary]]:
    """The cases, contestants and summaries of a run, from the results.json it wrote: what
    ``plot`` needs, so a chart can be drawn again without measuring anything."""
    data = json.loads(path.read_text())
    fields = set(Case.__dataclass_fields__)
    cases = [Case(**{k: v for k, v in c.items() if k in fields}) for c in data["cases"]]
    summaries: dict[tuple[str, str], Summary] = {}
    for raw in data["summaries"]:
        values = {k: v for k, v in raw.items() if k in Summary.__dataclass_fields__}
        for key in ("throughput", "p99_ms"):
            if values.get(key) is not None:
                values[key] = Spread(**values[key])
        summary = Summary(**values)
        summaries[(summary.case, summary.contestant)] = summary
    return cases, list(data["contestants"]), summaries


def chart_label(case: Case) -> str:
    """Two lines under a case's bars: its name, and what it is in words."""
    side = "TLS" if case.transport == "tls" else "plain HTTP"
    if case.kind == "small":
        return f"{case.name}\nmanifest GETs, {side}"
    what = (
        human_size(case.size) if case.count == 1 else f"{case.count} \u00d7 {human_size(case.size)}"
    )
    redirect = "" if case.redirect else ", no redirect"
    pinned = ", proxy on CPU 0" if case.pinned else ""
    return f"{case.name}\n{what}, {side}{redirect}{pinned}"


# The chart is read at README width (about 900 px on GitHub): 1200 px wide, one horizontal bar
# per contestant in each case, cases stacked top to bottom, blob cases (MB/s) and small-request
# cases (requests/s) in panels of their own, the legend above the panels where it hides nothing.
CHART_WIDTH_IN = 12.0
CHART_DPI = 100
# a case's height grows with its bars beyond four (six contestants: 1.2 in), so bars and their
# figures stay readable
_BAR_HEIGHT_IN = 0.2
_MIN_BARS = 4


def plot(
    path: Path,
    cases: Sequence[Case],
    contestants: Sequence[str],
    summaries: dict[tuple[str, str], Summary],
) -> str:
    """``figure`` written to ``path`` as a PNG. Returns a note for the report ('' when the
    chart was written)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return (
            "Chart skipped: matplotlib is not installed (`pip install -e '.[bench]'` for "
            "throughput.png)."
        )
    fig = figure(cases, contestants, summaries)
    fig.savefig(path, dpi=CHART_DPI)
    plt.close(fig)
    return ""


def figure(
    cases: Sequence[Case],
    contestants: Sequence[str],
    summaries: dict[tuple[str, str], Summary],
) -> Any:
    """The chart (a matplotlib Figure): horizontal grouped bars (median, min-max whiskers, the
    median written at the end), MB/s per blob case, req/s per small case. The floors
    (``floor-*``) are left to the tables and the summary lines: nine bars a case would not read
    at README width."""
    import matplotlib.pyplot as plt

    drawn = [name for name in contestants if not name.startswith("floor-")]
    with plt.rc_context({"font.size": 11}):
        return _draw(cases, drawn, summaries)


def _draw(
    cases: Sequence[Case],
    contestants: Sequence[str],
    summaries: dict[tuple[str, str], Summary],
) -> Any:
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    groups = [
        [c for c in cases if c.kind == "blobs"],
        [c for c in cases if c.kind == "small"],
    ]
    groups = [g for g in groups if g]
    header_in = 0.45
    case_in = _BAR_HEIGHT_IN * max(_MIN_BARS, len(contestants))
    height = header_in + sum(case_in * len(g) + 0.6 for g in groups)
    fig, axes = plt.subplots(
        len(groups),
        1,
        figsize=(CHART_WIDTH_IN, height),
        squeeze=False,
        gridspec_kw={"height_ratios": [len(g) for g in groups]},
    )
    bar = 0.8 / max(1, len(contestants))
    for ax, group in zip(axes[:, 0], groups, strict=True):
        top = 0.0
        for i, name in enumerate(contestants):
            ys, widths, low, high = [], [], [], []
            for j, case in enumerate(group):
                s = summaries.get((case.name, name))
                if s is None or s.throughput is None:
                    continue
                # the first contestant on top of each case's group
                ys.append(j + (i - (len(contestants) - 1) / 2) * bar)
                widths.append(s.throughput.median)
                low.append(s.throughput.median - s.throughput.lo)
                high.append(s.throughput.hi - s.throughput.median)
                top = max(top, s.throughput.hi)
            ax.barh(
                ys,
                widths,
                bar,
                xerr=[low, high],
                capsize=2,
                error_kw={"elinewidth": 0.8, "ecolor": "#333333"},
                label=name,
                color=COLOURS.get(name, "#555555"),
            )
            for y, width, extra in zip(ys, widths, high, strict=True):
                ax.text(
                    width + extra,
                    y,
                    f" {width:,.0f}",
                    va="center",
                    ha="left",
                    fontsize=9.5,
                    color="#333333",
                )
        ax.set_yticks(range(len(group)))
        ax.set_yticklabels([chart_label(c) for c in group], fontsize=10.5)
        ax.xaxis.set_major_formatter(matplotlib.ticker.StrMethodFormatter("{x:,.0f}"))
        ax.invert_yaxis()  # the first case at the top, as in the tables
        ax.set_xlim(0, top * 1.12)  # room for the figure after the longest whisker
        blobs = group[0].kind == "blobs"
        ax.set_xlabel(
            "MB/s, median of the runs (whiskers: min-max); longer is better"
            if blobs
            else "requests/s, median of the runs (whiskers: min-max); longer is better"
        )
        ax.grid(axis="x", alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    fig.suptitle(f"{HUBPROXY} vs the nginx recipe: throughput on this machine", y=0.995)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        loc="upper center",
        ncol=len(contestants),
        bbox_to_anchor=(0.5, 1 - 0.32 / height),
        frameon=False,
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - header_in / height))
    return fig
