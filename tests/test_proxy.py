"""hubproxy end to end against the fake Docker Hub: real sockets, real TLS, the registry flow.

Each test names the behaviour of the core issue it proves (routing, auth, redirects, failover,
headers, errors)."""

from __future__ import annotations

import hashlib
import json
import logging
import urllib.parse

import pytest
import trio
import trustme

from tests.conftest import StartProxy
from tests.fakehub import MEDIA_DOCKER_MANIFEST, FakeHub, fetch, make_layer
from tests.registry_client import RegistryClient


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def layer() -> bytes:
    return make_layer(7, 2_000_000)


@pytest.fixture
def image(hub: FakeHub, layer: bytes) -> str:
    return hub.add_image("library/alpine", "3.20", [layer, make_layer(8, 1000)])


# -- auth (behaviour 3) ------------------------------------------------------------------------


async def test_challenge_realm_points_at_the_mirror(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, image: str
) -> None:
    proxy = await start_proxy()
    for method in ("GET", "HEAD"):
        r = await fetch(proxy.url + "/v2/", ca, method=method)
        assert r.status == 401
        challenge = r.headers["www-authenticate"]
        assert challenge == (f'Bearer realm="{proxy.url}/token/0",service="registry.docker.io"')
        r = await fetch(proxy.url + "/v2/alpine/manifests/3.20", ca, method=method)
        assert r.status == 401
        assert r.headers["www-authenticate"] == (
            f'Bearer realm="{proxy.url}/token/0",service="registry.docker.io",'
            'scope="repository:library/alpine:pull"'
        )
    assert hub.auth_url not in json.dumps([s.headers for s in hub.requests])


async def test_realm_uses_the_host_the_client_addressed_or_public_url(
    start_proxy: StartProxy, ca: trustme.CA
) -> None:
    proxy = await start_proxy()
    r = await fetch(proxy.url + "/v2/", ca, headers=[("host", f"localhost:{proxy.port}")])
    assert f'realm="https://localhost:{proxy.port}/token/0"' in r.headers["www-authenticate"]
    public = await start_proxy(public_url="https://mirror.example.com")
    r = await fetch(public.url + "/v2/", ca)
    assert 'realm="https://mirror.example.com/token/0"' in r.headers["www-authenticate"]


async def test_anonymous_pull_through_the_mirror(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, image: str, layer: bytes
) -> None:
    proxy = await start_proxy()
    client = RegistryClient(proxy.url, ca)
    r = await client.request(
        "/v2/library/alpine/manifests/3.20", headers=[("accept", MEDIA_DOCKER_MANIFEST)]
    )
    assert r.status == 200
    assert r.headers["docker-content-digest"] == image
    assert digest_of(r.body) == image  # byte-exact
    assert r.headers["content-type"] == MEDIA_DOCKER_MANIFEST
    assert "ratelimit-remaining" in r.headers
    b = await client.request(f"/v2/library/alpine/blobs/{digest_of(layer)}")
    assert b.status == 200  # the 307 to the CDN was followed by the mirror
    assert b.complete
    assert b.body == layer
    assert b.headers["content-length"] == str(len(layer))
    assert b.headers["docker-content-digest"] == digest_of(layer)
    cdn = [s for s in hub.requests if s.server == "cdn"]
    assert cdn
    assert all("authorization" not in s.headers for s in cdn)
    registry_blob = [s for s in hub.requests if s.server == "registry" and "/blobs/" in s.target]
    assert registry_blob
    assert all("authorization" in s.headers for s in registry_blob)


async def test_library_prefix_in_path_and_token_scope(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, image: str
) -> None:
    proxy = await start_proxy()
    client = RegistryClient(proxy.url, ca)
    # docker computes the scope from the name it was given: "repository:alpine:pull"
    r = await client.request("/v2/alpine/manifests/3.20", scope="repository:alpine:pull")
    assert r.status == 200
    assert r.headers["docker-content-digest"] == image
    token_requests = [s for s in hub.requests if s.server == "auth"]
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(token_requests[-1].target).query)
    assert query["scope"] == ["repository:library/alpine:pull"]
    registry = [s.target for s in hub.requests if s.server == "registry"]
    assert "/v2/library/alpine/manifests/3.20" in registry
    assert not any(t.startswith("/v2/alpine/") for t in registry)


async def test_library_prefix_off_for_other_registries(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, image: str
) -> None:
    proxy = await start_proxy(library_prefix=False)
    client = RegistryClient(proxy.url, ca)
    r = await client.request("/v2/alpine/manifests/3.20")
    assert r.status == 401  # "alpine" alone does not exist upstream
    r = await client.request("/v2/library/alpine/manifests/3.20")
    assert r.status == 200


