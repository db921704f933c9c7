"""Manifests and tag state in the cache store while instances run (``cache/sharedstate.py``):
an instance started later, while the others run and have never stopped, serves their images
with the upstream stopped; what it takes from the store is verified and judged by the local
rules; writes never delay a client."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest
import trio
import trustme

from hubproxy.cache.objects import LocalDirectory, open_object_store
from hubproxy.cache.shared import SharedStore
from hubproxy.cache.sharedstate import STATE_REFRESH, SharedState
from hubproxy.policy.cachepolicy import Readability
from hubproxy.policy.statesharing import (
    LATEST_READABLE,
    ReadabilityRecord,
    TagRecord,
    decode_link,
    decode_readability,
    decode_tag,
    encode_readability,
    encode_tag,
    link_key,
    manifest_key,
    readability_key,
    rewrite_due,
    tag_key,
    take_readability,
)
from tests import test_cachestore
from tests.conftest import RunningProxy, TLSFiles
from tests.fakehub import FakeHub, fetch, make_layer
from tests.registry_client import RegistryClient
from tests.test_cachestore import (
    ACCEPT,
    FakeS3,
    on_bucket,
    pull,
    pullthrough,
    run_instance,
    shared_of,
)
from tests.test_operations import metric_samples, sample
from tests.test_pullthrough import stoppable_hub

# a fresh bucket per test (the moto server and the credentials: conftest)
bucket = test_cachestore.bucket
DIGEST = "sha256:" + "ab" * 32

# -- policy: keys and records ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("repository", "expected"),
    [
        ("library/busybox", "tags/library/busybox/latest@"),
        ("ghcr.io/owner/app", "tags/ghcr.io/owner/app/latest@"),
        ("registry:5000/team/app", "tags/registry+5000/team/app/latest@"),
        ("../etc", None),
        ("a//b", None),
        ("a/./b", None),
        ("a b", None),
        ("", None),
    ],
)
def test_tag_keys_name_the_repository_or_nothing(repository: str, expected: str | None) -> None:
    key = tag_key(repository, "latest", "application/x")
    if expected is None:
        assert key is None
        assert link_key(repository, DIGEST) is None and readability_key(repository) is None
    else:
        assert key is not None and key.startswith(expected)
        other = tag_key("other", "latest", "application/x")
        assert other is not None and key.rsplit("@")[1] == other.rsplit("@")[1]


def test_every_kind_of_client_has_its_own_tag_key_and_odd_tags_none() -> None:
    one = tag_key("library/a", "1.0", "application/vnd.oci.image.index.v1+json")
    two = tag_key("library/a", "1.0", "")
    assert one is not None and two is not None and one != two
    assert tag_key("library/a", "-bad", "") is None
    assert tag_key("library/a", "a/b", "") is None
    assert link_key("library/a", DIGEST) == f"links/library/a@{'ab' * 32}"
    assert link_key("library/a", "sha512:" + "ab" * 64) is None
    assert link_key("library/a", "sha256:XYZ") is None
    assert manifest_key("ab" * 32) == f"manifests/{'ab' * 32}"


def test_records_round_trip_and_garbage_is_no_record() -> None:
    record = TagRecord(DIGEST, "application/vnd.oci.image.index.v1+json", "k", 1700000000.0)
    assert decode_tag(encode_tag(record), "k") == record
    assert decode_tag(encode_tag(record), "another kind of client") is None
    for junk in (b"", b"[]", b"{", b'{"digest": "sha256:00"}', b"\xff"):
        assert decode_tag(junk, "k") is None
        assert decode_readability(junk) is None
    readable = ReadabilityRecord("library/a", Readability(True, 1700000000.0))
    assert decode_readability(encode_readability(readable)) == readable
    assert decode_readability(b'{"repository": "a", "anonymous": 1, "learned_at": 1}') is None
    assert decode_link(b"application/vnd.oci.image.manifest.v1+json") is not None
    assert decode_link(b"") == "" and decode_link(b"\x00\n") is None


@pytest.mark.parametrize(
    ("previous", "content", "now", "due"),
    [
        (None, "d1", 0.0, True),
        (("d1", 100.0), "d1", 100.0 + STATE_REFRESH - 1, False),
        (("d1", 100.0), "d1", 100.0 + STATE_REFRESH, True),
        (("d1", 100.0), "d2", 101.0, True),  # the tag moved
        (("d1", 100.0), "d1", 50.0, True),  # a clock set back
    ],
)
def test_a_record_is_rewritten_when_it_changed_or_an_interval_later(
    previous: tuple[str, float] | None, content: str, now: float, due: bool
) -> None:
    assert rewrite_due(previous, content, now, STATE_REFRESH) is due


def test_only_a_more_recent_readability_answer_is_taken() -> None:
    old, new = Readability(True, 100.0), Readability(False, 200.0)
    assert take_readability(None, old)
    assert take_readability(old, new)
    assert not take_readability(new, old)
    assert not take_readability(new, new)


# -- the queue of writes --------------------------------------------------------------------------


async def test_writes_are_coalesced_and_bounded_with_one_warning_per_episode(
    tmp_path: Path, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    store = LocalDirectory(tmp_path / "store")
    (tmp_path / "tmp").mkdir()
    shared = SharedStore(store)
    state = SharedState(shared, tmp_path / "tmp")
    hexpart = "cd" * 32
    async with trio.open_nursery() as nursery:
        nursery.start_soon(state.run)
        for _ in range(3):  # resolved three times to one digest: written once
            state.tag_resolved("library/a", "latest", "k", hexpart, "application/x")
            await state.wait_idle()
        assert shared.state_writes == 1
        key = tag_key("library/a", "latest", "k")
        assert key is not None
        assert decode_tag(b"".join(store.chunks(key)), "k") is not None
        await trio.sleep(STATE_REFRESH)  # an hour later: written again
        state.tag_resolved("library/a", "latest", "k", hexpart, "application/x")
        await state.wait_idle()
        assert shared.state_writes == 2
        # the queue full: what does not fit is dropped, counted, said once per episode
        state.queue_limit = 0
        for n in range(5):
            state.manifest_stored(f"{n:064x}", b"{}")
        assert shared.state_dropped == 5
        state.queue_limit = 10
        state.manifest_stored("ee" * 32, b"{}")
        await state.wait_idle()
        state.queue_limit = 0
        state.manifest_stored("ff" * 32, b"{}")  # a new episode
        nursery.cancel_scope.cancel()
    said = [r for r in caplog.records if "fills its queue" in r.getMessage()]
    assert len(said) == 2 and shared.state_dropped == 6
    assert store.size(manifest_key("ee" * 32)) == 2  # the one that fit was written
    assert list((tmp_path / "tmp").iterdir()) == []  # no temporary file left


# -- instances on one bucket -----------------------------------------------------------------


async def fetch_metrics(
    proxy: RunningProxy, ca: trustme.CA
) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    page = await fetch(proxy.url + "/metrics", ca)
    return metric_samples(page.body.decode())


async def test_a_fourth_instance_started_while_three_run_serves_their_image_upstream_stopped(
    nursery: trio.Nursery,
    ca: trustme.CA,
    tls_files: TLSFiles,
    tmp_path: Path,
    bucket: str,
    moto_url: str,
) -> None:
    hub, hub_scope = await stoppable_hub(nursery, ca)
    hub.add_image("library/busybox", "latest", [make_layer(1, 300_000), make_layer(2, 4000)])
    running = [
        (await run_instance(nursery, hub, tls_files, **on_bucket(bucket, moto_url, tmp_path / n)))[
            0
        ]
        for n in ("one", "two", "three")
    ]
    blobs = await pull(running[1], ca, "library/busybox", "latest")
    state = pullthrough(running[1]).shared_state
    assert state is not None
    with trio.fail_after(10):
        await pullthrough(running[1]).wait_probes()  # "may anyone read it?", published too
        await shared_of(running[1]).wait_idle()
        await state.wait_idle()
    store = open_object_store(bucket, moto_url)
    assert store.list("state") == []  # nobody stopped: no snapshot to start from
    assert store.size(LATEST_READABLE) is not None
    hub_scope.cancel()  # the upstream goes away
    fourth, _ = await run_instance(
        nursery, hub, tls_files, **on_bucket(bucket, moto_url, tmp_path / "four")
    )
    client = RegistryClient(fourth.url, ca)
    ping = await client.request("/v2/")  # it knows no repository: the one others learned
    assert ping.status == 200
    assert await pull(fourth, ca, "library/busybox", "latest") == blobs
    shared = shared_of(fourth)
    # the tag, its manifest and readability, the blobs' links; the blobs themselves
    assert shared.state_reads >= 1 + len(blobs) and shared.state_refused == 0
    assert shared.reads == len(blobs)
    assert pullthrough(fourth).stats.stale_answers >= 1 + len(blobs)
    page = await fetch_metrics(fourth, ca)
    assert sample(page, "hubproxy_store_state_reads_total") == shared.state_reads
    page = await fetch_metrics(running[1], ca)
    assert sample(page, "hubproxy_store_state_writes_total") >= 6  # body, tag, 3 links, ...


async def test_a_new_instance_asks_the_upstream_only_head_for_a_tag_another_resolved(
    nursery: trio.Nursery,
    hub: FakeHub,
    ca: trustme.CA,
    tls_files: TLSFiles,
    tmp_path: Path,
    bucket: str,
    moto_url: str,
) -> None:
    """Warm while the upstream is up too: a tag another instance resolved costs a HEAD (the
    access check, not counted by Docker Hub) instead of a GET."""
    hub.add_image("library/alpine", "3.20", [make_layer(3, 1000)])
    first, _ = await run_instance(
        nursery, hub, tls_files, **on_bucket(bucket, moto_url, tmp_path / "one")
    )
    await pull(first, ca, "library/alpine", "3.20")
    state = pullthrough(first).shared_state
    assert state is not None
    with trio.fail_after(10):
        await state.wait_idle()
    second, _ = await run_instance(
        nursery, hub, tls_files, **on_bucket(bucket, moto_url, tmp_path / "two")
    )
    hub.requests.clear()
    answer = await RegistryClient(second.url, ca).request(
        "/v2/library/alpine/manifests/3.20", headers=ACCEPT
    )
    assert answer.status == 200
    # (the client's first try, without a token, is answered 401 as the upstream answers it)
    with_token = [
        s.method
        for s in hub.requests
        if "/manifests/" in s.target and s.headers.get("authorization")
    ]
    assert with_token == ["HEAD"]
    assert shared_of(second).state_reads == 1


async def test_a_manifest_changed_in_the_bucket_is_refused_and_never_served(
    nursery: trio.Nursery,
    ca: trustme.CA,
    tls_files: TLSFiles,
    tmp_path: Path,
    bucket: str,
    moto_url: str,
) -> None:
    hub, hub_scope = await stoppable_hub(nursery, ca)
    hub.add_image("library/busybox", "latest", [make_layer(4, 1000)])
    first, _ = await run_instance(
        nursery, hub, tls_files, **on_bucket(bucket, moto_url, tmp_path / "one")
    )
    client = RegistryClient(first.url, ca)
    good = await client.request("/v2/library/busybox/manifests/latest", headers=ACCEPT)
    state = pullthrough(first).shared_state
    assert good.status == 200 and state is not None
    with trio.fail_after(10):
        await pullthrough(first).wait_probes()
        await state.wait_idle()
    key = manifest_key(hashlib.sha256(good.body).hexdigest())
    store = open_object_store(bucket, moto_url)
    changed = tmp_path / "changed"
    changed.write_bytes(good.body.replace(b"sha256", b"sha257", 1))  # same size, other bytes
    store.put(key, changed)
    hub_scope.cancel()
    second, _ = await run_instance(
        nursery, hub, tls_files, **on_bucket(bucket, moto_url, tmp_path / "two")
    )
    answer = await RegistryClient(second.url, ca).request(
        "/v2/library/busybox/manifests/latest", headers=ACCEPT
    )
    assert answer.status != 200
    assert changed.read_bytes() not in answer.body
    shared = shared_of(second)
    assert shared.state_refused == 1 and shared.state_reads == 0
    assert store.size(key) is None  # deleted there: the next fetch from the upstream puts it back
    assert pullthrough(second).manifests.tag("library/busybox", "latest", frozenset()) is None


async def test_a_private_tag_from_the_bucket_is_not_served_stale_to_an_anonymous_client(
    nursery: trio.Nursery,
    ca: trustme.CA,
    tls_files: TLSFiles,
    tmp_path: Path,
    bucket: str,
    moto_url: str,
) -> None:
    """The rule of the local stale answer, unchanged: only in a repository anyone may read."""
    hub, hub_scope = await stoppable_hub(nursery, ca)
    hub.add_image("acme/secret", "v1", [make_layer(5, 1000)])
    hub.add_user("alice", "s3cret")
    hub.make_private("acme/secret", "alice")
    first, _ = await run_instance(
        nursery, hub, tls_files, **on_bucket(bucket, moto_url, tmp_path / "one")
    )
    alice = RegistryClient(first.url, ca, credentials=("alice", "s3cret"))
    secret = await alice.request("/v2/acme/secret/manifests/v1", headers=ACCEPT)
    state = pullthrough(first).shared_state
    assert secret.status == 200 and state is not None
    with trio.fail_after(10):
        await pullthrough(first).wait_probes()  # learned: not readable by anyone
        await state.wait_idle()
    assert pullthrough(first).manifests.readability["acme/secret"].anonymous is False
    hub_scope.cancel()
    second, _ = await run_instance(
        nursery, hub, tls_files, **on_bucket(bucket, moto_url, tmp_path / "two")
    )
    answers = []
    for proxy in (first, second):  # its own stale state, and the state taken from the bucket
        answer = await RegistryClient(proxy.url, ca).request(
            "/v2/acme/secret/manifests/v1", headers=ACCEPT
        )
        answers.append(answer.status)
        assert answer.status != 200 and secret.body not in answer.body
    assert answers[0] == answers[1]
    shared = shared_of(second)
    assert shared.state_reads == 1  # it was taken, and judged as the local state is
    assert pullthrough(second).manifests.readability["acme/secret"].anonymous is False
    assert pullthrough(second).stats.stale_answers == 0


async def test_writes_never_delay_a_pull(
    nursery: trio.Nursery,
    hub: FakeHub,
    ca: trustme.CA,
    tls_files: TLSFiles,
    tmp_path: Path,
    bucket: str,
    moto_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A store that never answers a write: pulls complete, the writes wait in their bounded
    queue, and beyond it are dropped (one warning)."""
    caplog.set_level(logging.WARNING)
    hub.add_image("library/one", "latest", [make_layer(6, 2000)])
    hub.add_image("library/two", "latest", [make_layer(7, 2000)])
    proxy, _ = await run_instance(
        nursery, hub, tls_files, **on_bucket(bucket, moto_url, tmp_path / "one")
    )
    fake = FakeS3()
    fake.silent_puts = True
    await nursery.start(fake.serve)
    shared = shared_of(proxy)
    shared.objects = open_object_store("s3://shared/mirror", fake.url)
    state = pullthrough(proxy).shared_state
    assert state is not None
    with trio.fail_after(20):  # a guard only: a pull waiting on a write would never end
        assert len(await pull(proxy, ca, "library/one", "latest")) == 2
    assert state.queued >= 2 and shared.state_writes == 0  # waiting, not lost
    state.queue_limit = state.queued  # full
    with trio.fail_after(20):
        assert len(await pull(proxy, ca, "library/two", "latest")) == 2
    assert shared.state_dropped >= 2
    said = [r for r in caplog.records if "fills its queue" in r.getMessage()]
    assert len(said) == 1
