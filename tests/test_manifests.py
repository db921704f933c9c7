"""The manifest store (``manifests.py``) on its own: Accept negotiation, per-repository media
types, tags per kind of client, verification before storing, bounds and eviction, state written
behind to SQLite, a full disk, damaged state set aside, and the import of an old ``state.json``."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import resource
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from hubproxy.cache import manifests as manifests_module
from hubproxy.cache.manifests import MANIFEST_TYPES, ManifestStore, accepted_types, accepts, takes
from hubproxy.policy.cachepolicy import Readability


@contextlib.contextmanager
def database(path: Path) -> Iterator[sqlite3.Connection]:
    """A connection to ``path`` for one transaction, committed, then closed (sqlite3's own
    context manager only commits: Python 3.13 warns about the connection left open)."""
    conn = sqlite3.connect(path)
    try:
        with conn:
            yield conn
    finally:
        conn.close()


DOCKER = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


@pytest.mark.parametrize(
    ("accept", "media_type", "taken"),
    [
        ([], DOCKER, True),  # no Accept: anything (RFC 9110 section 12.5.1)
        ([DOCKER.encode()], DOCKER, True),
        ([DOCKER.upper().encode()], DOCKER, True),
        ([OCI.encode()], DOCKER, False),
        ([b"*/*"], DOCKER, True),
        ([b"application/*"], DOCKER, True),
        ([b"text/*"], DOCKER, False),
        ([f"{OCI}, {DOCKER}".encode()], DOCKER, True),
        ([OCI.encode(), DOCKER.encode()], DOCKER, True),  # repeated headers
        ([f"{DOCKER};q=0.5".encode()], DOCKER, True),
        ([f"{DOCKER}; q=0".encode()], DOCKER, False),  # q=0: "not acceptable"
        ([f"{DOCKER};q=0.0".encode()], DOCKER, False),
        ([f"{DOCKER};q=0.000".encode()], DOCKER, False),
        ([f"{DOCKER};Q=0".encode()], DOCKER, False),
        ([f"{DOCKER};q=nan".encode()], DOCKER, False),
        ([f"{DOCKER};q=bad".encode()], DOCKER, False),
        ([f"*/*;q=0, {OCI}".encode()], DOCKER, False),
        ([f"*/*;q=0, {DOCKER}".encode()], DOCKER, True),
        ([b", ,"], DOCKER, False),
    ],
)
def test_accepts(accept: list[bytes], media_type: str, taken: bool) -> None:
    assert accepts(accept, media_type) is taken
    # the request path's look-up answers the same, for a registry's types and any other
    for other in (media_type, *MANIFEST_TYPES, "application/json", DOCKER.upper()):
        assert takes(accept, other) is accepts(accept, other)


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        ([DOCKER.encode()], {DOCKER}),
        ([f"{DOCKER}, {DOCKER_LIST}".encode()], {DOCKER, DOCKER_LIST}),
        ([f"{DOCKER_LIST}, {DOCKER}".encode()], {DOCKER, DOCKER_LIST}),  # order does not matter
        ([f"{DOCKER};q=0.9, {DOCKER_LIST};q=0.1".encode()], {DOCKER, DOCKER_LIST}),
        ([f"{DOCKER}, {DOCKER_LIST};q=0".encode()], {DOCKER}),
        ([b"application/json"], set()),
        ([b"*/*"], set(MANIFEST_TYPES)),
        ([], set(MANIFEST_TYPES)),
        ([f"{OCI}, {OCI_INDEX}, x-unknown/thing".encode()], {OCI, OCI_INDEX}),
    ],
)
def test_accepted_types(accept: list[bytes], expected: set[str]) -> None:
    assert accepted_types(accept) == frozenset(expected)


def digest_of(body: bytes) -> str:
    return "sha256:" + hashlib.sha256(body).hexdigest()


BODY = b'{"schemaVersion": 2, "mediaType": "%s"}' % DOCKER.encode()
V2 = frozenset({DOCKER})


def opened(root: Path, **bounds: int) -> ManifestStore:
    store = ManifestStore(root, **bounds)
    store.open()
    return store


def restarted(store: ManifestStore, **bounds: int) -> ManifestStore:
    """Stop ``store`` (its writer flushes) and open its directory again, as a new process."""
    store.close()
    return opened(store.root, **bounds)


def rows(root: Path, table: str) -> list[tuple[object, ...]]:
    """A table's rows as another process sees them (committed only)."""
    with database(root / "state.db") as conn:
        return list(conn.execute(f"SELECT * FROM {table}"))


