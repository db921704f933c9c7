"""The benchmark harness (bench/): its pure parts, and one ``python -m bench --quick`` run."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench import clients, procs
from bench.cases import GiB, MiB, parse_case, parse_cases
from bench.cli import build_parser, output_dir
from bench.cli import main as bench_main
from bench.contestants import hubproxy_argv, instance_for, parse_contestants
from bench.env import find_tool
from bench.fixtures import Blob, Fixtures, TLSFiles
from bench.nginxconf import OriginPorts, render_contestant, render_origin
from bench.results import RunRecord, Summary, ratios, summarize
from bench.stats import Ratio, ratio, rotate, spread

REPO = Path(__file__).resolve().parent.parent
SUMMARY_LINE = re.compile(
    r"^(hubproxy|hubproxy-nocache)/(nginx-recipe|nginx-tuned|direct) (\S+) "
    r"(throughput|cpu-per-GiB|rps|p99) ratio: "
    r"(n/a|(?P<value>\d+\.\d\d) \((?P=value)x the "
    r"(throughput|requests/s|CPU per GiB|p99 latency): (higher|lower) is better\))$"
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
    assert os.getpid() in procs.group_pids(os.getpid())
    assert procs.cpu_seconds([os.getpid()]) > 0


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
    assert SUMMARY_LINE.match(ratio_line)


def _run(contestant: str, rep: int, seconds: float, cpu: float, ok: bool = True) -> RunRecord:
    return RunRecord(
        case="1GiB-tls",
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
        proxy_peak_rss_kb=30_000 if contestant != "direct" else None,
    )


def test_summaries_use_measured_verified_runs_and_ratios_need_honesty() -> None:
    case = parse_case("1GiB-tls")
    records = [
        _run("hubproxy", 0, 100.0, 9.0),  # warm-up: ignored
        *(_run("hubproxy", rep, s, 1.0) for rep, s in ((1, 1.0), (2, 2.0), (3, 4.0))),
        *(_run("nginx-tuned", rep, 2.0, 2.0) for rep in (1, 2, 3)),
        _run("direct", 1, 0.5, 0.0),
        _run("direct", 2, 0.1, 0.0, ok=False),  # fast and wrong
    ]
    mine = summarize(case, "hubproxy", records)
    assert mine.runs == 3 and mine.all_verified
    assert mine.throughput is not None
    assert mine.throughput.median == pytest.approx(GiB / 2.0 / 1e6)
    assert mine.throughput.lo == pytest.approx(GiB / 4.0 / 1e6)
    assert mine.proxy_cpu_per_gib == pytest.approx(1.0)
    assert mine.peak_rss_mb == pytest.approx(30_000 / 1024)
    direct = summarize(case, "direct", records)
    assert direct.runs == 2 and direct.verified == 1 and not direct.all_verified
    assert direct.problems and "hash" in direct.problems[0]
    summaries = {
        (case.name, n): summarize(case, n, records) for n in ("hubproxy", "nginx-tuned", "direct")
    }
    found = {(r.denominator, r.metric): r.value for r in ratios([case], summaries)}
    assert found[("nginx-tuned", "throughput")] == pytest.approx(1.0)
    assert found[("nginx-tuned", "cpu-per-GiB")] == pytest.approx(0.5)
    assert found[("direct", "throughput")] is None  # a failed run: no ratio at all
    assert ("direct", "cpu-per-GiB") not in found


# --- cases, contestants, configurations ------------------------------------------------------


def test_case_names() -> None:
    case = parse_case("256x1MiB-tls-noredir")
    assert (case.count, case.size, case.parallel, case.redirect, case.hit) == (
        256,
        MiB,
        32,
        False,
        False,
    )
    hit = parse_case("1GiB-http-hit")
    assert (hit.count, hit.size, hit.transport, hit.redirect, hit.hit) == (
        1,
        GiB,
        "http",
        True,
        True,
    )
    assert parse_case("8x64MiB-tls").parallel == 8
    assert parse_case("small-http").kind == "small"
    for bad in ("1TiB-tls", "small-ftp", "0x1MiB-tls", ""):
        with pytest.raises(ValueError, match=r"unknown case|must be positive"):
            parse_case(bad)
    with pytest.raises(ValueError, match="named twice"):
        parse_cases("small-tls,small-tls")
    with pytest.raises(ValueError, match="unknown contestant"):
        parse_contestants("hubproxy,squid")


def test_which_instance_serves_a_case() -> None:
    assert instance_for("hubproxy", parse_case("1GiB-tls")) == "cold"
    assert instance_for("hubproxy", parse_case("1GiB-tls-hit")) == "hit"
    assert instance_for("hubproxy-nocache", parse_case("1GiB-tls-hit")) is None
    assert instance_for("nginx-tuned", parse_case("1GiB-tls-hit")) == "steady"


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
    assert "--cert" not in plain and "--no-cache" in plain


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
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=90,
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
    assert any(line.startswith("hubproxy/nginx-tuned ") for line in lines)
    assert lines == data["summary_lines"]


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


def _summary(case: str, contestant: str, median: float) -> Summary:
    kind = "small" if case.startswith("small") else "blobs"
    return Summary(case, kind, contestant, 2, 2, spread([median * 0.9, median * 1.1]))


def test_chart_legend_covers_no_bar() -> None:
    """The quick run's chart had its legend over a bar: it now sits above the panels."""
    pytest.importorskip("matplotlib")
    from bench.report import figure

    cases = parse_cases("64MiB-tls,32x1MiB-tls,64MiB-tls-hit,small-tls")
    contestants = ["hubproxy", "nginx-recipe", "nginx-tuned", "direct"]
    summaries = {
        (case.name, name): _summary(case.name, name, value)
        for case in cases
        for name, value in zip(contestants, (900.0, 400.0, 450.0, 1000.0), strict=True)
    }
    fig = figure(cases, contestants, summaries)
    fig.canvas.draw()
    legend = fig.legends[0].get_window_extent()
    assert len(fig.axes) == 2
    for ax in fig.axes:
        assert ax.get_legend() is None
        assert not legend.overlaps(ax.get_window_extent())
