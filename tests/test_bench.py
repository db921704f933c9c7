"""The benchmark harness (bench/): its pure parts, and one ``python -m bench --quick`` run."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import clients, procs
from bench.cases import FULL_CASES, GiB, MiB, parse_case, parse_cases
from bench.cli import build_parser, output_dir
from bench.cli import main as bench_main
from bench.contestants import (
    CONTESTANTS,
    FLOORS,
    Spec,
    floor_argv,
    hubproxy_argv,
    instance_for,
    lists_flag,
    parse_contestants,
    spec_for,
)
from bench.env import find_tool
from bench.fixtures import Blob, Fixtures, TLSFiles, manifest_exactly
from bench.nginxconf import OriginPorts, render_contestant, render_origin
from bench.report import floor_table, issue_table
from bench.results import RunRecord, Summary, ratios, summarize
from bench.stats import Ratio, ratio, rotate, spread
from bench.targets import Check, Target, summary_lines, target_for

REPO = Path(__file__).resolve().parent.parent
# Every line ``python -m bench`` prints last (bench/targets.py)
_VERDICT = (
    r"\((target (>=|<=) [\d,.]+( ms| µs)?: (pass|FAIL|not measured)"
    r"(; floor-(pass|miss|hit) [\d,.]+( ms| µs)?: (pass|FAIL))?"
    r"|(higher|lower) is better; no target)\)"
)
SUMMARY_LINE = re.compile(
    r"^(?:hubproxy-(pass|miss|hit)/(nginx-tuned|floor-\1) \S+ "
    r"(throughput|cpu-per-GiB|rps|cpu-per-request) ratio: "
    r"(n/a|\d+\.\d\d) " + _VERDICT + "|"
    r"hubproxy-(pass|hit) small-\S+ (p99|cpu-per-request): (n/a|[\d,.]+( ms| µs)) " + _VERDICT + "|"
    r"(hubproxy-(miss|hit)|nginx-tuned) \S+-cpu0 MB/s per core: "
    r"([\d,]+ \(proxy pinned to CPU 0.*\)|n/a.*)|"
    r"hubproxy-(pass|miss|hit) \S+ peak RSS per concurrent transfer: \d+\.\d\d MB \(.*\)|"
    r"targets met: \d+ of \d+(; by the stack's floor: \d+ of \d+)?)$"
)

WRK_OUTPUT = """\
Running 3s test @ https://127.0.0.1:40000/v2/bench/blob/manifests/latest
  2 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     3.46ms    2.10ms  41.20ms   88.12%
    Req/Sec     7.41k   612.33     8.52k    71.67%
  Latency Distribution
     50%    2.95ms
     75%    4.01ms
     90%    5.52ms
     99%  850.00us
  44265 requests in 3.00s, 118.52MB read
  Socket errors: connect 0, read 3, write 0, timeout 1
  Non-2xx or 3xx responses: 7
Requests/sec:  14741.37
Transfer/sec:     39.47MB
"""


# --- wrk and curl output ---------------------------------------------------------------------


def test_parse_wrk_reads_rate_latency_and_errors() -> None:
    report = clients.parse_wrk(WRK_OUTPUT)
    assert report.requests == 44265
    assert report.seconds == pytest.approx(3.0)
    assert report.rps == pytest.approx(14741.37)
    assert report.p50_ms == pytest.approx(2.95)
    assert report.p99_ms == pytest.approx(0.85)
    assert report.read_bytes == round(118.52 * 1024 * 1024)
    assert report.socket_errors == {"connect": 0, "read": 3, "write": 0, "timeout": 1}
    assert report.non_2xx_3xx == 7
    assert report.errors == 11


def test_parse_wrk_clean_run_and_bad_output() -> None:
    clean = "\n".join(
        line for line in WRK_OUTPUT.splitlines() if "Socket" not in line and "Non-2xx" not in line
    )
    report = clients.parse_wrk(clean)
    assert report.non_2xx_3xx == 0 and report.socket_errors == {} and report.errors == 0
    with pytest.raises(ValueError, match="unexpected wrk output"):
        clients.parse_wrk("unable to connect to 127.0.0.1:1 Connection refused")


def test_wrk_units() -> None:
    assert clients.parse_duration_ms("1.50s") == pytest.approx(1500)
    assert clients.parse_duration_ms("2.00m") == pytest.approx(120_000)
    assert clients.parse_duration_ms("12us") == pytest.approx(0.012)
    assert clients.parse_size("1.00KB") == 1024
    with pytest.raises(ValueError, match="not a wrk duration"):
        clients.parse_duration_ms("fast")


def test_curl_write_out_and_transfer_checks() -> None:
    blob = Blob("ab" * 32, 5, Path("/nonexistent"))
    url = "https://127.0.0.1:1/v2/bench/blob/blobs/sha256:" + blob.digest_hex
    transfers = clients.parse_write_out(f"200 0 5 {url}\nnoise\n")
    assert transfers == [clients.Transfer(200, 0, 5, url)]
    assert clients.check_transfers(transfers, [blob], {url: blob}, 0) == []
    # a proxy that passes the 307 through, or truncates, is caught
    passed_on = clients.parse_write_out(f"307 0 171 {url}\n")
    assert clients.check_transfers(passed_on, [blob], {url: blob}, 0)
    assert clients.check_transfers(transfers, [blob], {url: blob}, 1)
    assert clients.check_transfers([], [blob], {url: blob}, 0)


def test_verify_files_hashes_and_removes(tmp_path: Path) -> None:
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.write_bytes(b"hello")
    bad.write_bytes(b"hellO")
    digest = hashlib.sha256(b"hello").hexdigest()
    blob = Blob(digest, 5, good)
    assert clients.verify_files([(blob, good)]) == []
    wrong = hashlib.sha256(b"hellO").hexdigest()
    assert clients.verify_files([(blob, bad)]) == [
        f"{digest[:12]}: received bytes hash to {wrong[:12]}"
    ]
    assert not good.exists() and not bad.exists()
    assert clients.verify_files([(blob, tmp_path / "missing")]) == [
        f"{digest[:12]}: no file received"
    ]


def test_parse_head_takes_the_last_response() -> None:
    dump = (
        "HTTP/1.1 307 Temporary Redirect\r\nLocation: x\r\n\r\n"
        "HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n"
    )
    assert clients.parse_head(dump) == (200, {"content-length": "7"})
    assert clients.parse_head("") == (0, {})


# --- /proc ----------------------------------------------------------------------------------


def test_parse_stat_survives_odd_command_names() -> None:
    line = "4242 (nginx: worker (x) y) S 4241 4241 4241 0 -1 4194624 100 0 0 0 37 12 0 0 20 0 1 0"
    stat = procs.parse_stat(line)
    assert (stat.pid, stat.ppid, stat.utime, stat.stime, stat.cpu_ticks) == (4242, 4241, 37, 12, 49)


def test_parse_stat_and_status_of_this_process() -> None:
    stat = procs.read_stat(os.getpid())
    assert stat is not None and stat.pid == os.getpid() and stat.ppid == os.getppid()
    status = Path(f"/proc/{os.getpid()}/status").read_text()
    assert procs.parse_vmhwm_kb(status) > 1000
    assert procs.parse_vmhwm_kb("Name: kthreadd\nVmRSS: 0 kB\n") == 0
    assert procs.parse_vmhwm_kb("VmHWM: 9 kB\nVmRSS:  7 kB\n", "VmRSS") == 7
    assert procs.rss_kb([os.getpid()]) > 1000
    assert os.getpid() in procs.group_pids(os.getpid())
    assert procs.cpu_seconds([os.getpid()]) > 0


def test_cpu_time_is_read_to_the_nanosecond_not_in_ticks() -> None:
    """The proxy's CPU time is its CPU clock, the one ``time.process_time`` reads for this
    process, not /proc's 10 ms ticks (a 64 MiB transfer takes a tenth of a second of CPU)."""
    before = procs.cpu_seconds([os.getpid()])
    mine = time.process_time()
    after = procs.cpu_seconds([os.getpid()])
    assert before <= mine <= after < mine + 0.005
    assert procs.cpu_seconds([os.getpid(), 2**22 + 1]) >= after  # a pid gone counts nothing


