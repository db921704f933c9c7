"""Run records, per-(case, contestant) summaries and the hubproxy ratios (pure).

Only measured (non-warm-up) runs count, and only verified ones enter the figures; a
contestant-case with any unverified measured run gets no ratio (a fast wrong proxy cannot win).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from bench.cases import Case, GiB
from bench.stats import Ratio, Spread, ratio, spread

HUBPROXY = "hubproxy"
NUMERATORS = ("hubproxy-pass", "hubproxy-miss", "hubproxy-hit")
# the floor contestant doing what each hubproxy contestant does, on hubproxy's stack alone
FLOOR_OF = {
    "hubproxy-pass": "floor-pass",
    "hubproxy-miss": "floor-miss",
    "hubproxy-hit": "floor-hit",
}
BASELINE = "nginx-tuned"  # every target is a ratio to it (issue 14)
BASELINES = ("nginx-tuned", "nginx-recipe", "direct")


@dataclass
class RunRecord:
    case: str
    contestant: str
    rep: int
    warmup: bool
    problems: list[str]
    seconds: float
    bytes: int
    requests: int
    client_cpu_s: float
    origin_cpu_s: float
    proxy_cpu_s: float | None = None
    proxy_peak_rss_kb: int | None = None
    proxy_rss_start_kb: int | None = None  # VmRSS when the run began (peak RSS reset to it)
    parallel: int = 0  # transfers (blobs) or connections (small) in flight at once
    rps: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    socket_errors: dict[str, int] = field(default_factory=dict)

    @property
    def verified(self) -> bool:
        return not self.problems

    @property
    def mbps(self) -> float:
        return self.bytes / self.seconds / 1e6 if self.seconds > 0 else 0.0


@dataclass
class Summary:
    case: str
    kind: str
    contestant: str
    runs: int
    verified: int
    throughput: Spread | None  # MB/s (blobs) or requests/s (small)
    proxy_cpu_per_gib: float | None = None  # blobs: median CPU-s per GiB moved
    proxy_cpu_us_per_req: float | None = None  # small: median CPU-us per request
    peak_rss_mb: float | None = None  # max over measured runs
    # the largest (peak RSS - RSS at the start of the run) over measured runs, what the
    # transfers in flight added, and that run's RSS at its start
    rss_growth_mb: float | None = None
    rss_start_mb: float | None = None
    parallel: int = 0
    p99_ms: Spread | None = None
    p50_ms: float | None = None
    client_cpu_per_gib: float | None = None
    client_cpu_us_per_req: float | None = None
    origin_cpu_per_gib: float | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def all_verified(self) -> bool:
        return self.runs > 0 and self.verified == self.runs


def _median(values: Sequence[float]) -> float | None:
    found = spread(values)
    return found.median if found else None


def summarize(case: Case, contestant: str, records: Sequence[RunRecord]) -> Summary:
    measured = [
        r for r in records if r.case == case.name and r.contestant == contestant and not r.warmup
    ]
    good = [r for r in measured if r.verified]
    problems: list[str] = []
    for r in measured:
        for problem in r.problems:
            line = f"rep {r.rep}: {problem}"
            if len(problems) < 10:
                problems.append(line)
    rss = [r.proxy_peak_rss_kb for r in good if r.proxy_peak_rss_kb is not None]
    growth = [
        (max(0, r.proxy_peak_rss_kb - r.proxy_rss_start_kb), r.proxy_rss_start_kb)
        for r in good
        if r.proxy_peak_rss_kb is not None and r.proxy_rss_start_kb is not None
    ]
    grew, grew_from = max(growth) if growth else (None, None)
    summary = Summary(
        case=case.name,
        kind=case.kind,
        contestant=contestant,
        runs=len(measured),
        verified=len(good),
        throughput=None,
        peak_rss_mb=max(rss) / 1024 if rss else None,
        rss_growth_mb=grew / 1024 if grew is not None else None,
        rss_start_mb=grew_from / 1024 if grew_from is not None else None,
        parallel=case.parallel or case.connections,
        problems=problems,
    )
    if case.kind == "blobs":
        summary.throughput = spread(r.mbps for r in good)
        gib = [(r, r.bytes / GiB) for r in good if r.bytes]
        summary.proxy_cpu_per_gib = _median(
            [r.proxy_cpu_s / g for r, g in gib if r.proxy_cpu_s is not None]
        )
        summary.client_cpu_per_gib = _median([r.client_cpu_s / g for r, g in gib])
        summary.origin_cpu_per_gib = _median([r.origin_cpu_s / g for r, g in gib])
    else:
        summary.throughput = spread(r.rps for r in good if r.rps is not None)
        summary.p99_ms = spread(r.p99_ms for r in good if r.p99_ms is not None)
        summary.p50_ms = _median([r.p50_ms for r in good if r.p50_ms is not None])
        per_req = [r for r in good if r.requests]
        summary.proxy_cpu_us_per_req = _median(
            [r.proxy_cpu_s / r.requests * 1e6 for r in per_req if r.proxy_cpu_s is not None]
        )
        summary.client_cpu_us_per_req = _median(
            [r.client_cpu_s / r.requests * 1e6 for r in per_req]
        )
    return summary


def ratios(cases: Sequence[Case], summaries: dict[tuple[str, str], Summary]) -> list[Ratio]:
    """Each hubproxy contestant against each baseline present, per case: throughput (or rps
    and p99 for small requests) and, against the nginx contestants, CPU per GiB moved (or per
    request)."""
    out: list[Ratio] = []
    for case, numerator in ((c, n) for n in NUMERATORS for c in cases):
        mine = summaries.get((case.name, numerator))
        if mine is None or mine.runs == 0:
            continue
        for base in BASELINES:
            theirs = summaries.get((case.name, base))
            if theirs is None:
                continue
            honest = mine.all_verified and theirs.all_verified

            def med(s: Spread | None) -> float | None:
                return s.median if s else None

            def add(
                metric: str,
                a: float | None,
                b: float | None,
                honest: bool = honest,
                numerator: str = numerator,
                base: str = base,
                name: str = case.name,
            ) -> None:
                out.append(Ratio(numerator, base, name, metric, ratio(a, b) if honest else None))

            with_cpu = base != "direct"
            if case.kind == "blobs":
                add("throughput", med(mine.throughput), med(theirs.throughput))
                if with_cpu:
                    add("cpu-per-GiB", mine.proxy_cpu_per_gib, theirs.proxy_cpu_per_gib)
            else:
                add("rps", med(mine.throughput), med(theirs.throughput))
                add("p99", med(mine.p99_ms), med(theirs.p99_ms))
                if with_cpu:
                    add("cpu-per-request", mine.proxy_cpu_us_per_req, theirs.proxy_cpu_us_per_req)
    return out
