"""The pull tracker (policy/pulls): manifest and blob events in, one summary per pull out; no
sockets, no clock (times are passed in)."""

from __future__ import annotations

import json

import pytest

from hubproxy.policy import pulls
from hubproxy.policy.pulls import (
    MAX_LAYERS,
    RECENT,
    PullSummary,
    PullTracker,
    image_name,
    manifest_layers,
    summary_line,
)
from hubproxy.policy.sizes import format_decimal_size as format_size

CLIENT = "10.0.0.5"
REPO = "library/alpine"
LAYERS = tuple(f"sha256:{n:064x}" for n in range(1, 4))
CONFIG = "sha256:" + "c" * 64


def image_manifest(*layers: str) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"digest": CONFIG, "size": 10},
            "layers": [{"digest": d, "size": 10} for d in layers],
        }
    ).encode()


def get_manifest(
    tracker: PullTracker,
    now: float,
    *,
    reference: str = "3.20",
    layers: tuple[str, ...] | None = LAYERS,
    client: str = CLIENT,
    repository: str = REPO,
    method: str = "GET",
) -> list[PullSummary]:
    return tracker.manifest(
        client=client,
        repository=repository,
        reference=reference,
        method=method,
        layers=frozenset(layers) if layers is not None else None,
        size=1000,
        now=now,
        wall=1_714_564_800.0 + now,
    )


def get_blob(
    tracker: PullTracker,
    digest: str,
    now: float,
    *,
    size: int = 1_000_000,
    cached: bool = False,
    complete: bool = True,
    client: str = CLIENT,
) -> list[PullSummary]:
    return tracker.blob(
        client=client,
        repository=REPO,
        digest=digest,
        size=size,
        complete=complete,
        from_cache=cached,
        now=now,
    )


def test_a_pull_ends_with_its_last_layer() -> None:
    tracker = PullTracker()
    assert get_manifest(tracker, 0.0) == []
    assert get_blob(tracker, CONFIG, 0.1, size=500) == []  # the config blob is no layer
    assert get_blob(tracker, LAYERS[0], 0.4, cached=True) == []
    assert get_blob(tracker, LAYERS[1], 0.6, cached=True) == []
    [pull] = get_blob(tracker, LAYERS[2], 1.2, size=1_499_500)
    assert pull == PullSummary(
        client=CLIENT,
        image="library/alpine:3.20",
        started_wall=1_714_564_800.0,
        layers=3,
        layers_total=3,
        bytes=1000 + 500 + 3_499_500,
        from_cache=2,
        seconds=1.2,
        done=True,
    )
    assert summary_line(pull) == (
        "pulled library/alpine:3.20 (3 layers, 3.5 MB, 2 from cache, 1.2 s) for 10.0.0.5"
    )
    assert len(tracker) == 0 and tracker.next_deadline() is None
    assert tracker.recent() == (pull,)


def test_a_client_that_had_some_layers_is_reported_after_the_quiet_time() -> None:
    tracker = PullTracker(quiet=10.0)
    get_manifest(tracker, 0.0)
    get_blob(tracker, LAYERS[0], 2.0)
    assert tracker.next_deadline() == 12.0
    assert tracker.expire(11.9) == []
    [pull] = tracker.expire(12.0)
    assert summary_line(pull) == (
        "pulled library/alpine:3.20 (1 of 3 layers, 1.0 MB, 0 from cache, 2.0 s) for 10.0.0.5"
    )