# --- statistics and ratios ------------------------------------------------------------------


def test_spread_ratio_rotate() -> None:
    s = spread([3.0, 1.0, 2.0, 10.0, 4.0])
    assert s is not None and (s.median, s.lo, s.hi, s.n) == (3.0, 1.0, 10.0, 5)
    even = spread([1.0, 2.0, 3.0, 4.0])
    assert even is not None and even.median == 2.5
    assert spread([]) is None
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(1.0, 0.0) is None and ratio(None, 1.0) is None
    assert rotate(["a", "b", "c"], 4) == ["b", "c", "a"]
    assert Ratio("hubproxy", "direct", "small-tls", "rps", None).line().endswith("ratio: n/a")


@pytest.mark.parametrize(
    ("metric", "value", "line"),
    [
        (
            "throughput",
            1.066,
            "hubproxy/nginx-tuned 1GiB-tls throughput ratio: 1.07 (1.07x the throughput: "
            "higher is better)",
        ),
        (
            "cpu-per-GiB",
            0.78,
            "hubproxy/nginx-tuned 1GiB-tls cpu-per-GiB ratio: 0.78 (0.78x the CPU per GiB: "
            "lower is better)",
        ),
        (
            "rps",
            0.125,
            "hubproxy/nginx-tuned 1GiB-tls rps ratio: 0.12 (0.12x the requests/s: "
            "higher is better)",
        ),
        (
            "p99",
            1.5,
            "hubproxy/nginx-tuned 1GiB-tls p99 ratio: 1.50 (1.50x the p99 latency: "
            "lower is better)",
        ),
    ],
)
def test_ratio_lines_say_which_way_is_better(metric: str, value: float, line: str) -> None:
    ratio_line = Ratio("hubproxy", "nginx-tuned", "1GiB-tls", metric, value).line()
    assert ratio_line == line


def _run(
    contestant: str,
    rep: int,
    seconds: float,
    cpu: float,
    ok: bool = True,
    case: str = "1GiB-tls",
    peak_kb: int = 30_000,
) -> RunRecord:
    return RunRecord(
        case=case,
        contestant=contestant,
        rep=rep,
        warmup=rep == 0,
        problems=[] if ok else ["received bytes hash to 000"],
        seconds=seconds,
        bytes=GiB,
        requests=1,
        client_cpu_s=1.0,
        origin_cpu_s=0.5,
        proxy_cpu_s=cpu if contestant != "direct" else None,
        proxy_peak_rss_kb=peak_kb if contestant != "direct" else None,
        proxy_rss_start_kb=20_000 if contestant != "direct" else None,
    )


