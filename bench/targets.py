"""Issue 14's targets, checked against a run's medians, and the summary lines (pure).

The targets (``python -m bench``: TLS on every hop, the redirect path, one run, vs nginx-tuned):

=============================================  ===========================  =====================
case                                           speed                        CPU
=============================================  ===========================  =====================
1 GiB miss, empty cache                        >= 1.0x                      <= 2.0x per GiB
64 MiB and 100 x 1 MiB miss                    >= 0.9x                      <= 2.0x per GiB
1 GiB ``--no-cache``                           >= 1.2x                      <= 1.15x per GiB
hits, all sizes                                >= 2.0x                      <= 0.6x per GiB
1 KiB requests, wrk -c50, ``--workers auto``   >= 0.25x req/s, p99 <= 30 ms <= 300 us per request
                                                                            passed upstream,
                                                                            <= 120 us from cache
=============================================  ===========================  =====================

A miss of a blob smaller than 1 GiB (``--quick``'s 32 x 1 MiB too) is held to the 64 MiB row.
Cases off that path (plain HTTP, no redirect) and the pinned ``-cpu0`` cases have no targets:
their lines report figures. Every summary line is one of:

- ``hubproxy-miss/nginx-tuned 1GiB-tls throughput ratio: 0.47 (target >= 1.00: FAIL)``
- ``hubproxy-pass/nginx-tuned 64MiB-tls throughput ratio: 0.87 (higher is better; no target)``
- ``hubproxy-pass small-tls p99: 54.0 ms (target <= 30.0 ms: FAIL)``
- ``hubproxy-miss 1GiB-tls-cpu0 MB/s per core: 250 (proxy pinned to CPU 0; ...)``
- ``hubproxy-miss 100x1MiB-tls peak RSS per concurrent transfer: 1.6 MB (...)``
- ``hubproxy-miss/nginx-tuned 1GiB-tls cpu-per-GiB ratio: 2.58 (target <= 2.00: FAIL; floor-miss
  2.28: FAIL)``: with the floor contestant's figure (:mod:`bench.floorproxy`) beside the target
  when the run measured it, and whether the floor itself meets the target;
- ``hubproxy-miss/floor-miss 1GiB-tls cpu-per-GiB ratio: 1.13 (lower is better; no target)``:
  what hubproxy costs above its stack's floor;
- ``targets met: 3 of 14; by the stack's floor: 5 of 14`` (last)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from bench.cases import Case, GiB
from bench.results import BASELINE, FLOOR_OF, NUMERATORS, Summary
from bench.stats import METRICS, Spread, ratio

Op = Literal[">=", "<="]


@dataclass(frozen=True)
class Target:
    op: Op
    bound: float

    def met(self, value: float) -> bool:
        return value >= self.bound if self.op == ">=" else value <= self.bound


def target_for(contestant: str, case: Case, metric: str) -> Target | None:
    """The issue's target for ``contestant``'s ``metric`` in ``case`` (ratios to nginx-tuned,
    except p99 in ms and CPU per request in µs); None where it names none."""
    if case.transport != "tls" or case.pinned or (case.kind == "blobs" and not case.redirect):
        return None
    if case.kind == "small":
        per_request = {"hubproxy-pass": 300.0, "hubproxy-hit": 120.0}.get(contestant)
        if per_request is None:
            return None
        return {
            "rps": Target(">=", 0.25),
            "p99": Target("<=", 30.0),
            "cpu-per-request": Target("<=", per_request),
        }.get(metric)
    big = case.count == 1 and case.size >= GiB
    table: dict[str, dict[str, Target]] = {
        "hubproxy-miss": {
            "throughput": Target(">=", 1.0 if big else 0.9),
            "cpu-per-GiB": Target("<=", 2.0),
        },
        "hubproxy-hit": {"throughput": Target(">=", 2.0), "cpu-per-GiB": Target("<=", 0.6)},
        "hubproxy-pass": (
            {"throughput": Target(">=", 1.2), "cpu-per-GiB": Target("<=", 1.15)} if big else {}
        ),
    }
    return table.get(contestant, {}).get(metric)


# absolute figures (not ratios): unit and decimals
_ABSOLUTE = {"p99": (" ms", 1), "cpu-per-request": (" µs", 0)}


@dataclass(frozen=True)
class Check:
    """One figure of hubproxy's: a ratio to nginx-tuned (``against``) or an absolute value,
    with the issue's target when it names one."""

    contestant: str
    case: str
    metric: str
    value: float | None
    target: Target | None = None
    against: str | None = None
    floor: str | None = None  # the floor contestant measured beside it, if any
    floor_value: float | None = None  # its figure, measured the same way

    @property
    def met(self) -> bool | None:
        """True/False against the target; None without a target or a value."""
        if self.target is None or self.value is None:
            return None
        return self.target.met(self.value)

    @property
    def floor_met(self) -> bool | None:
        """Whether the stack's floor meets the target; None without a target or a floor."""
        if self.target is None or self.floor_value is None:
            return None
        return self.target.met(self.floor_value)

    def line(self) -> str:
        if self.against is not None:
            head = f"{self.contestant}/{self.against} {self.case} {self.metric} ratio: "
            unit, digits = "", 2
        else:
            head = f"{self.contestant} {self.case} {self.metric}: "
            unit, digits = _ABSOLUTE[self.metric]
        shown = "n/a" if self.value is None else f"{self.value:,.{digits}f}{unit}"
        if self.target is None:
            better = "higher" if METRICS[self.metric][1] else "lower"
            return f"{head}{shown} ({better} is better; no target)"
        bound = f"{self.target.bound:,.{digits}f}{unit}"
        verdict = "not measured" if self.met is None else ("pass" if self.met else "FAIL")
        floor = ""
        if self.floor is not None and self.floor_value is not None:
            floor_verdict = "pass" if self.floor_met else "FAIL"
            floor = f"; {self.floor} {self.floor_value:,.{digits}f}{unit}: {floor_verdict}"
        return f"{head}{shown} (target {self.target.op} {bound}: {verdict}{floor})"


