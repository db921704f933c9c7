"""Operating a mirror, end to end over real sockets: /healthz, /readyz, /metrics (read back by
prometheus_client's own text parser), the status page, and access control tried from allowed
and refused loopback addresses (127.0.0.1 and 127.0.0.2 are both this machine)."""

from __future__ import annotations

import base64
import hashlib
import html
import json
import logging
import shutil
import ssl
import urllib.parse
from pathlib import Path

import h11
import pytest
import trio
import trustme
from prometheus_client.parser import text_string_to_metric_families

from hubproxy.app import reload
from hubproxy.ops.clientconfig import snippet
from hubproxy.ops.usersfile import add_user
from hubproxy.policy.access import parse_image_rules, parse_networks
from tests.conftest import RunningProxy, StartProxy
from tests.fakehub import FakeHub, fetch, make_layer
from tests.registry_client import RegistryClient
from tests.wire import WireClient

OTHER_ADDRESS = "127.0.0.2"  # a second loopback source address: "another machine"
PASSWORD = "correct-horse-battery-staple"


async def get_from(
    url: str, ca: trustme.CA, source: str, headers: list[tuple[str, str]] | None = None
) -> tuple[h11.Response, bytes]:
    """GET ``url`` over a fresh TLS connection made from the local address ``source``."""
    split = urllib.parse.urlsplit(url)
    assert split.hostname is not None and split.port is not None
    tcp = await trio.open_tcp_stream(split.hostname, split.port, local_address=source)
    context = ssl.create_default_context()
    ca.configure_trust(context)
    stream = trio.SSLStream(tcp, context, server_hostname=split.hostname, https_compatible=True)
    client = WireClient(stream, split.netloc)
    try:
        target = split.path + (f"?{split.query}" if split.query else "")
        return await client.request("GET", target or "/", headers)
    finally:
        await client.aclose()


def metric_samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a /metrics page, by name and labels, as Prometheus would read it."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return samples[(name, frozenset(labels.items()))]


@pytest.fixture
def layer() -> bytes:
    return make_layer(7, 300_000)


@pytest.fixture
def image(hub: FakeHub, layer: bytes) -> str:
    return hub.add_image("library/alpine", "3.20", [layer])


