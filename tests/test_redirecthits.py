"""``--redirect-hits``: a hit on a blob held in the shared store is a 307 to a presigned URL of
it, after the same access rules as any hit; against moto's S3 server (``test_cachestore``'s
fixtures). moto answers presigned GETs (and Range on them) but does not check their signature:
that the URL is signed is checked here by its query, not by moto refusing a forged one."""

from __future__ import annotations

import hashlib
import logging
import shutil
import urllib.parse
from datetime import timedelta
from pathlib import Path

import pytest
import trio
import trustme

from hubproxy.cache.objects import LocalDirectory, StoreUnusable, blob_key
from hubproxy.cache.shared import SharedStore
from hubproxy.cli import UsageError, load_settings
from hubproxy.policy.cachepolicy import AskUpstream, Fill, Forward, ServeCache, ServeStale
from hubproxy.policy.peers import PEER_MARKER
from hubproxy.policy.redirecthits import (
    KNOWN_FOR,
    PRESIGN_EXPIRY,
    known_in_store,
    loggable_url,
    may_redirect,
    redirect_headers,
    redirect_hit,
)
from tests import test_cachestore
from tests.conftest import TLSFiles
from tests.fakehub import FakeHub, fetch, make_layer, sha256_digest
from tests.registry_client import RegistryClient
from tests.test_cachestore import (
    on_bucket,
    pull,
    pullthrough,
    run_instance,
    shared_of,
)
from tests.test_operations import metric_samples, sample
from tests.test_skopeo import Skopeo, check_dir_copy

pytest.importorskip("obstore")
# a fresh bucket per test, as test_cachestore has it (the moto server: conftest)
bucket = test_cachestore.bucket


# -- policy -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("enabled", "method", "from_peer", "expected"),
    [
        (True, "GET", False, True),
        (False, "GET", False, False),  # off by default
        (True, "HEAD", False, False),  # answered by the mirror as before
        (True, "GET", True, False),  # a peer wants the bytes for its own cache
    ],
)
def test_which_requests_may_be_redirected(
    enabled: bool, method: str, from_peer: bool, expected: bool
) -> None:
    assert may_redirect(enabled=enabled, method=method, from_peer=from_peer) is expected


@pytest.mark.parametrize(
    ("decision", "candidate", "in_store", "expected"),
    [
        (ServeCache(), True, True, True),
        (ServeStale(), True, True, True),  # the upstream down, a repository anyone may read
        (ServeCache(), True, False, False),  # only in the local cache: streamed
        (ServeCache(), False, True, False),
        (AskUpstream(), True, True, False),  # the access check is not done yet
        (Forward(), True, True, False),  # the upstream refused this client: its answer
        (Fill(), True, True, False),
    ],
)
def test_only_a_hit_the_access_rules_passed_is_redirected(
    decision: ServeCache | ServeStale | AskUpstream | Forward | Fill,
    candidate: bool,
    in_store: bool,
    expected: bool,
) -> None:
    assert redirect_hit(decision, candidate=candidate, in_store=in_store) is expected


def test_a_blob_known_in_the_store_is_looked_up_again_after_a_while() -> None:
    assert not known_in_store(None, 100.0)
    assert known_in_store(100.0, 100.0 + KNOWN_FOR - 1)
    assert not known_in_store(100.0, 100.0 + KNOWN_FOR)
    assert 60 <= PRESIGN_EXPIRY <= 15 * 60  # minutes, not hours: the URL is a bearer capability


def test_a_presigned_url_is_logged_without_its_signature() -> None:
    url = "http://s3.example:9000/b/k/blobs/sha256/ab/abc?X-Amz-Expires=300&X-Amz-Signature=f00"
    assert loggable_url(url) == "http://s3.example:9000/b/k/blobs/sha256/ab/abc"
    headers = dict(redirect_headers(url, "sha256:abc"))
    assert headers[b"location"] == url.encode()
    assert headers[b"docker-content-digest"] == b"sha256:abc"
    assert headers[b"content-length"] == b"0" and headers[b"cache-control"] == b"no-store"


def test_a_local_directory_has_no_urls(tmp_path: Path) -> None:
    assert LocalDirectory(tmp_path).presign("blobs/x", timedelta(minutes=1)) is None


