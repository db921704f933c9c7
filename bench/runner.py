"""The interleaved repetition loop.

Every repetition runs every case; within a case each contestant takes its turn, starting from
a different contestant each time (rotation by repetition and case index), so drift in the
machine's state (thermal, page cache, neighbours) spreads over all contestants. The first
``warmup`` repetitions are run in full and discarded. Before each of its runs ``hubproxy-miss``
is restarted on an empty cache (untimed); a ``hubproxy-hit`` instance is primed once, untimed,
and checked to hold every blob (small requests: the manifest fetched once through it). Around
each run: the proxy's peak RSS is reset (its RSS at that moment kept), its CPU (and the
origin's) read before and after from /proc, over the process and all its descendants.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench import clients, procs
from bench.cases import Case
from bench.contestants import Contestants, Endpoint, Name, cached_blobs
from bench.env import Tools
from bench.fixtures import Fixtures
from bench.nginxconf import BLOB_PATH, MANIFEST_PATH, NOREDIR_BLOB_PATH
from bench.origin import Origin
from bench.results import RunRecord
from bench.stats import rotate


@dataclass(frozen=True)
class Settings:
    reps: int
    warmup: int
    small_seconds: float
    wrk_threads: int
    max_time: float


@dataclass
class Runner:
    tools: Tools
    fixtures: Fixtures
    origin: Origin
    contestants: Contestants
    settings: Settings
    work: Path
    say: Callable[[str], None] = print

    primed: set[tuple[str, str]] = field(default_factory=set)
    prime_problems: dict[tuple[str, str], list[str]] = field(default_factory=dict)

    def run(self, cases: Sequence[Case], names: Sequence[Name]) -> list[RunRecord]:
        for case in cases:  # start the long-lived instances before the first timed run
            for name in names:
                spec = self.contestants.spec(name, case)
                if spec is not None and spec.instance != "cold":
                    endpoint = self.contestants.endpoint(name, case)
                    if endpoint is not None and spec.instance == "hit":
                        self.prime(case, endpoint)
        records: list[RunRecord] = []
        total = self.settings.warmup + self.settings.reps
        for rep in range(total):
            warmup = rep < self.settings.warmup
            label = "warm-up" if warmup else f"rep {rep - self.settings.warmup + 1}"
            for index, case in enumerate(cases):
                for name in rotate(list(names), rep + index):
                    endpoint = self.contestants.fresh(name, case)
                    if endpoint is None:
                        continue
                    if case.kind == "blobs":
                        record = self.run_blobs(case, endpoint, rep, warmup)
                    else:
                        record = self.run_small(case, endpoint, rep, warmup)
                    records.append(record)
                    self.say(f"[{rep + 1}/{total} {label}] {progress(record)}")
        return records

    def prime(self, case: Case, endpoint: Endpoint) -> None:
        """Fill a cache-hit instance with the case's blobs (untimed) and check they are held;
        for small requests, fetch the manifest through it once."""
        key = (endpoint.base_url, f"{case.count}x{case.size}")
        if key in self.primed:
            return
        self.primed.add(key)
        if case.kind == "small":
            found = clients.verify_manifest(
                self.tools.curl,
                endpoint.base_url + MANIFEST_PATH,
                self.fixtures.tls.ca_pem,
                self.fixtures.manifest_path.read_bytes(),
                self.fixtures.manifest_digest,
                self.work / "manifest",
            )
            self.prime_problems[(case.name, endpoint.contestant)] = [f"priming: {p}" for p in found]
            self.say(
                f"bench: primed {endpoint.contestant} for {case.name}: "
                + ("ok" if not found else "; ".join(found))
            )
            return
        blobs = self.fixtures.blobs[(case.count, case.size)]
        path = BLOB_PATH if case.redirect else NOREDIR_BLOB_PATH
        urls = [f"{endpoint.base_url}{path}{blob.digest_hex}" for blob in blobs]
        fetch = clients.fetch_blobs(
            self.tools.curl,
            urls,
            blobs,
            self.work / "out",
            case.parallel,
            self.fixtures.tls.ca_pem,
            False,
            0,
            self.settings.max_time,
        )
        problems = [f"priming: {p}" for p in fetch.problems]
        if endpoint.cache_dir is not None:
            held = cached_blobs(endpoint.cache_dir, [b.digest_hex for b in blobs])
            if held != len(blobs):
                problems.append(f"after priming the cache holds {held} of {len(blobs)} blobs")
        self.prime_problems[(case.name, endpoint.contestant)] = problems
        self.say(
            f"bench: primed {endpoint.contestant} cache for {case.name}: "
            + ("ok" if not problems else "; ".join(problems))
        )

    def _measure_start(
        self, endpoint: Endpoint
    ) -> tuple[list[int], list[int], float, float, int | None]:
        """The proxy's processes (all descendants too: nginx or hubproxy workers), the
        origin's, their CPU so far, and the proxy's RSS as its peak is reset."""
        pids = endpoint.pids()
        origin_pids = self.origin.process.pids()
        procs.reset_peak_rss(pids)
        rss = procs.rss_kb(pids) if pids else None
        return pids, origin_pids, procs.cpu_seconds(pids), procs.cpu_seconds(origin_pids), rss

    def run_blobs(self, case: Case, endpoint: Endpoint, rep: int, warmup: bool) -> RunRecord:
        blobs = self.fixtures.blobs[(case.count, case.size)]
        path = BLOB_PATH if case.redirect else NOREDIR_BLOB_PATH
        urls = [f"{endpoint.base_url}{path}{blob.digest_hex}" for blob in blobs]
        redirects = 1 if endpoint.follow_redirects and case.redirect else 0
        pids, origin_pids, cpu0, ocpu0, rss0 = self._measure_start(endpoint)
        fetch = clients.fetch_blobs(
            self.tools.curl,
            urls,
            blobs,
            self.work / "out",
            case.parallel,
            self.fixtures.tls.ca_pem,
            endpoint.follow_redirects,
            redirects,
            self.settings.max_time,
        )
        proxy_cpu = procs.cpu_seconds(pids) - cpu0 if pids else None
        origin_cpu = procs.cpu_seconds(origin_pids) - ocpu0
        problems = self.prime_problems.get((case.name, endpoint.contestant), []) + fetch.problems
        return RunRecord(
            case=case.name,
            contestant=endpoint.contestant,
            rep=rep,
            warmup=warmup,
            problems=problems,
            seconds=fetch.seconds,
            bytes=fetch.bytes,
            requests=len(blobs),
            client_cpu_s=fetch.client_cpu_s,
            origin_cpu_s=origin_cpu,
            proxy_cpu_s=proxy_cpu,
            proxy_peak_rss_kb=procs.peak_rss_kb(pids) if pids else None,
            proxy_rss_start_kb=rss0,
            parallel=case.parallel,
        )

    def run_small(self, case: Case, endpoint: Endpoint, rep: int, warmup: bool) -> RunRecord:
        url = endpoint.base_url + MANIFEST_PATH
        pids, origin_pids, cpu0, ocpu0, rss0 = self._measure_start(endpoint)
        small = clients.run_wrk(
            self.tools.wrk,
            url,
            self.settings.wrk_threads,
            case.connections,
            self.settings.small_seconds,
        )
        proxy_cpu = procs.cpu_seconds(pids) - cpu0 if pids else None
        origin_cpu = procs.cpu_seconds(origin_pids) - ocpu0
        rss = procs.peak_rss_kb(pids) if pids else None
        problems = self.prime_problems.get((case.name, endpoint.contestant), []) + small.problems
        problems += clients.verify_manifest(
            self.tools.curl,
            url,
            self.fixtures.tls.ca_pem,
            self.fixtures.manifest_path.read_bytes(),
            self.fixtures.manifest_digest,
            self.work / "manifest",
        )
        report = small.report
        return RunRecord(
            case=case.name,
            contestant=endpoint.contestant,
            rep=rep,
            warmup=warmup,
            problems=problems,
            seconds=report.seconds if report else 0.0,
            bytes=report.read_bytes if report else 0,
            requests=report.requests if report else 0,
            client_cpu_s=small.client_cpu_s,
            origin_cpu_s=origin_cpu,
            proxy_cpu_s=proxy_cpu,
            proxy_peak_rss_kb=rss,
            proxy_rss_start_kb=rss0,
            parallel=case.connections,
            rps=report.rps if report else None,
            p50_ms=report.p50_ms if report else None,
            p99_ms=report.p99_ms if report else None,
            socket_errors=report.socket_errors if report else {},
        )


def progress(record: RunRecord) -> str:
    status = "ok" if record.verified else "FAILED: " + "; ".join(record.problems[:3])
    cpu = f"{record.proxy_cpu_s:.2f}" if record.proxy_cpu_s is not None else "-"
    rss = f"{record.proxy_peak_rss_kb / 1024:.1f}" if record.proxy_peak_rss_kb else "-"
    if record.rps is not None:
        figure = f"{record.rps:,.0f} req/s p99 {record.p99_ms:.1f} ms"
    else:
        figure = f"{record.mbps:,.0f} MB/s in {record.seconds:.2f}s"
    return (
        f"{record.case} {record.contestant}: {figure}; proxy CPU {cpu}s, peak RSS {rss} MB; "
        f"client CPU {record.client_cpu_s:.2f}s; {status}"
    )


def stderr_say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
