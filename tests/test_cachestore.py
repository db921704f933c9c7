"""The shared cache store (``--cache-store s3://...``) against a real S3 server: moto's server
mode, one process for the session, a fresh bucket per test."""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import sys
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
import trustme

from hubproxy.app import App, StartupError, serve
from hubproxy.cache.objects import (
    INSTALL_HINT,
    LocalDirectory,
    StoreUnusable,
    aws_profile,
    blob_key,
    open_object_store,
    parse_store_url,
    probe_conditional_put,
)
from hubproxy.cache.pullthrough import PullThrough
from hubproxy.cache.shared import SharedStore
from tests.conftest import RunningProxy, TLSFiles, make_config
from tests.fakehub import MEDIA_DOCKER_MANIFEST, FakeHub, fetch, make_layer
from tests.registry_client import RegistryClient
from tests.test_operations import metric_samples, sample
from tests.test_pullthrough import stoppable_hub
from tests.test_statuspage import _rows as status_rows

obstore = pytest.importorskip("obstore")
ACCEPT = [("accept", MEDIA_DOCKER_MANIFEST)]


@pytest.fixture
async def bucket(moto_url: str, aws_env: None) -> str:
    """A fresh bucket's --cache-store URL."""
    name = f"cache-{secrets.token_hex(4)}"
    answer = await fetch(f"{moto_url}/{name}", None, method="PUT")
    assert answer.status == 200
    return f"s3://{name}/mirror"


def pullthrough(proxy: RunningProxy) -> PullThrough:
    assert proxy.proxy.pullthrough is not None
    return proxy.proxy.pullthrough


def shared_of(proxy: RunningProxy) -> SharedStore:
    shared = pullthrough(proxy).blobs.shared
    assert isinstance(shared, SharedStore)
    return shared


def bucket_keys(url: str, endpoint: str) -> dict[str, int]:
    return dict(open_object_store(url, endpoint).list("blobs"))


async def pull(proxy: RunningProxy, ca: trustme.CA, repo: str, tag: str) -> dict[str, bytes]:
    """Pull an image as a client does: the manifest by tag, then its config and layers."""
    client = RegistryClient(proxy.url, ca)
    manifest = await client.request(f"/v2/{repo}/manifests/{tag}", headers=ACCEPT)
    assert manifest.status == 200, manifest.body
    doc = manifest.json()
    got = {}
    for descriptor in [doc["config"], *doc["layers"]]:
        digest = descriptor["digest"]
        answer = await client.request(f"/v2/{repo}/blobs/{digest}")
        assert answer.status == 200 and answer.complete
        assert "sha256:" + hashlib.sha256(answer.body).hexdigest() == digest
        got[digest] = answer.body
    await proxy.fills_ended()  # its blobs in the cache, and on their way to the bucket
    return got


class Instance:
    """A hubproxy that can be stopped (its shutdown saves the manifest state to the store)."""

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.stopped = trio.Event()

    async def stop(self) -> None:
        self.scope.cancel()
        await self.stopped.wait()


async def run_instance(
    nursery: trio.Nursery, hub: FakeHub, tls_files: TLSFiles, **overrides: Any
) -> tuple[RunningProxy, Instance]:
    config = make_config(hub, tls_files, **overrides)
    instance = Instance()

    async def run(*, task_status: trio.TaskStatus[App]) -> None:
        try:
            with instance.scope:
                await serve(config, task_status=task_status)
        finally:
            instance.stopped.set()

    app: App = await nursery.start(run)
    host, port = app.server.bound[0]
    return RunningProxy(f"https://{host}:{port}", app, config), instance


def on_bucket(bucket: str, moto_url: str, directory: Path) -> dict[str, Any]:
    """The settings of an instance with a cache directory of its own on the shared bucket."""
    return {"cache_dir": str(directory), "cache_store": bucket, "s3_endpoint": moto_url}


async def warm_bucket(
    nursery: trio.Nursery,
    ca: trustme.CA,
    tls_files: TLSFiles,
    tmp_path: Path,
    bucket: str,
    moto_url: str,
) -> tuple[FakeHub, trio.CancelScope, dict[str, bytes]]:
    """A first instance pulls an image (its blobs committed to the bucket) and stops."""
    hub, hub_scope = await stoppable_hub(nursery, ca)
    layers = [make_layer(1, 300_000), make_layer(2, 4000)]
    hub.add_image("library/busybox", "latest", layers)
    first, stop = await run_instance(
        nursery, hub, tls_files, **on_bucket(bucket, moto_url, tmp_path / "one")
    )
    blobs = await pull(first, ca, "library/busybox", "latest")
    shared = shared_of(first)
    with trio.fail_after(10):
        await pullthrough(first).wait_probes()  # "may anyone read it?", kept in the state
        await shared.wait_idle()
    assert shared.commits == len(blobs)
    await stop.stop()
    return hub, hub_scope, blobs


