"""Cached manifests: bytes by digest, tags to their last known digest, and which repositories
anyone may read.

Manifests are small, so they are kept whole: ``manifests/sha256/<hex>`` holds the exact bytes
(never re-encoded: a digest is over those bytes), and ``state.json`` maps each digest to its media
type, each ``repository:tag`` to its last known digest, and lists the repositories an anonymous
client may pull (learned by asking the upstream, so stale answers while it is down never leak a
private image). ``state.json`` is replaced atomically on change.

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
            if quality <= 0:
                continue
            kind = kind.lower()
            if kind in (wanted, "*/*", f"{major}/*"):
                return True
    return False


@dataclass(frozen=True)
class CachedManifest:
    digest: str  # "sha256:<hex>"
    media_type: str
    body: bytes


class ManifestStore:
    """Manifests on disk plus the small state file; all methods are synchronous and fast."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "manifests" / "sha256"
        self.state_path = root / "state.json"
        self.types: dict[str, str] = {}  # hex -> media type
        self.tags: dict[str, str] = {}  # "repo:tag" -> hex
        self.anonymous: set[str] = set()  # repositories anyone may pull
        self.links: dict[str, set[str]] = {}  # repository -> digests the upstream served in it
        self.private: set[str] = set()  # asked, and anonymous pulls were refused (memory only)
        self._verified: OrderedDict[str, bytes] = OrderedDict()  # hex -> body, checked once
        self._verified_bytes = 0

    def open(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            state = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("cache state %s is unreadable, starting afresh: %s", self.state_path, exc)
            return
        self.types = {k: v for k, v in state.get("types", {}).items() if (self.dir / k).exists()}
        self.tags = {k: v for k, v in state.get("tags", {}).items() if v in self.types}
        self.anonymous = set(state.get("anonymous", []))
        self.links = {repo: set(digests) for repo, digests in state.get("links", {}).items()}

    def get(self, digest: str) -> CachedManifest | None:
        hexpart = digest.removeprefix("sha256:")
        media_type = self.types.get(hexpart)
        if media_type is None:
            return None
        body = self._verified.get(hexpart)
        if body is None:
            try:
                body = (self.dir / hexpart).read_bytes()
            except OSError:
                return None
            if hashlib.sha256(body).hexdigest() != hexpart:  # a damaged file is never served
                return None
            self._remember_verified(hexpart, body)
        else:
            self._verified.move_to_end(hexpart)
        return CachedManifest(f"sha256:{hexpart}", media_type, body)

    def _remember_verified(self, hexpart: str, body: bytes) -> None:
        """Keep recently served manifests in memory (bounded): no disk read or hash per hit."""
        if hexpart not in self._verified:
            self._verified_bytes += len(body)
        self._verified[hexpart] = body
        while self._verified_bytes > MEMORY_LIMIT and self._verified:
            _key, old = self._verified.popitem(last=False)
            self._verified_bytes -= len(old)

    def tag(self, repository: str, tag: str) -> str | None:
        hexpart = self.tags.get(f"{repository}:{tag}")
        return f"sha256:{hexpart}" if hexpart else None

    def put(self, repository: str, reference: str, media_type: str, body: bytes) -> str | None:
        """Store a manifest fetched for ``reference`` (a tag or its digest); return its digest.

        A body that does not hash to the digest it was asked by is refused (None).
        """
        hexpart = hashlib.sha256(body).hexdigest()
        if reference.startswith("sha256:") and reference != f"sha256:{hexpart}":
            return None
        path = self.dir / hexpart
        self._remember_verified(hexpart, body)
        if not path.exists():
            temp = path.with_suffix(".partial")
            temp.write_bytes(body)
            os.replace(temp, path)
        self.types[hexpart] = media_type
        if not reference.startswith("sha256:"):
            self.tags[f"{repository}:{reference}"] = hexpart
        self.links.setdefault(repository, set()).add(f"sha256:{hexpart}")
        self._save()
        return f"sha256:{hexpart}"

    def link(self, repository: str, digest: str) -> None:
        """Record that the upstream served ``digest`` under ``repository``.

        Registries scope blobs and manifests to repositories; a stale answer (the upstream
        down) may only give a digest under a repository that was seen to hold it.
        """
        linked = self.links.setdefault(repository, set())
        if digest not in linked:
            linked.add(digest)
            self._save()

    def linked(self, repository: str, digest: str) -> bool:
        return digest in self.links.get(repository, ())

    def set_anonymous(self, repository: str, readable: bool) -> None:
        if readable:
            self.anonymous.add(repository)
            self.private.discard(repository)
        else:
            self.anonymous.discard(repository)
            self.private.add(repository)
        self._save()

    def _save(self) -> None:
        state = {
            "types": self.types,
            "tags": self.tags,
            "anonymous": sorted(self.anonymous),
            "links": {repo: sorted(digests) for repo, digests in self.links.items()},
        }
        temp = self.state_path.with_suffix(".partial")
        try:
            temp.write_text(json.dumps(state))
            os.replace(temp, self.state_path)
        except OSError as exc:
            log.warning("cannot save the cache state %s: %s", self.state_path, exc)
