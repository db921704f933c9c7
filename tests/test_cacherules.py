"""Who the cache answers, end to end: the access check's rules, the stale rules, per-client tag
answers, per-repository media types and verification before anything is stored.

Faults come from the fake registry's switches (``force_status``, ``lie_digest``,
``swap_manifest_body``, ``corrupt_blob``); nothing here reaches into the fake's internals.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
import trio
import trustme

from hubproxy.policy.registries import Registry
from hubproxy.policy.urls import base_url
from tests.conftest import RunningProxy, StartProxy
from tests.fakehub import (
    MEDIA_DOCKER_LIST,
    MEDIA_DOCKER_MANIFEST,
    MEDIA_OCI_MANIFEST,
    FakeHub,
    make_layer,
    sha256_digest,
)
from tests.registry_client import RegistryClient
from tests.test_manifests import database

ACCEPT = [("accept", f"{MEDIA_DOCKER_MANIFEST}, {MEDIA_OCI_MANIFEST}")]
ACCEPT_LISTS = [("accept", f"{MEDIA_DOCKER_MANIFEST}, {MEDIA_DOCKER_LIST}, {MEDIA_OCI_MANIFEST}")]
OLD_DOCKER = [("accept", MEDIA_DOCKER_MANIFEST)]  # what old docker clients send
DAY = 24 * 3600.0


def stored(proxy: RunningProxy, table: str) -> list[tuple[object, ...]]:
    """The rows of a table of the manifest state, once the writer committed what it has."""
    assert proxy.proxy.pullthrough is not None
    assert proxy.proxy.pullthrough.manifests.flush(timeout=10)
    with database(Path(proxy.config.cache_dir or "") / "state.db") as conn:
        return list(conn.execute(f"SELECT * FROM {table}"))


def manifest_files(proxy: RunningProxy) -> list[str]:
    return sorted(str(row[0]) for row in stored(proxy, "manifests"))


async def wait_probes(proxy: RunningProxy) -> None:
    assert proxy.proxy.pullthrough is not None
    with trio.fail_after(10):
        await proxy.proxy.pullthrough.wait_probes()


def anonymous_heads(hub: FakeHub) -> int:
    return sum(
        1
        for s in hub.requests
        if s.server == "registry" and s.method == "HEAD" and "authorization" not in s.headers
    )


def shift_wall_clock(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Move ``time.time`` (the wall clock readability is dated with) by ``seconds``."""
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + seconds)


# -- per-client tag answers -----------------------------------------------------------------------