def test_the_flag_needs_a_cache_store() -> None:
    with pytest.raises(UsageError, match=r"--redirect-hits: needs --cache-store s3://"):
        load_settings(["--redirect-hits"])
    with pytest.raises(UsageError, match=r"--redirect-hits: needs --cache-store"):
        load_settings(["--redirect-hits", "--cache-store", "s3://b/p", "--no-cache"])
    _, config = load_settings(["--redirect-hits", "--cache-store", "s3://b/p"])
    assert config.redirect_hits
    _, config = load_settings(["--cache-store", "s3://b/p"])
    assert not config.redirect_hits


# -- against moto's S3 server -------------------------------------------------------------------


def redirects(proxy_metrics: str) -> float:
    return sample(metric_samples(proxy_metrics), "hubproxy_store_redirects_total")


async def test_a_hit_is_a_307_to_a_url_of_the_store_serving_its_bytes(
    nursery: trio.Nursery,
    hub: FakeHub,
    ca: trustme.CA,
    tls_files: TLSFiles,
    tmp_path: Path,
    bucket: str,
    moto_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    layer = make_layer(1, 300_000)
    hub.add_image("library/busybox", "latest", [layer])
    proxy, _ = await run_instance(
        nursery,
        hub,
        tls_files,
        redirect_hits=True,
        **on_bucket(bucket, moto_url, tmp_path / "one"),
    )
    digest = sha256_digest(layer)
    blobs = await pull(proxy, ca, "library/busybox", "latest")  # misses: streamed, committed
    shared = shared_of(proxy)
    with trio.fail_after(10):
        await shared.wait_idle()
    assert shared.redirects == 0 and shared.commits == len(blobs)
    client = RegistryClient(proxy.url, ca)
    path = f"/v2/library/busybox/blobs/{digest}"
    answer = await client.request(path)
    assert answer.status == 307 and answer.body == b""
    assert answer.headers["docker-content-digest"] == digest
    assert answer.headers["cache-control"] == "no-store"
    location = answer.headers["location"]
    parts = urllib.parse.urlsplit(location)
    assert f"{parts.scheme}://{parts.netloc}" == moto_url
    assert parts.path.endswith(blob_key(digest.removeprefix("sha256:")))
    query = urllib.parse.parse_qs(parts.query)
    assert query["X-Amz-Expires"] == [str(int(PRESIGN_EXPIRY))] and "X-Amz-Signature" in query
    stored = await fetch(location, None)
    assert stored.status == 200 and stored.body == layer
    # a Range GET too: the client sends its Range again at the URL
    ranged = await client.request(path, headers=[("range", "bytes=10-19")])
    assert ranged.status == 307
    part = await fetch(ranged.headers["location"], None, headers=[("range", "bytes=10-19")])
    assert part.status == 206 and part.body == layer[10:20]
    # a HEAD is answered by the mirror, and a peer gets the bytes (for its own cache)
    head = await client.request(path, method="HEAD")
    assert head.status == 200 and head.headers["content-length"] == str(len(layer))
    peer = await client.request(path, headers=[(PEER_MARKER.decode(), "1")])
    assert peer.status == 200 and peer.body == layer
    assert shared.redirects == 2
    assert pullthrough(proxy).stats.hits >= 2
    metrics = await fetch(f"{proxy.url}/metrics", ca)
    assert redirects(metrics.body.decode()) == 2
    # the signature is never logged (the access log names the redirect, not the URL)
    assert not [r for r in caplog.records if "Signature" in r.getMessage()]
    assert any("upstream=redirect" in r.getMessage() for r in caplog.records)


async def test_a_client_the_upstream_refuses_gets_its_refusal_never_a_url(
    nursery: trio.Nursery,
    hub: FakeHub,
    ca: trustme.CA,
    tls_files: TLSFiles,
    tmp_path: Path,
    bucket: str,
    moto_url: str,
) -> None:
    layer = make_layer(2, 20_000)
    hub.add_image("acme/secret", "v1", [layer])
    hub.add_user("alice", "s3cret")
    hub.add_user("mallory", "m4llory")
    hub.make_private("acme/secret", "alice")
    proxy, _ = await run_instance(
        nursery,
        hub,
        tls_files,
        redirect_hits=True,
        **on_bucket(bucket, moto_url, tmp_path / "one"),
    )
    digest = sha256_digest(layer)
    path = f"/v2/acme/secret/blobs/{digest}"
    alice = RegistryClient(proxy.url, ca, credentials=("alice", "s3cret"))
    assert (await alice.request(path)).body == layer  # the miss: streamed, committed
    await proxy.fills_ended()
    shared = shared_of(proxy)
    with trio.fail_after(10):
        await shared.wait_idle()
    assert (await alice.request(path)).status == 307  # her hit
    for stranger in (
        RegistryClient(proxy.url, ca),
        RegistryClient(proxy.url, ca, credentials=("mallory", "m4llory")),
    ):
        answer = await stranger.request(path)
        direct = await RegistryClient(
            hub.registry_url, ca, credentials=stranger.credentials
        ).request(path)
        assert answer.status == direct.status and answer.status in (401, 403, 404)
        assert "location" not in answer.headers and layer not in answer.body
    # nor under the name of a public repository that never held it
    hub.add_image("library/busybox", "latest", [make_layer(3, 1000)])
    answer = await RegistryClient(proxy.url, ca).request(f"/v2/library/busybox/blobs/{digest}")
    assert answer.status == 404 and "location" not in answer.headers
    assert shared.redirects == 1


async def test_a_blob_not_in_the_store_is_streamed(
    nursery: trio.Nursery,
    hub: FakeHub,
    ca: trustme.CA,
    tls_files: TLSFiles,
    tmp_path: Path,
    bucket: str,
    moto_url: str,
) -> None:
    """A blob too large to commit stays in the local cache only: its hits are streamed; so
    are the hits of a blob in the store while it cannot sign a URL."""
    large = make_layer(4, 40_000)
    hub.add_image("library/large", "latest", [large])
    proxy, _ = await run_instance(
        nursery,
        hub,
        tls_files,
        redirect_hits=True,
        **on_bucket(bucket, moto_url, tmp_path / "one"),
    )
    shared = shared_of(proxy)
    shared.commit_memory = 20_000
    blobs = await pull(proxy, ca, "library/large", "latest")
    with trio.fail_after(10):
        await shared.wait_idle()
    assert shared.too_large == 1
    answer = await RegistryClient(proxy.url, ca).request(
        f"/v2/library/large/blobs/{sha256_digest(large)}"
    )
    assert answer.status == 200 and answer.body == large
    assert answer.headers["x-cache"] == "HIT" and shared.redirects == 0
    config_path = f"/v2/library/large/blobs/{next(d for d in blobs if d != sha256_digest(large))}"
    assert (await RegistryClient(proxy.url, ca).request(config_path)).status == 307
    shared.objects = LocalDirectory(tmp_path / "no-urls")  # a store that cannot sign one
    answer = await RegistryClient(proxy.url, ca).request(config_path)
    assert answer.status == 200 and answer.headers["x-cache"] == "HIT"
    assert answer.body == blobs[config_path.rsplit("/", 1)[1]] and shared.redirects == 1


async def test_a_store_without_urls_is_refused_for_the_flag(tmp_path: Path) -> None:
    shared = SharedStore(LocalDirectory(tmp_path))
    with pytest.raises(StoreUnusable, match=r"^--redirect-hits: .* has no URLs a client can"):
        await shared.check_presigning()


@pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo is not installed")
async def test_skopeo_follows_the_redirect_to_the_store(
    nursery: trio.Nursery,
    hub: FakeHub,
    ca: trustme.CA,
    tls_files: TLSFiles,
    tmp_path: Path,
    bucket: str,
    moto_url: str,
) -> None:
    layers = [make_layer(5, 200_000), make_layer(6, 3000)]
    hub.add_image("library/alpine", "3.20", layers)
    proxy, _ = await run_instance(
        nursery,
        hub,
        tls_files,
        redirect_hits=True,
        **on_bucket(bucket, moto_url, tmp_path / "one"),
    )
    skopeo = Skopeo(proxy, tls_files, tmp_path)
    source = ["--src-cert-dir", skopeo.cert_dir]
    await skopeo.run("copy", *source, skopeo.ref("alpine:3.20"), f"dir:{tmp_path / 'first'}")
    shared = shared_of(proxy)
    with trio.fail_after(10):
        await shared.wait_idle()
    assert shared.redirects == 0
    target = tmp_path / "second"
    await skopeo.run("copy", *source, skopeo.ref("alpine:3.20"), f"dir:{target}")
    checked = check_dir_copy(target)  # skopeo verified and wrote every blob by its digest
    for layer in layers:
        assert hashlib.sha256(layer).hexdigest() in checked
    assert shared.redirects == len(layers) + 1  # and the config blob