async def test_a_pull_commits_its_verified_blobs_to_the_bucket(
    nursery: trio.Nursery,
    ca: trustme.CA,
    tls_files: TLSFiles,
    tmp_path: Path,
    bucket: str,
    moto_url: str,
) -> None:
    _hub, _scope, blobs = await warm_bucket(nursery, ca, tls_files, tmp_path, bucket, moto_url)
    keys = bucket_keys(bucket, moto_url)
    assert keys == {blob_key(d.removeprefix("sha256:")): len(b) for d, b in blobs.items()}
    store = open_object_store(bucket, moto_url)
    assert [key for key, _ in store.list("state")] == ["state/state.db"]
    assert store.list("probe") == []  # the start's probe is cleaned up


async def test_a_new_instance_serves_from_the_bucket_with_the_upstream_down(
    nursery: trio.Nursery,
    ca: trustme.CA,
    tls_files: TLSFiles,
    tmp_path: Path,
    bucket: str,
    moto_url: str,
) -> None:
    hub, hub_scope, blobs = await warm_bucket(nursery, ca, tls_files, tmp_path, bucket, moto_url)
    hub_scope.cancel()  # the upstream goes away
    second, _ = await run_instance(
        nursery, hub, tls_files, **on_bucket(bucket, moto_url, tmp_path / "two")
    )
    assert await pull(second, ca, "library/busybox", "latest") == blobs
    shared = shared_of(second)
    assert shared.reads == len(blobs) and shared.commits == 0
    assert pullthrough(second).stats.stale_answers > 0
    for digest in blobs:  # now on its own disk too
        assert pullthrough(second).blobs.size_of(digest.removeprefix("sha256:")) is not None
    page = await fetch(second.url + "/metrics", ca)
    samples = metric_samples(page.body.decode())
    assert sample(samples, "hubproxy_store_reads_total") == len(blobs)
    assert sample(samples, "hubproxy_store_commits_total") == 0
    # the status page lists the store: where (no credentials), its counts, in use
    rows = dict(status_rows((await fetch(second.url + "/", ca)).body))
    assert rows["Store"] == f"{bucket} at {moto_url}"
    assert (rows["State"], rows["Blobs read into the cache"]) == ("in use", str(len(blobs)))
    assert rows["Blobs committed"] == "0"


async def test_a_blob_changed_in_the_bucket_is_never_completed_to_a_client(
    nursery: trio.Nursery,
    ca: trustme.CA,
    tls_files: TLSFiles,
    tmp_path: Path,
    bucket: str,
    moto_url: str,
) -> None:
    hub, _hub_scope, blobs = await warm_bucket(nursery, ca, tls_files, tmp_path, bucket, moto_url)
    digest, good = max(blobs.items(), key=lambda item: len(item[1]))
    key = blob_key(digest.removeprefix("sha256:"))
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF  # one flipped byte, same size
    changed = tmp_path / "changed"
    changed.write_bytes(bad)
    store = open_object_store(bucket, moto_url)
    store.put(key, changed)
    second, _ = await run_instance(
        nursery, hub, tls_files, **on_bucket(bucket, moto_url, tmp_path / "two")
    )
    client = RegistryClient(second.url, ca)
    answer = await client.request(f"/v2/library/busybox/blobs/{digest}")
    # a 502 or a cut transfer while following the fill from the bucket, or, once that fill
    # failed, the upstream's own bytes: never the changed ones completed
    if answer.status == 200 and answer.complete:
        assert answer.body == good
    assert answer.body != bytes(bad)
    assert pullthrough(second).stats.verification_failures >= 1
    await second.fills_ended()
    shared = shared_of(second)
    with trio.fail_after(10):
        await shared.wait_idle()
    # the changed object was deleted from the bucket, and the blob fetched from the upstream
    # (verified) committed again
    assert b"".join(store.chunks(key)) == good
    again = await client.request(f"/v2/library/busybox/blobs/{digest}")
    assert again.status == 200 and again.complete and again.body == good


