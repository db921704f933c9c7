"""Prefetch: what to fetch for an image, and how to tell a person about it. Pure.

``hubproxy prefetch`` (and the config file's ``prefetch`` list, refreshed by a running mirror)
pulls images the way a client would, so that the next real pull finds everything cached. The
I/O is ``hubproxy.prefetch``; the rules live here:

* :func:`parse_image`: an image as people spell it (``nginx``, ``nginx:1.27``,
  ``ghcr.io/o/app:tag``, ``docker.io/library/nginx@sha256:...``) to registry, repository and
  reference, with docker's rules (``registries.looks_like_host`` for the first component, the
  implied ``library/`` and ``latest``), and the path a mirror serves it under;
* :func:`parse_platforms`, :func:`machine_platform`, :func:`select_platforms`: which of an
  index's manifests to fetch (``--platform``, ``--all-platforms``, else this machine's, like
  ``docker pull``);
* :func:`parse_manifest`: the blobs an image manifest names, the children an index names;
* :func:`advice`: the one line per failure saying what failed and what to do;
* :class:`Tally`, :func:`progress_line`, :func:`summary_line`: the progress and the summary;
* :class:`FailureMemory`: the scheduled refresh logs a failure once, and its recovery once.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from .registries import DEFAULT_REGISTRY, canonical_registry, looks_like_host, upstream_name
from .sizes import format_decimal_size

MEDIA_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
INDEX_TYPES = frozenset({MEDIA_DOCKER_LIST, MEDIA_OCI_INDEX})
IMAGE_TYPES = frozenset({MEDIA_DOCKER_MANIFEST, MEDIA_OCI_MANIFEST})
# what docker and containerd send: every kind of manifest and index they can pull
ACCEPT = ", ".join((MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST, MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST))
MAX_DESCRIPTORS = 1024  # blobs of one image, manifests of one index: a real one has dozens

# distribution/reference's grammar
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


# -- images ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageRef:
    """One image to prefetch: ``registry`` by its table name, ``repository`` as that registry
    names it (Docker Hub's ``library/`` added), ``reference`` a tag or a ``sha256:`` digest."""

    registry: str
    repository: str
    reference: str
    text: str  # as the user wrote it: what lines about it say

    @property
    def by_digest(self) -> bool:
        return self.reference.startswith("sha256:")

    @property
    def path(self) -> str:
        """The name a mirror serves it under (``/v2/<path>/...``): Docker Hub's images as they
        are (a mirror's default registry), others behind their registry (``ghcr.io/o/app``),
        which is how docker names them to a mirror."""
        if self.registry == DEFAULT_REGISTRY:
            return self.repository
        return f"{self.registry}/{self.repository}"

    @property
    def tag(self) -> str | None:
        return None if self.by_digest else self.reference

    def __str__(self) -> str:
        return self.text


def parse_image(text: str) -> ImageRef:
    """An image as people spell it; ValueError saying what is wrong. ``name:tag@digest`` is
    pulled by its digest (as docker does); no tag means ``latest``."""
    spelled = text.strip()
    rest, at, digest = spelled.partition("@")
    if at and not _DIGEST.fullmatch(digest):
        raise ValueError(f"{text!r}: the digest after @ must be sha256: and 64 hex digits")
    first, slash, remainder = rest.partition("/")
    registry = DEFAULT_REGISTRY
    if slash and looks_like_host(first):
        registry, rest = canonical_registry(first), remainder
    name, colon, tag = rest.rpartition(":") if ":" in rest else (rest, "", "")
    if not colon:
        name, tag = rest, "latest"
    if not name or not _PATH.fullmatch(name):
        raise ValueError(
            f"{text!r} is not an image name: lowercase letters, digits, and . _ - / between "
            "them, e.g. nginx:1.27 or ghcr.io/owner/app:tag"
        )
    if not _TAG.fullmatch(tag):
        raise ValueError(f"{text!r}: {tag!r} is not a tag (letters, digits, _ . -)")
    repository = upstream_name(name, library_prefix=registry == DEFAULT_REGISTRY)
    return ImageRef(registry, repository, digest if at else tag, spelled)


# -- platforms ------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        tail = f"/{self.variant}" if self.variant else ""
        return f"{self.os}/{self.architecture}{tail}"


_PLATFORM = re.compile(r"[a-z0-9_.-]+")
# uname -m to the architecture (and variant) of the OCI image spec, as docker maps them
_MACHINES = {
    "x86_64": ("amd64", ""),
    "amd64": ("amd64", ""),
    "aarch64": ("arm64", ""),
    "arm64": ("arm64", ""),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "i386": ("386", ""),
    "i686": ("386", ""),
    "ppc64le": ("ppc64le", ""),
    "s390x": ("s390x", ""),
    "riscv64": ("riscv64", ""),
}


def parse_platform(text: str) -> Platform:
    """``linux/amd64``, ``linux/arm64/v8``, ``linux/arm/v7``; ValueError otherwise."""
    parts = text.strip().lower().split("/")
    if not 2 <= len(parts) <= 3 or not all(_PLATFORM.fullmatch(p) for p in parts):
        raise ValueError(f"{text!r} is not a platform: write OS/ARCH[/VARIANT], e.g. linux/arm64")
    return Platform(*parts)


def parse_platforms(text: str) -> tuple[Platform, ...]:
    """A comma-separated list of platforms (``linux/amd64,linux/arm64``), duplicates dropped."""
    items = [item for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError("no platform given: write OS/ARCH[/VARIANT], e.g. linux/arm64")
    return tuple(dict.fromkeys(parse_platform(item) for item in items))


def machine_platform(system: str, machine: str) -> Platform:
    """The platform of a machine from ``uname -s`` and ``uname -m`` (``Linux``, ``x86_64``):
    what ``docker pull`` picks from an index there. An unknown machine is taken as it is."""
    architecture, variant = _MACHINES.get(machine.lower(), (machine.lower(), ""))
    return Platform(system.lower(), architecture, variant)


def _matches(wanted: Platform, offered: Platform) -> bool:
    if (wanted.os, wanted.architecture) != (offered.os, offered.architecture):
        return False
    if not wanted.variant:
        return True
    # containerd's normalisation: arm64 means v8 when no variant is written
    if wanted.architecture == "arm64":
        return (offered.variant or "v8") == wanted.variant
    return offered.variant == wanted.variant


# -- manifests ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Descriptor:
    digest: str
    size: int
    media_type: str = ""
    platform: Platform | None = None


@dataclass(frozen=True)
class Manifest:
    """An index (``children``: its manifests) or an image (``blobs``: config first, then layers)."""

    index: bool
    children: tuple[Descriptor, ...] = ()
    blobs: tuple[Descriptor, ...] = ()


class BadManifest(ValueError):
    """A manifest prefetch cannot follow (its message says why)."""


def _descriptor(item: object) -> Descriptor:
    if not isinstance(item, dict):
        raise BadManifest("a descriptor is not an object")
    digest, size = item.get("digest"), item.get("size")
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise BadManifest(f"a descriptor has no sha256 digest ({str(digest)[:80]!r})")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise BadManifest(f"descriptor {digest} has no size")
    platform = None
    described = item.get("platform")
    if isinstance(described, dict):
        os_name, arch = described.get("os"), described.get("architecture")
        variant = described.get("variant") or ""
        if isinstance(os_name, str) and isinstance(arch, str) and isinstance(variant, str):
            platform = Platform(os_name.lower(), arch.lower(), variant.lower())
    media_type = item.get("mediaType")
    return Descriptor(digest, size, media_type if isinstance(media_type, str) else "", platform)


def _items(document: dict[str, Any], key: str) -> list[object]:
    items = document.get(key)
    if not isinstance(items, list):
        raise BadManifest(f"its {key!r} is not a list")
    if len(items) > MAX_DESCRIPTORS:
        raise BadManifest(f"it names {len(items)} {key}, more than {MAX_DESCRIPTORS}")
    return items


def parse_manifest(body: bytes, media_type: str) -> Manifest:
    """What an index or an image manifest names; BadManifest for anything else (a schema 1
    manifest, which registries stopped serving, included)."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadManifest("it is not JSON") from exc
    if not isinstance(document, dict):
        raise BadManifest("it is not a JSON object")
    kind = media_type or str(document.get("mediaType") or "")
    if kind in INDEX_TYPES or (not kind and "manifests" in document):
        children = tuple(_descriptor(item) for item in _items(document, "manifests"))
        return Manifest(index=True, children=children)
    if kind in IMAGE_TYPES or (not kind and "layers" in document):
        config = _descriptor(document.get("config"))
        layers = tuple(_descriptor(item) for item in _items(document, "layers"))
        return Manifest(index=False, blobs=(config, *layers))
    raise BadManifest(f"it is of type {kind[:100]!r}, which prefetch does not follow")


def _attestation(child: Descriptor) -> bool:
    # buildkit's provenance and SBOM manifests sit in the index as platform unknown/unknown
    return child.platform is not None and child.platform.os == "unknown"


def select_platforms(
    index: Manifest, wanted: tuple[Platform, ...] | None
) -> tuple[list[Descriptor], list[Platform]]:
    """The manifests of ``index`` to fetch: for each ``wanted`` platform the first that fits
    (``None``: every runnable one, attestations left out); and the wanted platforms that none
    fits."""
    runnable = [child for child in index.children if not _attestation(child)]
    if wanted is None:
        return list({child.digest: child for child in runnable}.values()), []
    chosen: dict[str, Descriptor] = {}
    missing = []
    for platform in wanted:
        fit = next(
            (c for c in runnable if c.platform is not None and _matches(platform, c.platform)),
            None,
        )
        if fit is None:
            missing.append(platform)
        else:
            chosen.setdefault(fit.digest, fit)
    return list(chosen.values()), missing


def offered_platforms(index: Manifest) -> str:
    """``linux/amd64, linux/arm64/v8``: what an index offers, for a line saying it lacks one."""
    names = sorted({str(c.platform) for c in index.children if c.platform and not _attestation(c)})
    return ", ".join(names) or "none"


# -- failures -------------------------------------------------------------------------------

_ADVICE = {
    # Docker Hub answers 401 for a repository that does not exist, too
    401: "no such repository, or a private one: check its name; for a private image give the "
    "mirror a login for its registry (registry-login in its config file)",
    403: "refused: the mirror's images-allow/images-deny rules, or the registry, do not let "
    "this image be pulled",
    404: "no such image, tag or digest upstream: check its spelling (and the registry)",
    429: "the upstream's rate limit was hit: retry later, or give the mirror a login "
    "(registry-login) for a higher limit",
}


def advice(status: int, message: str) -> str:
    """What failed and what to do, from the status of the failed answer and its message."""
    what = _ADVICE.get(status)
    if what is None and status >= 500:
        what = "the mirror or its upstream failed: see the mirror's log, and retry"
    if what is None:
        what = f"unexpected answer {status}" if status else "see above, and retry"
    return f"{message} ({what})" if message else what


# -- progress and summary ----------------------------------------------------------------------


@dataclass
class Tally:
    """What a prefetch run did so far, in numbers (one per run; the tasks add to it)."""

    images: int = 0  # images asked for
    images_done: int = 0  # of those, finished (fetched whole, or failed)
    failed: int = 0
    manifests: int = 0  # image manifests fetched (one per platform)
    blobs: int = 0  # blobs to fetch, as known so far (an index's platforms add theirs later)
    blobs_done: int = 0
    bytes_fetched: int = 0  # blob bytes the mirror fetched from its upstream for us
    bytes_cached: int = 0  # blob bytes it had cached already
    failures: list[str] = field(default_factory=list)  # one line each

    @property
    def bytes(self) -> int:
        return self.bytes_fetched + self.bytes_cached


def _rate(count: int, seconds: float) -> str:
    if seconds <= 0:
        return "-"
    return f"{format_decimal_size(int(count / seconds))}/s"


def progress_line(tally: Tally, seconds: float) -> str:
    """``2/3 images, 14/20 blobs, 68.2 MB (41.0 MB/s)``: the line a terminal redraws."""
    return (
        f"{tally.images_done}/{tally.images} images, {tally.blobs_done}/{tally.blobs} blobs, "
        f"{format_decimal_size(tally.bytes)} ({_rate(tally.bytes, seconds)})"
    )


def summary_line(tally: Tally, seconds: float) -> str:
    """The last line of a run: images, blobs, bytes fetched and already cached, time, failures."""
    ok = tally.images - tally.failed
    failed = f"; {tally.failed} failed" if tally.failed else ""
    return (
        f"prefetched {ok} of {tally.images} image{'s' if tally.images != 1 else ''} "
        f"({tally.manifests} manifest{'s' if tally.manifests != 1 else ''}, "
        f"{tally.blobs_done} blob{'s' if tally.blobs_done != 1 else ''}): "
        f"{format_decimal_size(tally.bytes_fetched)} fetched, "
        f"{format_decimal_size(tally.bytes_cached)} already cached, "
        f"in {seconds:.1f} s{failed}"
    )


# -- the scheduled refresh's log ---------------------------------------------------------------


class FailureMemory:
    """Which images of the ``prefetch`` list failed last round, and how: a failure is logged
    when it starts or changes, not every round while it persists; a recovery is logged once.
    Bounded by the list itself (one entry per image of it at most)."""

    def __init__(self) -> None:
        self._failing: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._failing)

    def failed(self, image: str, reason: str) -> bool:
        """Note a failure of ``image``; True if it is news (log it)."""
        news = self._failing.get(image) != reason
        self._failing[image] = reason
        return news

    def succeeded(self, image: str) -> bool:
        """Note a success of ``image``; True if it had been failing (log the recovery)."""
        return self._failing.pop(image, None) is not None

    def forget_others(self, images: set[str]) -> None:
        """Drop entries of images no longer in the list."""
        for image in [i for i in self._failing if i not in images]:
            del self._failing[image]