async def test_health_and_readiness(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    proxy = await start_proxy(cache_dir=str(tmp_path / "cache"))
    r = await fetch(proxy.url + "/healthz", ca)
    assert r.status == 200 and r.json() == {"status": "ok"}
    r = await fetch(proxy.url + "/readyz", ca)
    assert r.status == 200, r.body
    checks = r.json()["checks"]
    assert {name: check["ok"] for name, check in checks.items()} == {
        "listener": True,
        "upstream": True,
        "cache": True,
    }
    # the upstream was probed with GET /v2/ (no client behind it, so no credentials)
    assert any(s.target == "/v2/" and s.server == "registry" for s in hub.requests)

    shutil.rmtree(tmp_path / "cache" / "tmp")  # the disk under the cache went away
    r = await fetch(proxy.url + "/readyz", ca)
    assert r.status == 503
    checks = r.json()["checks"]
    assert checks["cache"]["ok"] is False and "cannot write" in checks["cache"]["detail"]
    assert checks["upstream"]["ok"] is True
    r = await fetch(proxy.url + "/healthz", ca, method="HEAD")
    assert r.status == 200 and r.body == b""


async def test_readiness_fails_while_no_upstream_answers(
    start_proxy: StartProxy, ca: trustme.CA
) -> None:
    with trio.socket.socket() as unused:  # a port nothing listens on
        await unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    proxy = await start_proxy(upstream=f"https://127.0.0.1:{port}")
    r = await fetch(proxy.url + "/readyz", ca)
    assert r.status == 503
    upstream = r.json()["checks"]["upstream"]
    assert upstream["ok"] is False and f"127.0.0.1:{port}" in upstream["detail"]
    r = await fetch(proxy.url + "/healthz", ca)
    assert r.status == 200  # alive, just not ready


async def test_metrics_count_what_the_mirror_did(
    hub: FakeHub,
    start_proxy: StartProxy,
    ca: trustme.CA,
    tmp_path: Path,
    image: str,
    layer: bytes,
) -> None:
    proxy = await start_proxy(cache_dir=str(tmp_path / "cache"))
    client = RegistryClient(proxy.url, ca)
    digest = "sha256:" + hashlib.sha256(layer).hexdigest()
    for _ in range(2):  # a miss, then a hit
        r = await client.request(f"/v2/library/alpine/blobs/{digest}")
        assert r.status == 200 and r.body == layer
    r = await client.request("/v2/library/alpine/manifests/3.20")
    assert r.status == 200
    bad = make_layer(8, 1)  # one byte: verified (and refused) before anything is sent
    bad_digest = "sha256:" + hashlib.sha256(bad).hexdigest()
    hub.add_image("library/busybox", "1", [bad])
    hub.corrupt_blob(bad_digest)
    r = await client.request(f"/v2/library/busybox/blobs/{bad_digest}")
    assert r.status == 502  # caught before a byte left: a clear error, never wrong bytes
    hub.add_image("library/redis", "7", [make_layer(9, 100)])
    assert proxy.proxy.pullthrough is not None
    await proxy.proxy.pullthrough.wait_probes()  # so the forced 429 meets our request
    hub.force_429(1, retry_after=None)
    r = await client.request("/v2/library/redis/manifests/7")
    assert r.status == 429
    await proxy.proxy.pullthrough.wait_probes()

    r = await fetch(proxy.url + "/metrics", ca)
    assert r.status == 200
    assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    samples = metric_samples(r.body.decode())
    assert sample(samples, "hubproxy_requests_total", route="blob", status="200") == 2
    assert sample(samples, "hubproxy_requests_total", route="blob", status="502") == 1
    assert sample(samples, "hubproxy_requests_total", route="token", status="200") >= 1
    assert sample(samples, "hubproxy_requests_total", route="manifest", status="429") == 1
    assert sample(samples, "hubproxy_cache_requests_total", kind="blob", result="hit") == 1
    assert sample(samples, "hubproxy_cache_requests_total", kind="blob", result="miss") == 1
    assert 0 < sample(samples, "hubproxy_cache_hit_ratio") < 1
    assert sample(samples, "hubproxy_response_bytes_total", source="cache") == len(layer)
    assert sample(samples, "hubproxy_response_bytes_total", source="upstream") >= len(layer)
    upstream = str(proxy.config.upstreams[0].origin)
    count = sample(samples, "hubproxy_upstream_response_seconds_count", upstream=upstream)
    inf = sample(samples, "hubproxy_upstream_response_seconds_bucket", upstream=upstream, le="+Inf")
    assert count == inf >= 3
    assert sample(samples, "hubproxy_upstream_rate_limited_total", upstream=upstream) == 1
    remaining = sample(samples, "hubproxy_upstream_ratelimit_remaining", upstream=upstream)
    assert remaining == hub.ratelimit_remaining
    assert sample(samples, "hubproxy_cache_verification_failures_total") == 1
    assert sample(samples, "hubproxy_cache_blobs") == 1
    assert sample(samples, "hubproxy_cache_bytes") == len(layer)
    # this very request is active
    assert sample(samples, "hubproxy_client_connections", state="active") >= 1
    assert sample(samples, "hubproxy_cache_evictions_total") == 0


async def test_metrics_count_evictions_and_failovers(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    layers = [make_layer(i, 100_000) for i in (1, 2)]
    hub.add_image("library/alpine", "3.20", layers)
    proxy = await start_proxy(
        cache_dir=str(tmp_path / "cache"), cache_size=150_000, fallbacks=[hub.registry_url]
    )
    client = RegistryClient(proxy.url, ca)
    for layer in layers:
        digest = "sha256:" + hashlib.sha256(layer).hexdigest()
        r = await client.request(f"/v2/library/alpine/blobs/{digest}")
        assert r.status == 200 and r.body == layer
        await proxy.fills_ended()  # cached, so evictable by the next
    hub.force_429(1)
    r = await client.request("/v2/library/alpine/manifests/3.20")
    assert r.status == 200  # the fallback answered
    samples = metric_samples((await fetch(proxy.url + "/metrics", ca)).body.decode())
    assert sample(samples, "hubproxy_cache_evictions_total") == 1
    origin = str(proxy.config.upstreams[0].origin)
    assert sample(samples, "hubproxy_failovers_total", from_upstream=origin, to_upstream=origin)
    assert sample(samples, "hubproxy_cache_limit_bytes") == 150_000


async def test_status_page_shows_the_client_lines_and_figures(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path, image: str
) -> None:
    proxy = await start_proxy(cache_dir=str(tmp_path / "cache"))
    r = await RegistryClient(proxy.url, ca).request("/v2/library/alpine/manifests/3.20")
    assert r.status == 200
    r = await fetch(proxy.url + "/", ca)
    assert r.status == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    page = r.body.decode()
    assert page.startswith("<!DOCTYPE html>")
    for client in ("docker", "containerd", "k3s", "podman"):
        text, _hint = snippet(client, proxy.url, None)
        assert html.escape(text) in page, client
    assert html.escape(hub.registry_url) in page
    assert "GiB" in page or "MiB" in page or "KiB" in page


async def test_allow_lists_refuse_other_networks(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = await start_proxy(allow=parse_networks(["127.0.0.1/32"]))
    head, _ = await get_from(proxy.url + "/v2/", ca, "127.0.0.1")
    assert head.status_code == 401  # served: the registry's own challenge
    seen = len(hub.requests)
    with caplog.at_level(logging.WARNING, logger="hubproxy"):
        head, body = await get_from(
            proxy.url + "/v2/library/alpine/manifests/3.20", ca, OTHER_ADDRESS
        )
    assert head.status_code == 403
    assert json.loads(body)["errors"][0]["code"] == "DENIED"
    assert len(hub.requests) == seen  # nothing went upstream for the refused client
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1 and OTHER_ADDRESS in refusals[0] and "--allow" in refusals[0]


async def test_ops_allow_limits_who_reads_metrics_and_status(
    start_proxy: StartProxy, ca: trustme.CA
) -> None:
    proxy = await start_proxy(
        allow=parse_networks(["127.0.0.0/8"]), ops_allow=parse_networks([f"{OTHER_ADDRESS}/32"])
    )
    for path in ("/metrics", "/healthz", "/readyz", "/"):
        head, body = await get_from(proxy.url + path, ca, "127.0.0.1")
        assert head.status_code == 403, path
        assert json.loads(body)["errors"][0]["code"] == "DENIED"
        head, _ = await get_from(proxy.url + path, ca, OTHER_ADDRESS)
        assert head.status_code == 200, path
    head, _ = await get_from(proxy.url + "/v2/", ca, "127.0.0.1")
    assert head.status_code == 401  # the registry API itself stays open to --allow


async def test_image_allow_and_deny_globs(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, image: str
) -> None:
    hub.add_image("library/busybox", "1", [make_layer(2, 100)])
    hub.add_image("someone/app", "1", [make_layer(3, 100)])
    proxy = await start_proxy(images=parse_image_rules(["library/*"], ["library/busybox"]))
    client = RegistryClient(proxy.url, ca)
    r = await client.request("/v2/alpine/manifests/3.20")
    assert r.status == 200
    for path in ("/v2/busybox/manifests/1", "/v2/someone/app/manifests/1"):
        r = await client.request(path)
        assert r.status == 403, path
        assert r.json()["errors"][0]["code"] == "DENIED"
    upstream_paths = [s.target for s in hub.requests]
    assert not any("busybox" in p or "someone" in p for p in upstream_paths)


async def test_client_rate_limit_answers_429_per_client(
    start_proxy: StartProxy, ca: trustme.CA
) -> None:
    # 0.01/s: the bucket cannot refill during the test, however slow the machine
    proxy = await start_proxy(client_rate_limit=0.01, client_burst=3)
    for _ in range(3):
        head, _ = await get_from(proxy.url + "/healthz", ca, "127.0.0.1")
        assert head.status_code == 200
    head, body = await get_from(proxy.url + "/healthz", ca, "127.0.0.1")
    assert head.status_code == 429
    assert dict(head.headers)[b"retry-after"] == b"100"
    assert json.loads(body)["errors"][0]["code"] == "TOOMANYREQUESTS"
    head, _ = await get_from(proxy.url + "/healthz", ca, OTHER_ADDRESS)
    assert head.status_code == 200  # another client has its own bucket
    samples = metric_samples(
        (await get_from(proxy.url + "/metrics", ca, OTHER_ADDRESS))[1].decode()
    )
    assert sample(samples, "hubproxy_denied_requests_total", reason="rate") == 1


@pytest.fixture
def users_file(tmp_path: Path) -> Path:
    path = tmp_path / "users"
    add_user(path, "alice", PASSWORD)
    return path


async def mirror_with_users(start_proxy: StartProxy, users_file: Path) -> RunningProxy:
    return await start_proxy(users_file=str(users_file))


async def test_mirror_login_gives_sealed_tokens_and_anonymous_upstream_pulls(
    hub: FakeHub,
    start_proxy: StartProxy,
    ca: trustme.CA,
    users_file: Path,
    image: str,
    layer: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    proxy = await mirror_with_users(start_proxy, users_file)
    digest = "sha256:" + hashlib.sha256(layer).hexdigest()

    anonymous = RegistryClient(proxy.url, ca)
    r = await anonymous.request("/v2/library/alpine/manifests/3.20")
    assert r.status == 401
    assert anonymous.challenges[0].startswith(f'Bearer realm="{proxy.url}/token/0"')
    assert 'service="registry.docker.io"' in anonymous.challenges[0]
    assert 'scope="repository:library/alpine:pull"' in anonymous.challenges[0]
    assert 'Basic realm="hubproxy"' in r.headers["www-authenticate"]  # the token endpoint's
    assert not any("/manifests/" in s.target for s in hub.requests)

    wrong = RegistryClient(proxy.url, ca, credentials=("alice", "wrong"))
    assert (await wrong.request("/v2/library/alpine/manifests/3.20")).status == 401

    alice = RegistryClient(proxy.url, ca, credentials=("alice", PASSWORD))
    r = await alice.request("/v2/library/alpine/manifests/3.20")
    assert r.status == 200
    r = await alice.request(f"/v2/library/alpine/blobs/{digest}")
    assert r.status == 200 and r.body == layer
    tokens = set(alice.tokens.values())
    assert tokens and all(t.startswith("hp1.") for t in tokens)
    # upstream: token requests anonymous and without the mirror account, registry requests
    # carrying the upstream's own token (never the sealed one)
    token_requests = [s for s in hub.requests if s.server == "auth"]
    assert token_requests
    assert all("authorization" not in s.headers for s in token_requests)
    assert all("account=" not in s.target for s in token_requests)
    registry_auth = [
        s.headers["authorization"]
        for s in hub.requests
        if s.server == "registry" and "/manifests/" in s.target and "authorization" in s.headers
    ]
    assert registry_auth and not any("hp1." in a for a in registry_auth)

    sealed = next(iter(tokens))
    tampered = sealed[:-2] + ("A" if sealed[-2] != "A" else "B") + sealed[-1]
    r = await fetch(
        proxy.url + "/v2/library/alpine/manifests/3.20",
        ca,
        headers=[("authorization", f"Bearer {tampered}")],
    )
    assert r.status == 401 and r.json()["errors"][0]["code"] == "UNAUTHORIZED"
    upstream_token = registry_auth[0].removeprefix("Bearer ")
    r = await fetch(  # a token from Docker Hub itself is not a mirror login
        proxy.url + "/v2/library/alpine/manifests/3.20",
        ca,
        headers=[("authorization", f"Bearer {upstream_token}")],
    )
    assert r.status == 401

    basic = base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
    r = await fetch(proxy.url + "/v2/", ca, headers=[("authorization", f"Basic {basic}")])
    assert r.status == 401  # admitted, and the upstream asks for its token: realm is ours
    assert f'realm="{proxy.url}/token/0"' in r.headers["www-authenticate"]

    logged = "\n".join(record.getMessage() for record in caplog.records)
    for secret in (PASSWORD, basic, upstream_token, *tokens):
        assert secret not in logged


async def test_sighup_rereads_the_users_file(
    start_proxy: StartProxy, ca: trustme.CA, users_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = await mirror_with_users(start_proxy, users_file)
    dave = base64.b64encode(b"dave:dave-pass-1").decode()
    r = await fetch(
        proxy.url + "/token/0?service=registry.docker.io&scope=repository:library/alpine:pull",
        ca,
        headers=[("authorization", f"Basic {dave}")],
    )
    assert r.status == 401
    add_user(users_file, "dave", "dave-pass-1")
    reload(proxy.server, proxy.proxy)  # what SIGHUP runs
    r = await fetch(
        proxy.url + "/token/0?service=registry.docker.io&scope=repository:library/alpine:pull",
        ca,
        headers=[("authorization", f"Basic {dave}")],
    )
    assert r.status == 200 and r.json()["token"].startswith("hp1.")
    await trio.Path(users_file).write_text("broken line\n")
    with caplog.at_level(logging.ERROR, logger="hubproxy"):
        reload(proxy.server, proxy.proxy)
    assert "still using the old users" in caplog.text
    r = await fetch(
        proxy.url + "/token/0?service=registry.docker.io&scope=repository:library/alpine:pull",
        ca,
        headers=[("authorization", f"Basic {dave}")],
    )
    assert r.status == 200
