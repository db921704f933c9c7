"""Pulls as people think of them: one line per image a client pulled, not one per request.

Theory of operation. A pull is a manifest GET followed by GETs of the blobs that manifest names.
``PullTracker`` is fed one event per answered manifest or blob request (``manifest``, ``blob``)
with a clock reading, and groups them by client address and repository:

- a manifest request naming a tag opens a pull of that tag (a different tag from the same client
  and repository closes the previous one); one naming a digest joins the open pull, so an index
  followed by its platform's manifest (by digest) is one pull. A HEAD only names the tag (a
  client resolving a tag to a digest first): a pull that never sees a manifest GET is dropped
  without a word, as is a HEAD that finds the image up to date.
- an image manifest's body names its layers (``manifest_layers``); each layer GET that completed
  counts once. The pull ends when every layer was served, or after ``QUIET`` seconds without an
  event (the client had some layers already, or went away).

Nothing here reads a clock or does I/O: times are the caller's (one monotonic clock for windows
and durations, the wall clock only to show when a pull started). Memory is bounded: at most
``MAX_OPEN`` pulls open (the oldest is ended early), ``MAX_LAYERS`` layers per pull, ``RECENT``
pulls remembered for the status page.
"""

from __future__ import annotations

import functools
import json
from collections import deque
from dataclasses import dataclass, field

from .sizes import format_decimal_size

QUIET = 10.0  # seconds without an event after which a pull is reported as it stands
MAX_OPEN = 256  # pulls followed at once; past it the one quiet longest is ended early
MAX_LAYERS = 512  # layer digests awaited per pull (a real image has a few dozen at most)
RECENT = 20  # pulls the status page lists
# manifest bodies whose layers are remembered (at most this many, each at most this large)
LAYERS_MEMO = 16
LAYERS_MEMO_BODY = 64 * 1024
DIGEST_SHOWN = 12  # hex digits of a digest reference shown in an image name


def is_digest(reference: str) -> bool:
    """Whether a manifest reference is a digest (``sha256:...``) rather than a tag."""
    return ":" in reference  # a tag cannot hold a colon (distribution's tag grammar)


def image_name(repository: str, reference: str) -> str:
    """``library/alpine:3.20``, or ``library/alpine@sha256:0123456789ab`` for a digest."""
    if is_digest(reference):
        algorithm, _, value = reference.partition(":")
        return f"{repository}@{algorithm}:{value[:DIGEST_SHOWN]}"
    return f"{repository}:{reference}"


def manifest_layers(body: bytes) -> frozenset[str] | None:
    """The layer digests an image manifest names (OCI, Docker schema 2, or schema 1's
    ``fsLayers``); None for an index, a manifest list, or anything that does not parse.

    The last few small bodies' answers are remembered: one manifest is asked for again and
    again (every pull of an image, every client of a mirror), and parsing it is the dear part."""
    if len(body) > LAYERS_MEMO_BODY:
        return _parse_layers(body)
    return _remembered_layers(body)


@functools.lru_cache(maxsize=LAYERS_MEMO)
def _remembered_layers(body: bytes) -> frozenset[str] | None:
    return _parse_layers(body)


def _parse_layers(body: bytes) -> frozenset[str] | None:
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(document, dict):
        return None
    layers = document.get("layers")
    key = "digest"
    if layers is None:
        layers, key = document.get("fsLayers"), "blobSum"
    if not isinstance(layers, list):
        return None
    digests = [
        item[key]
        for item in layers[:MAX_LAYERS]
        if isinstance(item, dict) and isinstance(item.get(key), str)
    ]
    return frozenset(digests)


@dataclass(frozen=True)
class PullSummary:
    """One pull as the log line and the status page tell it."""

    client: str
    image: str  # "library/alpine:3.20"
    started_wall: float  # Unix seconds, for people
    layers: int  # layers served (blobs, when the manifest's layers are unknown)
    layers_total: int | None  # layers the image manifest named; None: not known
    bytes: int  # manifest and blob bytes sent for it
    from_cache: int  # of ``layers``, served from the cache
    seconds: float  # from the first manifest request to the last event
    done: bool  # ended (every layer served, or quiet)


def summary_line(pull: PullSummary) -> str:
    """``pulled library/alpine:3.20 (3 layers, 3.5 MB, 2 from cache, 1.2 s) for 10.0.0.5``;
    ``2 of 3 layers`` when the client fetched only some (it had the rest), ``4 blobs`` when
    the manifest did not say which blobs are layers."""
    if pull.layers_total is None:
        count = f"{pull.layers} blob{'s' if pull.layers != 1 else ''}"
    elif pull.layers == pull.layers_total:
        count = f"{pull.layers} layer{'s' if pull.layers != 1 else ''}"
    else:
        count = f"{pull.layers} of {pull.layers_total} layers"
    return (
        f"pulled {pull.image} ({count}, {format_decimal_size(pull.bytes)}, "
        f"{pull.from_cache} from cache, {pull.seconds:.1f} s) for {pull.client}"
    )


