"""The manifest store (``manifests.py``) on its own: Accept negotiation, per-repository media
types, tags per kind of client, verification before storing, and a state file that survives a
power loss."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from hubproxy.cache.manifests import MANIFEST_TYPES, ManifestStore, accepted_types, accepts
from hubproxy.policy.cachepolicy import Readability

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


def opened(root: Path) -> ManifestStore:
    store = ManifestStore(root)
    store.open()
    return store


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
    reopened = opened(tmp_path)
    assert reopened.get("ghcr.io/owner/b", digest) == other


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
    assert opened(tmp_path).tag("library/a", "1", V2) == one


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
    assert list(store.dir.iterdir()) == []
    assert not store.state_path.exists()


def test_a_damaged_file_is_never_served_after_a_restart(tmp_path: Path) -> None:
    store = opened(tmp_path)
    digest = store.put("library/a", "1", accepted=V2, media_type=DOCKER, body=BODY, claimed=None)
    assert digest is not None
    path = store.dir / digest.removeprefix("sha256:")
    damaged = bytearray(path.read_bytes())
    damaged[5] ^= 0xFF
    path.write_bytes(bytes(damaged))
    restarted = opened(tmp_path)
    assert restarted.get("library/a", digest) is None
    # fetched again, it replaces the damaged file
    again = restarted.put(
        "library/a", digest, accepted=V2, media_type=DOCKER, body=BODY, claimed=None
    )
    assert again == digest
    assert path.read_bytes() == BODY
    assert opened(tmp_path).get("library/a", digest) is not None


def test_readability_is_kept_with_when_it_was_learned(tmp_path: Path) -> None:
    store = opened(tmp_path)
    store.set_readability("library/a", Readability(True, 1_800_000_000.5))
    store.set_readability("acme/secret", Readability(False, 1_800_000_001.0))
    state = json.loads(store.state_path.read_text())
    assert state["readability"]["library/a"] == {"anonymous": True, "learned_at": 1_800_000_000.5}
    assert opened(tmp_path).readability == store.readability


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


def test_the_state_file_is_fsynced_before_and_after_its_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A power loss right after the rename must find the new bytes on disk: the temporary file
    is fsynced before ``os.replace``, and the directory (the rename itself) after it."""
    events: list[tuple[str, int]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.fstat(fd).st_ino))
        real_fsync(fd)

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        events.append(("replace", os.stat(src).st_ino))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    store = opened(tmp_path)
    store.set_readability("library/a", Readability(True, 1.0))
    state_inode = os.stat(store.state_path).st_ino
    directory = os.stat(tmp_path).st_ino
    renamed = events.index(("replace", state_inode))
    assert ("fsync", state_inode) in events[:renamed]
    assert ("fsync", directory) in events[renamed:]
    assert not list(tmp_path.glob("*.partial"))
