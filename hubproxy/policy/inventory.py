"""What the cache holds, image by image, and what removing one takes: pure, over plain values.

``hubproxy cache ls``, ``rm`` and ``refresh`` and the admin API read the cache's state (tags,
manifests and the repositories they were served in, blob sizes, pull counts: ``cache/inventory``
gathers it into a :class:`CacheState`) and ask this module.

An *image* is one row: a manifest at the top (an image manifest, or an index of platforms) in
one repository, the tags naming it there, and what it takes: its platform manifests present in
the cache and the config and layer blobs of each. A tag that names a platform manifest of an
index it also names (a client that takes no index got that one) adds to the index's row. A
manifest pulled by digest and named by no tag is a row of its own (shown ``@sha256:...``).

Removing never takes what another image still uses: a manifest goes only when no image left
includes it, a blob only when no manifest left in the cache names it. Only a bare digest
(``sha256:...``, no repository) is removed whatever uses it: the operator asked for exactly that.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from .access import parse_image_pattern
from .errors import BadImageName, NotCached
from .registries import DEFAULT_REGISTRY, canonical_registry, looks_like_host, upstream_name
from .sizes import format_size

_HEX = re.compile(r"[0-9a-f]{64}")
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
MAX_REFERENCE = 512
MAX_CHILDREN = 256  # platforms read from one index (real ones have a dozen or two)
MAX_BLOBS = 1024  # blobs read from one image manifest


class Removal:
    """What a removal names (``cache/manifests.Removal`` writes these kinds to its journal)."""

    TAG = "tag"
    MANIFEST = "manifest"
    LINK = "link"
    REPOSITORY = "repository"
    BLOB = "blob"


# -- names -------------------------------------------------------------------------------------


def image_key(repository: str, reference: str) -> str:
    """The name pulls are counted under: ``repo:tag``, or ``repo@sha256:...`` for a digest
    (``repo`` as the cache keeps it: ``library/nginx``, ``ghcr.io/owner/app``)."""
    if reference.startswith("sha256:"):
        return f"{repository}@{reference}"
    return f"{repository}:{reference}"


def state_name(registry: str, repository: str) -> str:
    """The name the cache keeps a repository under: Docker Hub's plain, others' with their
    registry (``pullthrough.state_name`` of a request)."""
    return repository if registry == DEFAULT_REGISTRY else f"{registry}/{repository}"


def split_state_name(name: str) -> tuple[str, str]:
    """``(registry, repository)`` of a name the cache keeps: the inverse of :func:`state_name`."""
    first, slash, rest = name.partition("/")
    if slash and looks_like_host(first):
        return first, rest
    return DEFAULT_REGISTRY, name


@dataclass(frozen=True)
class ImageRef:
    """An image as a user names it: ``nginx``, ``nginx:1.27``, ``ghcr.io/owner/app:v1``,
    ``docker.io/library/nginx@sha256:...``; or a bare digest (``repository`` empty)."""

    registry: str  # the registry's table name ("docker.io", "ghcr.io")
    repository: str  # as the registry names it ("library/nginx"); "" for a bare digest
    tag: str | None = None
    digest: str | None = None  # "sha256:<hex>"

    @property
    def name(self) -> str:
        """The repository as the cache keeps it."""
        return state_name(self.registry, self.repository)

    def __str__(self) -> str:
        if not self.repository:
            return self.digest or ""
        shown = self.name
        if self.tag is not None:
            shown += f":{self.tag}"
        if self.digest is not None:
            shown += f"@{self.digest}"
        return shown


def parse_image_ref(text: str) -> ImageRef:
    """Parse an image reference the way docker reads one (a first component with a dot, a colon
    or ``localhost`` names a registry; Docker Hub's one-word names are ``library/``); raise
    BadImageName saying what is wrong."""
    text = text.strip()
    if not text or len(text) > MAX_REFERENCE:
        raise BadImageName(f"not an image name: {text[:80]!r}")
    name, at, digest = text.partition("@")
    if not at and _bare_digest(name):
        return ImageRef("", "", digest=name)
    if (at and not _bare_digest(digest)) or (not at and name.startswith("sha256:")):
        raise BadImageName(f"{text[:80]!r}: a digest is sha256: and 64 lowercase hex digits")
    tag = None
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name, _, tag = name.rpartition(":")
        if not _TAG.fullmatch(tag):
            raise BadImageName(f"{text[:80]!r}: {tag!r} is not a tag")
    first, slash, rest = name.partition("/")
    registry = DEFAULT_REGISTRY
    if slash and looks_like_host(first):
        registry, name = canonical_registry(first), rest
    if not _REPOSITORY.fullmatch(name):
        raise BadImageName(
            f"{text[:80]!r}: not a repository name (lowercase letters, digits, . _ - and /)"
        )
    repository = upstream_name(name, library_prefix=registry == DEFAULT_REGISTRY)
    return ImageRef(registry, repository, tag, digest if at else None)


def _bare_digest(text: str) -> bool:
    return text.startswith("sha256:") and _HEX.fullmatch(text[7:]) is not None


# -- manifests ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ManifestFacts:
    """What a manifest names: an image manifest its config and layers, an index its platform
    manifests (digest and ``os/arch[/variant]``)."""

    blobs: tuple[str, ...] = ()  # hex digests
    children: tuple[tuple[str, str], ...] = ()  # (hex, platform)

    @property
    def is_index(self) -> bool:
        return bool(self.children)


def manifest_facts(body: bytes) -> ManifestFacts:
    """The facts of a manifest body (OCI or Docker, schema 1's ``fsLayers`` too); nothing for
    a body that does not parse."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return ManifestFacts()
    if not isinstance(document, dict):
        return ManifestFacts()
    entries = document.get("manifests")
    if isinstance(entries, list):
        children = []
        for entry in entries[:MAX_CHILDREN]:
            hexpart = _hex_of(entry.get("digest") if isinstance(entry, dict) else None)
            if hexpart is not None:
                children.append((hexpart, _platform(entry.get("platform"))))
        return ManifestFacts(children=tuple(children))
    descriptors: list[object] = []
    config = document.get("config")
    if isinstance(config, dict):
        descriptors.append(config.get("digest"))
    layers = document.get("layers")
    key = "digest"
    if layers is None:
        layers, key = document.get("fsLayers"), "blobSum"
    if isinstance(layers, list):
        descriptors += [layer.get(key) for layer in layers[:MAX_BLOBS] if isinstance(layer, dict)]
    blobs = (_hex_of(item) for item in descriptors)
    return ManifestFacts(blobs=tuple(dict.fromkeys(b for b in blobs if b is not None)))


def _hex_of(digest: object) -> str | None:
    if isinstance(digest, str) and _bare_digest(digest):
        return digest[7:]
    return None


def _platform(value: object) -> str:
    if not isinstance(value, dict):
        return "unknown"
    parts = [value.get("os"), value.get("architecture"), value.get("variant")]
    shown = "/".join(str(part) for part in parts if isinstance(part, str) and part)
    return shown[:64] or "unknown"


# -- the inventory -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    pulls: int = 0  # manifest GETs answered
    hits: int = 0  # of them, without an upstream GET
    used: float = 0.0  # wall clock of the last; 0: never


@dataclass(frozen=True)
class CacheState:
    """The cache as read at one moment (``cache/inventory.read_state``)."""

    tags: Mapping[str, Mapping[str, str]]  # "repo:tag" -> {Accept key: manifest hex}
    links: Mapping[str, Mapping[str, str]]  # repo -> {digest: media type ("": a blob)}
    manifests: Mapping[str, ManifestFacts]  # hex -> facts, for every body cached
    manifest_sizes: Mapping[str, int]  # hex -> bytes of the body
    blobs: Mapping[str, int]  # hex -> bytes on disk, for every blob cached
    usage: Mapping[str, Usage] = field(default_factory=dict)  # image_key -> counts


@dataclass(frozen=True)
class Image:
    """One row of ``hubproxy cache ls``."""

    registry: str
    repository: str  # as the registry names it
    digest: str  # "sha256:..." of the top manifest
    tags: tuple[str, ...]
    platforms: tuple[str, ...]  # of an index: the platforms whose manifest is cached
    platforms_listed: int  # of an index: how many it lists; 0 for an image manifest
    size: int  # bytes of its blobs in the cache (each counted once)
    blobs_cached: int
    blobs_named: int
    pulls: int
    hits: int
    last_used: float  # 0: not pulled since counting began
    manifests: frozenset[str]  # hex of the top manifest and its cached platform manifests
    blob_keys: frozenset[str]  # hex of every blob they name

    @property
    def name(self) -> str:
        return state_name(self.registry, self.repository)

    @property
    def shown(self) -> str:
        """``library/nginx:1.27,latest`` or ``library/nginx@sha256:0123456789ab``."""
        if self.tags:
            return f"{self.name}:{','.join(self.tags)}"
        return f"{self.name}@{self.digest[:19]}"

    def as_json(self) -> dict[str, object]:
        return {
            "registry": self.registry,
            "repository": self.repository,
            "tags": list(self.tags),
            "digest": self.digest,
            "platforms": list(self.platforms),
            "platforms_listed": self.platforms_listed,
            "size": self.size,
            "blobs_cached": self.blobs_cached,
            "blobs_named": self.blobs_named,
            "pulls": self.pulls,
            "hits": self.hits,
            "last_used": self.last_used or None,
        }


def images(state: CacheState) -> list[Image]:
    """Every image the cache holds, sorted by registry, repository, then tags (untagged
    last)."""
    by_repository = _rows(state)
    found = []
    for name, rows in by_repository.items():
        registry, repository = split_state_name(name)
        for top, tags in rows.items():
            found.append(_image(state, registry, repository, name, top, tuple(sorted(tags))))
    found.sort(
        key=lambda i: (
            i.registry != DEFAULT_REGISTRY,
            i.registry,
            i.repository,
            not i.tags,
            i.tags,
            i.digest,
        )
    )
    return found


def _children(state: CacheState, hexpart: str) -> tuple[str, ...]:
    facts = state.manifests.get(hexpart)
    return tuple(child for child, _ in facts.children) if facts is not None else ()


def _rows(state: CacheState) -> dict[str, dict[str, set[str]]]:
    """repository -> {top manifest hex: its tags}."""
    rows: dict[str, dict[str, set[str]]] = {}
    for name, keyed in state.tags.items():
        repository, _, tag = name.rpartition(":")
        named = {h for h in keyed.values() if h in state.manifests}
        inside = {c for h in named for c in _children(state, h)}
        for hexpart in named - inside:
            rows.setdefault(repository, {}).setdefault(hexpart, set()).add(tag)
    for repository, linked in state.links.items():
        hexes = {d[7:] for d, media in linked.items() if media and d[7:] in state.manifests}
        inside = {c for h in hexes for c in _children(state, h)}
        mine = rows.setdefault(repository, {})
        inside |= {c for h in mine for c in _children(state, h)}
        for hexpart in hexes - inside:
            mine.setdefault(hexpart, set())
        if not mine:
            del rows[repository]
    return rows


def _image(
    state: CacheState, registry: str, repository: str, name: str, top: str, tags: tuple[str, ...]
) -> Image:
    facts = state.manifests.get(top, ManifestFacts())
    children = [(c, p) for c, p in facts.children if c in state.manifests]
    manifests = frozenset({top, *(c for c, _ in children)})
    blob_keys = frozenset(b for h in manifests for b in state.manifests[h].blobs)
    cached = [b for b in blob_keys if b in state.blobs]
    counted = [state.usage.get(f"{name}:{tag}") for tag in tags]
    counted.append(state.usage.get(f"{name}@sha256:{top}"))
    usage = [u for u in counted if u is not None]
    return Image(
        registry=registry,
        repository=repository,
        digest=f"sha256:{top}",
        tags=tags,
        platforms=tuple(sorted({p for _, p in children})),
        platforms_listed=len(facts.children),
        size=sum(state.blobs[b] for b in cached),
        blobs_cached=len(cached),
        blobs_named=len(blob_keys),
        pulls=sum(u.pulls for u in usage),
        hits=sum(u.hits for u in usage),
        last_used=max((u.used for u in usage), default=0.0),
        manifests=manifests,
        blob_keys=blob_keys,
    )


def select(found: Iterable[Image], registry: str | None, glob: str | None) -> list[Image]:
    """The images of ``registry`` (any name of it) whose repository matches ``glob`` (the
    image globs of ``--images-allow``: ``library/*``, ``nginx``, ``ghcr.io/owner/**``); a glob
    naming no registry is over ``registry`` when one is given. ValueError for a bad glob."""
    wanted = canonical_registry(registry) if registry else None
    pattern = None
    if glob:
        first = glob.split("/", 1)[0]
        if wanted and wanted != DEFAULT_REGISTRY and not looks_like_host(first):
            glob = f"{wanted}/{glob}"
        pattern = parse_image_pattern(glob)
    return [
        image
        for image in found
        if (wanted is None or image.registry == wanted)
        and (pattern is None or pattern.matches(image.registry, image.repository))
    ]


@dataclass(frozen=True)
class Totals:
    images: int
    tags: int
    size: int  # bytes of the listed images' blobs, each blob once
    blobs: int  # blobs in the whole cache
    blob_bytes: int
    manifests: int
    manifest_bytes: int
    unlisted_bytes: int  # blobs no cached manifest names (their manifest was evicted)

    def as_json(self) -> dict[str, int]:
        return {
            "images": self.images,
            "tags": self.tags,
            "size": self.size,
            "cache_blobs": self.blobs,
            "cache_blob_bytes": self.blob_bytes,
            "cache_manifests": self.manifests,
            "cache_manifest_bytes": self.manifest_bytes,
            "unlisted_blob_bytes": self.unlisted_bytes,
        }


def totals(state: CacheState, listed: Sequence[Image]) -> Totals:
    named = {b for facts in state.manifests.values() for b in facts.blobs}
    listed_blobs = {b for image in listed for b in image.blob_keys if b in state.blobs}
    return Totals(
        images=len(listed),
        tags=sum(len(image.tags) for image in listed),
        size=sum(state.blobs[b] for b in listed_blobs),
        blobs=len(state.blobs),
        blob_bytes=sum(state.blobs.values()),
        manifests=len(state.manifests),
        manifest_bytes=sum(state.manifest_sizes.values()),
        unlisted_bytes=sum(size for b, size in state.blobs.items() if b not in named),
    )


# -- the table ---------------------------------------------------------------------------------

_COLUMNS = ("IMAGE", "DIGEST", "PLATFORMS", "SIZE", "BLOBS", "PULLS", "HITS", "LAST PULL")


def ago(seconds: float) -> str:
    """``45s ago``, ``5m ago``, ``3h ago``, ``2d ago``; ``-`` for never."""
    if seconds < 0:
        return "just now"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def table_lines(listed: Sequence[Image], summed: Totals, now: float) -> list[str]:
    """``hubproxy cache ls`` for a terminal: one aligned row per image, then the totals."""
    rows = [_COLUMNS]
    for image in listed:
        if image.platforms_listed:
            platforms = f"{len(image.platforms)}/{image.platforms_listed}: " + ",".join(
                image.platforms
            )
        else:
            platforms = "-"
        rows.append(
            (
                image.shown,
                image.digest[7:19],
                platforms,
                format_size(image.size),
                f"{image.blobs_cached}/{image.blobs_named}",
                str(image.pulls),
                str(image.hits),
                ago(now - image.last_used) if image.last_used else "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    right = {3, 4, 5, 6}  # numbers line up on the right
    lines = [
        "  ".join(
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ).rstrip()
        for row in rows
    ]
    lines.append(total_line(summed))
    return lines


def total_line(summed: Totals) -> str:
    line = (
        f"{summed.images} image{'' if summed.images == 1 else 's'}, {summed.tags} "
        f"tag{'' if summed.tags == 1 else 's'}, {format_size(summed.size)} (shared layers "
        f"counted once); the cache holds {summed.blobs} blob{'' if summed.blobs == 1 else 's'} "
        f"({format_size(summed.blob_bytes)}) and {summed.manifests} manifest"
        f"{'' if summed.manifests == 1 else 's'} ({format_size(summed.manifest_bytes)})"
    )
    if summed.unlisted_bytes:
        line += f"; {format_size(summed.unlisted_bytes)} of blobs belong to no cached manifest"
    return line


# -- removal -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RemovalPlan:
    """What ``rm`` or ``refresh`` takes: removals for the manifest store (``(kind, name)``),
    blob files to delete, and for the report the images gone and the blobs kept."""

    removals: tuple[tuple[str, str], ...]
    blobs: tuple[str, ...]  # hex
    removed: tuple[str, ...]  # what went, for people ("library/nginx:1.27", "sha256:...")
    kept_blobs: int = 0  # blobs of removed images another image still names
    blob_bytes: int = 0  # bytes of ``blobs``


def plan_refresh(state: CacheState, ref: ImageRef) -> RemovalPlan:
    """``refresh IMAGE:TAG``: forget the tag (every client kind's answer), keep the bytes."""
    if ref.tag is None or ref.digest is not None or not ref.repository:
        raise BadImageName(f"{ref}: refresh takes IMAGE:TAG (a digest never changes)")
    name = f"{ref.name}:{ref.tag}"
    if name not in state.tags:
        raise NotCached(f"{name} is not cached")
    return RemovalPlan(((Removal.TAG, name),), (), (name,))


def plan_removal(state: CacheState, ref: ImageRef) -> RemovalPlan:
    """``rm``: a tag (its image goes with its last tag), an image by digest, a whole
    repository (every tag and image of it), or a bare digest (that blob or manifest, whatever
    names it). NotCached if nothing matches."""
    if not ref.repository:
        return _plan_digest(state, (ref.digest or "")[7:])
    found = images(state)
    mine = [image for image in found if image.name == ref.name]
    removals: list[tuple[str, str]] = []
    if ref.tag is not None:
        name = f"{ref.name}:{ref.tag}"
        if name not in state.tags:
            raise NotCached(f"{name} is not cached")
        removals.append((Removal.TAG, name))
        hit = [i for i in mine if ref.tag in i.tags]
        if ref.digest is not None:
            hit = [i for i in hit if i.digest == ref.digest]
        dropped = [i for i in hit if len(i.tags) == 1]  # the others keep another tag
        what = [name]
    elif ref.digest is not None:
        dropped = [i for i in mine if i.digest == ref.digest]
        if not dropped:
            linked = state.links.get(ref.name, {})
            if not linked.get(ref.digest) or ref.digest[7:] not in state.manifests:
                raise NotCached(f"{ref} is not cached")
            dropped = [_image(state, ref.registry, ref.repository, ref.name, ref.digest[7:], ())]
        removals += [(Removal.TAG, f"{ref.name}:{tag}") for i in dropped for tag in i.tags]
        what = [str(ref)]
    else:
        dropped = mine
        if not dropped and ref.name not in state.links:
            raise NotCached(f"{ref.name} is not cached")
        removals += [(Removal.TAG, f"{ref.name}:{tag}") for i in dropped for tag in i.tags]
        removals.append((Removal.REPOSITORY, ref.name))
        what = [ref.name]
    return _collect(state, found, dropped, removals, what, ref.name)


def _collect(
    state: CacheState,
    found: Sequence[Image],
    dropped: Sequence[Image],
    removals: list[tuple[str, str]],
    what: list[str],
    repository: str,
) -> RemovalPlan:
    """Add what the ``dropped`` images take along that nothing left needs: their links in
    ``repository``, manifests no other image includes, blobs no manifest left names."""
    gone = {(i.name, i.digest) for i in dropped}
    left = [i for i in found if (i.name, i.digest) not in gone]
    held = {h for image in left for h in image.manifests}
    manifests = {h for image in dropped for h in image.manifests} - held
    for image in dropped:
        removals += [(Removal.LINK, f"{repository}@sha256:{h}") for h in sorted(image.manifests)]
    removals += [(Removal.MANIFEST, h) for h in sorted(manifests)]
    named = {b for image in dropped for b in image.blob_keys if b in state.blobs}
    still = {b for h, facts in state.manifests.items() if h not in manifests for b in facts.blobs}
    blobs = sorted(named - still)
    return RemovalPlan(
        tuple(dict.fromkeys(removals)),
        tuple(blobs),
        tuple(what),
        kept_blobs=len(named) - len(blobs),
        blob_bytes=sum(state.blobs[b] for b in blobs),
    )


def _plan_digest(state: CacheState, hexpart: str) -> RemovalPlan:
    removals: list[tuple[str, str]] = []
    blobs: tuple[str, ...] = ()
    if hexpart in state.manifests:
        removals.append((Removal.MANIFEST, hexpart))
        removals += [
            (Removal.LINK, f"{repository}@sha256:{hexpart}")
            for repository, linked in sorted(state.links.items())
            if f"sha256:{hexpart}" in linked
        ]
    if hexpart in state.blobs:
        blobs = (hexpart,)
    if not removals and not blobs:
        raise NotCached(f"sha256:{hexpart} is not cached")
    return RemovalPlan(
        tuple(removals),
        blobs,
        (f"sha256:{hexpart}",),
        blob_bytes=sum(state.blobs[b] for b in blobs),
    )