def manifest(n: int, size: int = 0) -> bytes:
    return b'{"schemaVersion": 2, "n": %d, "pad": "%s"}' % (n, b"x" * size)


def test_media_types_are_kept_per_repository(tmp_path: Path) -> None:
    store = opened(tmp_path)
    digest = store.put("library/a", "1", accepted=V2, media_type=DOCKER, body=BODY, claimed=None)
    assert digest == digest_of(BODY)
    cached = store.get("library/a", digest)
    assert cached is not None and (cached.media_type, cached.body) == (DOCKER, BODY)
    assert store.get("ghcr.io/owner/b", digest) is None  # never served there
    assert store.has_body(digest)
    store.link("ghcr.io/owner/b", digest, OCI)
    other = store.get("ghcr.io/owner/b", digest)
    assert other is not None and other.media_type == OCI
    again = store.get("library/a", digest)
    assert again is not None and again.media_type == DOCKER
    store.link("ghcr.io/owner/c", digest)  # a blob-like link carries no media type
    assert store.get("ghcr.io/owner/c", digest) is None
    reopened = restarted(store)
    assert reopened.get("ghcr.io/owner/b", digest) == other
    reopened.close()


def test_tags_are_kept_per_set_of_accepted_types(tmp_path: Path) -> None:
    store = opened(tmp_path)
    index = b'{"mediaType": "%s"}' % DOCKER_LIST.encode()
    both = frozenset({DOCKER, DOCKER_LIST})
    one = store.put("library/a", "1", accepted=V2, media_type=DOCKER, body=BODY, claimed=None)
    two = store.put(
        "library/a", "1", accepted=both, media_type=DOCKER_LIST, body=index, claimed=None
    )
    assert store.tag("library/a", "1", V2) == one
    assert store.tag("library/a", "1", both) == two
    assert store.tag("library/a", "1", frozenset({OCI})) is None
    assert restarted(store).tag("library/a", "1", V2) == one


@pytest.mark.parametrize(
    ("reference", "claimed"),
    [
        ("1", digest_of(b"something else")),  # the header disagrees with the body
        (digest_of(b"something else"), None),  # asked by another digest
        (digest_of(b"something else"), digest_of(BODY)),
    ],
)
def test_nothing_is_stored_unless_the_body_verifies(
    tmp_path: Path, reference: str, claimed: str | None
) -> None:
    store = opened(tmp_path)
    assert (
        store.put(
            "library/a", reference, accepted=V2, media_type=DOCKER, body=BODY, claimed=claimed
        )
        is None
    )
    assert store.tags == {}
    assert store.links == {}
    assert not store.has_body(digest_of(BODY))
    store.close()
    for table in ("manifests", "tags", "links"):
        assert rows(tmp_path, table) == []