def test_summaries_use_measured_verified_runs_and_ratios_need_honesty() -> None:
    case = parse_case("1GiB-tls")
    records = [
        _run("hubproxy-miss", 0, 100.0, 9.0),  # warm-up: ignored
        *(_run("hubproxy-miss", rep, s, 1.0) for rep, s in ((1, 1.0), (2, 2.0), (3, 4.0))),
        *(_run("nginx-tuned", rep, 2.0, 2.0) for rep in (1, 2, 3)),
        _run("direct", 1, 0.5, 0.0),
        _run("direct", 2, 0.1, 0.0, ok=False),  # fast and wrong
    ]
    mine = summarize(case, "hubproxy-miss", records)
    assert mine.runs == 3 and mine.all_verified
    assert mine.throughput is not None
    assert mine.throughput.median == pytest.approx(GiB / 2.0 / 1e6)
    assert mine.throughput.lo == pytest.approx(GiB / 4.0 / 1e6)
    assert mine.proxy_cpu_per_gib == pytest.approx(1.0)
    assert mine.peak_rss_mb == pytest.approx(30_000 / 1024)
    assert mine.rss_growth_mb == pytest.approx(10_000 / 1024)
    assert mine.rss_start_mb == pytest.approx(20_000 / 1024)
    direct = summarize(case, "direct", records)
    assert direct.runs == 2 and direct.verified == 1 and not direct.all_verified
    assert direct.problems and "hash" in direct.problems[0]
    summaries = {
        (case.name, n): summarize(case, n, records)
        for n in ("hubproxy-miss", "nginx-tuned", "direct")
    }
    found = {(r.denominator, r.metric): r.value for r in ratios([case], summaries)}
    assert found[("nginx-tuned", "throughput")] == pytest.approx(1.0)
    assert found[("nginx-tuned", "cpu-per-GiB")] == pytest.approx(0.5)
    assert found[("direct", "throughput")] is None  # a failed run: no ratio at all
    assert ("direct", "cpu-per-GiB") not in found


# --- cases, contestants, configurations ------------------------------------------------------


def test_case_names() -> None:
    case = parse_case("256x1MiB-tls-noredir")
    assert (case.count, case.size, case.parallel, case.redirect, case.pinned) == (
        256,
        MiB,
        32,
        False,
        False,
    )
    pinned = parse_case("1GiB-http-cpu0")
    assert (pinned.count, pinned.size, pinned.transport, pinned.redirect, pinned.pinned) == (
        1,
        GiB,
        "http",
        True,
        True,
    )
    assert parse_case("8x64MiB-tls").parallel == 8
    assert parse_case("small-http").kind == "small"
    # a hit is a contestant now, not a case
    for bad in ("1TiB-tls", "small-ftp", "0x1MiB-tls", "", "1GiB-tls-hit"):
        with pytest.raises(ValueError, match=r"unknown case|must be positive"):
            parse_case(bad)
    with pytest.raises(ValueError, match="named twice"):
        parse_cases("small-tls,small-tls")
    with pytest.raises(ValueError, match="unknown contestant"):
        parse_contestants("hubproxy,squid")


def test_the_issue_cases_are_the_default() -> None:
    """Issue 14: pass, miss and hit of 1 GiB, 64 MiB and 100 x 1 MiB on the redirect path over
    TLS, small requests, and the 1 GiB miss and hit on one core."""
    cases = parse_cases(",".join(FULL_CASES))
    blobs = [(c.count, c.size) for c in cases if c.kind == "blobs" and not c.pinned]
    assert blobs == [(1, GiB), (1, 64 * MiB), (100, MiB)]
    assert all(c.transport == "tls" and c.redirect for c in cases)
    assert [c.name for c in cases if c.pinned] == ["1GiB-tls-cpu0"]
    assert [c.connections for c in cases if c.kind == "small"] == [50]
    assert parse_contestants(build_parser().parse_args([]).contestants) == list(CONTESTANTS)


def test_which_instance_serves_a_case() -> None:
    big, small, pinned = (parse_case(n) for n in ("1GiB-tls", "small-tls", "1GiB-tls-cpu0"))
    assert instance_for("hubproxy-miss", big) == "cold"
    assert instance_for("hubproxy-hit", big) == "hit"
    assert instance_for("hubproxy-pass", big) == "steady"
    assert instance_for("nginx-tuned", big) == "steady"
    assert instance_for("hubproxy-miss", small) is None
    assert instance_for("hubproxy-hit", small) == "hit"
    for name in ("hubproxy-pass", "nginx-recipe", "direct"):
        assert instance_for(name, pinned) is None
    # --workers only when hubproxy has it: auto for small requests, 1 on one core
    assert spec_for("hubproxy-pass", small, has_workers=True) == Spec(
        ("hubproxy-pass", "tls", "small", "auto", ""), "steady", workers="auto"
    )
    assert spec_for("hubproxy-pass", small, has_workers=False) == Spec(
        ("hubproxy-pass", "tls", "small", "", ""), "steady"
    )
    assert spec_for("hubproxy-miss", pinned, has_workers=True) == Spec(
        ("hubproxy-miss", "1GiB-tls-cpu0"), "cold", cache=True, workers="1", pinned=True
    )
    hit = spec_for("hubproxy-hit", big, has_workers=True)
    assert hit is not None and hit.workers is None and hit.cache
    # the floors: as many processes as hubproxy's default, the miss restarted like hubproxy's,
    # none on one core
    assert instance_for("floor-miss", big) == "cold"
    assert instance_for("floor-hit", big) == "hit"
    assert instance_for("floor-pass", small) == "steady"
    assert instance_for("floor-miss", small) is None
    assert all(instance_for(name, pinned) is None for name in FLOORS)
    assert all(getattr(spec_for(name, big, False), "workers", None) == "auto" for name in FLOORS)
    tuned = spec_for("nginx-tuned", pinned, has_workers=True)
    unpinned = spec_for("nginx-tuned", big, has_workers=True)
    assert tuned is not None and unpinned is not None
    assert tuned.pinned and not unpinned.pinned and tuned.key != unpinned.key


