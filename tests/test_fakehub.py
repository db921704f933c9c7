"""The fake Docker Hub and the CONNECT proxy follow the protocol (shared/PROTOCOL.md).

Every test talks to real TLS servers on 127.0.0.1 with an h11 client, so a proxy tested against
these fakes meets the same wire behaviour it would meet on Docker Hub.
"""

from __future__ import annotations

import base64
import gzip
import json
import logging
import re
import ssl
import urllib.parse
from collections.abc import Iterable
from typing import Any

import h11
import pytest
import trio
import trustme
from hypothesis import given
from hypothesis import strategies as st

from tests.fakehub import (
    BASIC_REALM,
    MEDIA_DOCKER_LIST,
    MEDIA_DOCKER_MANIFEST,
    MEDIA_OCI_MANIFEST,
    AuthLayout,
    ConnectFailed,
    FakeHub,
    FetchResult,
    RangeNotSatisfiable,
    fetch,
    make_layer,
    parse_range,
    sha256_digest,
)
from tests.fakeproxy import ConnectProxy
from tests.registry_client import RegistryClient

ACCEPT_ALL = ", ".join(
    [
        MEDIA_DOCKER_MANIFEST,
        MEDIA_DOCKER_LIST,
        MEDIA_OCI_MANIFEST,
        "application/vnd.oci.image.index.v1+json",
    ]
)


# Local fixtures, even where conftest has twins: these tests pin down the fake itself and
# must not change meaning when the shared fixtures grow options.
@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def hub(nursery: trio.Nursery, ca: trustme.CA) -> FakeHub:
    fake = FakeHub(ca)
    await nursery.start(fake.serve)
    return fake


@pytest.fixture
async def proxy(nursery: trio.Nursery) -> ConnectProxy:
    fake = ConnectProxy()
    await nursery.start(fake.serve)
    return fake


def challenge_params(value: str) -> dict[str, str]:
    """The key="value" pairs of one Bearer challenge (our values hold no quotes)."""
    scheme, _, rest = value.partition(" ")
    assert scheme == "Bearer"
    return dict(re.findall(r'(\w+)="([^"]*)"', rest))