class FakeS3:
    """A tiny S3 server from the public protocol, for what moto will not do: it ignores
    ``If-None-Match`` (every PUT succeeds, as a store without conditional writes does), and
    serves the objects in ``cut`` (by path) with their full Content-Length but only half the
    body, then closes the connection (a store failing mid-read). ``silent_puts``: a PUT is
    never answered (a store black-holing writes)."""

    def __init__(self) -> None:
        self.url = ""
        self.puts: list[str] = []
        self.silent_puts = False
        self.cut: dict[str, bytes] = {}
        self.gets = 0

    async def serve(self, *, task_status: trio.TaskStatus[None]) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        task_status.started()
        await trio.serve_listeners(self._connection, listeners)

    def _answer(self, method: bytes, target: str) -> tuple[int, list[tuple[str, str]], bytes]:
        headers = [("etag", '"0"'), ("last-modified", "Mon, 30 Nov 2026 05:00:00 GMT")]
        if method == b"PUT":
            self.puts.append(target)
            return 200, headers, b""
        if method == b"POST":  # DeleteObjects
            return 200, headers, b"<DeleteResult></DeleteResult>"
        data = self.cut.get(target.partition("?")[0])
        if data is None:
            return 404, [], b"<Error><Code>NoSuchKey</Code></Error>"
        if method == b"GET":
            self.gets += 1
        return 200, headers, data

    async def _connection(self, stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError):  # a client giving up on a cut
            await self._exchange(stream)

    async def _exchange(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        async with stream:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    conn.receive_data(data)
                    continue
                if isinstance(event, h11.Request):
                    method, target = event.method, event.target.decode()
                    continue
                if isinstance(event, h11.EndOfMessage):
                    if method == b"PUT" and self.silent_puts:
                        self.puts.append(target)
                        await trio.sleep_forever()
                    status, headers, body = self._answer(method, target)
                    headers.append(("content-length", str(len(body))))
                    out = conn.send(h11.Response(status_code=status, headers=headers)) or b""
                    if method == b"HEAD":
                        out += conn.send(h11.EndOfMessage()) or b""
                    elif method == b"GET" and status == 200:
                        await stream.send_all(out + body[: len(body) // 2])
                        return  # cut
                    else:
                        out += conn.send(h11.Data(data=body)) or b""
                        out += conn.send(h11.EndOfMessage()) or b""
                    await stream.send_all(out)
                    conn.start_next_cycle()
                    continue
                if isinstance(event, h11.ConnectionClosed):
                    return


async def test_a_store_that_ignores_conditional_puts_is_refused_at_start(
    nursery: trio.Nursery, hub: FakeHub, tls_files: TLSFiles, tmp_path: Path, aws_env: None
) -> None:
    fake = FakeS3()
    await nursery.start(fake.serve)
    config = make_config(
        hub,
        tls_files,
        cache_dir=str(tmp_path / "cache"),
        cache_store="s3://shared/mirror",
        s3_endpoint=fake.url,
    )
    with pytest.raises(StartupError, match=r"does not honour conditional puts \(If-None-Match"):
        await serve(config)
    assert len(fake.puts) == 2  # the probe key, put create-only twice
    assert fake.puts[0] == fake.puts[1] and "/shared/mirror/probe/" in fake.puts[0]


async def test_without_the_s3_extra_the_flag_says_how_to_install_it(
    hub: FakeHub, tls_files: TLSFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "obstore", None)  # as if not installed
    config = make_config(
        hub, tls_files, cache_dir=str(tmp_path / "cache"), cache_store="s3://shared"
    )
    with pytest.raises(StartupError) as caught:
        await serve(config)
    assert INSTALL_HINT in str(caught.value)
    assert INSTALL_HINT == "pip install 'hubproxy[s3]'"


@pytest.mark.parametrize(
    ("url", "bucket", "prefix"),
    [("s3://b", "b", ""), ("s3://b/", "b", ""), ("s3://b/a/c/", "b", "a/c")],
)
def test_store_urls_name_a_bucket_and_a_prefix(url: str, bucket: str, prefix: str) -> None:
    location = parse_store_url(url)
    assert (location.bucket, location.prefix) == (bucket, prefix)


@pytest.mark.parametrize("url", ["http://b/x", "s3://", "s3:///x", "s3://b/x?y=1", "b"])
def test_other_store_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError, match="s3://"):
        parse_store_url(url)
    with pytest.raises(StoreUnusable, match="--cache-store"):
        open_object_store(url)


def test_the_aws_profile_files_give_keys_and_region_the_environment_does_not(
    tmp_path: Path,
) -> None:
    (tmp_path / ".aws").mkdir()
    (tmp_path / ".aws" / "credentials").write_text(
        "[default]\naws_access_key_id = D\naws_secret_access_key = DS\n"
        "[work]\naws_access_key_id = W\naws_secret_access_key = WS\n"
    )
    (tmp_path / ".aws" / "config").write_text(
        "[default]\nregion = eu-west-1\n[profile work]\nregion = us-east-2\n"
    )
    assert aws_profile({}, tmp_path) == {
        "access_key_id": "D",
        "secret_access_key": "DS",
        "region": "eu-west-1",
    }
    assert aws_profile({"AWS_PROFILE": "work", "AWS_REGION": "x"}, tmp_path) == {
        "access_key_id": "W",
        "secret_access_key": "WS",
    }
    assert aws_profile({}, tmp_path / "nowhere") == {}


def test_the_local_directory_commits_create_only(tmp_path: Path) -> None:
    store = LocalDirectory(tmp_path / "store")
    source = tmp_path / "blob"
    source.write_bytes(b"hello blob")
    key = blob_key(hashlib.sha256(b"hello blob").hexdigest())
    assert store.put_new(key, source) is True
    source.unlink()  # a new file there: the committed one keeps its bytes
    source.write_bytes(b"other")
    assert store.put_new(key, source) is False
    assert store.read_range(key, 6, 10) == b"blob"
    assert b"".join(store.chunks(key)) == b"hello blob"
    assert store.list("blobs") == [(key, 10)]
    assert store.size(key) == 10 and store.size(blob_key("0" * 64)) is None
    probe_conditional_put(store, tmp_path / "scratch")  # it honours create-only
    assert store.list("probe") == []
    store.delete(key)
    assert store.list("blobs") == []
    assert sorted(os.listdir(tmp_path)) == ["blob", "store"]


async def test_blobs_larger_than_the_commit_memory_stay_local(
    nursery: trio.Nursery,
    hub: FakeHub,
    ca: trustme.CA,
    tls_files: TLSFiles,
    tmp_path: Path,
    bucket: str,
    moto_url: str,
) -> None:
    """A create-only put holds its body in memory: the commits' bytes are bounded, and a blob
    above the bound is kept by each instance only."""
    small, large = make_layer(5, 3000), make_layer(6, 40_000)
    hub.add_image("library/two", "latest", [small, large])
    proxy, _ = await run_instance(
        nursery, hub, tls_files, **on_bucket(bucket, moto_url, tmp_path / "one")
    )
    shared = shared_of(proxy)
    shared.commit_memory = 20_000
    blobs = await pull(proxy, ca, "library/two", "latest")
    with trio.fail_after(10):
        await shared.wait_idle()
    committed = bucket_keys(bucket, moto_url)
    assert blob_key(hashlib.sha256(large).hexdigest()) not in committed
    assert blob_key(hashlib.sha256(small).hexdigest()) in committed
    assert shared.too_large == 1 and len(committed) == len(blobs) - 1
    assert shared.committing_bytes == 0


async def test_a_store_that_fails_a_lookup_is_skipped_and_misses_go_upstream(
    nursery: trio.Nursery,
    hub: FakeHub,
    ca: trustme.CA,
    tls_files: TLSFiles,
    tmp_path: Path,
    bucket: str,
    moto_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    hub.add_image("library/gone", "latest", [make_layer(7, 2000), make_layer(8, 3000)])
    proxy, _ = await run_instance(
        nursery, hub, tls_files, **on_bucket(bucket, moto_url, tmp_path / "one")
    )
    shared = shared_of(proxy)
    closed = trio.socket.socket()  # a port nothing listens on: the store went away
    await closed.bind(("127.0.0.1", 0))
    shared.objects = open_object_store(bucket, f"http://127.0.0.1:{closed.getsockname()[1]}")
    closed.close()
    blobs = await pull(proxy, ca, "library/gone", "latest")
    assert len(blobs) == 3  # served from the upstream
    assert shared.resting_until > trio.current_time()
    lines = [r for r in caplog.records if "cannot look up" in r.getMessage()]
    assert len(lines) == 1 and "misses go to the upstream" in lines[0].getMessage()


async def test_a_store_failing_mid_read_costs_the_client_nothing(
    nursery: trio.Nursery,
    hub: FakeHub,
    ca: trustme.CA,
    tls_files: TLSFiles,
    tmp_path: Path,
    bucket: str,
    moto_url: str,
) -> None:
    """A blob the store stops sending halfway: the client's transfer finishes from the
    upstream (a Range request), the whole blob verified."""
    layer = make_layer(9, 200_000)
    hub.add_image("library/cut", "latest", [layer])
    proxy, _ = await run_instance(
        nursery, hub, tls_files, **on_bucket(bucket, moto_url, tmp_path / "one")
    )
    fake = FakeS3()
    await nursery.start(fake.serve)
    key = blob_key(hashlib.sha256(layer).hexdigest())
    fake.cut[f"/shared/mirror/{key}"] = layer
    shared = shared_of(proxy)
    shared.objects = open_object_store("s3://shared/mirror", fake.url)
    client = RegistryClient(proxy.url, ca)
    answer = await client.request(f"/v2/library/cut/blobs/sha256:{key.rsplit('/', 1)[1]}")
    assert answer.status == 200 and answer.complete and answer.body == layer
    assert fake.gets >= 1 and shared.reads == 0
