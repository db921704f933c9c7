"""bench/load.py: its pure helpers (slope, sizes, /proc parsing, descriptor classification), and
one ``python -m bench.load --quick`` run end to end (idle connections + transfers, a slow client,
a short soak) against a real nginx origin and hubproxy process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bench.env import find_tool
from bench.load import (
    TcpSocket,
    breakdown,
    classify_fd,
    fd_links,
    fds_settled,
    parse_size,
    parse_status_kb,
    parse_tcp_table,
    render_markdown,
    render_text,
    rss_kib,
    slope,
    tcp_table,
)

REPO = Path(__file__).resolve().parent.parent

TCP_TABLE = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1001 1 0
   1: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 1002 1 0
   2: 0100007F:C350 0100007F:01BB 01 00000000:00000000 00:00000000 00000000     0        0 1003 1 0
   3: 0100007F:C351 0100007F:01BB 08 00000000:00000000 00:00000000 00000000     0        0 1004 1 0
   4: 0100007F:C352 0100007F:0050 06 00000000:00000000 03:00000F9C 00000000     0        0 0 3 0
   5: garbage
"""


# --- pure helpers ------------------------------------------------------------------------------


def test_slope_is_the_least_squares_fit() -> None:
    assert slope([(0, 1), (1, 3), (2, 5), (3, 7)]) == pytest.approx(2.0)
    assert slope([(0, 5), (1, 5), (2, 5)]) == 0.0
    assert slope([(0, 0), (1, 1), (2, 0), (3, 1)]) == pytest.approx(0.2)
    assert slope([(10, -2), (20, -4)]) == pytest.approx(-0.2)


def test_slope_of_too_few_points_is_zero() -> None:
    assert slope([]) == 0.0
    assert slope([(1, 100)]) == 0.0
    assert slope([(1, 100), (1, 200)]) == 0.0  # no spread in x


def test_parse_size() -> None:
    assert parse_size("64M") == 64 << 20
    assert parse_size("1G") == 1 << 30
    assert parse_size("512k") == 512 << 10
    assert parse_size("8MiB") == 8 << 20
    assert parse_size("1.5G") == 3 << 29
    assert parse_size("1048576") == 1 << 20
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")
    with pytest.raises(ValueError, match="not a size"):
        parse_size("5T")


def test_parse_status_kb() -> None:
    status = "Name:\tpython\nVmHWM:\t   51200 kB\nVmRSS:\t   40960 kB\nThreads:\t1\n"
    assert parse_status_kb(status, "VmRSS") == 40960
    assert parse_status_kb(status, "VmHWM") == 51200
    assert parse_status_kb(status, "VmSwap") == 0
    assert parse_status_kb("", "VmRSS") == 0
    assert rss_kib(os.getpid()) > 1000  # this process, from /proc


def test_parse_tcp_table() -> None:
    table = parse_tcp_table(TCP_TABLE)
    assert table == {
        1001: TcpSocket(8080, 0, 0x0A),
        1002: TcpSocket(8080, 54321, 0x01),
        1003: TcpSocket(50000, 443, 0x01),
        1004: TcpSocket(50001, 443, 0x08),
    }  # the TIME_WAIT entry (inode 0) and the garbage line are left out
    assert parse_tcp_table("") == {}


def test_classify_fd() -> None:
    table = parse_tcp_table(TCP_TABLE)

    def kind(link: str) -> str:
        return classify_fd(link, table, 8080, {443})

    assert kind("socket:[1001]") == "listener"
    assert kind("socket:[1002]") == "client"
    assert kind("socket:[1003]") == "upstream"
    assert kind("socket:[1004]") == "upstream"
    assert classify_fd("socket:[1003]", table, 8080, {80}) == "tcp-other"
    assert kind("socket:[99999]") == "socket-other"
    assert kind("pipe:[4242]") == "pipe"
    assert kind("anon_inode:[eventpoll]") == "anon_inode"
    assert kind("/dev/shm/cache/blobs/ab/abcd") == "file"
    assert kind("/dev/null") == "file"
    assert kind("net:[4026531840]") == "other"


