"""``python -m bench``: the command line, and the run from setup to the summary lines.

Exit status: 0 when every run was verified, 1 when some run failed verification (the report is
still written), 2 for usage errors or missing tools.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType

from bench.cases import FULL_CASES, QUICK_CASES, SMALL_BODY, Case, parse_cases
from bench.contestants import CONTESTANTS, DEFAULT_CONTESTANTS, Name, parse_contestants
from bench.env import (
    REPO_ROOT,
    Tools,
    describe,
    ensure_tools,
    loadavg,
    missing_python_packages,
    source_fingerprint,
)

DEFAULT_OUT = REPO_ROOT / "bench" / "results"
# A smoke run must not overwrite the committed full run (the README's table and chart): it
# writes here, which git ignores, unless --out says otherwise.
QUICK_OUT = DEFAULT_OUT / "quick"


def output_dir(quick: bool, out: Path | None) -> Path:
    """Where a run writes: ``--out`` if given, else bench/results/quick for ``--quick`` and
    bench/results for a full run."""
    if out is not None:
        return out
    return QUICK_OUT if quick else DEFAULT_OUT


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Throughput, CPU and memory of hubproxy (passing, missing its cache, "
        "hitting it) against the tuned nginx recipe (every ratio's baseline), the pasted recipe "
        "and direct fetching, on 127.0.0.1, TLS on every hop, the registry's redirect to the "
        "CDN, interleaved, every byte verified; ends with issue 14's targets, pass or FAIL.",
    )
    add = parser.add_argument
    add(
        "--quick",
        action="store_true",
        help=f"smoke run, under a minute: {','.join(QUICK_CASES)}, 2 repetitions, 1 s of "
        "small requests",
    )
    add(
        "--out",
        type=Path,
        help="output directory (default bench/results; with --quick bench/results/quick, "
        "which git ignores)",
    )
    add(
        "--replot",
        type=Path,
        metavar="RESULTS_JSON",
        help="measure nothing: draw throughput.png again from a run's results.json (into "
        "--out, default the JSON's directory)",
    )
    add("--reps", type=int, help="measured repetitions (default 3, quick 2)")
    add("--warmup", type=int, default=1, help="discarded warm-up repetitions (default 1)")
    add(
        "--cases",
        help=f"comma-separated cases (default {','.join(FULL_CASES)}); blob cases are "
        "[COUNTx]SIZE(MiB|GiB)-(tls|http)[-noredir][-cpu0] (-cpu0: the proxy pinned to CPU 0, "
        "one worker), small ones small-(tls|http)",
    )
    add(
        "--contestants",
        default=",".join(DEFAULT_CONTESTANTS),
        help=f"comma-separated, from {','.join(CONTESTANTS)} (default: all); ratios are "
        "against nginx-tuned",
    )
    add(
        "--small-seconds",
        type=float,
        help="wrk duration per small-request run (default 8, quick 1)",
    )
    add("--wrk-threads", type=int, default=2, help="wrk threads (default 2)")
    add("--max-time", type=float, default=120.0, help="limit per client invocation, seconds")
    add("--tmp", type=Path, help="where blobs and instances live (default /dev/shm)")
    add(
        "--cache-base",
        type=Path,
        help="where hubproxy's cache directories go (default: inside --tmp, i.e. tmpfs; point "
        "it at a disk to include the disk's cost)",
    )
    add("--keep", action="store_true", help="keep the temporary directory (configs, logs)")
    return parser


@dataclass(frozen=True)
class Plan:
    cases: list[Case]
    contestants: list[Name]
    reps: int
    warmup: int
    small_seconds: float
    wrk_threads: int
    max_time: float


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def method_lines(tools: Tools, plan: Plan, cache_where: str, has_workers: bool) -> list[str]:
    """The method, as bullet points for the report."""
    workers_small = "`--workers auto`" if has_workers else "one process (no `--workers` yet)"
    workers_pinned = "`--workers 1`" if has_workers else "one process"
    return [
        "Origin: one nginx (`worker_processes auto`) playing Docker Hub: a TLS registry answering "
        "blob GETs with 307 to a separate TLS CDN endpoint (signed-looking query), a "
        f"{SMALL_BODY:,} B manifest with `Docker-Content-Digest`, a no-redirect blob path and "
        "plain-HTTP twins (unused by the default cases). Files are random bytes on /dev/shm, "
        "sha256 computed as written.",
        "Contestants, each its own process(es) in front of the same origin; proxy→origin always "
        "TLS, verified against the bench CA. hubproxy as users run it (`python -m hubproxy "
        "--cert --key --upstream https://origin --upstream-ca --no-library-prefix --log-level "
        "warning`), three ways: `hubproxy-pass` with `--no-cache` (every byte and request "
        "passed on; one long-lived instance); `hubproxy-miss` with `--cache-dir DIR` (DIR on "
        f"{cache_where}), stopped and restarted on an empty cache directory before every run "
        "(untimed: each run is a first pull, its upstream pool cold); `hubproxy-hit`, one "
        "long-lived instance per case, primed untimed and checked to hold every blob (small "
        "requests: the manifest fetched once through it; its manifest cache by tag is "
        "revalidated after `--manifest-ttl`, 60 s by default). Blob cases use hubproxy's "
        f"default worker count; small requests {workers_small}, the pinned case "
        f"{workers_pinned}. CPU and RSS are summed over hubproxy's process and every "
        "descendant (its workers).",
        "`nginx-tuned`, the baseline of every ratio and target: Debian's default nginx.conf "
        "(`worker_processes auto`) with the pasted recipe (TLS termination, "
        "`proxy_intercept_errors on`, `recursive_error_pages on`, `error_page 301 302 307 = "
        "@handle_redirect`, `proxy_pass $saved_redirect_location`) tuned: `proxy_buffering on` "
        "(`proxy_buffers 16 64k`, no temp files), upstream `keepalive 32` with "
        '`proxy_http_version 1.1` and `Connection ""`, `ssl_buffer_size 16k`, TLS session '
        "cache; its CDN hop is still a variable `proxy_pass`: a new connection per blob, with "
        "TLS session reuse. Reference rows: `nginx-recipe`, the recipe as pasted "
        "(`proxy_buffering off`, no upstream keep-alive); `direct`, the client at the origin "
        "itself, following the 307: the ceiling on this machine.",
        "Floors: `floor-pass`, `floor-miss` and `floor-hit` run `python -m bench.floorproxy`, "
        "a mirror with nothing of hubproxy in it but its stack (trio, h11 on both sides, "
        "hubproxy's TLSStream on both sides, sha256, the file system) and doing only what the "
        "hubproxy contestant of the same name does: follow the 307, stream 256 KiB chunks; a "
        "miss also hashes every blob (checked before its last byte) and writes it to a new "
        "file in the cache directory, kept (restarted on an empty one before every run, as "
        "`hubproxy-miss`); a hit reads the file (or the "
        "manifest, from memory). No access checks, limits, fair share, timeouts, logging or "
        "metrics. One process per CPU (`--processes auto`, as hubproxy's default `--workers "
        "auto`), all cases but the pinned ones. What it costs is the least "
        "any mirror on this stack pays on this machine: the summary gives it beside each "
        "target (`floor ...`) and hubproxy's figures as ratios to it.",
        "Per core (`-cpu0` cases): the proxy alone pinned to CPU 0 (`sched_setaffinity` "
        "before exec, as `taskset -c 0`; its workers inherit it), hubproxy with "
        f"{workers_pinned}, nginx-tuned with `worker_processes 1`; the client and the origin "
        "are not pinned and run on any core. Their MB/s is throughput per core.",
        f"Client for blobs: {Path(tools.curl).name} (`--parallel --parallel-max N --http1.1`, "
        "N = min(blobs, 32), keep-alive reuse within one invocation, files written to "
        "/dev/shm; only `direct` follows redirects), timed from spawn to exit; every file is "
        "sha256-checked after the timed section. Client cost: its CPU from `RUSAGE_CHILDREN` "
        "deltas, per GiB (blobs) or per request (small).",
        f"Small requests: wrk `-t{plan.wrk_threads} -c50 -d{plan.small_seconds:g}s --latency`, "
        f"GETs of the {SMALL_BODY:,} B manifest over keep-alive TLS (wrk cannot do keep-alive "
        "HEAD): `hubproxy-pass` passes every one upstream, `hubproxy-hit` answers from its "
        "cache; any non-2xx/3xx fails the run; after every run curl checks the manifest bytes "
        "and digest header (GET) and status and length (HEAD) through the contestant.",
        f"Repetitions: {plan.warmup} warm-up (discarded) + {plan.reps} measured, interleaved: "
        "every repetition runs every case, contestants in rotated order.",
        "Figures: MB = 10^6 bytes; throughput = bytes received / client wall time. Proxy CPU = "
        "each process's CPU clock (all threads, nanoseconds; clock_getcpuclockid) over the "
        "contestant's processes (nginx: "
        "master + workers; hubproxy: supervisor + workers, found by a /proc scan of parent "
        "pids) during the run. Peak RSS = sum of VmHWM over those processes, reset before each "
        "run (clear_refs 5), max over runs. Peak RSS per concurrent transfer (cases with several "
        "blobs in flight) = peak RSS / transfers in flight, and (peak RSS - RSS when the run "
        "began) / transfers in flight for the run where it grew most. nginx workers share pages "
        "with their master, so the sum overstates nginx a little. Ratios and targets compare "
        "medians of this run; a contestant with any unverified run gets no ratio.",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.replot is not None:
        return replot(args.replot, args.out)
    try:
        cases = parse_cases(args.cases or ",".join(QUICK_CASES if args.quick else FULL_CASES))
        contestants = parse_contestants(args.contestants)
    except ValueError as exc:
        parser.error(str(exc))
    plan = Plan(
        cases=cases,
        contestants=contestants,
        reps=args.reps if args.reps is not None else (2 if args.quick else 3),
        warmup=args.warmup,
        small_seconds=args.small_seconds or (1.0 if args.quick else 8.0),
        wrk_threads=args.wrk_threads,
        max_time=args.max_time,
    )
    if plan.reps < 1 or plan.warmup < 0 or plan.small_seconds <= 0 or plan.wrk_threads < 1:
        parser.error("--reps must be >= 1, --warmup >= 0, durations and threads positive")
    if not plan.small_seconds.is_integer():  # wrk's -d takes whole seconds: "0.5s" fails each run
        parser.error(
            f"--small-seconds must be a whole number of seconds, not {plan.small_seconds:g}"
        )
    missing = missing_python_packages()
    if missing:
        print(
            f"bench: missing Python packages {', '.join(missing)}: pip install -e '.[bench]'",
            file=sys.stderr,
        )
        return 2
    tools = ensure_tools()
    if isinstance(tools, str):
        print(tools, file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _on_sigterm)
    command = shlex.join(["python", "-m", "bench", *(sys.argv[1:] if argv is None else argv)])
    return run(args, plan, tools, command)


def replot(results_json: Path, out: Path | None) -> int:
    """``--replot``: the chart of a finished run, from its results.json alone."""
    from bench import report

    try:
        cases, contestants, summaries = report.read_summaries(results_json)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"bench: cannot read {results_json}: {exc}", file=sys.stderr)
        return 2
    chart = (out or results_json.parent) / "throughput.png"
    chart.parent.mkdir(parents=True, exist_ok=True)
    note = report.plot(chart, cases, contestants, summaries)
    if note:
        print(f"bench: {note}", file=sys.stderr)
        return 2
    print(f"bench: wrote {chart}", file=sys.stderr)
    return 0


def run(args: argparse.Namespace, plan: Plan, tools: Tools, command: str) -> int:
    from bench import report
    from bench.cases import blob_sets
    from bench.contestants import Contestants, hubproxy_has_workers
    from bench.fixtures import make_fixtures
    from bench.origin import start_origin
    from bench.results import RunRecord, Summary, ratios, summarize
    from bench.runner import Runner, Settings, stderr_say
    from bench.targets import summary_lines

    environment = describe(tools)
    has_workers = hubproxy_has_workers()
    environment["hubproxy --workers"] = "listed in --help" if has_workers else "not available"
    source_at_start = source_fingerprint()
    settings = Settings(
        reps=plan.reps,
        warmup=plan.warmup,
        small_seconds=plan.small_seconds,
        wrk_threads=plan.wrk_threads,
        max_time=plan.max_time,
    )
    shm = Path("/dev/shm")
    base = args.tmp or (shm if shm.is_dir() else None)
    tmp = Path(tempfile.mkdtemp(prefix="hubproxy-bench-", dir=base))
    cache_where = str(args.cache_base) if args.cache_base else f"tmpfs under {base or '/tmp'}"
    started = time.perf_counter()
    records: list[RunRecord] = []
    logs: list[report.LogScan] = []
    try:
        shapes = blob_sets(plan.cases)
        t0 = time.perf_counter()
        fixtures = make_fixtures(tmp, shapes, manifest_size=SMALL_BODY)
        total = sum(count * size for count, size in shapes)
        stderr_say(
            f"bench: {total / 2**20:,.0f} MiB of blobs in {time.perf_counter() - t0:.1f}s "
            f"under {tmp}"
        )
        with contextlib.ExitStack() as stack:
            cache_base = tmp
            if args.cache_base:
                cache_base = Path(tempfile.mkdtemp(prefix="hubproxy-bench-", dir=args.cache_base))
                stack.callback(shutil.rmtree, cache_base, True)
            origin = start_origin(tools.nginx, tmp, fixtures, stack)
            pool = Contestants(
                tools.nginx, tmp, cache_base, fixtures, origin, stack, has_workers=has_workers
            )
            runner = Runner(tools, fixtures, origin, pool, settings, tmp, say=stderr_say)
            records = runner.run(plan.cases, plan.contestants)
            log_paths = {"origin-nginx": tmp / "origin" / "error.log", **pool.logs()}
        # every process is stopped here: the logs are complete
        logs = [
            report.scan_log(name, path, str(path.relative_to(tmp)))
            for name, path in log_paths.items()
        ]
    finally:
        if args.keep:
            stderr_say(f"bench: kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    wall = time.perf_counter() - started
    environment["load average at end"] = loadavg()
    if source_fingerprint() != source_at_start:
        environment["WARNING"] = (
            f"hubproxy's source changed during the run (sha256 {source_at_start} -> "
            f"{source_fingerprint()}): runs may mix versions; rerun on a quiet tree"
        )
        stderr_say("bench: " + environment["WARNING"])
    summaries: dict[tuple[str, str], Summary] = {
        (case.name, name): summarize(case, name, records)
        for case in plan.cases
        for name in plan.contestants
        if any(r.case == case.name and r.contestant == name for r in records)
    }
    found_ratios = ratios(plan.cases, summaries)
    lines = summary_lines(plan.cases, summaries)
    out = output_dir(args.quick, args.out)
    out.mkdir(parents=True, exist_ok=True)
    chart_note = report.plot(out / "throughput.png", plan.cases, plan.contestants, summaries)
    if chart_note:
        stderr_say("bench: " + chart_note)
    method = method_lines(tools, plan, cache_where, has_workers)
    (out / "results.md").write_text(
        report.render_markdown(
            command=command,
            wall_seconds=wall,
            environment=environment,
            method=method,
            cases=plan.cases,
            contestants=plan.contestants,
            summaries=summaries,
            ratios=found_ratios,
            logs=logs,
            chart_note=chart_note,
            summary_lines=lines,
        )
    )
    report.write_json(
        out / "results.json",
        command=command,
        wall_seconds=wall,
        environment=environment,
        settings={**asdict(settings), "method": method},
        cases=plan.cases,
        contestants=plan.contestants,
        summaries=summaries,
        ratios=found_ratios,
        records=records,
        logs=logs,
        summary_lines=lines,
    )
    for scan in logs:
        if scan.lines:
            stderr_say(f"bench: {scan.name} logged {scan.lines} warning/error line(s), e.g.:")
            for sample in scan.samples[:3]:
                stderr_say(f"    {sample}")
    failed = [r for r in records if not r.verified]
    written = [out / "results.md", out / "results.json"]
    if not chart_note:
        written.append(out / "throughput.png")
    stderr_say(
        f"bench: {len(records)} runs in {wall:.0f}s, {len(failed)} failed verification; "
        f"wrote {', '.join(map(str, written))}"
    )
    for line in lines:
        print(line, flush=True)
    return 1 if failed else 0
