"""Pull-through caching of manifests, and answers while the upstream is down."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import pytest
import trio
import trustme

from hubproxy.cache.pullthrough import PullThrough
from hubproxy.net.server import RESPONSE_HEADS, _response_head
from hubproxy.policy.cachepolicy import Confirmations, anonymously_readable
from tests.conftest import RunningProxy, StartProxy, TLSFiles
from tests.fakehub import (
    MEDIA_DOCKER_LIST,
    MEDIA_DOCKER_MANIFEST,
    MEDIA_OCI_MANIFEST,
    FakeHub,
    make_layer,
    sha256_digest,
)
from tests.registry_client import RegistryClient
from tests.test_skopeo import Skopeo, check_dir_copy


def pullthrough(proxy: RunningProxy) -> PullThrough:
    assert proxy.proxy.pullthrough is not None
    return proxy.proxy.pullthrough


def anonymous(proxy: RunningProxy, repository: str) -> bool:
    """Whether the mirror holds that anyone may read ``repository`` now."""
    readability = pullthrough(proxy).manifests.readability.get(repository)
    return anonymously_readable(readability, time.time())


def manifest_gets(hub: FakeHub, repo: str) -> int:
    """Manifest GETs with a token (the anonymous first try of the token dance is a 401)."""
    return sum(
        1
        for s in hub.requests
        if s.server == "registry"
        and s.method == "GET"
        and f"/v2/{repo}/manifests/" in s.target
        and "authorization" in s.headers
    )


async def stoppable_hub(nursery: trio.Nursery, ca: trustme.CA) -> tuple[FakeHub, trio.CancelScope]:
    hub = FakeHub(ca)
    scope = trio.CancelScope()

    async def run(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await hub.serve(task_status=task_status)

    await nursery.start(run)
    return hub, scope


ACCEPT = [("accept", f"{MEDIA_DOCKER_MANIFEST}, {MEDIA_OCI_MANIFEST}")]


async def test_manifests_by_tag_are_revalidated_with_head_only(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    digest = hub.add_image("library/alpine", "3.20", [make_layer(1, 1000)])
    proxy = await start_proxy(cache_dir=str(tmp_path / "cache"), manifest_ttl=0.0)
    first = RegistryClient(proxy.url, ca)
    r = await first.request("/v2/library/alpine/manifests/3.20", headers=ACCEPT)
    assert r.status == 200
    assert r.headers["docker-content-digest"] == digest
    body = r.body
    before = hub.ratelimit_remaining
    for client in (first, RegistryClient(proxy.url, ca)):
        r = await client.request("/v2/library/alpine/manifests/3.20", headers=ACCEPT)
        assert r.status == 200
        assert r.body == body  # byte-exact
        assert r.headers["docker-content-digest"] == digest
        assert r.headers["content-type"] == MEDIA_DOCKER_MANIFEST
        r = await client.request(f"/v2/library/alpine/manifests/{digest}", headers=ACCEPT)
        assert r.body == body
    assert manifest_gets(hub, "library/alpine") == 1  # HEADs only after the first GET
    assert hub.ratelimit_remaining == before  # so Docker Hub's pull count did not move
    assert pullthrough(proxy).stats.hits == 4


async def test_a_moved_tag_is_fetched_anew(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    old = hub.add_image("library/alpine", "latest", [make_layer(1, 1000)])
    proxy = await start_proxy(cache_dir=str(tmp_path / "cache"), manifest_ttl=0.0)
    client = RegistryClient(proxy.url, ca)
    r = await client.request("/v2/library/alpine/manifests/latest", headers=ACCEPT)
    assert r.headers["docker-content-digest"] == old
    new = hub.add_image("library/alpine", "latest", [make_layer(2, 1000)])
    r = await client.request("/v2/library/alpine/manifests/latest", headers=ACCEPT)
    assert r.headers["docker-content-digest"] == new
    assert hashlib.sha256(r.body).hexdigest() == new.removeprefix("sha256:")


async def test_manifest_ttl_skips_revalidation_for_a_confirmed_client(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    hub.add_image("library/alpine", "latest", [make_layer(1, 1000)])
    proxy = await start_proxy(cache_dir=str(tmp_path / "cache"), manifest_ttl=3600.0)
    client = RegistryClient(proxy.url, ca)
    await client.request("/v2/library/alpine/manifests/latest", headers=ACCEPT)
    await pullthrough(proxy).wait_probes()  # the background "is it public?" question
    seen = len(hub.requests)
    r = await client.request("/v2/library/alpine/manifests/latest", headers=ACCEPT)
    assert r.status == 200
    assert len(hub.requests) == seen  # not even a HEAD
    stranger = RegistryClient(proxy.url, ca)  # other credentials: access is checked anyway
    r = await stranger.request("/v2/library/alpine/manifests/latest", headers=ACCEPT)
    assert r.status == 200
    assert len(hub.requests) > seen


async def test_tag_revalidation_times_are_bounded(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    """One entry per tag asked: held to --manifest-cache-entries like the store's indexes
    (before, a client asking tag after tag grew it without end)."""
    for n in range(6):
        hub.add_image("library/alpine", f"t{n}", [make_layer(n, 100)])
    proxy = await start_proxy(cache_dir=str(tmp_path / "cache"), manifest_cache_entries=3)
    client = RegistryClient(proxy.url, ca)
    for n in range(6):
        r = await client.request(f"/v2/library/alpine/manifests/t{n}", headers=ACCEPT)
        assert r.status == 200
    checked = pullthrough(proxy).tag_checked
    assert len(checked) == 3
    assert sorted(key.tag for key in checked) == ["t3", "t4", "t5"]


async def test_accept_negotiation_is_respected(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    hub.add_image("library/alpine", "3.20", [make_layer(1, 1000)])
    proxy = await start_proxy(cache_dir=str(tmp_path / "cache"))
    client = RegistryClient(proxy.url, ca)
    r = await client.request("/v2/library/alpine/manifests/3.20", headers=ACCEPT)
    assert r.status == 200
    # cached as a Docker schema 2 manifest; this client only takes OCI manifests
    r = await client.request(
        "/v2/library/alpine/manifests/3.20", headers=[("accept", MEDIA_OCI_MANIFEST)]
    )
    assert r.status == 404
    assert r.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"


async def test_private_manifest_needs_the_clients_own_access(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    hub.add_image("acme/secret", "v1", [make_layer(1, 1000)])
    hub.add_user("alice", "s3cret")
    hub.make_private("acme/secret", "alice")
    proxy = await start_proxy(cache_dir=str(tmp_path / "cache"))
    alice = RegistryClient(proxy.url, ca, credentials=("alice", "s3cret"))
    assert (await alice.request("/v2/acme/secret/manifests/v1", headers=ACCEPT)).status == 200
    stranger = RegistryClient(proxy.url, ca)
    r = await stranger.request("/v2/acme/secret/manifests/v1", headers=ACCEPT)
    assert r.status == 401
    assert pullthrough(proxy).stats.hits == 0
    await pullthrough(proxy).wait_probes()
    assert not anonymous(proxy, "acme/secret")


def registry_asks(hub: FakeHub, since: int) -> list[tuple[str, str]]:
    """What the registry was asked since its ``since``-th request (no token requests)."""
    return [(s.method, s.target) for s in hub.requests[since:] if s.server == "registry"]


async def pull_image(client: RegistryClient, repo: str, tag: str) -> list[str]:
    """Pull ``repo:tag`` as docker does (the index, the platform's manifest, its config and
    layers, each checked against its digest); the blobs' digests."""
    r = await client.request(
        f"/v2/{repo}/manifests/{tag}",
        headers=[("accept", f"{MEDIA_DOCKER_LIST}, {MEDIA_DOCKER_MANIFEST}")],
    )
    assert r.status == 200
    document = json.loads(r.body)
    if document["mediaType"] == MEDIA_DOCKER_LIST:
        child = document["manifests"][0]["digest"]
        r = await client.request(f"/v2/{repo}/manifests/{child}", headers=ACCEPT)
        assert r.status == 200
        assert sha256_digest(r.body) == child
        document = json.loads(r.body)
    digests = [document["config"]["digest"]] + [layer["digest"] for layer in document["layers"]]
    for digest in digests:
        r = await client.request(f"/v2/{repo}/blobs/{digest}")
        assert r.status == 200
        assert sha256_digest(r.body) == digest
    return digests