def _median(s: Spread | None) -> float | None:
    return s.median if s else None


def _honest(a: Summary, b: Summary, x: float | None, y: float | None) -> float | None:
    """A ratio only when every measured run of both was verified (a fast wrong proxy cannot
    win)."""
    return ratio(x, y) if a.all_verified and b.all_verified else None


def _figures(
    case: Case, mine: Summary, base: Summary | None, against: str
) -> list[tuple[str, float | None, str | None]]:
    """``(metric, value, against)`` of one contestant in one case, as the targets name them:
    ratios to ``base`` (``against``: its name), and in the small cases p99 and CPU per request
    as they are."""
    out: list[tuple[str, float | None, str | None]] = []
    if case.kind == "blobs":
        if base is not None:
            speed = _honest(mine, base, _median(mine.throughput), _median(base.throughput))
            cpu = _honest(mine, base, mine.proxy_cpu_per_gib, base.proxy_cpu_per_gib)
            out += [("throughput", speed, against), ("cpu-per-GiB", cpu, against)]
        return out
    if base is not None:
        rps = _honest(mine, base, _median(mine.throughput), _median(base.throughput))
        out.append(("rps", rps, against))
    ok = mine.all_verified
    out.append(("p99", _median(mine.p99_ms) if ok else None, None))
    out.append(("cpu-per-request", mine.proxy_cpu_us_per_req if ok else None, None))
    return out


def checks(cases: Sequence[Case], summaries: dict[tuple[str, str], Summary]) -> list[Check]:
    """Every hubproxy figure the targets table names, plus the same ratios for the sizes it
    does not (the pass of small blobs), in case order; pinned cases have their own lines.
    Where the run measured the floor contestant of the same kind, its figure goes beside."""
    out: list[Check] = []
    for case in cases:
        if case.pinned:
            continue
        base = summaries.get((case.name, BASELINE))
        for name in NUMERATORS:
            mine = summaries.get((case.name, name))
            if mine is None or mine.runs == 0:
                continue
            floor_name = FLOOR_OF[name]
            floor = summaries.get((case.name, floor_name))
            floor_values: dict[str, float | None] = {}
            if floor is not None and floor.runs:
                floor_values = {m: v for m, v, _ in _figures(case, floor, base, BASELINE)}
            for metric, value, against in _figures(case, mine, base, BASELINE):
                floor_value = floor_values.get(metric)
                out.append(
                    Check(
                        name,
                        case.name,
                        metric,
                        value,
                        target_for(name, case, metric),
                        against,
                        floor_name if floor_value is not None else None,
                        floor_value,
                    )
                )
    return out