def test_a_row_another_worker_evicted_is_a_quiet_miss(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """--workers: another process on the directory evicted a manifest this one still lists;
    it is forgotten without a warning (nothing is damaged), and fetched again."""
    store = opened(tmp_path)
    digest = store.put("library/a", "1", accepted=V2, media_type=DOCKER, body=BODY, claimed=None)
    assert digest is not None
    store.close()
    restarted = opened(tmp_path)  # lists the row, has not read its body yet
    with database(tmp_path / "state.db") as conn:
        conn.execute("DELETE FROM manifests")
    with caplog.at_level(logging.DEBUG, logger="hubproxy.cache"):
        assert restarted.get("library/a", digest) is None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "evicted elsewhere" in caplog.text
    restarted.close()


def test_a_link_another_worker_learned_is_found_in_the_database(tmp_path: Path) -> None:
    """--workers: a link another process on the directory learned after this one loaded is not
    in this one's memory; ``linked_shared`` finds it in the database, and keeps it."""
    here = opened(tmp_path)
    there = opened(tmp_path)
    blob = "sha256:" + "b" * 64
    there.link("library/a", blob)
    assert there.flush()
    assert not here.linked("library/a", blob)
    assert here.linked_shared("library/a", blob)
    assert here.linked("library/a", blob)  # kept in memory now
    assert not here.linked_shared("library/a", "sha256:" + "c" * 64)
    assert not here.linked_shared("library/other", blob)  # a link is per repository
    here.close()
    there.close()


def test_a_damaged_row_is_never_served_after_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = opened(tmp_path)
    digest = store.put("library/a", "1", accepted=V2, media_type=DOCKER, body=BODY, claimed=None)
    assert digest is not None
    store.close()
    damaged = bytearray(BODY)
    damaged[5] ^= 0xFF
    with database(tmp_path / "state.db") as conn:
        conn.execute("UPDATE manifests SET body = ?", (bytes(damaged),))
    restarted = opened(tmp_path)
    with caplog.at_level(logging.WARNING, logger="hubproxy.cache"):
        assert restarted.get("library/a", digest) is None
    assert f"cached manifest sha256:{digest.removeprefix('sha256:')} is damaged" in caplog.text
    assert restarted.tag("library/a", "1", V2) is None  # the tag went with it
    # fetched again, it replaces the damaged row
    again = restarted.put(
        "library/a", digest, accepted=V2, media_type=DOCKER, body=BODY, claimed=None
    )
    assert again == digest
    restarted.close()
    assert [row[3] for row in rows(tmp_path, "manifests")] == [BODY]
    last = opened(tmp_path)
    assert last.get("library/a", digest) is not None
    last.close()


async def test_a_large_body_is_read_off_the_event_loop(tmp_path: Path) -> None:
    """A restarted store reads a 4 MiB manifest (and hashes it) in a worker thread: other tasks
    run meanwhile. A small one is read at once, without a trip to a thread."""
    store = opened(tmp_path)
    large = manifest(1, 4 * 1024 * 1024 - 100)
    small = manifest(2)
    big = store.put("library/a", "big", accepted=V2, media_type=DOCKER, body=large, claimed=None)
    little = store.put("library/a", "1", accepted=V2, media_type=DOCKER, body=small, claimed=None)
    assert big is not None and little is not None
    store = restarted(store)  # nothing in memory
    ran: list[str] = []

    async def other_task() -> None:
        ran.append("other")

    for digest, body, order in (
        (little, small, ["load", "other"]),
        (big, large, ["other", "load"]),
    ):
        ran.clear()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(other_task)  # runs at the loader's first checkpoint
            loaded = await store.load("library/a", digest)
            ran.append("load")
        assert loaded is not None and loaded.body == body and loaded.media_type == DOCKER
        assert ran == order
    # read once, verified, then kept in memory: no second read
    with database(tmp_path / "state.db") as conn:
        conn.execute("UPDATE manifests SET body = x'00'")
    again = await store.load("library/a", big)
    assert again is not None and again.body == large
    store.close()


async def test_a_large_damaged_or_vanished_body_read_in_a_thread_is_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = opened(tmp_path)
    large = [manifest(n, 1024 * 1024) for n in range(2)]
    digests = [digest_of(body) for body in large]
    for n, body in enumerate(large):
        store.put("library/a", str(n), accepted=V2, media_type=DOCKER, body=body, claimed=None)
    store = restarted(store)
    with database(tmp_path / "state.db") as conn:
        conn.execute("UPDATE manifests SET body = x'00' WHERE hex = ?", (digests[0][7:],))
        conn.execute("DELETE FROM manifests WHERE hex = ?", (digests[1][7:],))
    with caplog.at_level(logging.DEBUG, logger="hubproxy.cache"):
        assert await store.load("library/a", digests[0]) is None
        assert await store.load("library/a", digests[1]) is None
    assert f"cached manifest {digests[0]} is damaged" in caplog.text
    assert f"cached manifest {digests[1]} was evicted elsewhere" in caplog.text
    assert not store.has_body(digests[0]) and not store.has_body(digests[1])
    assert store.tag("library/a", "0", V2) is None
    store.close()


def test_readability_is_kept_with_when_it_was_learned(tmp_path: Path) -> None:
    store = opened(tmp_path)
    store.set_readability("library/a", Readability(True, 1_800_000_000.5))
    store.set_readability("acme/secret", Readability(False, 1_800_000_001.0))
    assert store.flush()
    assert ("library/a", 1, 1_800_000_000.5) in [row[:3] for row in rows(tmp_path, "readability")]
    learned = dict(store.readability)
    assert restarted(store).readability == learned


def test_an_older_state_file_forgets_what_it_cannot_date(tmp_path: Path) -> None:
    body_hex = hashlib.sha256(BODY).hexdigest()
    (tmp_path / "manifests" / "sha256").mkdir(parents=True)
    (tmp_path / "manifests" / "sha256" / body_hex).write_bytes(BODY)
    (tmp_path / "state.json").write_text(
        json.dumps(
            {
                "types": {body_hex: DOCKER},
                "tags": {"library/a:1": body_hex},
                "anonymous": ["library/a"],
                "links": {"library/a": [f"sha256:{body_hex}"]},
            }
        )
    )
    store = opened(tmp_path)
    assert store.readability == {}  # "public" without a date: asked again
    assert store.tag("library/a", "1", V2) is None
    assert store.linked("library/a", f"sha256:{body_hex}")
    assert store.get("library/a", f"sha256:{body_hex}") is None  # its media type: learned again
    store.close()


def test_a_state_file_is_imported_once_and_set_aside(tmp_path: Path) -> None:
    body_hex = hashlib.sha256(BODY).hexdigest()
    (tmp_path / "manifests" / "sha256").mkdir(parents=True)
    (tmp_path / "manifests" / "sha256" / body_hex).write_bytes(BODY)
    (tmp_path / "manifests" / "sha256" / ("0" * 64)).write_bytes(b"damaged: not imported")
    v2 = {
        "version": 2,
        "tags": {"library/a:1": {DOCKER: body_hex}},
        "links": {"library/a": {f"sha256:{body_hex}": DOCKER}},
        "readability": {"library/a": {"anonymous": True, "learned_at": 1_800_000_000.0}},
    }
    (tmp_path / "state.json").write_text(json.dumps(v2))
    store = opened(tmp_path)
    assert store.tag("library/a", "1", V2) == f"sha256:{body_hex}"
    cached = store.get("library/a", f"sha256:{body_hex}")
    assert cached is not None and cached.body == BODY
    assert store.readability == {"library/a": Readability(True, 1_800_000_000.0)}
    assert not (tmp_path / "state.json").exists()
    assert (tmp_path / "state.json.migrated").exists()
    assert not (tmp_path / "manifests").exists()
    again = restarted(store)
    assert again.tag("library/a", "1", V2) == f"sha256:{body_hex}"
    assert len(again.sizes) == 1
    again.close()


def test_changes_are_committed_behind_in_a_write_ahead_log(tmp_path: Path) -> None:
    """Answers come from memory at once; another process sees them once the writer thread
    committed them (``flush`` waits for that), in a WAL-journalled database."""
    store = opened(tmp_path)
    digest = store.put("library/a", "1", accepted=V2, media_type=DOCKER, body=BODY, claimed=None)
    assert store.tag("library/a", "1", V2) == digest
    assert store.flush()
    assert [row[0] for row in rows(tmp_path, "tags")] == ["library/a:1"]
    with database(tmp_path / "state.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()


# -- bounds ---------------------------------------------------------------------------------------


def test_manifest_bytes_are_bounded_least_recently_used_first(tmp_path: Path) -> None:
    bodies = [manifest(n, 1000) for n in range(4)]
    store = opened(tmp_path, max_bytes=3 * len(bodies[0]))
    digests = [
        store.put("library/a", str(n), accepted=V2, media_type=DOCKER, body=body, claimed=None)
        for n, body in enumerate(bodies[:3])
    ]
    assert store.get("library/a", digests[0] or "") is not None  # used: the most recent now
    store.put("library/a", "3", accepted=V2, media_type=DOCKER, body=bodies[3], claimed=None)
    assert store.total <= store.max_bytes
    assert store.stats.evictions == 1
    assert not store.has_body(digests[1] or "")  # the least recently used
    assert store.tag("library/a", "1", V2) is None  # and the tag naming it
    assert store.tag("library/a", "0", V2) == digests[0]
    assert store.tag("library/a", "2", V2) == digests[2]
    again = restarted(store, max_bytes=3 * len(bodies[0]))
    assert {row[1] for row in rows(tmp_path, "manifests")} == {len(bodies[0])}
    assert len(rows(tmp_path, "manifests")) == 3
    assert again.tag("library/a", "1", V2) is None
    assert again.tag("library/a", "0", V2) == digests[0]
    # a lower bound at the next start evicts at once, the least recently used first
    smaller = restarted(again, max_bytes=len(bodies[0]))
    assert list(smaller.sizes) == [digest_of(bodies[3]).removeprefix("sha256:")]
    smaller.close()
    assert len(rows(tmp_path, "manifests")) == 1
    assert [row[0] for row in rows(tmp_path, "tags")] == ["library/a:3"]


def test_a_manifest_larger_than_the_bound_is_served_uncached(tmp_path: Path) -> None:
    store = opened(tmp_path, max_bytes=100)
    body = manifest(1, 200)
    digest = store.put("library/a", "1", accepted=V2, media_type=DOCKER, body=body, claimed=None)
    assert digest == digest_of(body)  # verified: the caller serves it
    assert not store.has_body(digest)
    assert store.tag("library/a", "1", V2) is None
    assert store.stats.uncached == 1
    store.close()


def test_tags_links_and_readability_are_bounded_by_count(tmp_path: Path) -> None:
    store = opened(tmp_path, max_entries=3)
    for n in range(5):
        store.put(f"r{n}", "t", accepted=V2, media_type=DOCKER, body=manifest(n), claimed=None)
        store.link(f"r{n}", "sha256:" + f"{n}" * 64)
        store.set_readability(f"r{n}", Readability(True, float(n)))
    assert len(store.sizes) == 3
    assert store.tag_count == len(store.tags) == 3
    assert store.link_count == sum(len(d) for d in store.links.values()) == 3
    assert list(store.readability) == ["r2", "r3", "r4"]
    assert store.tag("r4", "t", V2) == digest_of(manifest(4))
    assert store.tag("r0", "t", V2) is None
    again = restarted(store, max_entries=3)
    assert list(again.readability) == ["r2", "r3", "r4"]
    assert again.tag_count == 3
    again.close()
    assert len(rows(tmp_path, "links")) == 3
    assert len(rows(tmp_path, "tags")) == 3


# -- a full disk (issue 12, case 5) --------------------------------------------------------------


@pytest.fixture
def file_size_limit() -> Iterator[Callable[[int], None]]:
    """Limit the size any file of this process may grow to (RLIMIT_FSIZE): writes beyond it
    fail with EFBIG, as on a full disk (Python ignores SIGXFSZ). Restored afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

    def limit(size: int) -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))

    try:
        yield limit
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_a_manifest_that_cannot_be_written_is_served_uncached(
    tmp_path: Path, file_size_limit: Callable[[int], None], caplog: pytest.LogCaptureFixture
) -> None:
    store = opened(tmp_path)
    big = [manifest(n, 600_000) for n in range(3)]
    file_size_limit(256 * 1024)
    with caplog.at_level(logging.WARNING, logger="hubproxy.cache"):
        first = store.put(
            "library/a", "1", accepted=V2, media_type=DOCKER, body=big[0], claimed=None
        )
        assert first == digest_of(big[0])  # no OSError: the caller serves the verified bytes
        store.flush()  # the write fails: what it held is dropped
        second = store.put(
            "library/a", "2", accepted=V2, media_type=DOCKER, body=big[1], claimed=None
        )
        assert second == digest_of(big[1])
        store.flush()  # the write fails: what it held is dropped
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # one line a minute, however many failures
    assert "cannot store manifests" in warnings[0] and "free space" in warnings[0]
    assert store.stats.write_failures >= 2
    # what could not be written is not claimed as cached: asked upstream again
    assert store.get("library/a", first) is None
    assert store.tag("library/a", "1", V2) is None
    file_size_limit(resource.RLIM_INFINITY)
    third = store.put("library/a", "3", accepted=V2, media_type=DOCKER, body=big[2], claimed=None)
    assert store.flush()
    again = restarted(store)
    assert again.tag("library/a", "3", V2) == third
    assert again.get("library/a", third or "") is not None
    again.close()


# -- damaged state (issue 12, case 9) -------------------------------------------------------------


def damaged_aside(root: Path, name: str) -> list[Path]:
    """The files set aside as ``name`` (not its WAL, set aside along with it)."""
    return sorted(p for p in root.glob(f"{name}.damaged-*") if not p.name.endswith("-wal"))


@pytest.mark.parametrize(
    "content",
    [
        b"[]",  # valid JSON, the wrong shape
        b'{"tags": ["library/a:1"], "links": {}}',
        b'{"version": 2, "readability": "everything"}',
        b"\x00\xff\xfe garbage \x89PNG",
        b"[" * 100_000 + b"]" * 100_000,  # deeper than the parser goes
    ],
)
def test_a_damaged_state_file_is_set_aside_and_the_store_starts_empty(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "state.json").write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="hubproxy.cache"):
        store = opened(tmp_path)
    assert (len(store.tags), len(store.links), len(store.readability)) == (0, 0, 0)
    [aside] = damaged_aside(tmp_path, "state.json")
    assert aside.read_bytes() == content
    assert not (tmp_path / "state.json").exists()
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    digest = store.put("library/a", "1", accepted=V2, media_type=DOCKER, body=BODY, claimed=None)
    assert restarted(store).tag("library/a", "1", V2) == digest


def corrupt_inside(path: Path) -> None:
    """Overwrite every page but the first with noise: the header reads, the b-trees do not."""
    data = bytearray(path.read_bytes())
    for offset in range(4096, len(data)):
        data[offset] = (offset * 7 + 13) % 256
    path.write_bytes(bytes(data))


def filled_database(root: Path) -> None:
    store = opened(root)
    for n in range(50):
        store.put(
            "library/a", str(n), accepted=V2, media_type=DOCKER, body=manifest(n, 300), claimed=None
        )
    store.close()
    with database(root / "state.db") as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


@pytest.mark.parametrize(
    "damage",
    [
        lambda path: path.write_bytes(b"SQLite format 3\x00" + b"\xee" * 8000),
        lambda path: path.write_bytes(b"not a database at all\n" * 100),
        corrupt_inside,
    ],
    ids=["bad-header", "garbage", "bad-pages"],
)
def test_a_corrupt_database_is_set_aside_and_the_store_starts_empty(
    tmp_path: Path, damage: Callable[[Path], None], caplog: pytest.LogCaptureFixture
) -> None:
    filled_database(tmp_path)
    damage(tmp_path / "state.db")
    with caplog.at_level(logging.WARNING, logger="hubproxy.cache"):
        store = opened(tmp_path)
    assert len(store.sizes) == 0 and store.tags == {}
    assert len(damaged_aside(tmp_path, "state.db")) == 1
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    digest = store.put("library/a", "1", accepted=V2, media_type=DOCKER, body=BODY, claimed=None)
    assert restarted(store).tag("library/a", "1", V2) == digest


def test_a_database_of_another_shape_is_set_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with database(tmp_path / "state.db") as conn:
        conn.execute("CREATE TABLE tags (name TEXT)")
        conn.execute("INSERT INTO tags VALUES ('x')")
    with caplog.at_level(logging.WARNING, logger="hubproxy.cache"):
        store = opened(tmp_path)
    assert store.tags == {}
    assert len(damaged_aside(tmp_path, "state.db")) == 1
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    store.close()


def test_the_accepted_types_of_a_kind_of_client_are_worked_out_once() -> None:
    accept = [b"application/vnd.oci.image.manifest.v1+json", b"application/json;q=0.5"]
    first = accepted_types(accept)
    hits = manifests_module._remembered_types.cache_info().hits
    assert accepted_types(list(accept)) == first
    assert manifests_module._remembered_types.cache_info().hits == hits + 1
    # headers past the size remembered are worked out each time, and alike
    huge = [*accept, b"text/plain;q=0.1, " * 200]
    before = manifests_module._remembered_types.cache_info()
    assert accepted_types(huge) == first
    after = manifests_module._remembered_types.cache_info()
    assert (after.hits, after.misses) == (before.hits, before.misses)


def _hold_exclusively(path: Path) -> sqlite3.Connection:
    """Another process's connection holding the database exclusively until closed (as while it
    creates or vacuums it)."""
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("PRAGMA locking_mode = EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("COMMIT")
    return holder


def test_the_loops_connection_waits_for_its_first_read_only(tmp_path: Path) -> None:
    """With --workers another process may hold the database while this one opens it: the loop's
    connection waits for its first read (it failed at once with "database is locked" and the
    worker died while starting), and never waits afterwards."""
    opened(tmp_path).close()
    path = tmp_path / "state.db"
    holder = _hold_exclusively(path)
    releasing = threading.Timer(0.2, holder.close)  # the other process finishing its work
    releasing.start()
    try:
        reader = manifests_module._open_reader(path)
    finally:
        releasing.join()
    try:
        assert reader.execute("PRAGMA busy_timeout").fetchone()[0] == 0
    finally:
        reader.close()


def test_two_processes_creating_the_database_at_once_both_open_it(tmp_path: Path) -> None:
    """--workers on a new cache directory: both saw no tables, the other created them first;
    this one must take them as they are (it failed: "table manifests already exists")."""
    path = tmp_path / "state.db"
    first = sqlite3.connect(path, isolation_level=None)
    second = sqlite3.connect(path, isolation_level=None)
    try:
        manifests_module._create_schema(first)
        manifests_module._create_schema(second)
    finally:
        first.close()
        second.close()
    store = opened(tmp_path)
    store.close()
