"""``hubproxy doctor``: the judgements and the report (policy.diagnosis), and the checks run
against the fake registry, its token service and CDN (307 from the registry), and hubproxy
itself as the mirror, with trustme TLS."""

from __future__ import annotations

import datetime
import io
import json
import socket
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from hubproxy.cli import doctor_command
from hubproxy.config import Config
from hubproxy.ops.doctor import Doctor, Options
from hubproxy.policy.diagnosis import (
    Finding,
    Verdict,
    cache_space_finding,
    certificate_finding,
    exit_status,
    rate_limit_finding,
    render_json,
    render_lines,
    render_table,
)
from hubproxy.policy.proxies import parse_proxy_url
from hubproxy.policy.registries import Registry
from hubproxy.policy.urls import base_url, parse_url
from tests.conftest import StartProxy, TLSFiles, make_config
from tests.fakehub import FakeHub, make_layer
from tests.fakeproxy import SocksProxy

DAY = 86400.0
PEER = {
    "subject": ((("commonName", "registry-1.docker.io"),),),
    "issuer": ((("countryName", "US"),), (("organizationName", "Amazon"),)),
}
CHAIN = ["dns", "tcp", "tls", "v2", "token", "manifest", "cdn"]

# -- judgements --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("days", "verdict", "words"),
    [
        (90, Verdict.OK, "expires in 90 days"),
        (14, Verdict.OK, "expires in 14 days"),
        (13.5, Verdict.WARN, "renew it"),
        (5, Verdict.WARN, "expires in 5 days (renew it)"),
        (-2, Verdict.FAIL, "expired 2 days ago"),
    ],
)
def test_certificate_expiry(days: float, verdict: Verdict, words: str) -> None:
    found = certificate_finding("h:443", PEER, 1000.0, 1000.0 + days * DAY, 0.01)
    assert found.verdict is verdict
    assert words in found.detail
    if verdict is not Verdict.FAIL:
        assert found.detail.startswith("CN=registry-1.docker.io, issued by O=Amazon")


@pytest.mark.parametrize(
    ("status", "headers", "verdict", "words"),
    [
        (
            200,
            [
                (b"ratelimit-limit", b"100;w=21600"),
                (b"ratelimit-remaining", b"87;w=21600"),
                (b"docker-content-digest", b"sha256:" + b"a" * 64),
            ],
            Verdict.OK,
            "200 sha256:aaaaaaaaaaaa...; rate limit 87/100 left per 6h",
        ),
        (
            200,
            [(b"ratelimit-limit", b"100;w=21600"), (b"ratelimit-remaining", b"9;w=21600")],
            Verdict.WARN,
            "rate limit 9/100 left",
        ),
        (200, [], Verdict.OK, "no rate-limit headers"),
        (429, [(b"ratelimit-limit", b"100"), (b"ratelimit-remaining", b"0")], Verdict.FAIL, "429"),
        (404, [], Verdict.FAIL, "answered 404"),
    ],
)
def test_rate_limit_headers(
    status: int, headers: list[tuple[bytes, bytes]], verdict: Verdict, words: str
) -> None:
    found = rate_limit_finding("docker.io/library/hello-world", status, headers, 0.1)
    assert found.verdict is verdict
    assert words in found.detail


@pytest.mark.parametrize(
    ("bound", "blocks", "verdict"),
    [(20 << 30, False, Verdict.OK), (5 << 30, False, Verdict.WARN), (0, True, Verdict.FAIL)],
)
def test_cache_space(bound: int, blocks: bool, verdict: Verdict) -> None:
    assert cache_space_finding("/c", 6 << 30, 20 << 30, bound, blocks).verdict is verdict


ROWS = [
    Finding("tcp", "registry-1.docker.io:443", Verdict.OK, "connected", 0.012),
    Finding("cdn", "docker.io", Verdict.WARN, "slow", 12.5),
    Finding("token", "ghcr.io", Verdict.SKIP, "not run: tcp failed"),
]