def test_of_many_open_pulls_the_quiet_ones_end_and_the_busy_ones_stay() -> None:
    """Clients active at different times, some of them again later: the ones quiet for
    ``quiet`` end, in the order they went quiet, whatever order they began in."""
    tracker = PullTracker(quiet=10.0)
    for n in range(20):
        get_manifest(tracker, float(n), client=f"10.0.0.{n}")
    for when, n in enumerate((3, 0, 7)):
        get_blob(tracker, LAYERS[0], 20.0 + when, client=f"10.0.0.{n}")  # busy again later
    assert tracker.next_deadline() == 1.0 + 10.0  # 10.0.0.1, now the least recently active
    ended = tracker.expire(29.5)
    assert [pull.client for pull in ended] == [
        f"10.0.0.{n}" for n in range(20) if n not in (3, 0, 7)
    ]
    assert tracker.next_deadline() == 20.0 + 10.0  # 10.0.0.3
    assert [pull.client for pull in tracker.expire(30.0)] == ["10.0.0.3"]
    assert len(tracker) == 2


def test_an_index_then_the_platform_manifest_by_digest_is_one_pull() -> None:
    tracker = PullTracker()
    get_manifest(tracker, 0.0, layers=None)  # the index names manifests, not layers
    get_manifest(tracker, 0.1, reference="sha256:" + "d" * 64)
    for n, layer in enumerate(LAYERS):
        ended = get_blob(tracker, layer, 0.2 + n)
    [pull] = ended
    assert pull.image == "library/alpine:3.20" and pull.layers == 3
    assert pull.bytes == 2000 + 3_000_000


def test_a_head_alone_is_no_pull_but_names_the_tag() -> None:
    tracker = PullTracker(quiet=10.0)
    get_manifest(tracker, 0.0, method="HEAD", layers=None)  # docker: "Image is up to date"
    assert tracker.expire(100.0) == []
    assert tracker.recent() == ()
    # containerd: HEAD the tag, then GET the manifest by digest
    get_manifest(tracker, 200.0, method="HEAD", layers=None)
    get_manifest(tracker, 200.1, reference="sha256:" + "e" * 64, layers=LAYERS[:1])
    [pull] = get_blob(tracker, LAYERS[0], 200.5)
    assert summary_line(pull) == (
        "pulled library/alpine:3.20 (1 layer, 1.0 MB, 0 from cache, 0.5 s) for 10.0.0.5"
    )


def test_a_pull_by_digest_is_named_by_its_digest() -> None:
    tracker = PullTracker()
    get_manifest(tracker, 0.0, reference="sha256:" + "0123456789abcdef" * 4, layers=LAYERS[:1])
    [pull] = get_blob(tracker, LAYERS[0], 1.0)
    assert pull.image == "library/alpine@sha256:0123456789ab"


def test_another_tag_ends_the_previous_pull_and_clients_are_apart() -> None:
    tracker = PullTracker()
    get_manifest(tracker, 0.0)
    get_manifest(tracker, 0.1, client="10.0.0.6")
    get_blob(tracker, LAYERS[0], 0.2)
    [ended] = get_manifest(tracker, 0.5, reference="3.19")
    assert (ended.image, ended.client, ended.layers) == ("library/alpine:3.20", CLIENT, 1)
    assert len(tracker) == 2  # 10.0.0.6's pull of 3.20 and 10.0.0.5's of 3.19
    assert [p.image for p in tracker.recent()] == [
        "library/alpine:3.19",
        "library/alpine:3.20",
        "library/alpine:3.20",
    ]


def test_an_incomplete_layer_does_not_count_and_a_stray_blob_is_nobodys() -> None:
    tracker = PullTracker()
    assert get_blob(tracker, LAYERS[0], 0.0) == []  # no manifest first: not a pull
    assert len(tracker) == 0
    get_manifest(tracker, 1.0, layers=LAYERS[:1])
    assert get_blob(tracker, LAYERS[0], 1.5, complete=False, size=10) == []  # the client left
    [pull] = get_blob(tracker, LAYERS[0], 2.0)  # and came back for it
    assert (pull.layers, pull.bytes) == (1, 1000 + 10 + 1_000_000)


def test_a_pull_under_way_shows_in_recent() -> None:
    tracker = PullTracker()
    get_manifest(tracker, 0.0)
    get_blob(tracker, LAYERS[0], 1.0, cached=True)
    [pull] = tracker.recent()
    assert (pull.done, pull.layers, pull.layers_total, pull.from_cache) == (False, 1, 3, 1)


