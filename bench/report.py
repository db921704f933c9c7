"""Output: ``results.md`` (environment, method, a table per case, ratios, problems, contestant
logs), ``results.json`` (all of it plus every run), ``throughput.png`` (matplotlib, optional) and
the summary lines printed last, one per ratio."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.cases import Case
from bench.results import HUBPROXY, RunRecord, Summary
from bench.stats import Ratio, Spread

COLOURS = {
    "hubproxy": "#2a7ab9",
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


def case_ratio_line(case: Case, ratios: Sequence[Ratio]) -> str:
    parts = []
    for r in ratios:
        if r.case == case.name:
            shown = "n/a" if r.value is None else f"{r.value:.2f}"
            parts.append(f"{r.numerator}/{r.denominator} {r.metric} **{shown}**")
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
) -> str:
    out = ["# hubproxy blob benchmark", ""]
    out.append(f"`{command}` — wall time {wall_seconds:.0f} s.")
    out += ["", "## Environment", "", "| | |", "|---|---|"]
    out += [f"| {key} | {value} |" for key, value in environment.items()]
    out += ["", "## Method", ""]
    out += [f"- {line}" for line in method]
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
        "summary_lines": [r.line() for r in ratios],
        "runs": [{**asdict(r), "sha256_verified": r.verified, "mb_per_s": r.mbps} for r in records],
        "logs": [asdict(scan) for scan in logs],
    }
    path.write_text(json.dumps(_jsonable(data), indent=2) + "\n")


def plot(
    path: Path,
    cases: Sequence[Case],
    contestants: Sequence[str],
    summaries: dict[tuple[str, str], Summary],
) -> str:
    """Grouped bars (median, min-max whiskers): MB/s per blob case, req/s per small case.
    Returns a note for the report ('' when the chart was written)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return (
            "Chart skipped: matplotlib is not installed (`pip install -e '.[bench]'` for "
            "throughput.png)."
        )
    groups = [
        [c for c in cases if c.kind == "blobs"],
        [c for c in cases if c.kind == "small"],
    ]
    groups = [g for g in groups if g]
    fig, axes = plt.subplots(
        1,
        len(groups),
        figsize=(4 + 2.2 * sum(len(g) for g in groups), 4.8),
        squeeze=False,
        gridspec_kw={"width_ratios": [len(g) for g in groups]},
    )
    width = 0.8 / max(1, len(contestants))
    for ax, group in zip(axes[0], groups, strict=True):
        for i, name in enumerate(contestants):
            xs, heights, low, high = [], [], [], []
            for j, case in enumerate(group):
                s = summaries.get((case.name, name))
                if s is None or s.throughput is None:
                    continue
                xs.append(j + (i - (len(contestants) - 1) / 2) * width)
                heights.append(s.throughput.median)
                low.append(s.throughput.median - s.throughput.lo)
                high.append(s.throughput.hi - s.throughput.median)
            ax.bar(
                xs,
                heights,
                width,
                yerr=[low, high],
                capsize=3,
                label=name,
                color=COLOURS.get(name, "#555555"),
            )
        ax.set_xticks(range(len(group)))
        ax.set_xticklabels([c.name for c in group], rotation=20, ha="right")
        ax.set_ylabel("MB/s (median, min-max)" if group[0].kind == "blobs" else "requests/s")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(loc="upper right", fontsize="small")
    fig.suptitle(f"{HUBPROXY} vs nginx recipe: throughput on this machine")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return ""