async def test_a_cached_pull_asks_the_upstream_once(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    """A manifest the upstream confirmed for a client vouches, until that confirmation
    expires, for what it names that the repository served before: a pull of a cached image
    is one HEAD (its tag), not one more per manifest and layer."""
    child = hub.add_image("library/alpine", None, [make_layer(1, 1000), make_layer(2, 2000)])
    hub.add_index("library/alpine", "3.20", [(child, "amd64", "linux")])
    proxy = await start_proxy(cache_dir=str(tmp_path / "cache"), manifest_ttl=0.0)
    client = RegistryClient(proxy.url, ca)
    blobs = await pull_image(client, "library/alpine", "3.20")
    await proxy.fills_ended()
    await pullthrough(proxy).wait_probes()
    pullthrough(proxy).confirmations = Confirmations()  # a minute on: every one expired
    hits = pullthrough(proxy).stats.hits
    seen = len(hub.requests)
    assert await pull_image(client, "library/alpine", "3.20") == blobs
    assert registry_asks(hub, seen) == [("HEAD", "/v2/library/alpine/manifests/3.20")]
    assert pullthrough(proxy).stats.hits == hits + 2 + len(blobs)


async def test_a_manifest_vouches_for_no_other_client_nor_repository(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    layer = make_layer(1, 1000)
    digest = sha256_digest(layer)
    hub.add_image("library/alpine", "1", [layer])
    hub.add_image("acme/other", "1", [layer])  # the same layer, in another repository
    hub.add_image("acme/secret", "1", [layer, make_layer(2, 500)])
    hub.add_user("alice", "s3cret")
    hub.make_private("acme/secret", "alice")
    proxy = await start_proxy(cache_dir=str(tmp_path / "cache"))
    client = RegistryClient(proxy.url, ca)
    await pull_image(client, "library/alpine", "1")
    await proxy.fills_ended()
    await pullthrough(proxy).wait_probes()
    # acme/other's manifest is confirmed, but the mirror never saw acme/other serve the layer
    r = await client.request("/v2/acme/other/manifests/1", headers=ACCEPT)
    assert r.status == 200
    seen = len(hub.requests)
    r = await client.request(f"/v2/acme/other/blobs/{digest}")
    assert r.body == layer
    assert ("HEAD", f"/v2/acme/other/blobs/{digest}") in registry_asks(hub, seen)
    # another client: alpine's manifest, confirmed for the first, vouches nothing for it
    stranger = RegistryClient(proxy.url, ca)
    seen = len(hub.requests)
    r = await stranger.request(f"/v2/library/alpine/blobs/{digest}")
    assert r.body == layer
    assert ("HEAD", f"/v2/library/alpine/blobs/{digest}") in registry_asks(hub, seen)
    # a private repository: what alice's confirmed manifest names stays hers
    alice = RegistryClient(proxy.url, ca, credentials=("alice", "s3cret"))
    secret = await pull_image(alice, "acme/secret", "1")
    await proxy.fills_ended()
    for blob in secret:
        r = await stranger.request(f"/v2/acme/secret/blobs/{blob}")
        assert r.status == 401
        assert layer not in r.body


@pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo is not installed")
async def test_skopeo_pulls_a_cached_image_with_one_upstream_request(
    hub: FakeHub, start_proxy: StartProxy, tls_files: TLSFiles, tmp_path: Path
) -> None:
    """A real client (its own token each run): the second pull of a multi-platform image asks
    the upstream only where its tag points now."""
    layers = [make_layer(1, 300_000), make_layer(2, 5000)]
    amd64 = hub.add_image("library/busybox", None, layers)
    arm64 = hub.add_image("library/busybox", None, [make_layer(3, 4000)], arch="arm64")
    hub.add_index(
        "library/busybox", "latest", [(amd64, "amd64", "linux"), (arm64, "arm64", "linux")]
    )
    proxy = await start_proxy(cache_dir=str(tmp_path / "cache"), manifest_ttl=0.0)
    skopeo = Skopeo(proxy, tls_files, tmp_path)
    src = ["--src-cert-dir", skopeo.cert_dir, "--override-arch", "amd64", "--override-os", "linux"]
    await skopeo.run("copy", *src, skopeo.ref("busybox:latest"), f"dir:{tmp_path / 'one'}")
    await proxy.fills_ended()
    await pullthrough(proxy).wait_probes()
    seen = len(hub.requests)
    await skopeo.run("copy", *src, skopeo.ref("busybox:latest"), f"dir:{tmp_path / 'two'}")
    checked = check_dir_copy(tmp_path / "two")
    for layer in layers:
        assert hashlib.sha256(layer).hexdigest() in checked
    asked = [(m, t) for m, t in registry_asks(hub, seen) if "/manifests/" in t or "/blobs/" in t]
    assert asked == [("HEAD", "/v2/library/busybox/manifests/latest")]


@pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo is not installed")
async def test_public_image_pulls_completely_while_the_upstream_is_down(
    nursery: trio.Nursery,
    start_proxy: StartProxy,
    ca: trustme.CA,
    tls_files: TLSFiles,
    tmp_path: Path,
) -> None:
    hub, hub_scope = await stoppable_hub(nursery, ca)
    layers = [make_layer(1, 800_000), make_layer(2, 5000)]
    hub.add_image("library/busybox", "latest", layers)
    secret_layer = make_layer(3, 1000)
    secret = "sha256:" + hashlib.sha256(secret_layer).hexdigest()
    hub.add_image("acme/secret", "v1", [secret_layer])
    hub.add_user("alice", "s3cret")
    hub.make_private("acme/secret", "alice")
    proxy = await start_proxy(upstream=hub.registry_url, cache_dir=str(tmp_path / "cache"))
    skopeo = Skopeo(proxy, tls_files, tmp_path)
    src = ["--src-cert-dir", skopeo.cert_dir]
    await skopeo.run("copy", *src, skopeo.ref("busybox:latest"), f"dir:{tmp_path / 'one'}")
    alice = RegistryClient(proxy.url, ca, credentials=("alice", "s3cret"))
    assert (await alice.request("/v2/acme/secret/manifests/v1", headers=ACCEPT)).status == 200
    assert (await alice.request(f"/v2/acme/secret/blobs/{secret}")).body == secret_layer
    with trio.fail_after(20):
        await pullthrough(proxy).wait_probes()
    assert anonymous(proxy, "library/busybox")

    hub_scope.cancel()  # Docker Hub goes away
    target = tmp_path / "two"
    await skopeo.run("copy", *src, skopeo.ref("busybox:latest"), f"dir:{target}")
    checked = check_dir_copy(target)
    for layer in layers:
        assert hashlib.sha256(layer).hexdigest() in checked
    assert json.loads((target / "manifest.json").read_bytes())["schemaVersion"] == 2
    assert pullthrough(proxy).stats.stale_answers > 0
    # a private image is never answered from the cache without the upstream's word (alice's
    # own confirmed token would still do, for ACCESS_CONFIRMATION_TTL)
    later = RegistryClient(proxy.url, ca, credentials=("alice", "s3cret"))
    r = await later.request("/v2/acme/secret/manifests/v1", headers=ACCEPT)
    assert r.status == 502
    assert r.json()["errors"][0]["code"] == "UNAVAILABLE"
    # nor under the name of a public repository that never held it
    r = await later.request(f"/v2/library/busybox/blobs/{secret}")
    assert r.status == 502
    assert secret_layer not in r.body


async def test_the_answers_of_a_cached_manifest_share_one_head_event(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    """h11's event for a cached manifest's head is made (and its headers validated) once, and
    every client still gets the whole answer, each on its own connection."""
    hub.add_image("library/alpine", "3.20", [make_layer(1, 1000)])
    proxy = await start_proxy(cache_dir=str(tmp_path / "cache"))
    path = "/v2/library/alpine/manifests/3.20"
    first = await RegistryClient(proxy.url, ca).request(path, headers=ACCEPT)
    assert first.status == 200
    made = _response_head.cache_info().misses
    answers = [await RegistryClient(proxy.url, ca).request(path, headers=ACCEPT) for _ in range(3)]
    assert all(a.status == 200 and a.body == first.body for a in answers)
    assert {a.headers["docker-content-digest"] for a in answers} == {
        "sha256:" + hashlib.sha256(first.body).hexdigest()
    }
    assert _response_head.cache_info().misses <= made + 1  # (the first hit's, if any)
    assert _response_head.cache_info().maxsize == RESPONSE_HEADS  # bounded