def test_breakdown_counts_kinds_and_close_wait() -> None:
    table = parse_tcp_table(TCP_TABLE)
    links = {
        0: "/dev/null",
        3: "anon_inode:[eventpoll]",
        4: "socket:[1001]",
        5: "socket:[1002]",
        6: "socket:[1003]",
        7: "socket:[1004]",
        8: "socket:[5]",
    }
    assert breakdown(links, table, 8080, {443}) == {
        "anon_inode": 1,
        "client": 1,
        "close_wait": 1,
        "file": 1,
        "listener": 1,
        "socket-other": 1,
        "total": 7,
        "upstream": 2,
    }


def test_fds_settled_allows_only_idle_upstream_connections() -> None:
    assert fds_settled({"total": 9}, 9)
    assert fds_settled({"total": 73, "upstream": 64}, 9)
    assert not fds_settled({"total": 10, "client": 1}, 9)
    assert not fds_settled({"total": 74, "upstream": 64}, 9)  # one descriptor leaked


def test_breakdown_of_real_sockets_in_this_process() -> None:
    """/proc/self: a listener, an accepted connection and the connecting side, told apart."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as outgoing:
            accepted, _ = listener.accept()
            with accepted:
                counts = breakdown(fd_links(os.getpid()), tcp_table(os.getpid()), port, {port})
                assert counts["listener"] >= 1
                assert counts["client"] >= 1  # the accepted side: local port == listen port
                assert counts["upstream"] >= 1  # the connecting side: remote port == port
                assert outgoing.fileno() in fd_links(os.getpid())


def test_reports_render_rows() -> None:
    rows = [("idle RSS", "29.8 MiB", "< 40 MB: yes"), ("per idle connection", "17.2 KiB", "")]
    text = render_text(rows)
    assert text.splitlines()[1].rstrip() == "per idle connection  17.2 KiB"
    markdown = render_markdown(
        "t", "python -m bench.load", {"CPU": "x"}, rows, ["m"], {"log": {"samples": []}}, []
    )
    assert "| per idle connection | 17.2 KiB |  |" in markdown
    assert "- all passed" in markdown


# --- the whole thing -------------------------------------------------------------------------


def test_quick_run_end_to_end(tmp_path: Path) -> None:
    if find_tool("nginx") is None:
        pytest.skip("needs nginx (apt-get install -y nginx-light)")
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.load", "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("load", "slow-client", "soak"):
        assert (out / f"{name}.md").is_file()
        assert (out / f"{name}.json").is_file()
        assert "## Checks" in (out / f"{name}.md").read_text()

    load = json.loads((out / "load.json").read_text())
    assert load["ok"] and load["failed_checks"] == []
    transfers = load["transfers"]
    assert transfers["count"] == 10 and transfers["verified"] == 10 and transfers["errors"] == {}
    idle = load["idle_connections"]
    assert idle["opened"] == idle["survived_transfers"] == 100
    assert idle["per_connection_kib"] > 0
    fds = load["fds_after"]
    assert fds["matched"] and fds["unexplained"] == 0
    assert fds["after"] == fds["baseline"] + fds["idle_upstream_connections"]
    assert fds["idle_upstream_connections"] <= fds["tolerance_upstream"]
    assert 0 < load["idle_rss_kib_at_start"] < transfers["peak_rss_kib"]

    slow = json.loads((out / "slow-client.json").read_text())
    assert set(slow["variants"]) == {"cache-miss", "no-cache"}
    for variant in slow["variants"].values():
        assert variant["verified"] and variant["bytes"] == 64 << 20
        assert variant["samples"] >= 2 and variant["rss_max_kib"] >= variant["rss_min_kib"] > 0
        assert variant["fds_after"]["matched"]

    soak = json.loads((out / "soak.json").read_text())
    assert soak["ok"] and soak["errors"] == {}
    assert soak["verified_blobs"] > 0 and soak["requests"] > soak["verified_blobs"]
    assert soak["samples"] >= 2 and soak["fds_after"]["matched"]
    assert sum(soak["deliberate_disconnects"].values()) > 0