async def test_a_client_taking_no_manifest_list_does_not_repoint_the_tag(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    """distribution answers a client that takes no manifest list with the linux/amd64 manifest;
    a client that takes lists must still get the list, from the same credentials, within
    --manifest-ttl."""
    amd = hub.add_image("library/python", None, [make_layer(1, 1000)])
    arm = hub.add_image("library/python", None, [make_layer(2, 1000)], arch="arm64")
    index = hub.add_index(
        "library/python", "3.12", [(amd, "amd64", "linux"), (arm, "arm64", "linux")]
    )
    proxy = await start_proxy(cache_dir=str(tmp_path / "cache"), manifest_ttl=3600.0)
    client = RegistryClient(proxy.url, ca)
    path = "/v2/library/python/manifests/3.12"
    old = await client.request(path, headers=OLD_DOCKER)
    assert (old.status, old.headers["docker-content-digest"]) == (200, amd)
    new = await client.request(path, headers=ACCEPT_LISTS)
    assert (new.status, new.headers["docker-content-digest"]) == (200, index)
    assert new.headers["content-type"] == MEDIA_DOCKER_LIST
    assert sha256_digest(new.body) == index
    # and each kind of client now has its own cached answer
    gets = sum(1 for s in hub.requests if s.method == "GET" and "/manifests/" in s.target)
    assert (await client.request(path, headers=OLD_DOCKER)).headers["docker-content-digest"] == amd
    assert (await client.request(path, headers=ACCEPT_LISTS)).headers[
        "docker-content-digest"
    ] == index
    assert sum(1 for s in hub.requests if s.method == "GET" and "/manifests/" in s.target) == gets


# -- anonymous readability expires ------------------------------------------------------------


async def pull_public(
    hub: FakeHub, proxy: RunningProxy, ca: trustme.CA
) -> tuple[str, bytes, RegistryClient]:
    """A client pulls a public image; its manifest (by tag) and layer are cached, and the mirror
    learned that anyone may read it. Returns the digest, the layer and the client."""
    layer = make_layer(3, 5000)
    digest = hub.add_image("library/alpine", "3.20", [layer])
    client = RegistryClient(proxy.url, ca)
    assert (await client.request("/v2/library/alpine/manifests/3.20", headers=ACCEPT)).status == 200
    blob = f"/v2/library/alpine/blobs/{sha256_digest(layer)}"
    assert (await client.request(blob)).body == layer
    await wait_probes(proxy)
    return digest, layer, client


@pytest.mark.parametrize(("hours", "stale"), [(23.0, True), (25.0, False)])
async def test_public_is_trusted_for_a_day_while_the_upstream_is_down(
    hub: FakeHub,
    start_proxy: StartProxy,
    ca: trustme.CA,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    hours: float,
    stale: bool,
) -> None:
    proxy = await start_proxy(cache_dir=str(tmp_path / "cache"))
    digest, layer, _client = await pull_public(hub, proxy, ca)
    hub.force_status("manifest", 503, times=100)
    hub.force_status("blob", 503, times=100)
    shift_wall_clock(monkeypatch, hours * 3600)
    stranger = RegistryClient(proxy.url, ca)
    r = await stranger.request("/v2/library/alpine/manifests/3.20", headers=ACCEPT)
    assert (r.status == 200) is stale
    if stale:
        assert r.headers["docker-content-digest"] == digest
    r = await stranger.request(f"/v2/library/alpine/blobs/{sha256_digest(layer)}")
    assert (r.status == 200 and r.body == layer) is stale


async def test_public_is_asked_again_after_an_hour_and_the_answer_dated(
    hub: FakeHub,
    start_proxy: StartProxy,
    ca: trustme.CA,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache = tmp_path / "cache"
    proxy = await start_proxy(cache_dir=str(cache), manifest_ttl=0.0)
    _digest, _layer, client = await pull_public(hub, proxy, ca)  # client: has its token
    asked = anonymous_heads(hub)
    assert asked > 0
    assert (await client.request("/v2/library/alpine/manifests/3.20", headers=ACCEPT)).status == 200
    await wait_probes(proxy)
    assert anonymous_heads(hub) == asked  # known, and less than an hour old
    shift_wall_clock(monkeypatch, 2 * 3600)
    assert (await client.request("/v2/library/alpine/manifests/3.20", headers=ACCEPT)).status == 200
    await wait_probes(proxy)
    assert anonymous_heads(hub) > asked
    [learned] = [row for row in stored(proxy, "readability") if row[0] == "library/alpine"]
    assert learned[1] == 1  # anonymous
    assert isinstance(learned[2], float) and abs(learned[2] - time.time()) < 60  # shifted now


# -- "upstream unavailable" ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "stale"), [(500, True), (501, True), (503, True), (429, True), (404, False)]
)
async def test_an_upstream_answering_5xx_or_429_gets_stale_answers_and_a_404_does_not(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path, status: int, stale: bool
) -> None:
    proxy = await start_proxy(cache_dir=str(tmp_path / "cache"))
    digest, _layer, _client = await pull_public(hub, proxy, ca)
    hub.force_status("manifest", status, times=100)
    r = await RegistryClient(proxy.url, ca).request(
        "/v2/library/alpine/manifests/3.20", headers=ACCEPT
    )
    if stale:
        assert (r.status, r.headers["docker-content-digest"]) == (200, digest)
    else:
        assert r.status == 404


# -- the access check ----------------------------------------------------------------------------


async def pull_secret(
    hub: FakeHub, proxy: RunningProxy, ca: trustme.CA
) -> tuple[str, bytes, bytes]:
    """alice pulls a private image through the mirror: its manifest (by digest) and layer are
    cached. Returns the manifest digest, its body and the layer."""
    layer = make_layer(4, 3000)
    digest = hub.add_image("acme/secret", "v1", [layer])
    hub.add_user("alice", "s3cret")
    hub.make_private("acme/secret", "alice")
    alice = RegistryClient(proxy.url, ca, credentials=("alice", "s3cret"))
    manifest = await alice.request(f"/v2/acme/secret/manifests/{digest}", headers=ACCEPT)
    assert manifest.status == 200
    assert (await alice.request(f"/v2/acme/secret/blobs/{sha256_digest(layer)}")).body == layer
    await wait_probes(proxy)
    return digest, manifest.body, layer


@pytest.mark.parametrize(
    ("kind", "status", "location"),
    [
        ("manifest", 304, False),  # a condition's answer
        ("manifest", 307, True),  # registries serve manifests themselves
        ("manifest", 302, False),
        ("blob", 304, False),
        ("blob", 302, False),  # a redirect to nowhere
        ("blob", 300, True),
    ],
)
async def test_only_200_or_a_blob_redirect_confirms_access(
    hub: FakeHub,
    start_proxy: StartProxy,
    ca: trustme.CA,
    tmp_path: Path,
    kind: str,
    status: int,
    location: bool,
) -> None:
    proxy = await start_proxy(cache_dir=str(tmp_path / "cache"))
    digest, body, layer = await pull_secret(hub, proxy, ca)
    headers = [("location", f"{hub.registry_url}/elsewhere")] if location else []
    hub.force_status(kind, status, method="HEAD", headers=headers)
    stranger = RegistryClient(proxy.url, ca)
    path = (
        f"/v2/acme/secret/manifests/{digest}"
        if kind == "manifest"
        else f"/v2/acme/secret/blobs/{sha256_digest(layer)}"
    )
    r = await stranger.request(path, headers=ACCEPT)
    assert r.status == 401
    assert body not in r.body and layer[:1000] not in r.body


async def test_the_access_check_carries_no_conditions(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    """A client's If-None-Match would turn the access check's 200 into a 304 (which is no
    yes): the check asks plainly, and the cached manifest is served."""
    proxy = await start_proxy(cache_dir=str(tmp_path / "cache"), manifest_ttl=0.0)
    digest, _layer, client = await pull_public(hub, proxy, ca)  # client: has its token
    seen = len(hub.requests)
    conditional = [*ACCEPT, ("if-none-match", f'"{digest}"'), ("range", "bytes=0-10")]
    r = await client.request("/v2/library/alpine/manifests/3.20", headers=conditional)
    assert r.status in (200, 304)
    heads = [s for s in hub.requests[seen:] if s.method == "HEAD" and "/manifests/" in s.target]
    assert heads
    assert not any("if-none-match" in s.headers or "range" in s.headers for s in heads)
    assert not any(s.method == "GET" and "/manifests/" in s.target for s in hub.requests[seen:])


async def test_access_checks_never_ask_a_fallback(
    nursery: trio.Nursery, hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    """A fallback (a Worker with credentials of its own, say) answering yes proves nothing
    about this client: while the primary rests, a cached private manifest stays closed."""
    worker = FakeHub(ca)
    await nursery.start(worker.serve)
    proxy = await start_proxy(cache_dir=str(tmp_path / "cache"), fallbacks=(worker.registry_url,))
    digest, body, layer = await pull_secret(hub, proxy, ca)
    hub.force_status("manifest", 429, headers=[("retry-after", "600")])
    await RegistryClient(proxy.url, ca).request("/v2/library/other/manifests/1", headers=ACCEPT)
    assert proxy.proxy.forwarder.default.resting_until[0] > trio.current_time()  # the primary rests
    worker.force_status("manifest", 200, method="HEAD", times=100)
    worker.force_status("blob", 200, method="HEAD", times=100)
    stranger = RegistryClient(proxy.url, ca)
    r = await stranger.request(f"/v2/acme/secret/manifests/{digest}", headers=ACCEPT)
    assert r.status != 200 and body not in r.body
    r = await stranger.request(f"/v2/acme/secret/blobs/{sha256_digest(layer)}")
    assert r.status != 200 and layer[:1000] not in r.body
    heads = [s for s in worker.requests if s.method == "HEAD"]
    assert heads == []


async def test_a_fallbacks_answer_confirms_nothing(
    nursery: trio.Nursery, hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    """A manifest a fallback served while the primary rests is this client's to have, but it
    confirms nothing for later requests: neither its own path nor what it names (a layer
    cached for alice stays closed to a stranger the fallback itself refuses it to)."""
    worker = FakeHub(ca)
    await nursery.start(worker.serve)
    proxy = await start_proxy(cache_dir=str(tmp_path / "cache"), fallbacks=(worker.registry_url,))
    digest, body, layer = await pull_secret(hub, proxy, ca)
    assert worker.add_image("acme/secret", "v1", [layer]) == digest  # public there
    hub.force_status("manifest", 429, headers=[("retry-after", "600")])
    await RegistryClient(proxy.url, ca).request("/v2/library/other/manifests/1", headers=ACCEPT)
    assert proxy.proxy.forwarder.default.resting_until[0] > trio.current_time()  # the primary rests
    worker.force_status("blob", 404, times=100)
    stranger = RegistryClient(proxy.url, ca)
    r = await stranger.request(f"/v2/acme/secret/manifests/{digest}", headers=ACCEPT)
    assert r.status == 200 and r.body == body  # the fallback's answer
    r = await stranger.request(f"/v2/acme/secret/blobs/{sha256_digest(layer)}")
    assert r.status == 404 and layer[:1000] not in r.body  # the fallback's answer again
    worker.force_status("manifest", 404, times=100)  # and now the fallback refuses it too
    r = await stranger.request(f"/v2/acme/secret/manifests/{digest}", headers=ACCEPT)
    assert r.status == 404 and body not in r.body


async def test_a_tag_fetched_through_a_fallback_is_not_fresh_for_the_primary(
    nursery: trio.Nursery, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    """Where a tag points is revalidated with the primary; a fallback's answer (fetched while
    the primary rested) is this client's, but does not count as that revalidation."""
    # open registries: the client shows both the same (no) credentials
    hub = FakeHub(ca, auth_layout="basic", basic_anonymous=True)
    worker = FakeHub(ca, auth_layout="basic", basic_anonymous=True)
    await nursery.start(hub.serve)
    await nursery.start(worker.serve)
    primary = hub.add_image("library/alpine", "v2", [make_layer(7, 1000)])
    elsewhere = worker.add_image("library/alpine", "v2", [make_layer(8, 1000)])
    proxy = await start_proxy(
        upstream=hub.registry_url,
        fallbacks=(worker.registry_url,),
        cache_dir=str(tmp_path / "cache"),
        manifest_ttl=3600.0,
    )
    client = RegistryClient(proxy.url, ca)
    r = await client.request("/v2/library/alpine/manifests/v2", headers=ACCEPT)
    assert r.headers["docker-content-digest"] == primary  # and this client is confirmed
    await wait_probes(proxy)
    hub.force_status("manifest", 429, headers=[("retry-after", "600")])
    await client.request("/v2/library/other/manifests/1", headers=ACCEPT)
    upstreams = proxy.proxy.forwarder.default
    assert upstreams.resting_until[0] > trio.current_time()  # the primary rests
    # another Accept is another cached answer of the tag: fetched, from the fallback
    r = await client.request("/v2/library/alpine/manifests/v2", headers=ACCEPT_LISTS)
    assert r.headers["docker-content-digest"] == elsewhere
    upstreams.resting_until[0] = 0.0  # the primary is back
    r = await client.request("/v2/library/alpine/manifests/v2", headers=ACCEPT_LISTS)
    assert r.headers["docker-content-digest"] == primary


def registry(name: str, *fakes: FakeHub) -> Registry:
    return Registry(name, tuple(base_url(fake.registry_url) for fake in fakes))


async def test_a_confirmation_on_one_registry_opens_nothing_on_another(
    hub: FakeHub, ghcr: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    """Blobs are stored once per digest for every registry: the same path with the same
    credentials on another registry is a new question."""
    layer = make_layer(5, 200_000)
    hub.add_image("acme/app", "v1", [layer])
    ghcr.add_image("acme/app", "v1", [layer])
    ghcr.add_user("owner", "pw")
    ghcr.make_private("acme/app", "owner")
    proxy = await start_proxy(
        registries=(registry("ghcr.io", ghcr),), cache_dir=str(tmp_path / "cache")
    )
    client = RegistryClient(proxy.url, ca)
    scope = "repository:acme/app:pull"
    path = f"/v2/acme/app/blobs/{sha256_digest(layer)}"
    assert (await client.request(path, scope=scope)).body == layer  # Docker Hub's, confirmed
    r = await client.request(f"{path}?ns=ghcr.io", scope=scope)  # the same token, on ghcr.io
    assert r.status == 401
    assert layer[:1000] not in r.body


# -- media types per repository ----------------------------------------------------------------


async def test_a_manifests_media_type_is_the_one_its_repository_serves(
    hub: FakeHub, ghcr: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    layers = [make_layer(6, 1000)]
    digest = hub.add_image("library/alpine", "3.20", layers)
    assert ghcr.add_image("owner/app", "v1", layers) == digest
    ghcr.add_user("pusher", "pw")
    pusher = RegistryClient(ghcr.registry_url, ca, credentials=("pusher", "pw"))
    scope = "repository:owner/app:pull,push"
    body = (await pusher.request(f"/v2/owner/app/manifests/{digest}", scope=scope)).body
    pushed = await pusher.request(
        "/v2/owner/app/manifests/oci",
        method="PUT",
        headers=[("content-type", MEDIA_OCI_MANIFEST)],
        body=body,
        scope=scope,
    )
    assert pushed.status == 201  # the same bytes, served by ghcr.io as an OCI manifest
    proxy = await start_proxy(
        registries=(registry("ghcr.io", ghcr),), cache_dir=str(tmp_path / "cache")
    )
    client = RegistryClient(proxy.url, ca)
    r = await client.request(f"/v2/library/alpine/manifests/{digest}", headers=ACCEPT)
    assert (r.status, r.headers["content-type"]) == (200, MEDIA_DOCKER_MANIFEST)
    r = await client.request(f"/v2/owner/app/manifests/{digest}?ns=ghcr.io", headers=ACCEPT)
    assert (r.status, r.headers["content-type"], r.body) == (200, MEDIA_OCI_MANIFEST, body)
    r = await client.request(f"/v2/library/alpine/manifests/{digest}", headers=ACCEPT)
    assert (r.status, r.headers["content-type"]) == (200, MEDIA_DOCKER_MANIFEST)


# -- verified before stored -----------------------------------------------------------------------


async def test_a_tag_whose_digest_header_disagrees_with_its_body_stores_nothing(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    hub.add_image("library/alpine", "3.20", [make_layer(7, 1000)])
    hub.lie_digest("library/alpine", "3.20", "sha256:" + "e" * 64)
    cache = tmp_path / "cache"
    proxy = await start_proxy(cache_dir=str(cache))
    r = await RegistryClient(proxy.url, ca).request(
        "/v2/library/alpine/manifests/3.20", headers=ACCEPT
    )
    assert (r.status, r.json()["errors"][0]["code"]) == (502, "UNAVAILABLE")
    assert manifest_files(proxy) == []
    assert stored(proxy, "tags") == []


async def test_a_manifest_whose_body_is_not_its_digest_stores_nothing(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    digest = hub.add_image("library/alpine", "3.20", [make_layer(8, 1000)])
    wrong = (
        b'{"schemaVersion": 2, "mediaType": "%s", "layers": []}' % MEDIA_DOCKER_MANIFEST.encode()
    )
    # the Docker-Content-Digest is the wrong body's own: only the asked digest reveals the swap
    hub.swap_manifest_body(digest, wrong, digest_header="body")
    cache = tmp_path / "cache"
    proxy = await start_proxy(cache_dir=str(cache))
    client = RegistryClient(proxy.url, ca)
    r = await client.request(f"/v2/library/alpine/manifests/{digest}", headers=ACCEPT)
    assert (r.status, r.json()["errors"][0]["code"]) == (502, "UNAVAILABLE")
    assert wrong not in r.body
    assert manifest_files(proxy) == []


async def test_a_damaged_manifest_is_not_served_by_the_next_process(
    hub: FakeHub, start_proxy: StartProxy, ca: trustme.CA, tmp_path: Path
) -> None:
    digest = hub.add_image("library/alpine", "3.20", [make_layer(9, 1000)])
    cache = tmp_path / "cache"
    first = await start_proxy(cache_dir=str(cache))
    r = await RegistryClient(first.url, ca).request(
        f"/v2/library/alpine/manifests/{digest}", headers=ACCEPT
    )
    good = r.body
    assert first.proxy.pullthrough is not None
    first.proxy.pullthrough.manifests.close()  # as the process would at its end
    damaged = bytearray(good)
    damaged[len(damaged) // 2] ^= 0x01
    with database(cache / "state.db") as conn:
        conn.execute("UPDATE manifests SET body = ?", (bytes(damaged),))
    second = await start_proxy(cache_dir=str(cache))  # a new process on the same cache
    r = await RegistryClient(second.url, ca).request(
        f"/v2/library/alpine/manifests/{digest}", headers=ACCEPT
    )
    assert r.status == 200
    assert r.body == good
    [(hexpart, body)] = [(row[0], row[3]) for row in stored(second, "manifests")]
    assert isinstance(body, bytes)
    assert hexpart == digest.removeprefix("sha256:") == hashlib.sha256(body).hexdigest()
