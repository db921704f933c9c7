"""The pull-through decisions (``cachepolicy.py``) as tables: no sockets, no clock."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from hubproxy.policy.cachepolicy import (
    ACCESS_CONFIRMATION_TTL,
    READABILITY_REFRESH,
    READABILITY_WINDOW,
    AskUpstream,
    CacheRequest,
    ConfirmationKey,
    Confirmations,
    Decision,
    Fill,
    Forward,
    Kind,
    ManifestReferences,
    Readability,
    ServeCache,
    ServeStale,
    UpstreamVerdict,
    access_check_headers,
    admit_fetches,
    after_upstream,
    anonymously_readable,
    confirmation_key,
    decide,
    fetch_share,
    fits_in_memory,
    identity_settled,
    keep_manifest,
    manifest_references,
    manifest_verified,
    may_share_fetch,
    ping_stale_allowed,
    should_probe,
    stale_allowed,
    tag_current,
    tag_fresh,
    upstream_unavailable,
    verdict,
    vouched_paths,
)

ALLOWED, DENIED, UNAVAILABLE = (
    UpstreamVerdict.ALLOWED,
    UpstreamVerdict.DENIED,
    UpstreamVerdict.UNAVAILABLE,
)
LOCATION = [(b"location", b"https://cdn.example/blob")]


@pytest.mark.parametrize(
    ("status", "unavailable"),
    [(200, False), (404, False), (428, False), (429, True), (499, False), (500, True),
     (501, True), (502, True), (503, True), (599, True)],
)  # fmt: skip
def test_upstream_unavailable(status: int, unavailable: bool) -> None:
    assert upstream_unavailable(status) is unavailable


@pytest.mark.parametrize(
    ("status", "headers", "kind", "expected"),
    [
        (200, [], Kind.MANIFEST, ALLOWED),
        (200, [], Kind.BLOB, ALLOWED),
        (307, LOCATION, Kind.BLOB, ALLOWED),  # Docker Hub sends blobs to its CDN
        (301, LOCATION, Kind.BLOB, ALLOWED),
        (302, LOCATION, Kind.BLOB, ALLOWED),
        (303, LOCATION, Kind.BLOB, ALLOWED),
        (308, LOCATION, Kind.BLOB, ALLOWED),
        (307, [], Kind.BLOB, DENIED),  # a redirect to nowhere says nothing
        (302, [(b"location", b"")], Kind.BLOB, DENIED),
        (307, LOCATION, Kind.MANIFEST, DENIED),  # a registry serves manifests itself
        (304, [], Kind.MANIFEST, DENIED),  # a condition's answer, not "you may read it"
        (304, LOCATION, Kind.BLOB, DENIED),
        (300, LOCATION, Kind.BLOB, DENIED),
        (305, LOCATION, Kind.BLOB, DENIED),
        (204, [], Kind.MANIFEST, DENIED),
        (206, [], Kind.BLOB, DENIED),
        (401, [], Kind.MANIFEST, DENIED),
        (403, [], Kind.BLOB, DENIED),
        (404, [], Kind.BLOB, DENIED),
        (429, [], Kind.MANIFEST, UNAVAILABLE),
        (500, [], Kind.MANIFEST, UNAVAILABLE),
        (503, LOCATION, Kind.BLOB, UNAVAILABLE),
    ],
)
def test_verdict(
    status: int, headers: list[tuple[bytes, bytes]], kind: Kind, expected: UpstreamVerdict
) -> None:
    assert verdict(status, headers, kind=kind) is expected


def test_access_check_headers_drop_conditions_and_ranges() -> None:
    headers = [
        (b"authorization", b"Bearer t"),
        (b"accept", b"application/vnd.oci.image.index.v1+json"),
        (b"if-none-match", b'"sha256:abc"'),
        (b"if-modified-since", b"Sat, 29 Oct 1994 19:43:31 GMT"),
        (b"if-match", b"*"),
        (b"if-unmodified-since", b"Sat, 29 Oct 1994 19:43:31 GMT"),
        (b"if-range", b'"x"'),
        (b"range", b"bytes=0-9"),
        (b"user-agent", b"docker/27"),
    ]
    assert access_check_headers(headers) == [
        (b"authorization", b"Bearer t"),
        (b"accept", b"application/vnd.oci.image.index.v1+json"),
        (b"user-agent", b"docker/27"),
    ]


def test_confirmation_keys_name_credentials_registry_and_path() -> None:
    path = "/v2/acme/app/blobs/sha256:" + "a" * 64
    key = confirmation_key(b"Bearer t", "", path)
    assert key == confirmation_key(b"Bearer t", "", path)
    assert key != confirmation_key(b"Bearer t", "ghcr.io", path)
    assert key != confirmation_key(b"Bearer u", "", path)
    assert key != confirmation_key(None, "", path)
    assert key != confirmation_key(b"Bearer t", "", path.replace("acme", "other"))
    assert "Bearer" not in repr(key)  # the credentials are kept hashed


def test_confirmations_expire() -> None:
    confirmations = Confirmations()
    key = confirmation_key(b"Bearer t", "", "/v2/a/b/manifests/x")
    assert not confirmations.confirmed(key, 100.0)
    confirmations.remember(key, 100.0)
    assert confirmations.confirmed(key, 100.0)
    assert confirmations.confirmed(key, 100.0 + ACCESS_CONFIRMATION_TTL - 0.01)
    assert not confirmations.confirmed(key, 100.0 + ACCESS_CONFIRMATION_TTL)


def test_a_carried_confirmation_expires_with_the_one_it_came_from() -> None:
    confirmations = Confirmations()
    manifest = confirmation_key(b"Bearer t", "", "/v2/a/b/manifests/x")
    blob = confirmation_key(b"Bearer t", "", "/v2/a/b/blobs/sha256:" + "1" * 64)
    assert confirmations.expiry(manifest, 100.0) is None
    confirmations.remember(manifest, 100.0)
    until = confirmations.expiry(manifest, 130.0)
    assert until == 100.0 + ACCESS_CONFIRMATION_TTL
    assert confirmations.carry(blob, until, 130.0)
    assert confirmations.expiry(blob, 130.0) == until  # not 130 + TTL
    assert not confirmations.confirmed(blob, until)
    confirmations.remember(blob, 150.0)  # its own, later: a carry never shortens it
    assert confirmations.carry(blob, until, 150.0)
    assert confirmations.expiry(blob, 150.0) == 150.0 + ACCESS_CONFIRMATION_TTL


def test_a_confirmation_is_passed_on_once_and_again_once_renewed() -> None:
    confirmations = Confirmations()
    manifest = confirmation_key(b"Bearer t", "", "/v2/a/b/manifests/x")
    confirmations.remember(manifest, 100.0)
    until = 100.0 + ACCESS_CONFIRMATION_TTL
    assert confirmations.first_pass(manifest, until, 100.0)
    assert not confirmations.first_pass(manifest, until, 110.0)  # served again on it
    confirmations.remember(manifest, 170.0)  # expired and asked again
    assert confirmations.first_pass(manifest, 170.0 + ACCESS_CONFIRMATION_TTL, 170.0)


def test_carrying_never_grows_a_full_table(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("hubproxy.policy.cachepolicy.MAX_CONFIRMATIONS", 3)
    confirmations = Confirmations()
    keys = [confirmation_key(b"", "", f"/v2/a/blobs/{n}") for n in range(5)]
    for key in keys[:3]:
        confirmations.remember(key, 0.0)
    assert not confirmations.carry(keys[3], 50.0, 1.0)  # three live ones: no room
    assert not confirmations.confirmed(keys[3], 1.0)
    assert confirmations.carry(keys[3], 200.0, 100.0)  # the three expired: dropped
    assert confirmations.confirmed(keys[3], 100.0)
    assert not confirmations.confirmed(keys[0], 100.0)


IMAGE = {
    "schemaVersion": 2,
    "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "x", "size": 2, "digest": "sha256:" + "c" * 64},
    "layers": [
        {"mediaType": "y", "size": 3, "digest": "sha256:" + "1" * 64},
        {"mediaType": "y", "size": 4, "digest": "sha256:" + "2" * 64},
    ],
}
INDEX = {
    "schemaVersion": 2,
    "mediaType": "application/vnd.oci.image.index.v1+json",
    "manifests": [{"mediaType": "z", "size": 9, "digest": "sha256:" + "a" * 64}],
}


def test_a_manifest_names_its_config_and_layers_an_index_its_manifests() -> None:
    assert manifest_references(json.dumps(IMAGE).encode(), "") == (
        ("blobs", "sha256:" + "c" * 64),
        ("blobs", "sha256:" + "1" * 64),
        ("blobs", "sha256:" + "2" * 64),
    )
    assert manifest_references(json.dumps(INDEX).encode(), "") == (
        ("manifests", "sha256:" + "a" * 64),
    )
    for junk in (b"", b"[]", b"{", json.dumps({**IMAGE, "layers": "no"}).encode()):
        assert manifest_references(junk, "") == ()
    schema1 = json.dumps({"schemaVersion": 1, "fsLayers": [{"blobSum": "sha256:" + "1" * 64}]})
    assert manifest_references(schema1.encode(), "") == ()


def test_references_are_parsed_once_and_kept_within_bounds() -> None:
    kept = ManifestReferences(limit=8)
    body = json.dumps(IMAGE).encode()
    first = kept.of("sha256:" + "e" * 64, "", body)
    assert kept.of("sha256:" + "e" * 64, "", b"not parsed again") is first
    kept.of("sha256:" + "f" * 64, "", body)  # 3 references and the entry each: 8, both kept
    kept.of("sha256:" + "d" * 64, "", body)  # 12 > 8: the least recently asked goes
    assert kept.of("sha256:" + "e" * 64, "", b"{}") == ()  # parsed again (from this body)


def test_a_manifest_vouches_only_for_what_its_repository_served() -> None:
    references = manifest_references(json.dumps(IMAGE).encode(), "")
    served = {"sha256:" + "c" * 64, "sha256:" + "2" * 64}
    assert list(vouched_paths("library/alpine", references, served.__contains__)) == [
        "/v2/library/alpine/blobs/sha256:" + "c" * 64,
        "/v2/library/alpine/blobs/sha256:" + "2" * 64,
    ]
    children = manifest_references(json.dumps(INDEX).encode(), "")
    assert list(vouched_paths("a/b", children, lambda digest: True)) == [
        "/v2/a/b/manifests/sha256:" + "a" * 64
    ]
    assert list(vouched_paths("a/b", children, lambda digest: False)) == []


@pytest.mark.parametrize(
    ("checked_at", "now", "ttl", "fresh"),
    [(None, 5.0, 60.0, False), (0.0, 59.9, 60.0, True), (0.0, 60.0, 60.0, False),
     (10.0, 10.0, 0.0, False)],
)  # fmt: skip
def test_tag_fresh(checked_at: float | None, now: float, ttl: float, fresh: bool) -> None:
    assert tag_fresh(checked_at, now, ttl) is fresh


def test_tag_current() -> None:
    digest = "sha256:" + "a" * 64
    assert tag_current(digest, digest.encode())
    assert not tag_current(digest, None)
    assert not tag_current(digest, b"sha256:" + b"b" * 64)


BODY = "sha256:" + "a" * 64
OTHER = "sha256:" + "b" * 64


@pytest.mark.parametrize(
    ("reference", "claimed", "ok"),
    [
        ("latest", None, True),
        ("latest", BODY, True),
        ("latest", OTHER, False),  # a Docker-Content-Digest the body disagrees with
        (BODY, None, True),
        (BODY, BODY, True),
        (OTHER, None, False),  # asked by a digest the body does not hash to
        (OTHER, BODY, False),
        (BODY, OTHER, False),
    ],
)
def test_manifest_verified(reference: str, claimed: str | None, ok: bool) -> None:
    assert manifest_verified(reference, BODY, claimed) is ok


NOW = 1_800_000_000.0


@pytest.mark.parametrize(
    ("readability", "readable", "probe"),
    [
        (None, False, True),
        (Readability(True, NOW), True, False),
        (Readability(True, NOW - READABILITY_REFRESH + 1), True, False),
        (Readability(True, NOW - READABILITY_REFRESH), True, True),  # re-asked after an hour
        (Readability(True, NOW - READABILITY_WINDOW + 1), True, True),
        (Readability(True, NOW - READABILITY_WINDOW), False, True),  # and forgotten after a day
        (Readability(True, NOW - 10 * READABILITY_WINDOW), False, True),
        (Readability(True, NOW + 60), True, True),  # the clock went back a little: ask again
        (Readability(True, NOW + READABILITY_WINDOW), False, True),
        (Readability(False, NOW), False, False),
        (Readability(False, NOW - READABILITY_REFRESH), False, True),
    ],
)
def test_readability_expires_and_is_asked_again(
    readability: Readability | None, readable: bool, probe: bool
) -> None:
    assert anonymously_readable(readability, NOW) is readable
    assert should_probe(readability, NOW) is probe


def test_stale_needs_a_linked_digest_in_a_readable_repository() -> None:
    public = Readability(True, NOW - 3600)
    assert stale_allowed(public, True, NOW)
    assert not stale_allowed(public, False, NOW)
    assert not stale_allowed(Readability(False, NOW), True, NOW)
    assert not stale_allowed(None, True, NOW)
    assert not stale_allowed(public, True, NOW + READABILITY_WINDOW)
    assert ping_stale_allowed([Readability(False, NOW), public], NOW)
    assert not ping_stale_allowed([Readability(False, NOW)], NOW)
    assert not ping_stale_allowed([public], NOW + READABILITY_WINDOW)
    assert not ping_stale_allowed([], NOW)


BLOB = CacheRequest(Kind.BLOB, "GET", has_range=False, cached=True, confirmed=False)
TAG = CacheRequest(
    Kind.MANIFEST, "GET", has_range=False, cached=True, confirmed=False, by_digest=False
)


def facts(base: CacheRequest, **changes: object) -> CacheRequest:
    return replace(base, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("request_facts", "asked", "expected"),
    [
        # misses: only a plain GET fills; HEADs and ranges go through as they are
        (facts(BLOB, cached=False), None, Fill()),
        (facts(BLOB, cached=False, method="HEAD"), None, Forward()),
        (facts(BLOB, cached=False, has_range=True), None, Forward()),
        (facts(BLOB, cached=False, stale_ok=True), UNAVAILABLE, Fill()),
        (facts(TAG, cached=False), None, Fill()),
        (facts(TAG, cached=False, method="HEAD"), None, Forward()),
        # hits: confirmed ones are served; others are asked about first
        (facts(BLOB, confirmed=True), None, ServeCache()),
        (facts(BLOB, confirmed=True, has_range=True), None, ServeCache()),
        (BLOB, None, AskUpstream()),
        (facts(BLOB, stale_ok=True), None, AskUpstream()),  # stale only when asked in vain
        (BLOB, ALLOWED, ServeCache()),
        (facts(BLOB, method="HEAD"), ALLOWED, ServeCache()),
        (BLOB, DENIED, Forward()),
        (facts(BLOB, stale_ok=True), DENIED, Forward()),
        (BLOB, UNAVAILABLE, Forward()),
        (facts(BLOB, stale_ok=True), UNAVAILABLE, ServeStale()),
        # tags: served unasked only while fresh, and only to a confirmed client
        (facts(TAG, confirmed=True), None, AskUpstream()),
        (facts(TAG, confirmed=True, tag_fresh=True), None, ServeCache()),
        (facts(TAG, tag_fresh=True), None, AskUpstream()),
        (facts(TAG, tag_current=True), ALLOWED, ServeCache()),
        (TAG, ALLOWED, Fill()),  # the tag moved: one GET of what it names now
        (facts(TAG, method="HEAD"), ALLOWED, Forward()),
        (facts(TAG, tag_current=True), DENIED, Forward()),
        (facts(TAG, stale_ok=True), UNAVAILABLE, ServeStale()),
        (TAG, UNAVAILABLE, Forward()),
        # by digest: never "moved"
        (facts(TAG, by_digest=True, confirmed=True), None, ServeCache()),
        (facts(TAG, by_digest=True), ALLOWED, ServeCache()),
    ],
)
def test_decide(
    request_facts: CacheRequest, asked: UpstreamVerdict | None, expected: Decision
) -> None:
    assert decide(request_facts, asked) == expected


@pytest.mark.parametrize(
    ("status", "cached", "stale_ok", "expected"),
    [
        (None, True, True, ServeStale()),  # no answer at all
        (500, True, True, ServeStale()),
        (501, True, True, ServeStale()),
        (429, True, True, ServeStale()),
        (404, True, True, Forward()),
        (200, True, True, Forward()),
        (500, False, True, Forward()),
        (500, True, False, Forward()),
        (None, True, False, Forward()),
    ],
)
def test_after_upstream(
    status: int | None, cached: bool, stale_ok: bool, expected: Decision
) -> None:
    assert after_upstream(status, cached=cached, stale_ok=stale_ok) == expected


@pytest.mark.parametrize(
    ("method", "status", "length", "media_type", "kept"),
    [
        ("GET", 200, 100, b"application/json", True),
        ("GET", 200, 4096, b"x/y", True),
        ("GET", 200, 4097, b"x/y", False),
        ("GET", 200, None, b"x/y", False),
        ("GET", 200, 100, None, False),
        ("HEAD", 200, 100, b"x/y", False),
        ("GET", 203, 100, b"x/y", False),
        ("GET", 404, 100, b"x/y", False),
    ],
)
def test_keep_manifest(
    method: str, status: int, length: int | None, media_type: bytes | None, kept: bool
) -> None:
    assert keep_manifest(method, status, length, media_type, 4096) is kept


# -- manifests in flight ------------------------------------------------------------------------

PATH = "/v2/acme/app/manifests/v1"


@pytest.mark.parametrize(
    ("follower", "stored", "shares"),
    [
        (confirmation_key(b"Bearer a", "", PATH), True, True),
        (confirmation_key(b"Bearer a", "", PATH), False, False),  # the leader stored nothing
        (confirmation_key(b"Bearer b", "", PATH), True, False),  # other credentials
        (confirmation_key(None, "", PATH), True, False),  # anonymous
        (confirmation_key(b"Bearer a", "ghcr.io", PATH), True, False),  # another registry
        (confirmation_key(b"Bearer a", "", PATH + "x"), True, False),
    ],
)
def test_may_share_fetch_only_with_the_same_credentials(
    follower: ConfirmationKey, stored: bool, shares: bool
) -> None:
    leader = confirmation_key(b"Bearer a", "", PATH)
    assert may_share_fetch(leader, follower, stored=stored) is shares


@pytest.mark.parametrize(
    ("used", "size", "limit", "fits"),
    [
        (0, 100, 10, True),  # alone, even larger than the limit
        (0, 10, 10, True),
        (5, 5, 10, True),
        (5, 6, 10, False),
        (1, 4 << 20, 32 << 20, True),
        (30 << 20, 4 << 20, 32 << 20, False),
    ],
)
def test_fits_in_memory(used: int, size: int, limit: int, fits: bool) -> None:
    assert fits_in_memory(used, size, limit) is fits


@pytest.mark.parametrize(
    ("used", "used_by", "waiting", "chosen"),
    [
        # room in all and in each share: first come, first served
        (0, {}, [("a", 4), ("b", 4)], [0, 1]),
        # the attacker is at its share: its waiters are passed over, the victim goes in
        (8, {"a": 8}, [("a", 4), ("a", 1), ("b", 4)], [2]),
        # a client's later small waiter never overtakes its own earlier large one
        (6, {"a": 6}, [("a", 8), ("a", 1)], []),
        # the oldest that fits its share but not the whole waits, and nobody overtakes it
        (28, {"a": 8, "b": 8, "c": 8, "d": 4}, [("e", 8), ("f", 1)], []),
        # a fetch alone always fits (one manifest larger than the limit still works)
        (0, {}, [("a", 40)], [0]),
        # a client holding nothing may start one fetch even larger than its share; then it is
        # over its share, and its next waits
        (8, {"b": 8}, [("a", 12), ("a", 1)], [0]),
    ],
)
def test_admit_fetches(
    used: int, used_by: dict[str, int], waiting: list[tuple[str, int]], chosen: list[int]
) -> None:
    assert admit_fetches(32, 8, used, used_by, waiting) == chosen


def test_fetch_share_leaves_room_for_the_largest_manifest() -> None:
    assert fetch_share(32 << 20, 4 << 20) == 8 << 20
    assert fetch_share(8 << 20, 4 << 20) == 4 << 20


S = 1_000_000_000  # a second, in nanoseconds


@pytest.mark.parametrize(
    ("ctime_ns", "age", "settled"),
    [
        (1_700_000_000 * S + 123_456_789, 0.0, False),  # sub-second timestamps: a jiffy's tick
        (1_700_000_000 * S + 123_456_789, 0.05, False),
        (1_700_000_000 * S + 123_456_789, 0.1, True),
        (1_700_000_000 * S + 10_000_000, 0.1, True),  # exFAT's 10 ms steps
        (1_700_000_000 * S, 0.1, False),  # whole seconds (ext3, HFS+, FAT's 2 s): two of them
        (1_700_000_000 * S, 1.9, False),
        (1_700_000_000 * S, 2.0, True),
        (1_700_000_000 * S + 123_456_789, -1.0, False),  # a change in the future: not settled
    ],
)
def test_a_file_identity_is_settled_once_its_timestamp_tick_has_passed(
    ctime_ns: int, age: float, settled: bool
) -> None:
    assert identity_settled(ctime_ns, ctime_ns + round(age * S)) is settled