def test_reports() -> None:
    table = render_table(ROWS).splitlines()
    assert table[0].split() == ["CHECK", "TARGET", "RESULT", "DETAIL", "TIME"]
    # aligned: every row's result starts in the same column
    column = table[0].index("RESULT")
    assert [line[column:].split()[0] for line in table[1:]] == ["OK", "WARN", "SKIP"]
    assert table[1].endswith("12 ms") and table[2].endswith("12.5 s") and table[3].endswith("-")
    assert render_lines(ROWS).splitlines()[0] == (
        "OK tcp registry-1.docker.io:443: connected (12 ms)"
    )
    document = json.loads(render_json(ROWS))
    assert document["status"] == 0
    assert document["checks"][2] == {
        "check": "token",
        "target": "ghcr.io",
        "result": "SKIP",
        "detail": "not run: tcp failed",
        "seconds": None,
    }
    assert exit_status(ROWS) == 0
    assert exit_status([*ROWS, replace(ROWS[0], verdict=Verdict.FAIL)]) == 1


# -- against the fakes -------------------------------------------------------------------------


def doctor_config(hub: FakeHub, tls_files: TLSFiles, cache: Path, **overrides: Any) -> Config:
    hub.add_image("library/hello-world", "latest", [make_layer(3, 2000)])
    return make_config(hub, tls_files, cache_dir=str(cache), cache_size=64 << 20, **overrides)


def rows(findings: list[Finding]) -> dict[tuple[str, str], Finding]:
    return {(f.check, f.target.split(" ")[0]): f for f in findings}


async def test_every_hop_ok_and_the_mirror_too(
    hub: FakeHub, tls_files: TLSFiles, start_proxy: StartProxy, tmp_path: Path
) -> None:
    config = doctor_config(hub, tls_files, tmp_path)
    mirror = await start_proxy()
    options = Options(mirror=parse_url(mirror.url), mirror_ca=str(tls_files.ca_pem))
    findings = await Doctor(config, options).run()
    assert [f.check for f in findings] == [
        *CHAIN,
        "cache",
        "mirror-tls",
        "mirror-v2",
        "mirror-pull",
    ], render_lines(findings)
    assert {f.verdict for f in findings} == {Verdict.OK}, render_lines(findings)
    by = {f.check: f for f in findings}
    auth = hub.auth_url.removeprefix("https://")
    assert f"401 Bearer realm=https://{auth}/token service=registry.docker.io" == by["v2"].detail
    assert "rate limit" in by["manifest"].detail and "/100 left per 6h" in by["manifest"].detail
    cdn = hub.cdn_url.removeprefix("https://").split(":")[0]
    assert by["cdn"].detail.startswith(f"307 to {cdn}: 200, first ")
    assert "issued by" in by["tls"].detail and "issued by" in by["mirror-tls"].detail
    assert by["mirror-pull"].detail.startswith("200, ")
    assert exit_status(findings) == 0


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_a_registry_down_fails_its_row_and_the_others_still_run(
    hub: FakeHub, tls_files: TLSFiles, tmp_path: Path
) -> None:
    port = closed_port()
    down = Registry("down.example", (base_url(f"https://127.0.0.1:{port}"),))
    config = doctor_config(hub, tls_files, tmp_path, registries=(down,))
    findings = await Doctor(config, Options(images={"down.example": "team/app:1"})).run()
    hub_rows = findings[: len(CHAIN)]
    down_rows = findings[len(CHAIN) : 2 * len(CHAIN)]
    assert [f.verdict for f in hub_rows] == [Verdict.OK] * len(CHAIN), render_lines(findings)
    assert [(f.check, f.verdict) for f in down_rows] == [
        ("dns", Verdict.OK),
        ("tcp", Verdict.FAIL),
        *((check, Verdict.SKIP) for check in CHAIN[2:]),
    ], render_lines(findings)
    assert down_rows[1].target == f"127.0.0.1:{port}"
    assert down_rows[1].detail == "connection refused"
    assert down_rows[2].detail == "not run: tcp failed"
    assert findings[-1].check == "cache" and findings[-1].verdict is Verdict.OK
    assert exit_status(findings) == 1