def test_workers_flag_found_in_help() -> None:
    assert lists_flag("  --workers N|auto  processes on one port", "--workers")
    assert lists_flag("  -w, --workers, --other", "--workers")
    assert not lists_flag(
        "  hubproxy --fallback https://my-worker.example.workers.dev", "--workers"
    )
    assert not lists_flag("  --workers-limit N", "--workers")


def _fixtures(root: Path) -> Fixtures:
    tls = TLSFiles(root / "ca.pem", root / "server.pem", root / "key.pem")
    return Fixtures(root, tls, root / "blobs", root / "manifest.json", "sha256:" + "0" * 64)


def test_hubproxy_command_line(tmp_path: Path) -> None:
    fixtures = _fixtures(tmp_path)
    argv = hubproxy_argv(5000, "tls", "https://127.0.0.1:1", fixtures, tmp_path / "c", "py")
    assert argv[:5] == ["py", "-m", "hubproxy", "--listen", "127.0.0.1:5000"]
    for flag in ("--cert", "--key", "--upstream-ca", "--no-library-prefix", "--cache-dir"):
        assert flag in argv
    plain = hubproxy_argv(5000, "http", "https://127.0.0.1:1", fixtures, None, "py")
    assert "--cert" not in plain and "--no-cache" in plain and "--workers" not in plain
    workers = hubproxy_argv(5000, "tls", "https://x", fixtures, None, "py", workers="auto")
    assert workers[workers.index("--workers") + 1] == "auto"
    floor = floor_argv(5000, "tls", "https://x", fixtures, "miss", tmp_path / "f", "py", "auto")
    assert floor[:5] == ["py", "-m", "bench.floorproxy", "--listen", "127.0.0.1:5000"]
    assert floor[floor.index("--mode") + 1] == "miss" and "--cert" in floor
    assert floor[floor.index("--processes") + 1] == "auto"
    assert floor[floor.index("--dir") + 1] == str(tmp_path / "f")


def test_recipe_and_tuned_configurations(tmp_path: Path) -> None:
    args = (tmp_path, 8443, True, 9443, tmp_path / "ca.pem", tmp_path / "s.pem", tmp_path / "k.pem")
    recipe = render_contestant("recipe", *args)
    for directive in (
        "listen 127.0.0.1:8443 ssl;",
        "proxy_pass https://127.0.0.1:9443;",
        "proxy_ssl_server_name on;",
        "proxy_buffering off;",
        "proxy_intercept_errors on;",
        "recursive_error_pages on;",
        "error_page 301 302 307 = @handle_redirect;",
        "location @handle_redirect",
        "set $saved_redirect_location '$upstream_http_location';",
        "proxy_pass $saved_redirect_location;",
        "proxy_ssl_verify on;",
        f"pid {tmp_path}/nginx.pid;",
    ):
        assert directive in recipe
    assert "keepalive 32" not in recipe
    tuned = render_contestant("tuned", *args)
    for directive in (
        "keepalive 32;",
        "proxy_http_version 1.1;",
        'proxy_set_header Connection "";',
        "proxy_buffering on;",
        "ssl_buffer_size 16k;",
        "ssl_session_cache",
        "proxy_pass https://origin_registry;",
        "error_page 301 302 307 = @handle_redirect;",
    ):
        assert directive in tuned
    assert "proxy_buffering off" not in tuned
    plain = render_contestant("recipe", tmp_path, 8080, False, 9443, *args[4:])
    assert "listen 127.0.0.1:8080;" in plain and "ssl_certificate " not in plain


def test_origin_configuration(tmp_path: Path) -> None:
    conf = render_origin(
        tmp_path,
        OriginPorts(1001, 1002, 1003, 1004),
        tmp_path / "blobs",
        tmp_path / "manifest.json",
        "sha256:" + "1" * 64,
        tmp_path / "s.pem",
        tmp_path / "k.pem",
    )
    assert "return 307 https://127.0.0.1:1003/blobs/$1?verify=" in conf
    assert "return 307 http://127.0.0.1:1004/blobs/$1?verify=" in conf
    assert "Docker-Content-Digest sha256:" + "1" * 64 in conf
    assert "application/vnd.docker.distribution.manifest.v2+json" in conf
    assert conf.count("listen 127.0.0.1:") == 4 and "/var/" not in conf


# --- the whole thing -------------------------------------------------------------------------