async def test_token_query_and_authorization_forwarded_intact(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, image: str
) -> None:
    hub.add_user("alice", "s3cret")
    proxy = await start_proxy()
    await fetch(proxy.url + "/v2/", ca)  # learn the realm
    query = (
        "service=registry.docker.io&scope=repository%3Alibrary%2Falpine%3Apull"
        "&scope=repository:library/busybox:pull&account=alice"
    )
    r = await fetch(
        f"{proxy.url}/token/0?{query}",
        ca,
        headers=[("authorization", "Basic YWxpY2U6czNjcmV0")],
    )
    assert r.status == 200
    assert r.json()["token"]
    seen = [s for s in hub.requests if s.server == "auth"][-1]
    assert seen.target == "/token?" + query
    assert seen.headers["authorization"] == "Basic YWxpY2U6czNjcmV0"


async def test_token_realm_learned_when_unknown(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA
) -> None:
    """A client may ask for a token first (realm cached from before a restart)."""
    proxy = await start_proxy()
    r = await fetch(f"{proxy.url}/token/0?service=registry.docker.io", ca)
    assert r.status == 200
    assert r.json()["token"]
    r = await fetch(f"{proxy.url}/token/9?service=registry.docker.io", ca)
    assert r.status == 404
    assert r.json()["errors"][0]["code"] == "UNSUPPORTED"


async def test_private_repository(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, layer: bytes
) -> None:
    digest = hub.add_image("acme/secret", "v1", [layer])
    hub.add_user("alice", "s3cret")
    hub.add_user("mallory", "hunter2")
    hub.make_private("acme/secret", "alice")
    proxy = await start_proxy()
    anonymous = RegistryClient(proxy.url, ca)
    r = await anonymous.request("/v2/acme/secret/manifests/v1")
    assert r.status == 401
    assert r.json()["errors"][0]["code"] == "UNAUTHORIZED"
    other = RegistryClient(proxy.url, ca, credentials=("mallory", "hunter2"))
    assert (await other.request("/v2/acme/secret/manifests/v1")).status == 401
    wrong = RegistryClient(proxy.url, ca, credentials=("alice", "nope"))
    r = await wrong.request("/v2/acme/secret/manifests/v1")
    assert r.status == 401
    assert "incorrect username or password" in r.body.decode()
    alice = RegistryClient(proxy.url, ca, credentials=("alice", "s3cret"))
    r = await alice.request("/v2/acme/secret/manifests/v1")
    assert r.status == 200
    assert r.headers["docker-content-digest"] == digest
    b = await alice.request(f"/v2/acme/secret/blobs/{digest_of(layer)}")
    assert b.status == 200
    assert b.body == layer


async def test_credentials_and_tokens_never_logged(
    hub: FakeHub,
    start_proxy: StartProxy,
    ca: trustme.CA,
    layer: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    hub.add_image("acme/secret", "v1", [layer])
    hub.add_user("alice", "s3cret")
    hub.make_private("acme/secret", "alice")
    proxy = await start_proxy()
    alice = RegistryClient(proxy.url, ca, credentials=("alice", "s3cret"))
    assert (await alice.request("/v2/acme/secret/manifests/v1")).status == 200
    assert (await alice.request(f"/v2/acme/secret/blobs/{digest_of(layer)}")).status == 200
    text = caplog.text
    assert "GET /v2/acme/secret/manifests/v1 200" in text  # the access log works...
    for token in alice.tokens.values():
        assert token not in text  # ...and says nothing secret
    assert "YWxpY2U6czNjcmV0" not in text
    assert "s3cret" not in text
    assert "verify=" not in text  # pre-signed CDN URLs are credentials too


# -- redirects (behaviour 4) -------------------------------------------------------------------


async def test_range_request_through_redirect(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, image: str, layer: bytes
) -> None:
    proxy = await start_proxy()
    client = RegistryClient(proxy.url, ca)
    r = await client.request(
        f"/v2/library/alpine/blobs/{digest_of(layer)}", headers=[("range", "bytes=100-1099")]
    )
    assert r.status == 206
    assert r.body == layer[100:1100]
    assert r.headers["content-range"] == f"bytes 100-1099/{len(layer)}"
    h = await client.request(f"/v2/library/alpine/blobs/{digest_of(layer)}", method="HEAD")
    assert h.status == 200
    assert h.headers["content-length"] == str(len(layer))
    assert h.body == b""


async def test_redirect_loop_is_a_clear_502(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, image: str, layer: bytes
) -> None:
    hub.redirect_loop(digest_of(layer))
    proxy = await start_proxy()
    client = RegistryClient(proxy.url, ca)
    with trio.fail_after(10):
        r = await client.request(f"/v2/library/alpine/blobs/{digest_of(layer)}")
    assert r.status == 502
    error = r.json()["errors"][0]
    assert error["code"] == "UNAVAILABLE"
    assert "redirected more than 5 times" in error["message"]


async def test_truncated_upstream_body_aborts_the_client(
    hub: FakeHub,
    start_proxy: StartProxy,
    ca: trustme.CA,
    image: str,
    layer: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="hubproxy.access")
    hub.truncate_blob(digest_of(layer))
    proxy = await start_proxy()
    client = RegistryClient(proxy.url, ca)
    r = await client.request(f"/v2/library/alpine/blobs/{digest_of(layer)}")
    assert r.status == 200  # headers were already out when the CDN died...
    assert not r.complete  # ...so the client sees an aborted transfer, never a clean end
    assert len(r.body) < len(layer)
    # ...and the access log does not call it a 200 either (written before the connection closes)
    with trio.fail_after(10):
        while proxy.server.connections:
            await proxy.server.wait_connections_changed()
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "hubproxy.access"]
    blob_lines = [line for line in lines if "/blobs/" in line]
    assert blob_lines and " 200/aborted " in blob_lines[-1]


