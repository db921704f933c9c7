"""The scale-out bench case (bench/scaleout.py): its pure parts, and one ``python -m
bench.scaleout --quick`` run: three instances, one bucket, 30 clients, and the upstream sends
exactly the image's bytes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.env import find_tool
from bench.fixtures import Blob
from bench.nginxconf import OriginPorts, render_origin
from bench.scaleout import cdn_bytes, metric, missing_packages, upstream_checks

REPO = Path(__file__).resolve().parent.parent
A, B = "a" * 64, "b" * 64


def test_the_cdn_log_gives_the_bytes_and_gets_per_blob() -> None:
    log = f"200 1000 /blobs/{A}\n206 24 /blobs/{A}\n200 500 /blobs/{B}\nnot a line\n- - -\n"
    sent, gets = cdn_bytes(log)
    assert sent == {A: 1024, B: 500}
    assert gets == {A: 2, B: 1}


def test_the_upstream_must_send_the_image_once() -> None:
    layers = [Blob(A, 1024, Path(A)), Blob(B, 500, Path(B))]
    assert upstream_checks(layers, {A: 1024, B: 500}, {A: 1, B: 1}) == []
    assert upstream_checks(layers, {A: 2048, B: 500}, {A: 2, B: 1}) == [
        "the upstream sent 2,548 bytes for a 1,524-byte image",
        f"layer {A[:12]} fetched 2x",
    ]
    assert upstream_checks(layers, {A: 1024}, {A: 1}) == [
        "the upstream sent 1,024 bytes for a 1,524-byte image",
        f"layer {B[:12]} fetched 0x",
    ]


def test_metric_sums_the_samples_with_the_labels_asked() -> None:
    page = (
        "# HELP hubproxy_peer_fetches_total ...\n"
        'hubproxy_peer_fetches_total{peer="https://127.0.0.1:1",result="filled"} 3.0\n'
        'hubproxy_peer_fetches_total{peer="https://127.0.0.1:2",result="filled"} 2.0\n'
        'hubproxy_peer_fetches_total{peer="https://127.0.0.1:2",result="upstream"} 1.0\n'
        "hubproxy_store_commits_total 4.0\n"
        "hubproxy_store_commits_created 1.7e9\n"
    )
    assert metric(page, "hubproxy_peer_fetches_total", result="filled") == 5
    assert metric(page, "hubproxy_peer_fetches_total") == 6
    assert metric(page, "hubproxy_store_commits_total") == 4
    assert metric(page, "hubproxy_store_reads_total") == 0


def test_the_origin_logs_its_cdns_bytes_only_when_asked(tmp_path: Path) -> None:
    ports = OriginPorts(1, 2, 3, 4)
    files = (tmp_path / "blobs", tmp_path / "m.json", "sha256:" + "1" * 64)
    tls = (tmp_path / "c.pem", tmp_path / "k.pem")
    plain = render_origin(tmp_path, ports, *files, *tls)
    assert "log_format" not in plain and plain.count("access_log") == 1  # the http block's off
    logged = render_origin(tmp_path, ports, *files, *tls, cdn_log=tmp_path / "cdn.log")
    assert "log_format cdnbytes '$status $body_bytes_sent $uri';" in logged
    # in both CDN servers (TLS and plain), in no registry server
    assert logged.count(f"access_log {tmp_path / 'cdn.log'} cdnbytes;") == 2
    for server in logged.split("server {")[1:]:
        assert ("cdnbytes" in server) == ("location /blobs/" in server)


def test_quick_scaleout_fetches_the_image_from_the_upstream_once(tmp_path: Path) -> None:
    if find_tool("nginx") is None and os.geteuid() != 0:
        pytest.skip("needs nginx")
    if missing_packages():
        pytest.skip(f"needs {', '.join(missing_packages())}")
    out = tmp_path / "results"
    # a generous --peer-timeout: the check is that peers share one upstream fetch, not that a
    # loaded machine answers within hubproxy's default 2 s (when it does not, the other
    # instances fetch from the upstream themselves, as they should)
    argv = ["--quick", "--peer-timeout", "60s", "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "bench.scaleout", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,  # seconds on an idle machine; this one may not be
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "scaleout.json").read_text())
    image = result["params"]["image_bytes"]
    assert result["upstream_bytes"] == image  # the check: the CDN's own count
    assert set(result["cdn_gets"].values()) == {1}
    assert result["params"]["clients"] == 30 and result["params"]["instances"] == 3
    assert result["pulls_verified"] == 30 * result["params"]["layers"]
    assert result["bucket_complete"] and result["ok"]
    assert all(i["alive_at_end"] for i in result["instances"])
    assert "| upstream bytes | " in (out / "scaleout.md").read_text()
    assert "aggregate throughput" in proc.stdout