def test_quick_run_end_to_end(tmp_path: Path) -> None:
    missing = [tool for tool in ("nginx", "curl", "wrk") if find_tool(tool) is None]
    if missing and os.geteuid() != 0:
        pytest.skip(f"needs {', '.join(missing)} (bench installs them only as root)")
    out = tmp_path / "results"
    proc = subprocess.run(
        # no warm-up: the suite's time (the warm-up's exclusion is tested above)
        [sys.executable, "-m", "bench", "--quick", "--warmup", "0", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,  # a smoke run takes under a minute on an idle machine; this one may not be
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    markdown = (out / "results.md").read_text()
    data = json.loads((out / "results.json").read_text())
    cases = [c["name"] for c in data["cases"]]
    assert cases and all(f"### {name}" in markdown for name in cases)
    assert data["runs"] and all(run["sha256_verified"] for run in data["runs"])
    for summary in data["summaries"]:
        assert summary["all_verified"] and summary["runs"] >= 2, summary
    lines = proc.stdout.strip().splitlines()
    assert lines and all(SUMMARY_LINE.match(line) for line in lines), lines
    assert lines == data["summary_lines"]
    # every target the quick cases reach is checked: no "not measured", a verdict each
    for name, metric in [
        ("hubproxy-miss/nginx-tuned 64MiB-tls", "throughput"),
        ("hubproxy-miss/nginx-tuned 32x1MiB-tls", "cpu-per-GiB"),
        ("hubproxy-hit/nginx-tuned 64MiB-tls", "throughput"),
        ("hubproxy-pass/nginx-tuned small-tls", "rps"),
        ("hubproxy-hit small-tls", "p99"),
        ("hubproxy-pass small-tls", "cpu-per-request"),
    ]:
        [line] = [x for x in lines if x.startswith(f"{name} {metric}")]
        assert re.search(r": (pass|FAIL)\)$", line), line
    # the floors ran, delivered verified bytes, and stand beside the targets
    floors = [s for s in data["summaries"] if s["contestant"].startswith("floor-")]
    assert {s["contestant"] for s in floors} == {"floor-pass", "floor-miss", "floor-hit"}
    assert any(
        line.startswith("hubproxy-miss/floor-miss 32x1MiB-tls cpu-per-GiB") for line in lines
    )
    assert re.search(r"; by the stack's floor: \d+ of \d+$", lines[-1]), lines[-1]
    assert any(" 64MiB-tls-cpu0 MB/s per core: " in line for line in lines)
    assert any(line.startswith("hubproxy-miss 32x1MiB-tls peak RSS per") for line in lines)
    assert lines[-1].startswith("targets met: ")
    assert "## Targets (issue 14)" in markdown and "| 64MiB-tls | " in markdown


def test_request_floor_measures_both_tls_streams() -> None:
    """``python -m bench.request_floor``: the bare trio + h11 + TLS server answers wrk, with
    trio's SSLStream and with hubproxy's TLSStream, and says what a request cost each."""
    if find_tool("wrk") is None:
        pytest.skip("needs wrk")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.request_floor", "--seconds", "1", "--rounds", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    lines = proc.stdout.strip().splitlines()
    pattern = r"\[round 1\] (trio\.SSLStream|TLSStream): ([\d,]+) req/s, (\d+) µs CPU per request"
    found = [re.fullmatch(pattern, line) for line in lines]
    assert [m.group(1) for m in found if m] == ["trio.SSLStream", "TLSStream"], lines
    assert all(m and int(m.group(2).replace(",", "")) > 0 and int(m.group(3)) > 0 for m in found)


# --- where a run writes, and the chart -------------------------------------------------------


def test_quick_run_leaves_the_committed_results_alone() -> None:
    """``--quick`` without ``--out`` writes to bench/results/quick (git-ignored), never over
    the full run the README quotes."""
    results = REPO / "bench" / "results"
    assert output_dir(quick=True, out=None) == results / "quick"
    assert output_dir(quick=False, out=None) == results
    assert output_dir(quick=True, out=Path("/srv/x")) == Path("/srv/x")
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "bench/results/quick/results.json"], cwd=REPO, check=False
    )
    assert ignored.returncode == 0
    assert "quick" in build_parser().format_help()


def _png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


def test_replot_draws_the_committed_run_readable_at_readme_width(tmp_path: Path) -> None:
    """``--replot`` measures nothing: the chart again from results.json, 1200 px wide (the
    committed one was 2618 x 528, unreadable at README width)."""
    pytest.importorskip("matplotlib")
    committed = REPO / "bench" / "results" / "results.json"
    assert bench_main(["--replot", str(committed), "--out", str(tmp_path)]) == 0
    width, height = _png_size(tmp_path / "throughput.png")
    assert width == 1200 and 600 <= height <= 1100
    assert _png_size(REPO / "bench" / "results" / "throughput.png") == (width, height)
    assert bench_main(["--replot", str(tmp_path / "missing.json")]) == 2