def test_memory_is_bounded() -> None:
    tracker = PullTracker(max_open=4)
    ended = []
    for n in range(10):
        ended += get_manifest(tracker, float(n), client=f"10.0.0.{n}")
    assert len(tracker) == 4
    assert [p.client for p in ended] == [f"10.0.0.{n}" for n in range(6)]  # oldest first
    for n in range(RECENT + 5):
        get_manifest(tracker, 100.0 + n, reference=f"t{n}")
    assert len(tracker.recent()) == RECENT
    many = tuple(f"sha256:{n:064x}" for n in range(MAX_LAYERS * 2))
    assert len(manifest_layers(image_manifest(*many)) or ()) == MAX_LAYERS


@pytest.mark.parametrize(
    ("body", "layers"),
    [
        (image_manifest(*LAYERS), frozenset(LAYERS)),
        (json.dumps({"schemaVersion": 1, "fsLayers": [{"blobSum": LAYERS[0]}]}).encode(),
         frozenset(LAYERS[:1])),
        (json.dumps({"schemaVersion": 2, "manifests": [{"digest": LAYERS[0]}]}).encode(), None),
        (b"not json", None),
        (b"\xff\xfe", None),
        (b"[1, 2]", None),
        (json.dumps({"layers": [{"digest": 5}, "x", {"digest": LAYERS[1]}]}).encode(),
         frozenset(LAYERS[1:2])),
    ],
)  # fmt: skip
def test_manifest_layers(body: bytes, layers: frozenset[str] | None) -> None:
    assert manifest_layers(body) == layers


@pytest.mark.parametrize(
    ("size", "text"),
    [(0, "0 B"), (999, "999 B"), (1000, "1.0 kB"), (3_500_000, "3.5 MB"), (2 * 10**12, "2.0 TB")],
)
def test_format_size(size: int, text: str) -> None:
    assert format_size(size) == text


def test_image_name() -> None:
    assert image_name("library/alpine", "3.20") == "library/alpine:3.20"
    assert image_name("ghcr.io/o/i", "sha256:" + "f" * 64) == "ghcr.io/o/i@sha256:ffffffffffff"


def test_unknown_layers_are_counted_as_blobs() -> None:
    tracker = PullTracker(quiet=5.0)
    get_manifest(tracker, 0.0, layers=None)
    get_blob(tracker, LAYERS[0], 1.0)
    get_blob(tracker, LAYERS[1], 2.0, cached=True)
    [pull] = tracker.expire(7.0)
    assert summary_line(pull) == (
        "pulled library/alpine:3.20 (2 blobs, 2.0 MB, 1 from cache, 2.0 s) for 10.0.0.5"
    )


def test_a_manifest_asked_for_again_is_parsed_once() -> None:
    body = json.dumps({"layers": [{"digest": "sha256:" + "ab" * 32}]}).encode()
    first = manifest_layers(body)
    hits = pulls._remembered_layers.cache_info().hits
    again = manifest_layers(bytes(bytearray(body)))  # an equal body, not the same object
    assert again == first == frozenset({"sha256:" + "ab" * 32})
    assert pulls._remembered_layers.cache_info().hits == hits + 1


def test_a_large_manifest_is_not_remembered() -> None:
    layers = [{"digest": f"sha256:{i:064x}"} for i in range(pulls.MAX_LAYERS)]
    body = json.dumps({"layers": layers, "pad": "x" * pulls.LAYERS_MEMO_BODY}).encode()
    before = pulls._remembered_layers.cache_info()
    found = manifest_layers(body)
    assert found is not None and len(found) == pulls.MAX_LAYERS
    after = pulls._remembered_layers.cache_info()
    assert (after.hits, after.misses) == (before.hits, before.misses)