def basic(user: str, password: str) -> tuple[str, str]:
    return ("authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())


async def get_token(
    hub: FakeHub,
    ca: trustme.CA,
    *scopes: str,
    headers: Iterable[tuple[str, str]] = (),
) -> str:
    query = urllib.parse.urlencode([("service", hub.service)] + [("scope", s) for s in scopes])
    answer = await fetch(f"{hub.auth_url}/token?{query}", ca, headers=headers)
    assert answer.status == 200, answer.body
    token: str = answer.json()["token"]
    return token


def bearer(token: str) -> tuple[str, str]:
    return ("authorization", f"Bearer {token}")


async def pull_token(hub: FakeHub, ca: trustme.CA, name: str) -> str:
    return await get_token(hub, ca, f"repository:{name}:pull")


@pytest.mark.trio
async def test_anonymous_pull_of_a_public_image(hub: FakeHub, ca: trustme.CA) -> None:
    layers = [make_layer(1, 3000), make_layer(2, 700_000)]
    digest = hub.add_image("library/alpine", "3.19", layers)

    ping = await fetch(f"{hub.registry_url}/v2/", ca)
    assert ping.status == 401
    assert ping.headers["docker-distribution-api-version"] == "registry/2.0"
    assert ping.json() == {
        "errors": [{"code": "UNAUTHORIZED", "message": "authentication required", "detail": None}]
    }
    params = challenge_params(ping.headers["www-authenticate"])
    assert params == {"realm": f"{hub.auth_url}/token", "service": "registry.docker.io"}

    denied = await fetch(f"{hub.registry_url}/v2/library/alpine/manifests/3.19", ca)
    assert denied.status == 401
    params = challenge_params(denied.headers["www-authenticate"])
    assert params["scope"] == "repository:library/alpine:pull"

    query = urllib.parse.urlencode({"service": params["service"], "scope": params["scope"]})
    answer = await fetch(f"{params['realm']}?{query}", ca)
    assert answer.status == 200
    doc = answer.json()
    assert doc["token"] == doc["access_token"]
    assert doc["expires_in"] == 300
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", doc["issued_at"])
    auth = bearer(doc["token"])

    ping = await fetch(f"{hub.registry_url}/v2/", ca, headers=[auth])
    assert (ping.status, ping.json()) == (200, {})

    got = await fetch(
        f"{hub.registry_url}/v2/library/alpine/manifests/3.19",
        ca,
        headers=[auth, ("accept", ACCEPT_ALL)],
    )
    assert got.status == 200
    assert got.headers["content-type"] == MEDIA_DOCKER_MANIFEST
    assert got.headers["docker-content-digest"] == digest == sha256_digest(got.body)
    assert got.headers["etag"] == f'"{digest}"'
    assert int(got.headers["content-length"]) == len(got.body)
    manifest = got.json()

    blobs: dict[str, bytes] = {}
    for descriptor in [manifest["config"], *manifest["layers"]]:
        redirect = await fetch(
            f"{hub.registry_url}/v2/library/alpine/blobs/{descriptor['digest']}", ca, headers=[auth]
        )
        assert redirect.status == 307
        location = redirect.headers["location"]
        assert location.startswith(f"{hub.cdn_url}/registry-v2/docker/registry/v2/blobs/sha256/")
        hexpart = descriptor["digest"].removeprefix("sha256:")
        assert f"/sha256/{hexpart[:2]}/{hexpart}/data?verify=" in location
        blob = await fetch(location, ca)  # no Authorization: it must never reach the CDN
        assert blob.status == 200
        assert blob.headers["content-type"] == "application/octet-stream"
        assert blob.headers["accept-ranges"] == "bytes"
        assert sha256_digest(blob.body) == descriptor["digest"]
        assert len(blob.body) == descriptor["size"]
        blobs[descriptor["digest"]] = blob.body

    config = json.loads(blobs[manifest["config"]["digest"]])
    assert (config["architecture"], config["os"]) == ("amd64", "linux")
    assert config["rootfs"]["diff_ids"] == [sha256_digest(gzip.decompress(x)) for x in layers]
    # ping, challenge, token, ping, manifest, then a redirect and a CDN fetch per blob.
    servers = [s.server for s in hub.requests]
    assert servers == ["registry", "registry", "auth", "registry", "registry"] + [
        "registry",
        "cdn",
    ] * len(blobs)


@pytest.mark.trio
async def test_head_gets_the_same_challenge_and_headers(hub: FakeHub, ca: trustme.CA) -> None:
    digest = hub.add_image("library/busybox", "latest", [make_layer(3, 100)])
    url = f"{hub.registry_url}/v2/library/busybox/manifests/latest"

    get, head = await fetch(url, ca), await fetch(url, ca, method="HEAD")
    assert get.status == head.status == 401
    assert head.body == b""
    assert head.headers["content-length"] == get.headers["content-length"] == str(len(get.body))
    assert head.headers["www-authenticate"] == get.headers["www-authenticate"]
    assert 'scope="repository:library/busybox:pull"' in head.headers["www-authenticate"]

    ping = await fetch(f"{hub.registry_url}/v2/", ca, method="HEAD")
    assert ping.status == 401
    assert "www-authenticate" in ping.headers

    auth = bearer(await pull_token(hub, ca, "library/busybox"))
    head = await fetch(url, ca, method="HEAD", headers=[auth])
    assert head.status == 200
    assert head.body == b""
    assert head.headers["docker-content-digest"] == digest
    assert head.headers["ratelimit-remaining"] == "100;w=21600"
    get = await fetch(url, ca, headers=[auth])
    assert head.headers["content-length"] == str(len(get.body))
    assert get.headers["ratelimit-remaining"] == "99;w=21600"

    blob = json.loads(get.body)["layers"][0]["digest"]
    head = await fetch(f"{hub.registry_url}/v2/library/busybox/blobs/{blob}", ca, method="HEAD")
    assert head.status == 401
    head = await fetch(
        f"{hub.registry_url}/v2/library/busybox/blobs/{blob}", ca, method="HEAD", headers=[auth]
    )
    assert head.status == 307
    cdn = await fetch(head.headers["location"], ca, method="HEAD")
    assert (cdn.status, cdn.body) == (200, b"")
    assert cdn.headers["content-length"] == str(len(make_layer(3, 100)))


@pytest.mark.trio
async def test_cdn_refuses_authorization_and_bad_signatures(hub: FakeHub, ca: trustme.CA) -> None:
    digest = hub.add_blob(b"some blob")
    url = hub.signed_blob_url(digest)
    assert (await fetch(url, ca)).body == b"some blob"

    leaked = await fetch(url, ca, headers=[("authorization", "Bearer abc")])
    assert leaked.status == 400
    assert leaked.headers["content-type"] == "application/xml"
    assert leaked.body == (
        b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InvalidArgument</Code>'
        b"<Message>Missing x-amz-content-sha256</Message></Error>"
    )
    expired = await fetch(hub.signed_blob_url(digest, ttl=-5), ca)
    assert expired.status == 403
    tampered = await fetch(url[:-1] + ("0" if url[-1] != "0" else "1"), ca)
    assert tampered.status == 403
    unsigned = await fetch(url.partition("?")[0], ca)
    assert unsigned.status == 403
    put = await fetch(url, ca, method="PUT", body=b"x")
    assert put.status == 405


@pytest.mark.trio
@pytest.mark.parametrize(
    ("header", "status", "start", "stop"),
    [
        ("bytes=0-9", 206, 0, 10),
        ("bytes=100-", 206, 100, 1000),
        ("bytes=-5", 206, 995, 1000),
        ("bytes=990-5000", 206, 990, 1000),
        ("bytes=999-999", 206, 999, 1000),
        ("bytes=1000-", 416, 0, 0),
        ("bytes=-0", 416, 0, 0),
        ("bytes=0-1,5-6", 200, 0, 1000),
        ("items=0-1", 200, 0, 1000),
        ("bytes=9-2", 200, 0, 1000),
    ],
)
async def test_cdn_ranges(
    hub: FakeHub, ca: trustme.CA, header: str, status: int, start: int, stop: int
) -> None:
    data = bytes(range(256)) * 3 + bytes(232)
    url = hub.signed_blob_url(hub.add_blob(data))
    got = await fetch(url, ca, headers=[("range", header)])
    assert got.status == status
    if status == 416:
        assert got.headers["content-range"] == "bytes */1000"
        return
    assert got.body == data[start:stop]
    if status == 206:
        assert got.headers["content-range"] == f"bytes {start}-{stop - 1}/1000"
    else:
        assert "content-range" not in got.headers


@given(st.text(max_size=30), st.integers(min_value=0, max_value=5000))
def test_parse_range_never_selects_outside_the_blob(header: str, total: int) -> None:
    try:
        selected = parse_range(header, total)
    except RangeNotSatisfiable:
        return
    if selected is not None:
        start, stop = selected
        assert 0 <= start < stop <= total


@given(st.integers(min_value=1, max_value=5000), st.data())
def test_parse_range_matches_the_rfc_for_first_last(total: int, data: st.DataObject) -> None:
    first = data.draw(st.integers(min_value=0, max_value=total - 1))
    last = data.draw(st.integers(min_value=first, max_value=total + 10))
    assert parse_range(f"bytes={first}-{last}", total) == (first, min(last + 1, total))


@pytest.mark.trio
async def test_private_repository_needs_credentials(hub: FakeHub, ca: trustme.CA) -> None:
    hub.add_user("alice", "s3cret")
    hub.add_user("bob", "hunter2")
    hub.add_image("alice/secret", "v1", [make_layer(4, 50)])
    hub.make_private("alice/secret", "alice")
    url = f"{hub.registry_url}/v2/alice/secret/manifests/v1"

    anonymous = await fetch(url, ca, headers=[bearer(await pull_token(hub, ca, "alice/secret"))])
    assert anonymous.status == 401
    params = challenge_params(anonymous.headers["www-authenticate"])
    assert params["scope"] == "repository:alice/secret:pull"
    assert params["error"] == "insufficient_scope"

    scope = "repository:alice/secret:pull"
    bob = await get_token(hub, ca, scope, headers=[basic("bob", "hunter2")])
    assert (await fetch(url, ca, headers=[bearer(bob)])).status == 401
    alice = await get_token(hub, ca, scope, headers=[basic("alice", "s3cret")])
    assert (await fetch(url, ca, headers=[bearer(alice)])).status == 200

    for wrong in [basic("alice", "wrong"), basic("carol", "s3cret"), ("authorization", "Basic !!")]:
        refused = await fetch(
            f"{hub.auth_url}/token?service=registry.docker.io&scope={scope}", ca, headers=[wrong]
        )
        assert refused.status == 401
        assert refused.json() == {"details": "incorrect username or password"}

    # Private repositories stay out of search results.
    found = await fetch(f"{hub.registry_url}/v1/search?q=secret", ca)
    assert found.json()["num_results"] == 0


@pytest.mark.trio
async def test_token_service_rules(hub: FakeHub, ca: trustme.CA) -> None:
    hub.add_image("library/nginx", "latest", [make_layer(5, 10)])
    hub.add_image("library/redis", "latest", [make_layer(6, 10)])

    wrong_service = await fetch(f"{hub.auth_url}/token?service=evil&scope=x", ca)
    assert wrong_service.status == 400
    assert (await fetch(f"{hub.auth_url}/token", ca)).status == 400

    # containerd asks for several scopes at once; ungrantable ones are dropped silently.
    token = await get_token(
        hub,
        ca,
        "repository:library/nginx:pull",
        "repository:library/redis:pull,push",
        "repository:nobody/nothing:pull",
        "registry:catalog:*",
    )
    for name in ("library/nginx", "library/redis"):
        got = await fetch(
            f"{hub.registry_url}/v2/{name}/manifests/latest", ca, headers=[bearer(token)]
        )
        assert got.status == 200
    push = await fetch(
        f"{hub.registry_url}/v2/library/redis/blobs/uploads/",
        ca,
        method="POST",
        headers=[bearer(token)],
    )
    assert push.status == 401
    assert 'scope="repository:library/redis:pull,push"' in push.headers["www-authenticate"]

    # OAuth2 password grant, as containerd sends it.
    hub.add_user("alice", "pw")
    form = urllib.parse.urlencode(
        {
            "grant_type": "password",
            "username": "alice",
            "password": "pw",
            "service": "registry.docker.io",
            "scope": "repository:library/nginx:pull",
            "client_id": "containerd-client",
        }
    ).encode()
    posted = await fetch(
        f"{hub.auth_url}/token",
        ca,
        method="POST",
        headers=[("content-type", "application/x-www-form-urlencoded")],
        body=form,
    )
    assert posted.status == 200
    assert posted.json()["access_token"]

    hub.expire_tokens()
    stale = await fetch(f"{hub.registry_url}/v2/", ca, headers=[bearer(token)])
    assert stale.status == 401
    assert challenge_params(stale.headers["www-authenticate"])["error"] == "invalid_token"


@pytest.mark.trio
async def test_one_component_names_do_not_exist(hub: FakeHub, ca: trustme.CA) -> None:
    hub.add_image("library/nginx", "latest", [make_layer(7, 10)])
    with pytest.raises(ValueError, match="library/nginx"):
        hub.add_image("nginx", "latest", [])
    short = await fetch(
        f"{hub.registry_url}/v2/nginx/manifests/latest",
        ca,
        headers=[bearer(await pull_token(hub, ca, "nginx"))],
    )
    assert short.status == 401
    assert 'scope="repository:nginx:pull"' in short.headers["www-authenticate"]
    full = await fetch(
        f"{hub.registry_url}/v2/library/nginx/manifests/latest",
        ca,
        headers=[bearer(await pull_token(hub, ca, "library/nginx"))],
    )
    assert full.status == 200


@pytest.mark.trio
async def test_unknown_things_and_accept(hub: FakeHub, ca: trustme.CA) -> None:
    digest = hub.add_image("library/debian", "12", [make_layer(8, 10)])
    auth = bearer(await pull_token(hub, ca, "library/debian"))
    base = f"{hub.registry_url}/v2/library/debian"

    async def code(url: str, *headers: tuple[str, str]) -> tuple[int, str]:
        got = await fetch(url, ca, headers=[auth, *headers])
        return got.status, got.json()["errors"][0]["code"]

    assert await code(f"{base}/manifests/13") == (404, "MANIFEST_UNKNOWN")
    assert await code(f"{base}/manifests/sha256:{'0' * 64}") == (404, "MANIFEST_UNKNOWN")
    assert await code(f"{base}/blobs/sha256:{'0' * 64}") == (404, "BLOB_UNKNOWN")
    assert await code(f"{hub.registry_url}/v2/_catalog") == (404, "NOT_FOUND")
    assert await code(f"{base}/manifests/12", ("accept", MEDIA_OCI_MANIFEST)) == (
        404,
        "MANIFEST_UNKNOWN",
    )
    for accept in ["*/*", f"{MEDIA_OCI_MANIFEST}, {MEDIA_DOCKER_MANIFEST};q=0.5"]:
        got = await fetch(f"{base}/manifests/12", ca, headers=[auth, ("accept", accept)])
        assert got.headers["docker-content-digest"] == digest
    # Accept repeated as separate header lines counts as one list.
    repeated = await fetch(
        f"{base}/manifests/{digest}",
        ca,
        headers=[auth, ("accept", MEDIA_OCI_MANIFEST), ("accept", MEDIA_DOCKER_MANIFEST)],
    )
    assert repeated.status == 200
    assert hub.requests[-1].headers["accept"] == f"{MEDIA_OCI_MANIFEST}, {MEDIA_DOCKER_MANIFEST}"

    # Docker Hub grants nothing on a repository that does not exist: 401, not 404.
    ghost = await fetch(
        f"{hub.registry_url}/v2/nobody/ghost/manifests/latest",
        ca,
        headers=[bearer(await pull_token(hub, ca, "nobody/ghost"))],
    )
    assert ghost.status == 401
    # A push token does reach the (still empty) repository.
    hub.add_user("nobody", "pw")
    token = await get_token(
        hub, ca, "repository:nobody/ghost:pull,push", headers=[basic("nobody", "pw")]
    )
    empty = await fetch(
        f"{hub.registry_url}/v2/nobody/ghost/manifests/latest", ca, headers=[bearer(token)]
    )
    assert (empty.status, empty.json()["errors"][0]["code"]) == (404, "NAME_UNKNOWN")


@pytest.mark.trio
async def test_manifest_list(hub: FakeHub, ca: trustme.CA) -> None:
    amd = hub.add_image("library/python", None, [make_layer(9, 10)])
    arm = hub.add_image("library/python", None, [make_layer(10, 10)], arch="arm64")
    index = hub.add_index(
        "library/python", "3.11", [(amd, "amd64", "linux"), (arm, "arm64", "linux")]
    )
    auth = bearer(await pull_token(hub, ca, "library/python"))
    base = f"{hub.registry_url}/v2/library/python/manifests"

    got = await fetch(f"{base}/3.11", ca, headers=[auth, ("accept", ACCEPT_ALL)])
    assert got.headers["content-type"] == MEDIA_DOCKER_LIST
    assert got.headers["docker-content-digest"] == index == sha256_digest(got.body)
    entries = got.json()["manifests"]
    assert [(e["digest"], e["platform"]["architecture"]) for e in entries] == [
        (amd, "amd64"),
        (arm, "arm64"),
    ]
    for entry in entries:
        child = await fetch(f"{base}/{entry['digest']}", ca, headers=[auth, ("accept", ACCEPT_ALL)])
        assert sha256_digest(child.body) == entry["digest"]
        assert len(child.body) == entry["size"]
    # A client that only knows schema2 gets the linux/amd64 manifest by tag (distribution's
    # default platform), and no list by the list's digest.
    only_v2 = await fetch(f"{base}/3.11", ca, headers=[auth, ("accept", MEDIA_DOCKER_MANIFEST)])
    assert only_v2.status == 200
    assert only_v2.headers["content-type"] == MEDIA_DOCKER_MANIFEST
    assert only_v2.headers["docker-content-digest"] == amd == sha256_digest(only_v2.body)
    v2 = ("accept", MEDIA_DOCKER_MANIFEST)
    by_digest = await fetch(f"{base}/{index}", ca, headers=[auth, v2])
    assert by_digest.status == 404
    only_oci = await fetch(f"{base}/3.11", ca, headers=[auth, ("accept", MEDIA_OCI_MANIFEST)])
    assert only_oci.status == 404  # the amd64 manifest is schema2, which it does not take
    assert amd != arm


@pytest.mark.trio
async def test_manifest_list_without_amd64_is_unknown_to_a_schema2_client(
    hub: FakeHub, ca: trustme.CA
) -> None:
    arm = hub.add_image("library/python", None, [make_layer(10, 10)], arch="arm64")
    hub.add_index("library/python", "arm", [(arm, "arm64", "linux")])
    auth = bearer(await pull_token(hub, ca, "library/python"))
    url = f"{hub.registry_url}/v2/library/python/manifests/arm"
    got = await fetch(url, ca, headers=[auth, ("accept", MEDIA_DOCKER_MANIFEST)])
    assert got.status == 404


@pytest.mark.trio
async def test_if_none_match_with_the_digest_is_a_304(hub: FakeHub, ca: trustme.CA) -> None:
    digest = hub.add_image("library/node", "20", [make_layer(11, 10)])
    auth = bearer(await pull_token(hub, ca, "library/node"))
    url = f"{hub.registry_url}/v2/library/node/manifests/20"
    for method in ("GET", "HEAD"):
        got = await fetch(url, ca, method=method, headers=[auth, ("if-none-match", f'"{digest}"')])
        assert (got.status, got.body) == (304, b"")
        assert "docker-content-digest" not in got.headers
    other = await fetch(url, ca, headers=[auth, ("if-none-match", '"sha256:other"')])
    assert other.status == 200
    anonymous = await fetch(url, ca, headers=[("if-none-match", f'"{digest}"')])
    assert anonymous.status == 401  # authorisation comes first


@pytest.mark.trio
async def test_rate_limit_counts_only_gets(hub: FakeHub, ca: trustme.CA) -> None:
    hub.add_image("library/node", "20", [make_layer(11, 10)])
    hub.ratelimit_limit = 2
    auth = bearer(await pull_token(hub, ca, "library/node"))
    url = f"{hub.registry_url}/v2/library/node/manifests/20"

    async def remaining(method: str) -> tuple[int, str]:
        got = await fetch(url, ca, method=method, headers=[auth])
        assert got.headers["ratelimit-limit"] == "2;w=21600"
        assert got.headers["docker-ratelimit-source"] == "127.0.0.1"
        return got.status, got.headers["ratelimit-remaining"]

    assert await remaining("HEAD") == (200, "2;w=21600")
    assert await remaining("GET") == (200, "1;w=21600")
    assert await remaining("HEAD") == (200, "1;w=21600")
    assert await remaining("GET") == (200, "0;w=21600")
    over = await fetch(url, ca, headers=[auth])
    assert over.status == 429
    assert over.headers["retry-after"] == "60"
    assert over.json()["errors"][0]["code"] == "TOOMANYREQUESTS"
    assert await remaining("HEAD") == (200, "0;w=21600")
    hub.ratelimit_remaining = 5
    assert await remaining("GET") == (200, "4;w=21600")


@pytest.mark.trio
async def test_force_429(hub: FakeHub, ca: trustme.CA) -> None:
    hub.add_image("library/golang", "1", [make_layer(12, 10)])
    auth = bearer(await pull_token(hub, ca, "library/golang"))
    url = f"{hub.registry_url}/v2/library/golang/manifests/1"
    hub.force_429(2, retry_after=7)

    assert (await fetch(url, ca)).status == 401  # unauthorised requests do not use up the fault
    first = await fetch(url, ca, headers=[auth])
    assert (first.status, first.headers["retry-after"]) == (429, "7")
    assert first.json()["errors"][0]["code"] == "TOOMANYREQUESTS"
    blob = await fetch(
        f"{hub.registry_url}/v2/library/golang/blobs/sha256:{'0' * 64}", ca, headers=[auth]
    )
    assert blob.status == 429
    assert (await fetch(url, ca, headers=[auth])).status == 200

    hub.force_429(1, retry_after=None)
    quiet = await fetch(url, ca, method="HEAD", headers=[auth])
    assert quiet.status == 429
    assert "retry-after" not in quiet.headers
    assert (await fetch(url, ca, headers=[auth])).status == 200


@pytest.mark.trio
async def test_force_status_by_kind_path_and_method(hub: FakeHub, ca: trustme.CA) -> None:
    hub.add_image("library/golang", "1", [make_layer(12, 10)])
    auth = bearer(await pull_token(hub, ca, "library/golang"))
    url = f"{hub.registry_url}/v2/library/golang/manifests/1"
    hub.force_status("manifest", 503, times=2)
    first = await fetch(url, ca)  # before authorisation: even an anonymous request gets it
    assert (first.status, first.json()["errors"][0]["code"]) == (503, "FORCED")
    assert (await fetch(url, ca, method="HEAD", headers=[auth])).status == 503
    assert (await fetch(url, ca, headers=[auth])).status == 200

    hub.force_status("/v2/library/golang/manifests/1", 304, method="HEAD")
    assert (await fetch(url, ca, headers=[auth])).status == 200  # a GET: not this one
    not_modified = await fetch(url, ca, method="HEAD", headers=[auth])
    assert (not_modified.status, not_modified.body) == (304, b"")
    assert (await fetch(url, ca, method="HEAD", headers=[auth])).status == 200

    blob = f"{hub.registry_url}/v2/library/golang/blobs/sha256:{'0' * 64}"
    hub.force_status("blob", 302, headers=[("x-why", "forced")])
    moved = await fetch(blob, ca, headers=[auth])
    assert (moved.status, moved.headers["x-why"]) == (302, "forced")
    assert "location" not in moved.headers
    assert (await fetch(blob, ca, headers=[auth])).status == 404

    hub.force_status("ping", 500)
    assert (await fetch(f"{hub.registry_url}/v2/", ca)).status == 500
    assert (await fetch(f"{hub.registry_url}/v2/", ca)).status == 401


@pytest.mark.trio
async def test_lie_digest_sends_a_header_the_body_disagrees_with(
    hub: FakeHub, ca: trustme.CA
) -> None:
    digest = hub.add_image("library/golang", "1", [make_layer(12, 10)])
    auth = bearer(await pull_token(hub, ca, "library/golang"))
    base = f"{hub.registry_url}/v2/library/golang/manifests"
    liar = "sha256:" + "e" * 64
    hub.lie_digest("library/golang", "1", liar)
    for method in ("GET", "HEAD"):
        got = await fetch(f"{base}/1", ca, method=method, headers=[auth])
        assert got.headers["docker-content-digest"] == liar
    got = await fetch(f"{base}/1", ca, headers=[auth])
    assert sha256_digest(got.body) == digest  # the body is the real one
    honest = await fetch(f"{base}/{digest}", ca, headers=[auth])  # only that reference lies
    assert honest.headers["docker-content-digest"] == digest


@pytest.mark.trio
async def test_swap_manifest_body(hub: FakeHub, ca: trustme.CA) -> None:
    digest = hub.add_image("library/golang", "1", [make_layer(12, 10)])
    auth = bearer(await pull_token(hub, ca, "library/golang"))
    base = f"{hub.registry_url}/v2/library/golang/manifests"
    wrong = b'{"schemaVersion": 2, "swapped": true}'
    hub.swap_manifest_body(digest, wrong)
    for ref in (digest, "1"):
        got = await fetch(f"{base}/{ref}", ca, headers=[auth])
        assert (got.body, got.headers["docker-content-digest"]) == (wrong, digest)
    hub.swap_manifest_body(digest, wrong, digest_header="body")
    got = await fetch(f"{base}/{digest}", ca, headers=[auth])
    assert (got.body, got.headers["docker-content-digest"]) == (wrong, sha256_digest(wrong))
    hub.swap_manifest_body(digest, wrong, digest_header="none")
    got = await fetch(f"{base}/{digest}", ca, headers=[auth])
    assert got.body == wrong
    assert "docker-content-digest" not in got.headers


@pytest.mark.trio
async def test_push_round_trip(hub: FakeHub, ca: trustme.CA) -> None:
    hub.add_user("alice", "pw")
    registry = hub.registry_url
    anonymous = await fetch(f"{registry}/v2/alice/app/blobs/uploads/", ca, method="POST")
    assert anonymous.status == 401
    assert 'scope="repository:alice/app:pull,push"' in anonymous.headers["www-authenticate"]
    token = await get_token(
        hub, ca, "repository:alice/app:pull,push", headers=[basic("alice", "pw")]
    )
    auth = bearer(token)

    layer = make_layer(13, 300_000)
    layer_digest = sha256_digest(layer)

    async def start_upload() -> str:
        started = await fetch(
            f"{registry}/v2/alice/app/blobs/uploads/", ca, method="POST", headers=[auth]
        )
        assert started.status == 202
        assert started.headers["range"] == "0-0"
        location = started.headers["location"]
        assert location == f"/v2/alice/app/blobs/uploads/{started.headers['docker-upload-uuid']}"
        return location

    # A bad digest is refused and cancels the upload.
    location = await start_upload()
    bad = await fetch(
        f"{registry}{location}?digest=sha256:{'1' * 64}",
        ca,
        method="PUT",
        headers=[auth],
        body=layer,
    )
    assert (bad.status, bad.json()["errors"][0]["code"]) == (400, "DIGEST_INVALID")
    gone = await fetch(f"{registry}{location}", ca, headers=[auth])
    assert gone.status == 404

    location = await start_upload()
    chunked = await fetch(
        f"{registry}{location}",
        ca,
        method="PATCH",
        headers=[auth],
        body=[layer[:1000], layer[1000:100_000]],  # streamed, Transfer-Encoding: chunked
    )
    assert (chunked.status, chunked.headers["range"]) == (202, "0-99999")
    sized = await fetch(
        f"{registry}{location}",
        ca,
        method="PATCH",
        headers=[auth, ("content-range", "100000-199999")],
        body=layer[100_000:200_000],
    )
    assert (sized.status, sized.headers["range"]) == (202, "0-199999")
    out_of_order = await fetch(
        f"{registry}{location}",
        ca,
        method="PATCH",
        headers=[auth, ("content-range", "0-9")],
        body=layer[:10],
    )
    assert out_of_order.status == 416
    done = await fetch(
        f"{registry}{location}?digest={layer_digest}",
        ca,
        method="PUT",
        headers=[auth],
        body=layer[200_000:],
    )
    assert done.status == 201
    assert done.headers["docker-content-digest"] == layer_digest
    assert done.headers["location"] == f"/v2/alice/app/blobs/{layer_digest}"

    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {}}).encode()
    config_digest = sha256_digest(config)
    mono = await fetch(
        f"{registry}/v2/alice/app/blobs/uploads/?digest={config_digest}",
        ca,
        method="POST",
        headers=[auth],
        body=config,
    )
    assert mono.status == 201

    def manifest_for(*layer_digests: str) -> bytes:
        doc = {
            "schemaVersion": 2,
            "mediaType": MEDIA_DOCKER_MANIFEST,
            "config": {"mediaType": "x", "size": len(config), "digest": config_digest},
            "layers": [{"mediaType": "y", "size": 1, "digest": d} for d in layer_digests],
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    dangling = await fetch(
        f"{registry}/v2/alice/app/manifests/v1",
        ca,
        method="PUT",
        headers=[auth, ("content-type", MEDIA_DOCKER_MANIFEST)],
        body=manifest_for(f"sha256:{'2' * 64}"),
    )
    assert (dangling.status, dangling.json()["errors"][0]["code"]) == (400, "MANIFEST_BLOB_UNKNOWN")

    for broken in [b"not json", b"[]", b'{"layers": 5}', b'{"layers": [{"size": 1}]}']:
        invalid = await fetch(
            f"{registry}/v2/alice/app/manifests/v1",
            ca,
            method="PUT",
            headers=[auth, ("content-type", MEDIA_DOCKER_MANIFEST)],
            body=broken,
        )
        assert invalid.json()["errors"][0]["code"] == "MANIFEST_INVALID"

    manifest = manifest_for(layer_digest)
    put = await fetch(
        f"{registry}/v2/alice/app/manifests/v1",
        ca,
        method="PUT",
        headers=[auth, ("content-type", MEDIA_DOCKER_MANIFEST)],
        body=manifest,
    )
    assert put.status == 201
    assert put.headers["docker-content-digest"] == sha256_digest(manifest)

    back = await fetch(f"{registry}/v2/alice/app/manifests/v1", ca, headers=[auth])
    assert back.body == manifest  # byte-exact, never re-serialised
    tags = await fetch(f"{registry}/v2/alice/app/tags/list", ca, headers=[auth])
    assert tags.json() == {"name": "alice/app", "tags": ["v1"]}
    redirect = await fetch(f"{registry}/v2/alice/app/blobs/{layer_digest}", ca, headers=[auth])
    assert (await fetch(redirect.headers["location"], ca)).body == layer

    # The repository now exists and is public: anyone may pull it.
    anyone = bearer(await pull_token(hub, ca, "alice/app"))
    assert (
        await fetch(f"{registry}/v2/alice/app/manifests/v1", ca, headers=[anyone])
    ).status == 200


@pytest.mark.trio
async def test_search(hub: FakeHub, ca: trustme.CA) -> None:
    hub.add_image("library/nginx", "latest", [make_layer(14, 10)])
    hub.add_image("bitnami/nginx", "latest", [make_layer(14, 10)])
    hub.add_image("library/redis", "latest", [make_layer(14, 10)])
    got = await fetch(f"{hub.registry_url}/v1/search?q=nginx&n=25", ca)
    assert got.status == 200
    assert got.json() == {
        "num_results": 2,
        "query": "nginx",
        "results": [
            {
                "name": "bitnami/nginx",
                "description": "",
                "star_count": 0,
                "is_official": False,
                "is_automated": False,
            },
            {
                "name": "nginx",
                "description": "",
                "star_count": 0,
                "is_official": True,
                "is_automated": False,
            },
        ],
    }
    limited = await fetch(f"{hub.registry_url}/v1/search?q=n&n=1", ca)
    assert (limited.json()["num_results"], len(limited.json()["results"])) == (2, 1)


@pytest.mark.trio
async def test_truncated_blob(hub: FakeHub, ca: trustme.CA) -> None:
    data = make_layer(15, 1_000_000)
    digest = hub.add_blob(data)
    hub.truncate_blob(digest, times=2)
    for _ in range(2):
        cut = await fetch(hub.signed_blob_url(digest), ca)
        assert cut.status == 200
        assert int(cut.headers["content-length"]) == len(data)
        assert not cut.complete
        assert 0 < len(cut.body) < len(data)
        assert data.startswith(cut.body)
    whole = await fetch(hub.signed_blob_url(digest), ca)
    assert whole.complete
    assert whole.body == data


@pytest.mark.trio
async def test_redirect_loop(hub: FakeHub, ca: trustme.CA) -> None:
    digest = hub.add_image("library/loop", "1", [b"not gzipped"])
    layer = sha256_digest(b"not gzipped")
    hub.redirect_loop(layer)
    auth = bearer(await pull_token(hub, ca, "library/loop"))
    url = f"{hub.registry_url}/v2/library/loop/blobs/{layer}"
    seen = set()
    for _ in range(5):
        got = await fetch(url, ca, headers=[auth])
        assert got.status == 307
        url = got.headers["location"]
        assert url.startswith(hub.registry_url)
        seen.add(url)
    assert len(seen) == 5
    assert digest.startswith("sha256:")


@pytest.mark.trio
async def test_keep_alive_and_malformed_requests(hub: FakeHub, ca: trustme.CA) -> None:
    data = make_layer(16, 600_000)
    url = urllib.parse.urlsplit(hub.signed_blob_url(hub.add_blob(data)))
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    assert url.port is not None
    tcp = await trio.open_tcp_stream("127.0.0.1", url.port)
    async with trio.SSLStream(tcp, ctx, server_hostname="127.0.0.1", https_compatible=True) as tls:
        conn = h11.Connection(h11.CLIENT)
        target = f"{url.path}?{url.query}"
        for first, last in [(0, 99), (100, 599_999), (600_000, len(data) - 1)]:
            headers = [("host", url.netloc), ("range", f"bytes={first}-{last}")]
            await tls.send_all(conn.send(h11.Request(method="GET", target=target, headers=headers)))
            await tls.send_all(conn.send(h11.EndOfMessage()))
            body = bytearray()
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(bytes(await tls.receive_some()))
                elif isinstance(event, h11.Response):
                    assert event.status_code == 206
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
            assert bytes(body) == data[first : last + 1]
            assert conn.our_state is conn.their_state is h11.DONE
            conn.start_next_cycle()

    # A request line h11 cannot parse gets a 400 and a closed connection, not a dead server.
    tcp = await trio.open_tcp_stream("127.0.0.1", url.port)
    async with trio.SSLStream(tcp, ctx, server_hostname="127.0.0.1", https_compatible=True) as tls:
        conn = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
        conn.send(h11.EndOfMessage())
        await tls.send_all(b"GET / HTTP/1.1\r\nhost: x\r\nthis is no header\r\n\r\n")
        while (event := conn.next_event()) is h11.NEED_DATA:
            conn.receive_data(bytes(await tls.receive_some()))
        assert isinstance(event, h11.Response)
        assert event.status_code == 400
    assert (await fetch(hub.signed_blob_url(sha256_digest(data)), ca)).body == data
    assert [s.server for s in hub.requests] == ["cdn"] * 4


@pytest.mark.trio
async def test_a_failing_handler_closes_only_its_connection(
    nursery: trio.Nursery, ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    class ExplodingCDN(FakeHub):
        def _cdn(self, request: Any) -> Any:  # the only way to make a handler fail on purpose
            raise RuntimeError("boom")

    hub = ExplodingCDN(ca)
    await nursery.start(hub.serve)
    with (
        caplog.at_level(logging.ERROR, logger="tests.fakehub"),
        pytest.raises(h11.RemoteProtocolError),
    ):
        await fetch(hub.signed_blob_url(hub.add_blob(b"x")), ca)
    assert "handler failed" in caplog.text
    assert (await fetch(f"{hub.registry_url}/v2/", ca)).status == 401
    assert (await fetch(f"{hub.auth_url}/nowhere", ca)).status == 404


@pytest.mark.trio
async def test_requests_are_recorded(hub: FakeHub, ca: trustme.CA) -> None:
    await fetch(
        f"{hub.registry_url}/v2/?ns=docker.io",
        ca,
        method="HEAD",
        headers=[("x-a", "1"), ("X-A", "2"), ("user-agent", "test")],
    )
    (seen,) = hub.requests
    assert (seen.server, seen.method, seen.target) == ("registry", "HEAD", "/v2/?ns=docker.io")
    assert seen.headers["x-a"] == "1, 2"
    assert seen.headers["user-agent"] == "test"
    assert seen.headers["host"] == urllib.parse.urlsplit(hub.registry_url).netloc


@pytest.mark.trio
async def test_connect_proxy_tunnels_tls(hub: FakeHub, proxy: ConnectProxy, ca: trustme.CA) -> None:
    data = make_layer(17, 2_000_000)
    digest = hub.add_blob(data)
    ping = await fetch(f"{hub.registry_url}/v2/", ca, proxy=proxy.url)
    assert ping.status == 401
    assert challenge_params(ping.headers["www-authenticate"])["realm"] == f"{hub.auth_url}/token"
    blob = await fetch(hub.signed_blob_url(digest), ca, proxy=proxy.url)
    assert blob.body == data
    assert proxy.connects == [
        hub.registry_url.removeprefix("https://"),
        hub.cdn_url.removeprefix("https://"),
    ]
    assert [s.server for s in hub.requests] == ["registry", "cdn"]

    not_connect = await fetch(f"{proxy.url}/", None)
    assert (not_connect.status, not_connect.headers["allow"]) == (405, "CONNECT")
    with pytest.raises(ConnectFailed) as outside:
        await fetch("https://registry-1.docker.io/v2/", ca, proxy=proxy.url)
    assert outside.value.result.status == 403
    with pytest.raises(ConnectFailed) as closed:
        await fetch("https://127.0.0.1:1/", ca, proxy=proxy.url)
    assert closed.value.result.status == 502


@pytest.mark.trio
async def test_connect_proxy_authentication(
    nursery: trio.Nursery, hub: FakeHub, ca: trustme.CA
) -> None:
    required = "Basic " + base64.b64encode(b"user:pass").decode()
    proxy = ConnectProxy(required_auth=required)
    await nursery.start(proxy.serve)
    with pytest.raises(ConnectFailed) as refused:
        await fetch(f"{hub.registry_url}/v2/", ca, proxy=proxy.url)
    answer: FetchResult = refused.value.result
    assert answer.status == 407
    assert answer.headers["proxy-authenticate"] == 'Basic realm="fakeproxy"'
    with pytest.raises(ConnectFailed):
        await fetch(
            f"{hub.registry_url}/v2/",
            ca,
            proxy=proxy.url,
            proxy_headers=[("proxy-authorization", "Basic x")],
        )
    ok = await fetch(
        f"{hub.registry_url}/v2/",
        ca,
        proxy=proxy.url,
        proxy_headers=[("proxy-authorization", required)],
    )
    assert ok.status == 401
    assert len(proxy.connects) == 3


# -- other registries' auth layouts -------------------------------------------------------------


def test_layout_arguments_are_checked(ca: trustme.CA) -> None:
    default = FakeHub(ca)
    assert (default.auth_layout, default.service, default.basic_anonymous) == (
        "separate",
        "registry.docker.io",
        False,
    )
    with pytest.raises(ValueError, match="basic_anonymous"):
        FakeHub(ca, auth_layout="same-host", basic_anonymous=True)
    with pytest.raises(ValueError, match="auth_layout"):
        FakeHub(ca, auth_layout="oauth")  # type: ignore[arg-type]


@pytest.mark.trio
async def test_default_layout_has_three_origins(hub: FakeHub, ca: trustme.CA) -> None:
    assert len({hub.registry_url, hub.auth_url, hub.cdn_url}) == 3
    # The registry origin has no token path of its own on Docker Hub.
    stray = await fetch(f"{hub.registry_url}/token?service=registry.docker.io", ca)
    assert stray.status == 404
    assert [s.server for s in hub.requests] == ["registry"]


@pytest.mark.trio
async def test_same_host_anonymous_pull_with_the_token_flow(ghcr: FakeHub, ca: trustme.CA) -> None:
    layers = [make_layer(20, 5000), make_layer(21, 300_000)]
    digest = ghcr.add_image("owner/image", "v1", layers)
    assert ghcr.auth_url == ghcr.registry_url != ghcr.cdn_url

    ping = await fetch(f"{ghcr.registry_url}/v2/", ca)
    assert ping.status == 401
    params = challenge_params(ping.headers["www-authenticate"])
    assert params == {"realm": f"{ghcr.registry_url}/token", "service": "ghcr.io"}

    client = RegistryClient(ghcr.registry_url, ca)
    scope = "repository:owner/image:pull"
    got = await client.request(
        "/v2/owner/image/manifests/v1", headers=[("accept", ACCEPT_ALL)], scope=scope
    )
    assert got.status == 200
    assert got.headers["docker-content-digest"] == digest == sha256_digest(got.body)
    assert not any(k.startswith("ratelimit-") for k in got.headers)
    (challenge,) = client.challenges
    assert challenge_params(challenge) == {
        "realm": f"{ghcr.registry_url}/token",
        "service": "ghcr.io",
        "scope": scope,
    }
    (token_response,) = client.token_responses
    assert token_response.status == 200
    assert "docker-distribution-api-version" not in token_response.headers

    manifest = got.json()
    for descriptor in [manifest["config"], *manifest["layers"]]:
        redirect = await client.request(
            f"/v2/owner/image/blobs/{descriptor['digest']}", scope=scope
        )
        assert redirect.status == 307
        location = redirect.headers["location"]
        assert location.startswith(f"{ghcr.cdn_url}/")  # another origin, like ghcr's CDN
        blob = await fetch(location, ca)
        assert sha256_digest(blob.body) == descriptor["digest"]
        assert len(blob.body) == descriptor["size"]
    assert blob.body == layers[-1]

    # The token request went to the registry origin but is recorded as "auth".
    token_requests = [s for s in ghcr.requests if s.server == "auth"]
    assert [s.target.partition("?")[0] for s in token_requests] == ["/token"]
    assert token_requests[0].headers["host"] == urllib.parse.urlsplit(ghcr.registry_url).netloc
    assert [s.server for s in ghcr.requests] == ["registry", "registry", "auth", "registry"] + [
        "registry",
        "cdn",
    ] * 3


@pytest.mark.trio
async def test_same_host_private_image_and_service(ghcr: FakeHub, ca: trustme.CA) -> None:
    ghcr.add_user("alice", "s3cret")
    ghcr.add_user("bob", "hunter2")
    digest = ghcr.add_image("alice/private", "v1", [make_layer(22, 100)])
    ghcr.make_private("alice/private", "alice")
    path = "/v2/alice/private/manifests/v1"
    scope = "repository:alice/private:pull"

    anonymous = await RegistryClient(ghcr.registry_url, ca).request(path, scope=scope)
    assert anonymous.status == 401
    assert challenge_params(anonymous.headers["www-authenticate"])["error"] == "insufficient_scope"
    bob = await RegistryClient(ghcr.registry_url, ca, credentials=("bob", "hunter2")).request(
        path, scope=scope
    )
    assert bob.status == 401
    alice = RegistryClient(ghcr.registry_url, ca, credentials=("alice", "s3cret"))
    got = await alice.request(path, scope=scope)
    assert (got.status, got.headers["docker-content-digest"]) == (200, digest)

    wrong = await RegistryClient(ghcr.registry_url, ca, credentials=("alice", "x")).request(
        path, scope=scope
    )
    assert (wrong.status, wrong.json()) == (401, {"details": "incorrect username or password"})

    # A token for Docker Hub's service (or none) is not this registry's to give.
    for service in ["registry.docker.io", "evil", ""]:
        query = urllib.parse.urlencode({"service": service, "scope": scope})
        refused = await fetch(
            f"{ghcr.registry_url}/token?{query}", ca, headers=[basic("alice", "s3cret")]
        )
        assert (refused.status, refused.json()) == (400, {"details": "invalid service"})
    assert (await fetch(f"{ghcr.registry_url}/token", ca)).status == 400

    # The token path is exact: anything else on the origin is the registry's 404.
    other = await fetch(f"{ghcr.registry_url}/token/x?service=ghcr.io", ca)
    assert (other.status, other.json()["errors"][0]["code"]) == (404, "NOT_FOUND")
    assert ghcr.requests[-1].server == "registry"


def basic_challenge(result: FetchResult) -> str:
    assert result.status == 401
    assert result.json()["errors"][0]["code"] == "UNAUTHORIZED"
    return result.headers["www-authenticate"]


@pytest.mark.trio
async def test_basic_layout_pull(htpasswd: FakeHub, ca: trustme.CA) -> None:
    htpasswd.add_user("alice", "s3cret")
    layers = [make_layer(23, 2000), make_layer(24, 700_000)]
    digest = htpasswd.add_image("team/app", "1.0", layers)
    registry = htpasswd.registry_url
    assert htpasswd.auth_url == htpasswd.cdn_url == ""
    with pytest.raises(ValueError, match="no CDN"):
        htpasswd.signed_blob_url(digest)

    challenge = f'Basic realm="{BASIC_REALM}"'
    for method in ["GET", "HEAD"]:
        ping = await fetch(f"{registry}/v2/", ca, method=method)
        assert ping.headers["www-authenticate"] == challenge
        assert ping.headers["docker-distribution-api-version"] == "registry/2.0"
    assert basic_challenge(await fetch(f"{registry}/v2/", ca)) == challenge
    assert basic_challenge(await fetch(f"{registry}/v2/team/app/manifests/1.0", ca)) == challenge

    # There is no token service: not on this origin, not anywhere.
    token = await fetch(f"{registry}/token?service=registry.docker.io", ca)
    assert token.status == 404

    alice = basic("alice", "s3cret")
    ping = await fetch(f"{registry}/v2/", ca, headers=[alice])
    assert (ping.status, ping.json()) == (200, {})
    got = await fetch(
        f"{registry}/v2/team/app/manifests/1.0", ca, headers=[alice, ("accept", ACCEPT_ALL)]
    )
    assert got.status == 200
    assert got.headers["docker-content-digest"] == digest == sha256_digest(got.body)
    assert "ratelimit-limit" not in got.headers
    manifest = got.json()
    for descriptor, expected in zip(manifest["layers"], layers, strict=True):
        blob = await fetch(
            f"{registry}/v2/team/app/blobs/{descriptor['digest']}", ca, headers=[alice]
        )
        assert blob.status == 200  # served by the registry itself, no redirect
        assert blob.body == expected
        assert blob.headers["docker-content-digest"] == descriptor["digest"]
        assert blob.headers["etag"] == f'"{descriptor["digest"]}"'
        assert blob.headers["content-type"] == "application/octet-stream"
    blob_url = f"{registry}/v2/team/app/blobs/{manifest['layers'][1]['digest']}"
    part = await fetch(blob_url, ca, headers=[alice, ("range", "bytes=10-19")])
    assert (part.status, part.body) == (206, layers[1][10:20])
    assert part.headers["content-range"] == f"bytes 10-19/{len(layers[1])}"
    beyond = await fetch(blob_url, ca, headers=[alice, ("range", f"bytes={len(layers[1])}-")])
    assert (beyond.status, beyond.headers["content-range"]) == (416, f"bytes */{len(layers[1])}")
    head = await fetch(blob_url, ca, method="HEAD", headers=[alice])
    assert (head.status, head.body, head.headers["content-length"]) == (
        200,
        b"",
        str(len(layers[1])),
    )

    # Wrong password, unknown user, garbage and Bearer credentials all get the Basic challenge.
    for wrong in [
        basic("alice", "wrong"),
        basic("carol", "s3cret"),
        ("authorization", "Basic !!"),
        bearer("abc"),
    ]:
        assert basic_challenge(await fetch(f"{registry}/v2/", ca, headers=[wrong])) == challenge
        refused = await fetch(f"{registry}/v2/team/app/manifests/1.0", ca, headers=[wrong])
        assert basic_challenge(refused) == challenge
    assert {s.server for s in htpasswd.requests} == {"registry"}


@pytest.mark.trio
async def test_basic_layout_private_repositories_and_push(
    htpasswd: FakeHub, ca: trustme.CA
) -> None:
    htpasswd.add_user("alice", "a")
    htpasswd.add_user("bob", "b")
    htpasswd.add_image("alice/secret", "v1", [make_layer(25, 10)])
    htpasswd.make_private("alice/secret", "alice")
    url = f"{htpasswd.registry_url}/v2/alice/secret/manifests/v1"

    assert (await fetch(url, ca, headers=[basic("alice", "a")])).status == 200
    denied = await fetch(url, ca, headers=[basic("bob", "b")])
    assert (denied.status, denied.json()["errors"][0]["code"]) == (403, "DENIED")
    assert "www-authenticate" not in denied.headers
    unknown = await fetch(
        f"{htpasswd.registry_url}/v2/bob/nothing/manifests/v1", ca, headers=[basic("bob", "b")]
    )
    assert (unknown.status, unknown.json()["errors"][0]["code"]) == (404, "NAME_UNKNOWN")

    data = b"pushed with basic credentials"
    digest = sha256_digest(data)
    upload = f"{htpasswd.registry_url}/v2/bob/app/blobs/uploads/?digest={digest}"
    assert basic_challenge(await fetch(upload, ca, method="POST", body=data))
    pushed = await fetch(upload, ca, method="POST", headers=[basic("bob", "b")], body=data)
    assert pushed.status == 201
    back = await fetch(
        f"{htpasswd.registry_url}/v2/bob/app/blobs/{digest}", ca, headers=[basic("alice", "a")]
    )
    assert back.body == data


@pytest.mark.trio
async def test_basic_layout_anonymous_reads(nursery: trio.Nursery, ca: trustme.CA) -> None:
    hub = FakeHub(ca, auth_layout="basic", basic_anonymous=True)
    await nursery.start(hub.serve)
    hub.add_user("alice", "a")
    layer = make_layer(26, 1000)
    hub.add_image("team/public", "1", [layer])
    hub.add_image("team/private", "1", [make_layer(27, 10)])
    hub.make_private("team/private", "alice")
    registry = hub.registry_url

    ping = await fetch(f"{registry}/v2/", ca)
    assert (ping.status, ping.json()) == (200, {})
    assert basic_challenge(await fetch(f"{registry}/v2/", ca, headers=[basic("alice", "x")]))
    got = await fetch(f"{registry}/v2/team/public/manifests/1", ca)
    assert got.status == 200
    blob = await fetch(f"{registry}/v2/team/public/blobs/{sha256_digest(layer)}", ca)
    assert blob.body == layer

    challenge = f'Basic realm="{BASIC_REALM}"'
    for url, method in [
        (f"{registry}/v2/team/private/manifests/1", "GET"),
        (f"{registry}/v2/team/nothing/manifests/1", "GET"),
        (f"{registry}/v2/team/public/blobs/uploads/", "POST"),
    ]:
        assert basic_challenge(await fetch(url, ca, method=method)) == challenge
    private = await fetch(
        f"{registry}/v2/team/private/manifests/1", ca, headers=[basic("alice", "a")]
    )
    assert private.status == 200


async def layout_hub(nursery: trio.Nursery, ca: trustme.CA, layout: AuthLayout) -> FakeHub:
    hub = FakeHub(ca, auth_layout=layout, service="registry.example")
    await nursery.start(hub.serve)
    hub.add_user("alice", "a")
    return hub


async def credentials(hub: FakeHub, ca: trustme.CA, name: str) -> tuple[str, str]:
    """What a pull of ``name`` sends on the registry origin, in any layout."""
    if hub.auth_layout == "basic":
        return basic("alice", "a")
    return bearer(await pull_token(hub, ca, name))


async def blob_of(hub: FakeHub, ca: trustme.CA, name: str, digest: str) -> FetchResult:
    """GET a blob like a client: follow the registry's redirect (without Authorization)."""
    auth = await credentials(hub, ca, name)
    got = await fetch(f"{hub.registry_url}/v2/{name}/blobs/{digest}", ca, headers=[auth])
    if got.status == 307:
        assert hub.auth_layout != "basic"
        got = await fetch(got.headers["location"], ca)
    return got


LAYOUTS: list[AuthLayout] = ["separate", "same-host", "basic"]


@pytest.mark.trio
@pytest.mark.parametrize("layout", LAYOUTS)
async def test_faults_in_every_layout(
    nursery: trio.Nursery, ca: trustme.CA, layout: AuthLayout
) -> None:
    hub = await layout_hub(nursery, ca, layout)
    data = make_layer(28, 400_000)
    hub.add_image("team/app", "1", [data])
    digest = sha256_digest(data)
    auth = await credentials(hub, ca, "team/app")
    url = f"{hub.registry_url}/v2/team/app/manifests/1"

    hub.force_429(1, retry_after=3)
    assert (await fetch(url, ca)).status == 401  # unauthorised requests do not use up the fault
    limited = await fetch(url, ca, headers=[auth])
    assert (limited.status, limited.headers["retry-after"]) == (429, "3")
    first = await fetch(url, ca, headers=[auth])
    assert (first.status, first.headers["ratelimit-remaining"]) == (200, "99;w=21600")
    hub.force_429(1)
    assert (await blob_of(hub, ca, "team/app", digest)).status == 429

    hub.truncate_blob(digest, times=1)
    cut = await blob_of(hub, ca, "team/app", digest)
    assert (cut.status, cut.complete) == (200, False)
    assert 0 < len(cut.body) < len(data) and data.startswith(cut.body)
    hub.corrupt_blob(digest)
    bad = await blob_of(hub, ca, "team/app", digest)
    assert len(bad.body) == len(data) and bad.body != data
    assert (await blob_of(hub, ca, "team/app", digest)).body == data

    hub.ratelimit_limit = None
    quiet = await fetch(url, ca, headers=[auth])
    assert quiet.status == 200
    assert not any(k.startswith("ratelimit-") for k in quiet.headers)