def test_a_small_request_duration_wrk_cannot_take_is_refused_before_any_run(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench_main(["--small-seconds", "0.5"])
    assert exit_info.value.code == 2
    assert "--small-seconds must be a whole number of seconds, not 0.5" in capsys.readouterr().err


def _summary(case: str, contestant: str, median: float) -> Summary:
    kind = "small" if case.startswith("small") else "blobs"
    return Summary(case, kind, contestant, 2, 2, spread([median * 0.9, median * 1.1]))


def test_chart_legend_covers_no_bar() -> None:
    """The quick run's chart had its legend over a bar: it now sits above the panels."""
    pytest.importorskip("matplotlib")
    from bench.report import figure

    cases = parse_cases("64MiB-tls,32x1MiB-tls,64MiB-tls-cpu0,small-tls")
    contestants: list[str] = list(CONTESTANTS)  # the floors are left out of the chart
    values = (500.0, 300.0, 900.0, 450.0, 400.0, 1000.0, 600.0, 350.0, 950.0)
    summaries = {
        (case.name, name): _summary(case.name, name, value)
        for case in cases
        for name, value in zip(contestants, values, strict=True)
    }
    fig = figure(cases, contestants, summaries)
    fig.canvas.draw()
    legend = fig.legends[0].get_window_extent()
    labels = [text.get_text() for text in fig.legends[0].get_texts()]
    assert labels and not any("floor" in label for label in labels), labels
    assert len(fig.axes) == 2
    for ax in fig.axes:
        assert ax.get_legend() is None
        assert not legend.overlaps(ax.get_window_extent())


# --- the issue's targets and the summary lines ---------------------------------------------------


@pytest.mark.parametrize(
    ("contestant", "case", "metric", "target"),
    [
        ("hubproxy-miss", "1GiB-tls", "throughput", Target(">=", 1.0)),
        ("hubproxy-miss", "1GiB-tls", "cpu-per-GiB", Target("<=", 2.0)),
        ("hubproxy-miss", "64MiB-tls", "throughput", Target(">=", 0.9)),
        ("hubproxy-miss", "100x1MiB-tls", "throughput", Target(">=", 0.9)),
        ("hubproxy-miss", "100x1MiB-tls", "cpu-per-GiB", Target("<=", 2.0)),
        ("hubproxy-pass", "1GiB-tls", "throughput", Target(">=", 1.2)),
        ("hubproxy-pass", "1GiB-tls", "cpu-per-GiB", Target("<=", 1.15)),
        ("hubproxy-pass", "64MiB-tls", "throughput", None),
        ("hubproxy-hit", "64MiB-tls", "throughput", Target(">=", 2.0)),
        ("hubproxy-hit", "1GiB-tls", "cpu-per-GiB", Target("<=", 0.6)),
        ("hubproxy-pass", "small-tls", "rps", Target(">=", 0.25)),
        ("hubproxy-pass", "small-tls", "p99", Target("<=", 30.0)),
        ("hubproxy-pass", "small-tls", "cpu-per-request", Target("<=", 300.0)),
        ("hubproxy-hit", "small-tls", "cpu-per-request", Target("<=", 120.0)),
        ("hubproxy-miss", "1GiB-tls-cpu0", "throughput", None),
        ("hubproxy-miss", "1GiB-http", "throughput", None),
        ("hubproxy-miss", "100x1MiB-tls-noredir", "throughput", None),
        ("nginx-recipe", "1GiB-tls", "throughput", None),
    ],
)
def test_targets_are_the_issues(
    contestant: str, case: str, metric: str, target: Target | None
) -> None:
    assert target_for(contestant, parse_case(case), metric) == target


def test_check_lines_give_the_target_and_the_verdict() -> None:
    over = Target(">=", 1.0)
    cases = [
        (
            Check("hubproxy-miss", "1GiB-tls", "throughput", 0.47, over, "nginx-tuned"),
            "hubproxy-miss/nginx-tuned 1GiB-tls throughput ratio: 0.47 (target >= 1.00: FAIL)",
            False,
        ),
        (
            Check("hubproxy-hit", "1GiB-tls", "cpu-per-GiB", 0.6, Target("<=", 0.6), "nginx-tuned"),
            "hubproxy-hit/nginx-tuned 1GiB-tls cpu-per-GiB ratio: 0.60 (target <= 0.60: pass)",
            True,
        ),
        (
            Check("hubproxy-pass", "64MiB-tls", "throughput", 0.871, None, "nginx-tuned"),
            "hubproxy-pass/nginx-tuned 64MiB-tls throughput ratio: 0.87 (higher is better; "
            "no target)",
            None,
        ),
        (
            Check("hubproxy-pass", "small-tls", "p99", 54.04, Target("<=", 30.0)),
            "hubproxy-pass small-tls p99: 54.0 ms (target <= 30.0 ms: FAIL)",
            False,
        ),
        (
            Check("hubproxy-hit", "small-tls", "cpu-per-request", 99.6, Target("<=", 120.0)),
            "hubproxy-hit small-tls cpu-per-request: 100 µs (target <= 120 µs: pass)",
            True,
        ),
        (
            Check("hubproxy-miss", "1GiB-tls", "throughput", None, over, "nginx-tuned"),
            "hubproxy-miss/nginx-tuned 1GiB-tls throughput ratio: n/a (target >= 1.00: "
            "not measured)",
            None,
        ),
    ]
    for check, line, met in cases:
        assert check.line() == line
        assert check.met is met
        assert SUMMARY_LINE.match(line), line


def _blob_summary(
    case: str, name: str, mbps: float, cpu: float, peak: float = 40.0, growth: float = 8.0
) -> Summary:
    return Summary(
        case,
        "blobs",
        name,
        3,
        3,
        spread([mbps]),
        proxy_cpu_per_gib=cpu,
        peak_rss_mb=peak,
        rss_growth_mb=growth,
        rss_start_mb=peak - growth,
    )


def _keyed(summaries: list[Summary]) -> dict[tuple[str, str], Summary]:
    """Summaries by (case, contestant), as a run's report holds them."""
    return {(s.case, s.contestant): s for s in summaries}


def _small_summary(name: str, rps: float, p99: float, us: float) -> Summary:
    return Summary(
        "small-tls",
        "small",
        name,
        3,
        3,
        spread([rps]),
        proxy_cpu_us_per_req=us,
        p99_ms=spread([p99]),
    )


def test_summary_lines_from_a_run() -> None:
    """What ``python -m bench`` prints last, from the medians of a (made-up) run: each target
    with its verdict, the per-core MB/s and the RSS per concurrent transfer, then the tally."""
    cases = parse_cases("1GiB-tls,100x1MiB-tls,small-tls,1GiB-tls-cpu0")
    summaries = _keyed(
        [
            _blob_summary("1GiB-tls", "nginx-tuned", 400.0, 1.5),
            _blob_summary("1GiB-tls", "hubproxy-pass", 500.0, 1.65),
            _blob_summary("1GiB-tls", "hubproxy-miss", 200.0, 4.5),
            _blob_summary("1GiB-tls", "hubproxy-hit", 800.0, 0.75),
            _blob_summary("1GiB-tls", "direct", 700.0, 0.0),
            _blob_summary("100x1MiB-tls", "nginx-tuned", 200.0, 3.0),
            _blob_summary("100x1MiB-tls", "hubproxy-miss", 190.0, 5.0, peak=90.0, growth=48.0),
            _small_summary("nginx-tuned", 20_000.0, 5.0, 30.0),
            _small_summary("hubproxy-pass", 4_000.0, 40.0, 280.0),
            _small_summary("hubproxy-hit", 6_000.0, 20.0, 100.0),
            _blob_summary("1GiB-tls-cpu0", "nginx-tuned", 300.0, 1.6),
            _blob_summary("1GiB-tls-cpu0", "hubproxy-miss", 150.0, 3.2),
        ]
    )
    lines = summary_lines(cases, summaries)
    assert all(SUMMARY_LINE.match(line) for line in lines), lines
    assert lines == [
        "hubproxy-pass/nginx-tuned 1GiB-tls throughput ratio: 1.25 (target >= 1.20: pass)",
        "hubproxy-pass/nginx-tuned 1GiB-tls cpu-per-GiB ratio: 1.10 (target <= 1.15: pass)",
        "hubproxy-miss/nginx-tuned 1GiB-tls throughput ratio: 0.50 (target >= 1.00: FAIL)",
        "hubproxy-miss/nginx-tuned 1GiB-tls cpu-per-GiB ratio: 3.00 (target <= 2.00: FAIL)",
        "hubproxy-hit/nginx-tuned 1GiB-tls throughput ratio: 2.00 (target >= 2.00: pass)",
        "hubproxy-hit/nginx-tuned 1GiB-tls cpu-per-GiB ratio: 0.50 (target <= 0.60: pass)",
        "hubproxy-miss/nginx-tuned 100x1MiB-tls throughput ratio: 0.95 (target >= 0.90: pass)",
        "hubproxy-miss/nginx-tuned 100x1MiB-tls cpu-per-GiB ratio: 1.67 (target <= 2.00: pass)",
        "hubproxy-pass/nginx-tuned small-tls rps ratio: 0.20 (target >= 0.25: FAIL)",
        "hubproxy-pass small-tls p99: 40.0 ms (target <= 30.0 ms: FAIL)",
        "hubproxy-pass small-tls cpu-per-request: 280 µs (target <= 300 µs: pass)",
        "hubproxy-hit/nginx-tuned small-tls rps ratio: 0.30 (target >= 0.25: pass)",
        "hubproxy-hit small-tls p99: 20.0 ms (target <= 30.0 ms: pass)",
        "hubproxy-hit small-tls cpu-per-request: 100 µs (target <= 120 µs: pass)",
        "hubproxy-miss 1GiB-tls-cpu0 MB/s per core: 150 (proxy pinned to CPU 0, 3.20 CPU-s/GiB; "
        "0.50x nginx-tuned's)",
        "nginx-tuned 1GiB-tls-cpu0 MB/s per core: 300 (proxy pinned to CPU 0, 1.60 CPU-s/GiB)",
        "hubproxy-miss 100x1MiB-tls peak RSS per concurrent transfer: 2.81 MB (peak 90.0 MB / "
        "32 transfers; 1.50 MB each above the 42.0 MB at the start of a run)",
        "targets met: 10 of 14",
    ]
    # a contestant with an unverified run gets no ratio, and its target counts as not met
    summaries[("1GiB-tls", "hubproxy-hit")].verified = 2
    again = summary_lines(cases, summaries)
    assert (
        "hubproxy-hit/nginx-tuned 1GiB-tls throughput ratio: n/a (target >= 2.00: not measured)"
        in again
    )
    assert again[-1] == "targets met: 8 of 14"


def test_summary_lines_put_the_stacks_floor_beside_each_target() -> None:
    """With the floor contestants measured (bench.floorproxy), each target line says what the
    floor of the same kind reached and whether that meets the target, hubproxy's figures come
    again as ratios to their floor, and the tally counts the targets the floor meets."""
    cases = parse_cases("1GiB-tls,small-tls")
    summaries = _keyed(
        [
            _blob_summary("1GiB-tls", "nginx-tuned", 400.0, 1.5),
            _blob_summary("1GiB-tls", "hubproxy-miss", 200.0, 4.5),
            _blob_summary("1GiB-tls", "floor-miss", 300.0, 3.3),
            _small_summary("nginx-tuned", 20_000.0, 5.0, 30.0),
            _small_summary("hubproxy-hit", 6_000.0, 20.0, 150.0),
            _small_summary("floor-hit", 8_000.0, 10.0, 90.0),
        ]
    )
    lines = summary_lines(cases, summaries)
    assert all(SUMMARY_LINE.match(line) for line in lines), lines
    assert lines == [
        "hubproxy-miss/nginx-tuned 1GiB-tls throughput ratio: 0.50 (target >= 1.00: FAIL; "
        "floor-miss 0.75: FAIL)",
        "hubproxy-miss/nginx-tuned 1GiB-tls cpu-per-GiB ratio: 3.00 (target <= 2.00: FAIL; "
        "floor-miss 2.20: FAIL)",
        "hubproxy-hit/nginx-tuned small-tls rps ratio: 0.30 (target >= 0.25: pass; floor-hit "
        "0.40: pass)",
        "hubproxy-hit small-tls p99: 20.0 ms (target <= 30.0 ms: pass; floor-hit 10.0 ms: pass)",
        "hubproxy-hit small-tls cpu-per-request: 150 µs (target <= 120 µs: FAIL; floor-hit "
        "90 µs: pass)",
        "hubproxy-miss/floor-miss 1GiB-tls throughput ratio: 0.67 (higher is better; no target)",
        "hubproxy-miss/floor-miss 1GiB-tls cpu-per-GiB ratio: 1.36 (lower is better; no target)",
        "hubproxy-hit/floor-hit small-tls cpu-per-request ratio: 1.67 (lower is better; no target)",
        "targets met: 2 of 5; by the stack's floor: 3 of 5",
    ]
    # a floor with an unverified run is no floor: no figure beside the target, no ratio
    summaries[("1GiB-tls", "floor-miss")].verified = 2
    again = summary_lines(cases, summaries)
    assert again[0] == (
        "hubproxy-miss/nginx-tuned 1GiB-tls throughput ratio: 0.50 (target >= 1.00: FAIL)"
    )
    assert (
        "hubproxy-miss/floor-miss 1GiB-tls cpu-per-GiB ratio: n/a (lower is better; no target)"
        in again
    )
    assert again[-1] == "targets met: 2 of 5; by the stack's floor: 3 of 5"


def test_issue_table_puts_hubproxy_beside_nginx_tuned() -> None:
    cases = parse_cases("1GiB-tls,small-tls")
    summaries = _keyed(
        [
            _blob_summary("1GiB-tls", "nginx-tuned", 445.0, 1.49),
            _blob_summary("1GiB-tls", "hubproxy-pass", 507.3, 2.0),
            _blob_summary("1GiB-tls", "hubproxy-miss", 209.15, 5.07),
            _small_summary("nginx-tuned", 21_100.0, 5.0, 32.0),
            _small_summary("hubproxy-pass", 1_050.0, 54.0, 826.0),
        ]
    )
    assert issue_table(cases, summaries).splitlines()[2:] == [
        "| 1GiB-tls | 445 MB/s, 1.49 CPU-s/GiB | 1.14x speed, 1.34x CPU | 0.47x speed, 3.40x CPU "
        "| — |",
        "| small-tls | 21,100 req/s, 32 µs/req, p99 5 ms | 1,050 req/s (0.05x) at 826 µs, p99 54 "
        "ms | — | — |",
    ]


def test_floor_table_puts_each_floor_beside_nginx_tuned_and_hubproxy_against_it() -> None:
    cases = parse_cases("1GiB-tls,small-tls,64MiB-tls")
    summaries = _keyed(
        [
            _blob_summary("1GiB-tls", "nginx-tuned", 400.0, 1.5),
            _blob_summary("1GiB-tls", "hubproxy-miss", 200.0, 4.5),
            _blob_summary("1GiB-tls", "floor-miss", 300.0, 3.0),
            _small_summary("nginx-tuned", 20_000.0, 5.0, 30.0),
            _small_summary("hubproxy-hit", 3_000.0, 25.0, 550.0),
            _small_summary("floor-hit", 6_000.0, 12.0, 250.0),
            _blob_summary("64MiB-tls", "nginx-tuned", 400.0, 1.5),  # no floor: no row
        ]
    )
    assert floor_table(cases, summaries).splitlines() == [
        "| case | `floor-pass` | `floor-miss` | `floor-hit` |",
        "|---|---|---|---|",
        "| 1GiB-tls | — | 0.75x speed, 2.00x CPU; hubproxy 1.50x its CPU per GiB | — |",
        "| small-tls | — | — | 6,000 req/s (0.30x) at 250 µs, p99 12 ms; hubproxy 2.20x its "
        "CPU per request |",
    ]
    assert floor_table(cases, {k: v for k, v in summaries.items() if "floor" not in k[1]}) == ""


# --- processes: pinning, RSS, the small manifest -----------------------------------------------


def test_a_pinned_process_runs_on_cpu_0_only(tmp_path: Path) -> None:
    """``-cpu0``: the proxy on CPU 0 from its first instruction (the mask is set before exec,
    so whatever it forks inherits it); other processes keep every CPU."""
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    with contextlib.ExitStack() as stack:
        pinned = procs.start("pinned", sleeper, tmp_path / "log", stack, cpus={0})
        assert os.sched_getaffinity(pinned.pid) == {0}
        free = procs.start("free", sleeper, tmp_path / "log2", stack)
        assert os.sched_getaffinity(free.pid) == os.sched_getaffinity(0)


def test_cpu_is_summed_over_a_process_and_its_workers() -> None:
    """``hubproxy --workers``: the supervisor's children (found by a /proc scan) are measured
    with it, so a worker's CPU is not lost."""
    script = (
        "import os, sys, time\n"
        "if os.fork() == 0:\n"
        "    sum(range(3_000_000))  # the worker's work\n"
        "    print(os.getpid(), flush=True)\n"
        "time.sleep(60)\n"
    )
    argv = [sys.executable, "-c", script]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            worker = int(proc.stdout.readline())  # printed once its work is done
            group = procs.group_pids(proc.pid)
            assert group == [proc.pid, worker]
            assert procs.cpu_seconds([worker]) > 0
            assert procs.cpu_seconds(group) > procs.cpu_seconds([proc.pid])
        finally:
            for pid in procs.group_pids(proc.pid)[::-1]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)


def test_the_small_manifest_is_exactly_one_kib() -> None:
    body = manifest_exactly(1024)
    assert len(body) == 1024
    assert json.loads(body)["schemaVersion"] == 2


def test_wait_quiet_waits_for_the_start_up_work(tmp_path: Path) -> None:
    """A process that still works after it started (hubproxy's check of its upstreams) is
    waited for: its CPU time no longer moves when ``wait_quiet`` returns."""
    busy_then_idle = [
        sys.executable,
        "-c",
        "import time\nend = time.process_time() + 0.4\n"
        "while time.process_time() < end: pass\ntime.sleep(60)",
    ]
    with contextlib.ExitStack() as stack:
        started = procs.start("busy", busy_then_idle, tmp_path / "log", stack)
        assert procs.wait_quiet(started, quiet=0.3, timeout=20)
        spent = procs.cpu_seconds([started.process.pid])
        assert spent >= 0.35  # it did not return while the work ran
        assert procs.wait_quiet(started, quiet=0.3, timeout=20)
        assert procs.cpu_seconds([started.process.pid]) - spent < procs.QUIET_CPU