async def test_a_certificate_expiring_in_5_days_is_a_warning(
    nursery: trio.Nursery, ca: trustme.CA, tls_files: TLSFiles, tmp_path: Path
) -> None:
    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=5, hours=1)
    short = FakeHub(ca, cert_not_after=soon)
    await nursery.start(short.serve)
    findings = await Doctor(doctor_config(short, tls_files, tmp_path), Options()).run()
    (tls,) = [f for f in findings if f.check == "tls"]
    assert tls.verdict is Verdict.WARN
    assert "expires in 5 days (renew it)" in tls.detail
    assert exit_status(findings) == 0  # warnings do not fail the run


async def test_a_mirror_certificate_for_another_name_fails(
    hub: FakeHub,
    ca: trustme.CA,
    tls_files: TLSFiles,
    start_proxy: StartProxy,
    tmp_path: Path,
) -> None:
    other = ca.issue_cert("mirror.other.example")
    cert, key = tmp_path / "other.pem", tmp_path / "other-key.pem"
    other.cert_chain_pems[0].write_to_path(str(cert))
    other.private_key_pem.write_to_path(str(key))
    mirror = await start_proxy(cert=str(cert), key=str(key))
    options = Options(mirror=parse_url(mirror.url), mirror_ca=str(tls_files.ca_pem))
    findings = await Doctor(doctor_config(hub, tls_files, tmp_path / "cache"), options).run()
    by = {f.check: f for f in findings}
    assert by["mirror-tls"].verdict is Verdict.FAIL
    assert by["mirror-tls"].detail == "TLS: certificate is not for 127.0.0.1"
    assert by["mirror-pull"].verdict is Verdict.SKIP
    assert by["cdn"].verdict is Verdict.OK  # the upstream checks ran all the same
    assert exit_status(findings) == 1


async def test_through_a_socks5h_proxy(
    nursery: trio.Nursery, hub: FakeHub, tls_files: TLSFiles, tmp_path: Path
) -> None:
    socks = SocksProxy()
    await nursery.start(socks.serve)
    port = int(hub.registry_url.rsplit(":", 1)[1])
    config = doctor_config(
        hub,
        tls_files,
        tmp_path,
        upstream=f"https://localhost:{port}",
        upstream_proxy=parse_proxy_url(socks.url("socks5h")),
    )
    findings = await Doctor(config, Options()).run()
    assert {f.verdict for f in findings} == {Verdict.OK}, render_lines(findings)
    by = {f.check: f for f in findings}
    # the proxy resolves the registry's name: this machine only needs the proxy's
    assert by["dns"].detail == (
        f"127.0.0.1: 127.0.0.1 (the SOCKS5 proxy {socks.address} resolves localhost)"
    )
    assert by["tcp"].detail == f"connected through the SOCKS5 proxy {socks.address} (socks5h)"
    assert ("name", "localhost", port) in socks.asked
    cdn_port = int(hub.cdn_url.rsplit(":", 1)[1])
    assert ("ipv4", "127.0.0.1", cdn_port) in socks.asked  # the CDN hop went through it too


async def test_json_from_the_command_line_parses(
    hub: FakeHub, tls_files: TLSFiles, tmp_path: Path
) -> None:
    hub.add_image("library/hello-world", "latest", [make_layer(3, 2000)])
    out, err = io.StringIO(), io.StringIO()
    argv = [
        "--json",
        "--upstream",
        hub.registry_url,
        "--upstream-ca",
        str(tls_files.ca_pem),
        "--cache-dir",
        str(tmp_path),
        "--cache-size",
        "64M",
    ]
    status = await trio.to_thread.run_sync(lambda: doctor_command(argv, stdout=out, stderr=err))
    document = json.loads(out.getvalue())
    assert status == document["status"] == 0, out.getvalue() + err.getvalue()
    assert [c["check"] for c in document["checks"]] == [*CHAIN, "cache"]
    assert all(c["result"] == "OK" for c in document["checks"])


def test_usage_errors_are_one_line() -> None:
    out, err = io.StringIO(), io.StringIO()
    assert doctor_command(["--image", "ghcr.io"], stdout=out, stderr=err) == 2
    assert err.getvalue() == (
        "hubproxy doctor: error: --image wants NAME=REPOSITORY:TAG, got 'ghcr.io'\n"
    )