def floor_lines(cases: Sequence[Case], summaries: dict[tuple[str, str], Summary]) -> list[str]:
    """hubproxy's figures as ratios to its stack's floor (the ``floor-*`` contestant of the
    same kind), where the run measured both: what hubproxy's own work costs."""
    lines: list[str] = []
    for case in cases:
        if case.pinned:
            continue
        for name in NUMERATORS:
            mine = summaries.get((case.name, name))
            floor_name = FLOOR_OF[name]
            floor = summaries.get((case.name, floor_name))
            if mine is None or floor is None or not mine.runs or not floor.runs:
                continue
            if case.kind == "blobs":
                figures = [
                    ("throughput", _median(mine.throughput), _median(floor.throughput)),
                    ("cpu-per-GiB", mine.proxy_cpu_per_gib, floor.proxy_cpu_per_gib),
                ]
            else:
                figures = [
                    ("cpu-per-request", mine.proxy_cpu_us_per_req, floor.proxy_cpu_us_per_req)
                ]
            for metric, a, b in figures:
                value = _honest(mine, floor, a, b)
                lines.append(Check(name, case.name, metric, value, None, floor_name).line())
    return lines


def per_core_lines(cases: Sequence[Case], summaries: dict[tuple[str, str], Summary]) -> list[str]:
    """The pinned cases: MB/s with the proxy on one core, hubproxy's next to nginx-tuned's."""
    lines: list[str] = []
    for case in (c for c in cases if c.pinned and c.kind == "blobs"):
        base = summaries.get((case.name, BASELINE))
        for name in (*NUMERATORS, BASELINE):
            mine = summaries.get((case.name, name))
            if mine is None or mine.runs == 0:
                continue
            head = f"{name} {case.name} MB/s per core: "
            if not mine.all_verified or mine.throughput is None:
                lines.append(head + "n/a (a run failed verification)")
                continue
            cpu = mine.proxy_cpu_per_gib
            detail = f"proxy pinned to CPU 0, {cpu:.2f} CPU-s/GiB" if cpu is not None else ""
            if name != BASELINE and base is not None:
                found = _honest(mine, base, mine.throughput.median, _median(base.throughput))
                if found is not None:
                    detail += f"; {found:.2f}x {BASELINE}'s"
            lines.append(f"{head}{mine.throughput.median:,.0f} ({detail})")
    return lines


def rss_lines(cases: Sequence[Case], summaries: dict[tuple[str, str], Summary]) -> list[str]:
    """Peak RSS per concurrent transfer, in the cases with several blobs in flight: the peak
    over the number in flight, and what the transfers added to the RSS the run began with
    (``hubproxy-miss`` starts each run as a fresh process; the others are long-lived and keep
    memory from earlier runs, so their growth understates)."""
    lines: list[str] = []
    for case in cases:
        if case.kind != "blobs" or case.parallel < 2 or case.pinned:
            continue
        for name in NUMERATORS:
            s = summaries.get((case.name, name))
            if s is None or s.peak_rss_mb is None:
                continue
            grew = ""
            if s.rss_growth_mb is not None and s.rss_start_mb is not None:
                grew = (
                    f"; {s.rss_growth_mb / case.parallel:.2f} MB each above the "
                    f"{s.rss_start_mb:.1f} MB at the start of a run"
                )
            lines.append(
                f"{name} {case.name} peak RSS per concurrent transfer: "
                f"{s.peak_rss_mb / case.parallel:.2f} MB (peak {s.peak_rss_mb:.1f} MB / "
                f"{case.parallel} transfers{grew})"
            )
    return lines


def tally(found: Sequence[Check]) -> str:
    """``targets met: 3 of 14`` (targets not measured count as not met), and ``; by the
    stack's floor: 5 of 14`` when the run measured floors (a target whose floor was not
    measured counts as not met by it)."""
    targeted = [c for c in found if c.target is not None]
    met = sum(1 for c in targeted if c.met)
    line = f"targets met: {met} of {len(targeted)}"
    if any(c.floor_value is not None for c in targeted):
        by_floor = sum(1 for c in targeted if c.floor_met)
        line += f"; by the stack's floor: {by_floor} of {len(targeted)}"
    return line


def summary_lines(cases: Sequence[Case], summaries: dict[tuple[str, str], Summary]) -> list[str]:
    """What ``python -m bench`` prints last: the checks, hubproxy over its floor, per-core
    figures, RSS per transfer, and the tally."""
    found = checks(cases, summaries)
    return [
        *(c.line() for c in found),
        *floor_lines(cases, summaries),
        *per_core_lines(cases, summaries),
        *rss_lines(cases, summaries),
        tally(found),
    ]