# -- failover (behaviour 6) --------------------------------------------------------------------


async def test_429_fails_over_to_the_fallback_and_rests_the_primary(
    nursery: trio.Nursery,
    hub: FakeHub,
    start_proxy: StartProxy,
    ca: trustme.CA,
    layer: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    worker = FakeHub(ca)
    await nursery.start(worker.serve)
    for fake in (hub, worker):
        fake.add_image("library/alpine", "3.20", [layer])
    proxy = await start_proxy(fallbacks=[worker.registry_url])
    client = RegistryClient(proxy.url, ca)
    assert (await client.request("/v2/library/alpine/manifests/3.20")).status == 200
    hub.force_429(1, retry_after=120)
    # The primary answers 429; the fallback (its own token service here) challenges with a
    # realm that leads back through the mirror to the fallback's token service.
    r = await client.request("/v2/library/alpine/manifests/3.20")
    assert r.status == 200
    assert f'realm="{proxy.url}/token/1"' in client.challenges[-1]
    primary = hub.registry_url.removeprefix("https://")
    assert f"upstream https://{primary} answered 429; skipping it for 120s; trying" in caplog.text
    primary_before = len([s for s in hub.requests if s.server == "registry"])
    r = await client.request("/v2/library/alpine/manifests/3.20")
    assert r.status == 200
    # the primary rests until Retry-After: no further request reached it
    assert len([s for s in hub.requests if s.server == "registry"]) == primary_before
    assert any(s.server == "registry" and "/manifests/" in s.target for s in worker.requests)


async def test_429_without_fallback_reaches_the_client(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, image: str
) -> None:
    proxy = await start_proxy()
    client = RegistryClient(proxy.url, ca)
    assert (await client.request("/v2/library/alpine/manifests/3.20")).status == 200
    hub.force_429(1, retry_after=30)
    r = await client.request("/v2/library/alpine/manifests/3.20")
    assert r.status == 429
    assert r.headers["retry-after"] == "30"
    assert r.json()["errors"][0]["code"] == "TOOMANYREQUESTS"


async def test_rate_limit_headers_reach_the_client(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, image: str
) -> None:
    proxy = await start_proxy()
    client = RegistryClient(proxy.url, ca)
    r = await client.request("/v2/library/alpine/manifests/3.20")
    assert r.headers["ratelimit-limit"] == "100;w=21600"
    assert r.headers["ratelimit-remaining"].endswith(";w=21600")
    assert r.headers["docker-ratelimit-source"] == "127.0.0.1"


async def _closed_port() -> int:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port: int = listener.socket.getsockname()[1]
    await listener.aclose()
    return port


async def test_unreachable_upstream_is_a_502_json_error(
    start_proxy: StartProxy, ca: trustme.CA
) -> None:
    port = await _closed_port()
    proxy = await start_proxy(upstream=f"https://127.0.0.1:{port}")
    with trio.fail_after(10):
        r = await fetch(proxy.url + "/v2/library/alpine/manifests/3.20", ca)
    assert r.status == 502
    assert r.reason == "Bad Gateway"
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["errors"][0]
    assert error["code"] == "UNAVAILABLE"
    assert f"127.0.0.1:{port}" in error["message"]


async def test_unreachable_primary_fails_over(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, image: str
) -> None:
    port = await _closed_port()
    proxy = await start_proxy(upstream=f"https://127.0.0.1:{port}", fallbacks=[hub.registry_url])
    client = RegistryClient(proxy.url, ca)
    r = await client.request("/v2/library/alpine/manifests/3.20")
    assert r.status == 200
    assert r.headers["docker-content-digest"] == image


async def test_upstream_tls_failure_is_a_502(
    nursery: trio.Nursery, hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA
) -> None:
    proxy = await start_proxy(upstream_ca=None)  # the fake's CA is then not trusted
    r = await fetch(proxy.url + "/v2/", ca)
    assert r.status == 502
    assert "certificate" in r.json()["errors"][0]["message"].lower()


# -- routing, push, search (behaviour 2) ----------------------------------------------------------


async def test_unknown_paths_get_a_registry_404(start_proxy: StartProxy, ca: trustme.CA) -> None:
    proxy = await start_proxy()
    for path in ("/index.html", "/v2/../etc/passwd", "/v2/Upper/manifests/x", "/v3/"):
        r = await fetch(proxy.url + path, ca)
        assert r.status == 404, path
        assert r.json()["errors"][0]["code"] in ("UNSUPPORTED", "NAME_INVALID")


async def test_search_goes_to_the_index(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, image: str
) -> None:
    proxy = await start_proxy()
    r = await fetch(proxy.url + "/v1/search?q=alpine&n=25", ca)
    assert r.status == 200
    names = [result["name"] for result in r.json()["results"]]
    assert "alpine" in names


async def test_push_streams_request_bodies(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA
) -> None:
    hub.add_user("alice", "s3cret")
    hub.add_image("alice/app", "v0", [make_layer(1, 100)])
    proxy = await start_proxy()
    client = RegistryClient(proxy.url, ca, credentials=("alice", "s3cret"))
    scope = "repository:alice/app:pull,push"
    r = await client.request("/v2/alice/app/blobs/uploads/", method="POST", scope=scope)
    assert r.status == 202
    location = r.headers["location"]
    assert location.startswith("/v2/alice/app/blobs/uploads/")  # stays on the mirror
    data = make_layer(2, 500_000)
    chunks = [data[:200_000], data[200_000:]]
    r = await client.request(location, method="PATCH", body=chunks, scope=scope)  # chunked
    assert r.status == 202
    location = r.headers["location"]
    sep = "&" if "?" in location else "?"
    r = await client.request(f"{location}{sep}digest={digest_of(data)}", method="PUT", scope=scope)
    assert r.status == 201, r.body
    got = await client.request(f"/v2/alice/app/blobs/{digest_of(data)}", scope=scope)
    assert got.body == data


# -- headers (behaviour 8) --------------------------------------------------------------------


async def test_hop_by_hop_dropped_and_forwarding_headers_set(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, image: str
) -> None:
    proxy = await start_proxy()
    accept = f"{MEDIA_DOCKER_MANIFEST}, application/vnd.oci.image.index.v1+json;q=0.9"
    await fetch(
        proxy.url + "/v2/library/alpine/manifests/3.20",
        ca,
        headers=[
            ("accept", accept),
            ("connection", "x-secret-hop"),
            ("x-secret-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("x-forwarded-for", "6.6.6.6"),
            ("te", "trailers"),
        ],
    )
    seen = [s for s in hub.requests if s.server == "registry"][-1]
    assert seen.headers["accept"] == accept
    for hop in ("x-secret-hop", "keep-alive", "te"):
        assert hop not in seen.headers
    assert seen.headers["x-forwarded-for"] == "127.0.0.1"
    assert seen.headers["x-real-ip"] == "127.0.0.1"
    assert seen.headers["x-forwarded-proto"] == "https"
    assert seen.headers["host"] == hub.registry_url.removeprefix("https://")


async def test_plain_http_listener(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, image: str
) -> None:
    proxy = await start_proxy(tls=False)
    assert proxy.url.startswith("http://")
    client = RegistryClient(proxy.url, ca)
    r = await client.request("/v2/alpine/manifests/3.20")
    assert r.status == 200
    assert client.challenges[0].startswith(f'Bearer realm="{proxy.url}/token/0"')
    seen = [s for s in hub.requests if s.server == "registry"][-1]
    assert seen.headers["x-forwarded-proto"] == "http"