@dataclass
class _Pull:
    client: str
    repository: str
    reference: str  # the tag (or digest) first named
    started: float
    started_wall: float
    last: float
    fetched_manifest: bool = False  # a manifest GET was served (a HEAD alone is no pull)
    layers: set[str] | None = None  # what the image manifest(s) named
    served: set[str] = field(default_factory=set)  # layers (or blobs) served whole
    cached: set[str] = field(default_factory=set)  # ... of them from the cache
    bytes: int = 0
    done: bool = False

    @property
    def complete(self) -> bool:
        return self.layers is not None and bool(self.layers) and self.layers <= self.served

    def summary(self) -> PullSummary:
        if self.layers is None:
            served, cached, total = self.served, self.cached, None
        else:
            served = self.served & self.layers
            cached, total = self.cached & self.layers, len(self.layers)
        return PullSummary(
            client=self.client,
            image=image_name(self.repository, self.reference),
            started_wall=self.started_wall,
            layers=len(served),
            layers_total=total,
            bytes=self.bytes,
            from_cache=len(cached),
            seconds=max(0.0, self.last - self.started),
            done=self.done,
        )


class PullTracker:
    """Manifest and blob events in, one ``PullSummary`` per pull out (see the module doc).

    Each event method returns the pulls it ended, for the caller to log; ``expire`` ends the
    quiet ones and ``next_deadline`` says when to call it next."""

    def __init__(self, *, quiet: float = QUIET, max_open: int = MAX_OPEN) -> None:
        self.quiet = quiet
        self.max_open = max_open
        self._open: dict[tuple[str, str], _Pull] = {}  # (client, repository), oldest first
        self._recent: deque[_Pull] = deque(maxlen=RECENT)

    def __len__(self) -> int:
        return len(self._open)

    def manifest(
        self,
        *,
        client: str,
        repository: str,
        reference: str,
        method: str,
        layers: frozenset[str] | None,
        size: int,
        now: float,
        wall: float,
    ) -> list[PullSummary]:
        """A manifest request answered 2xx: ``layers`` from ``manifest_layers`` (None for an
        index or an unknown body), ``size`` the body bytes sent."""
        ended: list[PullSummary] = []
        key = (client, repository)
        pull = self._open.get(key)
        if pull is not None and not is_digest(reference) and pull.reference != reference:
            ended += self._end(key)  # the same client moved on to another tag
            pull = None
        if pull is None:
            while len(self._open) >= self.max_open:
                ended += self._end(next(iter(self._open)))
            pull = self._open[key] = _Pull(client, repository, reference, now, wall, now)
        else:
            self._open[key] = self._open.pop(key)  # most recently active last
        pull.last = now
        if method != "GET":
            return ended
        pull.bytes += size
        if not pull.fetched_manifest:
            pull.fetched_manifest = True
            self._recent.append(pull)
        if layers is not None and (pull.layers is None or not layers <= pull.layers):
            known = pull.layers if pull.layers is not None else set()
            pull.layers = known | set(list(layers)[: max(0, MAX_LAYERS - len(known))])
        return ended

    def blob(
        self,
        *,
        client: str,
        repository: str,
        digest: str,
        size: int,
        complete: bool,
        from_cache: bool,
        now: float,
    ) -> list[PullSummary]:
        """A blob GET answered: ``size`` body bytes sent, ``complete`` if the client got the
        whole blob. A blob without an open pull (a resumed download) is nobody's."""
        key = (client, repository)
        pull = self._open.get(key)
        if pull is None or not pull.fetched_manifest:
            return []
        self._open[key] = self._open.pop(key)
        pull.last = now
        pull.bytes += size
        wanted = digest in pull.layers if pull.layers is not None else len(pull.served) < MAX_LAYERS
        if complete and wanted:
            pull.served.add(digest)
            if from_cache:
                pull.cached.add(digest)
        return self._end(key) if pull.complete else []

    def expire(self, now: float) -> list[PullSummary]:
        """End the pulls quiet for ``quiet`` seconds; the ones with a manifest GET are returned."""
        # the open pulls are in the order of their last activity (each moves to the end when
        # active): the quiet ones are at the front, and the first busy one ends the search
        # (this runs for every manifest and blob answered, whatever the number of pulls open)
        ended: list[PullSummary] = []
        while self._open:
            key, pull = next(iter(self._open.items()))
            if now - pull.last < self.quiet:
                break
            ended += self._end(key)
        return ended

    def next_deadline(self) -> float | None:
        """When ``expire`` ends the next pull, if nothing happens before; None: none open."""
        if not self._open:
            return None
        return next(iter(self._open.values())).last + self.quiet  # the least recently active

    def recent(self) -> tuple[PullSummary, ...]:
        """The latest pulls, newest first, those still under way included (``done`` False)."""
        return tuple(pull.summary() for pull in reversed(self._recent))

    def _end(self, key: tuple[str, str]) -> list[PullSummary]:
        pull = self._open.pop(key)
        pull.done = True
        return [pull.summary()] if pull.fetched_manifest else []
