"""Cached manifests: bytes by digest, per repository the media type each digest was served with,
tags to their last known digest per kind of client, and which repositories anyone may read.

Manifests are small, so they are kept whole: ``manifests/sha256/<hex>`` holds the exact bytes
(never re-encoded: a digest is over those bytes; re-hashed whenever read from disk, so a damaged
file is never served). ``state.json`` holds, per repository (its state name, which includes the
registry), the digests the upstream served in it with their media types (a registry's
``Content-Type`` says nothing about what another registry, or another repository, serves); per
``repository:tag`` and set of accepted media types, the last known digest (a registry answers a
tag by ``Accept``); and, per repository, whether an anonymous client may pull it and when that
was learned (wall clock). ``state.json`` is written to a temporary file, fsync'd, renamed into
place, and the directory fsync'd: a power loss leaves the old state or the new, never an empty
file.

Accept negotiation follows RFC 9110 section 12.5.1: a cached manifest is served only to a client
whose ``Accept`` names its media type (or ``*/*``, or ``type/*``) with a non-zero quality.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..policy.cachepolicy import Readability, manifest_verified

log = logging.getLogger("hubproxy.cache")

MAX_MANIFEST = 4 * 1024 * 1024  # distribution's limit on manifest size
MEMORY_LIMIT = 8 * 1024 * 1024  # verified manifests kept in memory


def accepts(accept_values: Sequence[bytes], media_type: str) -> bool:
    """Whether a client sending these ``Accept`` headers takes ``media_type``.

    No ``Accept`` at all means any media type (RFC 9110 section 12.5.1).
    """
    if not accept_values:
        return True
    wanted = media_type.lower()
    major = wanted.split("/", 1)[0]
    for value in accept_values:
        for item in value.decode("latin-1").split(","):
            kind, *params = (part.strip() for part in item.split(";"))
            if not kind:
                continue
            quality = 1.0
            for param in params:
                name, _, number = param.partition("=")
                if name.strip().lower() == "q":
                    try:
                        quality = float(number)
                    except ValueError:
                        quality = 0.0
            if not quality > 0:  # q=0 is "not acceptable" (section 12.4.2); so is q=nan
                continue
            kind = kind.lower()
            if kind in (wanted, "*/*", f"{major}/*"):
                return True
    return False


# The manifest media types a registry chooses between by Accept; a client's Accept is reduced to
# the subset of these it takes, so clients of one kind share one cached answer per tag, and no
# Accept header however odd can make more than 2**len(...) of them.
MANIFEST_TYPES = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.artifact.manifest.v1+json",
)


def accepted_types(accept_values: Sequence[bytes]) -> frozenset[str]:
    """The manifest media types a client sending these ``Accept`` headers takes (q > 0)."""
    return frozenset(t for t in MANIFEST_TYPES if accepts(accept_values, t))


def _accept_key(accepted: frozenset[str]) -> str:
    return ",".join(sorted(accepted))


@dataclass(frozen=True)
class CachedManifest:
    digest: str  # "sha256:<hex>"
    media_type: str  # as the upstream served it in the repository it was asked for
    body: bytes


class ManifestStore:
    """Manifests on disk plus the small state file; all methods are synchronous and fast."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "manifests" / "sha256"
        self.state_path = root / "state.json"
        self.tags: dict[str, dict[str, str]] = {}  # "repo:tag" -> {accept key: hex}
        # repository -> {digest: media type} of what the upstream served in it ("" for blobs)
        self.links: dict[str, dict[str, str]] = {}
        self.readability: dict[str, Readability] = {}  # repository -> the anonymous answer
        self._verified: OrderedDict[str, bytes] = OrderedDict()  # hex -> body, checked once
        self._verified_bytes = 0

    def open(self) -> None:
        """Create the directory and read the state file (entries of an older format, which had
        no learned-at times and one media type for every registry, are dropped: re-learned)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            state = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("cache state %s is unreadable, starting afresh: %s", self.state_path, exc)
            return
        if not isinstance(state, dict):
            return
        self.tags = {
            name: {str(k): str(v) for k, v in keyed.items()}
            for name, keyed in _mapping(state.get("tags")).items()
            if isinstance(keyed, dict)
        }
        self.links = {}
        for repository, digests in _mapping(state.get("links")).items():
            if isinstance(digests, dict):
                self.links[repository] = {str(d): str(t) for d, t in digests.items()}
            elif isinstance(digests, list):  # the older format: blob-like links, no types
                self.links[repository] = {str(d): "" for d in digests}
        for repository, answer in _mapping(state.get("readability")).items():
            if isinstance(answer, dict):
                anonymous, learned_at = answer.get("anonymous"), answer.get("learned_at")
                if isinstance(anonymous, bool) and isinstance(learned_at, int | float):
                    self.readability[repository] = Readability(anonymous, float(learned_at))

    def get(self, repository: str, digest: str) -> CachedManifest | None:
        """The manifest ``digest`` as served in ``repository``, or None if the upstream never
        served it there (or its file is gone or damaged)."""
        media_type = self.links.get(repository, {}).get(digest)
        if not media_type:
            return None
        body = self._body(digest.removeprefix("sha256:"))
        return CachedManifest(digest, media_type, body) if body is not None else None

    def has_body(self, digest: str) -> bool:
        """Whether the bytes of manifest ``digest`` are here (for whichever repository)."""
        hexpart = digest.removeprefix("sha256:")
        return hexpart in self._verified or (self.dir / hexpart).is_file()

    def _body(self, hexpart: str) -> bytes | None:
        body = self._verified.get(hexpart)
        if body is not None:
            self._verified.move_to_end(hexpart)
            return body
        try:
            body = (self.dir / hexpart).read_bytes()
        except OSError:
            return None
        if hashlib.sha256(body).hexdigest() != hexpart:  # a damaged file is never served
            log.warning("cached manifest sha256:%s is damaged; ignoring it", hexpart)
            return None
        self._remember_verified(hexpart, body)
        return body

    def _remember_verified(self, hexpart: str, body: bytes) -> None:
        """Keep recently served manifests in memory (bounded): no disk read or hash per hit."""
        if hexpart not in self._verified:
            self._verified_bytes += len(body)
        self._verified[hexpart] = body
        while self._verified_bytes > MEMORY_LIMIT and self._verified:
            _key, old = self._verified.popitem(last=False)
            self._verified_bytes -= len(old)

    def tag(self, repository: str, tag: str, accepted: frozenset[str]) -> str | None:
        """The digest ``tag`` named when last fetched by a client accepting ``accepted``."""
        hexpart = self.tags.get(f"{repository}:{tag}", {}).get(_accept_key(accepted))
        return f"sha256:{hexpart}" if hexpart else None

    def put(
        self,
        repository: str,
        reference: str,
        *,
        accepted: frozenset[str],
        media_type: str,
        body: bytes,
        claimed: str | None,
    ) -> str | None:
        """Verify and store a manifest fetched for ``reference`` (a tag or its digest) by a
        client accepting ``accepted``; return its digest.

        Nothing is stored, and no tag moves, unless the body hashes to the digest it was asked
        by and to ``claimed`` (the upstream's ``Docker-Content-Digest``, if it sent one): None.
        """
        hexpart = hashlib.sha256(body).hexdigest()
        digest = f"sha256:{hexpart}"
        if not manifest_verified(reference, digest, claimed):
            return None
        if hexpart not in self._verified or not (self.dir / hexpart).is_file():
            _write_durably(self.dir / hexpart, body, sync_dir=False)
        self._remember_verified(hexpart, body)
        if not reference.startswith("sha256:"):
            self.tags.setdefault(f"{repository}:{reference}", {})[_accept_key(accepted)] = hexpart
        self.links.setdefault(repository, {})[digest] = media_type
        self._save()
        return digest

    def link(self, repository: str, digest: str, media_type: str = "") -> None:
        """Record that the upstream served ``digest`` under ``repository`` (a manifest with
        ``media_type``; a blob with none).

        Registries scope blobs and manifests to repositories; a stale answer (the upstream
        down) may only give a digest under a repository that was seen to hold it.
        """
        linked = self.links.setdefault(repository, {})
        if digest not in linked or (media_type and linked[digest] != media_type):
            linked[digest] = media_type or linked.get(digest, "")
            self._save()

    def linked(self, repository: str, digest: str) -> bool:
        return digest in self.links.get(repository, {})

    def set_readability(self, repository: str, readability: Readability) -> None:
        self.readability[repository] = readability
        self._save()

    def _save(self) -> None:
        state = {
            "version": 2,
            "tags": self.tags,
            "links": self.links,
            "readability": {
                repository: {"anonymous": r.anonymous, "learned_at": r.learned_at}
                for repository, r in self.readability.items()
            },
        }
        try:
            _write_durably(self.state_path, json.dumps(state).encode(), sync_dir=True)
        except OSError as exc:
            log.warning("cannot save the cache state %s: %s", self.state_path, exc)


def _mapping(value: object) -> dict[str, object]:
    return {str(k): v for k, v in value.items()} if isinstance(value, dict) else {}


def _write_durably(path: Path, data: bytes, *, sync_dir: bool) -> None:
    """Replace ``path`` with ``data`` so that a crash or power loss leaves the old file or the
    new one: write a temporary file, fsync it, rename it into place, fsync the directory."""
    temp = path.with_name(path.name + ".partial")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.replace(temp, path)
    except OSError:
        os.unlink(temp)
        raise
    if sync_dir:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
