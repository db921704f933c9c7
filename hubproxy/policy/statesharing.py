"""The manifest state several instances share through the cache store (``--cache-store``): the
keys it lives under, its records, and when a record is written again or taken in. Pure.

What is shared is what a stale answer rests on (``cachepolicy.stale_allowed``) and what saves an
upstream GET: the bytes of a manifest (by digest, immutable), what a tag named for a kind of
client (the set of media types it accepts), which digests the upstream served in a repository
(with their media type; blobs with none), and whether anyone may read a repository (with when
that was learned). An instance that lacks one of these facts locally may take another's from the
store; the rules applied to it afterwards are the local ones, unchanged.

Keys, under the store's prefix (``@`` never occurs in a repository name or a tag, so no key is
another's prefix directory):

- ``manifests/<hex>``: the body, byte-exact (verified against its digest whenever read);
- ``tags/<repository>/<tag>@<accepts>``: :class:`TagRecord` as JSON, ``<accepts>`` a short hash
  of the accepted media types (the local key of a tag);
- ``links/<repository>@<hex>``: the media type the upstream served that digest with there;
- ``readability/<repository>@anyone``: :class:`ReadabilityRecord` as JSON;
- ``readability/@latest``: the last repository learned readable by anyone (the ``/v2/`` ping of
  an instance that knows none yet: ``cachepolicy.ping_stale_allowed``).

A registry host's port (``host:5000/owner/image``) is spelled ``host+5000``: ``:`` is not safe in
every store's keys.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

from .cachepolicy import Readability

MANIFESTS = "manifests"
TAGS = "tags"
LINKS = "links"
READABILITY = "readability"
LATEST_READABLE = f"{READABILITY}/@latest"

_HEX = re.compile(r"[0-9a-f]{64}\Z")
_REPOSITORY = re.compile(r"[A-Za-z0-9._/:-]{1,512}\Z")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\Z")


def _name(repository: str) -> str | None:
    """The repository as a key path, or None for a name that cannot be one (never published)."""
    if not _REPOSITORY.match(repository):
        return None
    if any(part in ("", ".", "..") for part in repository.split("/")):
        return None
    return repository.replace(":", "+")


def accepts_id(accept_key: str) -> str:
    """A short, stable name for a set of accepted media types (the local tag key)."""
    return hashlib.sha256(accept_key.encode()).hexdigest()[:16]


def manifest_key(hexpart: str) -> str:
    return f"{MANIFESTS}/{hexpart}"


def tag_key(repository: str, tag: str, accept_key: str) -> str | None:
    name = _name(repository)
    if name is None or not _TAG.match(tag):
        return None
    return f"{TAGS}/{name}/{tag}@{accepts_id(accept_key)}"


def link_key(repository: str, digest: str) -> str | None:
    name = _name(repository)
    hexpart = digest.removeprefix("sha256:")
    if name is None or not digest.startswith("sha256:") or not _HEX.match(hexpart):
        return None
    return f"{LINKS}/{name}@{hexpart}"


def readability_key(repository: str) -> str | None:
    name = _name(repository)
    return None if name is None else f"{READABILITY}/{name}@anyone"


@dataclass(frozen=True)
class TagRecord:
    """What a tag named when an instance last had it from the upstream."""

    digest: str  # sha256:<hex>
    media_type: str
    accepts: str  # the accepted media types it was resolved for (the local tag key)
    resolved_at: float  # wall clock


def encode_tag(record: TagRecord) -> bytes:
    return json.dumps(
        {
            "digest": record.digest,
            "media_type": record.media_type,
            "accepts": record.accepts,
            "resolved_at": record.resolved_at,
        }
    ).encode()


def decode_tag(data: bytes, accept_key: str) -> TagRecord | None:
    """The record if ``data`` is one, for this very set of accepted types; None otherwise."""
    document = _json_object(data)
    if document is None:
        return None
    digest, media_type = document.get("digest"), document.get("media_type")
    accepts, resolved_at = document.get("accepts"), document.get("resolved_at")
    if not (
        isinstance(digest, str)
        and digest.startswith("sha256:")
        and _HEX.match(digest[7:])
        and isinstance(media_type, str)
        and 0 < len(media_type) <= 255
        and accepts == accept_key
        and isinstance(resolved_at, int | float)
    ):
        return None
    return TagRecord(digest, media_type, accept_key, float(resolved_at))


@dataclass(frozen=True)
class ReadabilityRecord:
    repository: str
    readability: Readability


def encode_readability(record: ReadabilityRecord) -> bytes:
    return json.dumps(
        {
            "repository": record.repository,
            "anonymous": record.readability.anonymous,
            "learned_at": record.readability.learned_at,
        }
    ).encode()


def decode_readability(data: bytes) -> ReadabilityRecord | None:
    document = _json_object(data)
    if document is None:
        return None
    repository = document.get("repository")
    anonymous, learned_at = document.get("anonymous"), document.get("learned_at")
    if (
        not isinstance(repository, str)
        or _name(repository) is None
        or not isinstance(anonymous, bool)
        or not isinstance(learned_at, int | float)
    ):
        return None
    return ReadabilityRecord(repository, Readability(anonymous, float(learned_at)))


def decode_link(data: bytes) -> str | None:
    """The media type a link record names ("" for a blob), None if it is not one."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        return None
    return text if len(text) <= 255 and text.isprintable() else None


def _json_object(data: bytes) -> dict[str, object] | None:
    try:
        document = json.loads(data)
    except (ValueError, RecursionError):
        return None
    return document if isinstance(document, dict) else None


def rewrite_due(
    previous: tuple[str, float] | None, content: str, now: float, interval: float
) -> bool:
    """Whether to write a mutable record again: ``previous`` is what this instance last wrote
    under its key (content, when); the same content is written again only ``interval`` later
    (a tag re-resolved to the same digest by every pull would otherwise be one PUT each)."""
    if previous is None or previous[0] != content:
        return True
    return not 0 <= now - previous[1] < interval


def take_readability(local: Readability | None, theirs: Readability) -> bool:
    """Whether another instance's answer replaces this one's: only a more recent one (the
    window rules then apply to it as to any: ``cachepolicy.anonymously_readable``)."""
    return local is None or theirs.learned_at > local.learned_at
