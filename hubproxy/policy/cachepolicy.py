"""When the cache may answer a client: the pull-through decisions, with no I/O and no clock.

Theory of operation. The cache only serves what the upstream would serve this client. For a
blob or manifest request the driver (``pullthrough.py``) gathers plain facts into a
:class:`CacheRequest` and calls :func:`decide`, which returns what to do:

- :class:`ServeCache`: answer from the cache (this client's access is confirmed, and a tag's
  cached answer is fresh or was just revalidated);
- :class:`AskUpstream`: show the client's own credentials (or none) to the *primary* upstream
  with a HEAD of the same path, conditional headers stripped; then call :func:`decide` again
  with the :func:`verdict` on its answer;
- :class:`Fill`: a GET of the whole thing that the cache lacks: fetch it once and keep a copy;
- :class:`Forward`: send the client's request upstream as it is (the registry's own answer);
- :class:`ServeStale`: the upstream could not answer (down, 429, 5xx): serve the cached copy
  unconfirmed, which :func:`stale_allowed` permits only for a digest seen in a repository that
  anyone could read within :data:`READABILITY_WINDOW`.

A yes is remembered per (credentials, registry, path) for :data:`ACCESS_CONFIRMATION_TTL`: per
resource, not per repository (blobs and manifests are stored by digest for every repository, and
a registry answers BLOB_UNKNOWN for a digest the repository does not link), and per registry (the
same path names different things on two registries). A manifest served on a confirmation passes
it on, until the same expiry, to the manifests and blobs it names that the upstream served in
that repository before (:func:`vouched_paths`). A tag's cached answer is keyed by the set of
manifest media types the client accepts, because a registry answers a tag differently by
``Accept`` (distribution gives a client that takes no manifest list the linux/amd64 manifest).

Concurrent misses of one manifest make one upstream GET (:class:`FetchKey` names "the same
fetch": registry, path and accepted media types). Only a request with the very same credentials
takes the leader's answer (:func:`may_share_fetch`); any other waits for the leader to finish and
then decides again, so it meets its own access check (a HEAD) before a cached byte reaches it.
The bytes of manifests being buffered from upstreams are capped; :func:`fits_in_memory` is the
admission rule.

Times are plain numbers passed in: ``now`` on the monotonic clock, ``wall_now`` in Unix seconds
(what is kept in the state file across restarts).
"""

from __future__ import annotations

import enum
import functools
import hashlib
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from .headers import Headers, get_header
from .prefetch import BadManifest, parse_manifest
from .values import immutable

ACCESS_CONFIRMATION_TTL = 60.0  # Docker Hub tokens live 300 s; a revoked grant is seen soon
MAX_CONFIRMATIONS = 10_000
READABILITY_WINDOW = 24 * 3600.0  # "anyone may read it" is trusted this long after it was learned
READABILITY_REFRESH = 3600.0  # and asked again (in the background) once it is this old

# A registry's answers that say "you may read this" when asked with HEAD and no redirect
# following: the thing itself, or (blobs only) the registry sending it to its storage.
REDIRECTS = frozenset({301, 302, 303, 307, 308})

# Conditional and partial request headers: a 304 or 206 to the access check would say nothing
# about whether this client may read the whole thing (RFC 9110 section 13).
ACCESS_CHECK_DROPPED = frozenset(
    {
        b"if-none-match",
        b"if-modified-since",
        b"if-match",
        b"if-unmodified-since",
        b"if-range",
        b"range",
    }
)


class Kind(enum.Enum):
    BLOB = "blob"
    MANIFEST = "manifest"


class UpstreamVerdict(enum.Enum):
    """What the primary upstream said to the access check."""

    ALLOWED = "allowed"
    DENIED = "denied"
    UNAVAILABLE = "unavailable"  # the upstream could not say (down, resting, 429, 5xx)


def upstream_unavailable(status: int) -> bool:
    """Whether an upstream status means "cannot answer now" rather than "no"."""
    return status == 429 or status >= 500


def verdict(status: int, headers: Headers, *, kind: Kind) -> UpstreamVerdict:
    """Read the access check's answer: only a 200, or for a blob a redirect to its storage
    (with a Location), is a yes; a 304 or any other 3xx is not."""
    if status == 200:
        return UpstreamVerdict.ALLOWED
    if kind is Kind.BLOB and status in REDIRECTS and get_header(headers, b"location"):
        return UpstreamVerdict.ALLOWED
    if upstream_unavailable(status):
        return UpstreamVerdict.UNAVAILABLE
    return UpstreamVerdict.DENIED


def access_check_headers(headers: Headers) -> Headers:
    """The client's headers as the access check sends them: without conditions or ranges."""
    return [(k, v) for k, v in headers if k not in ACCESS_CHECK_DROPPED]


# -- confirmations ------------------------------------------------------------------------------


class ConfirmationKey(NamedTuple):
    """What a confirmation is kept under. A tuple, not a dataclass: it is looked up three
    times per cached manifest, and a tuple hashes and compares in C."""

    credentials: str  # sha256 of the client's Authorization (never kept in clear)
    registry: str  # "" for the default registry
    path: str  # the upstream path, e.g. /v2/library/alpine/blobs/sha256:...


def confirmation_key(authorization: bytes | None, registry: str, path: str) -> ConfirmationKey:
    """The key a confirmed access is remembered under."""
    credentials = hashlib.sha256(authorization).hexdigest() if authorization else _NO_CREDENTIALS
    return ConfirmationKey(credentials, registry, path)


_NO_CREDENTIALS = hashlib.sha256(b"").hexdigest()  # (an anonymous pull's, worked out once)


class Confirmations:
    """Access confirmations and when they expire (plain state; the clock is passed in)."""

    def __init__(self, ttl: float = ACCESS_CONFIRMATION_TTL) -> None:
        self.ttl = ttl
        self._until: dict[ConfirmationKey, float] = {}
        # the expiry each manifest's confirmation was last passed on with (``first_pass``)
        self._passed: dict[ConfirmationKey, float] = {}

    def confirmed(self, key: ConfirmationKey, now: float) -> bool:
        return self._until.get(key, -1.0) > now

    def expiry(self, key: ConfirmationKey, now: float) -> float | None:
        """When the confirmation of ``key`` expires, None if there is none now."""
        until = self._until.get(key)
        return until if until is not None and until > now else None

    def remember(self, key: ConfirmationKey, now: float) -> None:
        if len(self._until) > MAX_CONFIRMATIONS:
            self._drop_expired(now)
        self._until[key] = now + self.ttl

    def carry(self, key: ConfirmationKey, until: float, now: float) -> bool:
        """Confirm ``key`` until ``until``, another confirmation's expiry (see
        :func:`vouched_paths`): never later, and never shortening what ``key`` holds. False,
        and nothing kept, while the table is full of live confirmations: carrying saves an
        access check, so it never grows the table past its bound."""
        if self._until.get(key, -1.0) >= until:
            return True
        if len(self._until) >= MAX_CONFIRMATIONS:
            self._drop_expired(now)
            if len(self._until) >= MAX_CONFIRMATIONS:
                return False
        self._until[key] = until
        return True

    def first_pass(self, key: ConfirmationKey, until: float, now: float) -> bool:
        """Whether the confirmation of ``key`` that expires at ``until`` is passed on now for
        the first time (a manifest served again on it vouches for nothing new; a renewed one
        is passed on again)."""
        if self._passed.get(key) == until:
            return False
        if len(self._passed) >= MAX_CONFIRMATIONS:
            self._passed = {k: v for k, v in self._passed.items() if v > now}
        self._passed[key] = until
        return True

    def _drop_expired(self, now: float) -> None:
        self._until = {k: v for k, v in self._until.items() if v > now}


# -- confirmations shared between the workers of --workers N -------------------------------------

# a shared confirmation: "<seconds left> <credentials> <registry or -> <path>", one per line
_SHARED = re.compile(
    rb"(?P<left>[0-9]{1,6}\.[0-9]{3}) (?P<credentials>[0-9a-f]{64}) "
    rb"(?P<registry>-|[a-z0-9][a-z0-9.:-]{0,252}) (?P<path>/v2/[!-~]{1,2048})"
)


def encode_shared(entries: Iterable[tuple[ConfirmationKey, float]]) -> bytes:
    """Confirmations with their seconds left, as lines another worker reads with
    :func:`decode_shared` (the credentials only as their hash, as kept here)."""
    return b"".join(
        b"%.3f %s %s %s\n"
        % (left, key.credentials.encode(), (key.registry or "-").encode(), key.path.encode())
        for key, left in entries
    )


def decode_shared(line: bytes) -> tuple[ConfirmationKey, float] | None:
    """One line of :func:`encode_shared`: the key and its seconds left (at most
    :data:`ACCESS_CONFIRMATION_TTL`); None for anything else, or for a confirmation no longer
    alive."""
    match = _SHARED.fullmatch(line)
    if match is None:
        return None
    left = min(float(match["left"]), ACCESS_CONFIRMATION_TTL)
    if left <= 0:
        return None
    registry = match["registry"].decode()
    key = ConfirmationKey(
        match["credentials"].decode(), "" if registry == "-" else registry, match["path"].decode()
    )
    return key, left


# -- blob verifications shared between the workers of --workers N --------------------------------

# "V <sha256 hex> <inode> <size> <mtime ns> <ctime ns> <seconds since verified>", one per line: a
# cached blob's file whose bytes one worker hashed to its digest, as that file then was
_VERIFIED = re.compile(
    rb"V (?P<hex>[0-9a-f]{64}) (?P<inode>[0-9]{1,20}) (?P<size>[0-9]{1,20}) "
    rb"(?P<mtime>-?[0-9]{1,20}) (?P<ctime>-?[0-9]{1,20}) (?P<age>[0-9]{1,9}\.[0-9]{3})"
)

# (inode, size, mtime ns, ctime ns): what a file's stat says of its identity (cache.store)
IdentityFields = tuple[int, int, int, int]


def encode_verified(hexdigest: str, identity: IdentityFields, age: float) -> bytes:
    """A verification as a line another worker reads with :func:`decode_verified`."""
    return b"V %s %d %d %d %d %.3f\n" % (hexdigest.encode(), *identity, max(age, 0.0))


def decode_verified(line: bytes) -> tuple[str, IdentityFields, float] | None:
    """One line of :func:`encode_verified`: the digest's hex, the file's identity and the
    seconds since it was verified; None for anything else."""
    match = _VERIFIED.fullmatch(line)
    if match is None:
        return None
    identity = (int(match["inode"]), int(match["size"]), int(match["mtime"]), int(match["ctime"]))
    return match["hex"].decode(), identity, float(match["age"])


# -- what a confirmed manifest vouches for --------------------------------------------------------

# references of recently served manifests kept parsed (one per descriptor: the digest and its
# kind), at most this many in all: a manifest names dozens, an index a few dozen
MAX_KEPT_REFERENCES = 4096


def manifest_references(body: bytes, media_type: str) -> tuple[tuple[str, str], ...]:
    """What a manifest names inside its own repository, as ``(kind, digest)`` with kind
    ``"manifests"`` (an index's children) or ``"blobs"`` (an image's config and layers); ()
    for a body that is neither, or names more than ``MAX_DESCRIPTORS``."""
    try:
        parsed = parse_manifest(body, media_type)
    except BadManifest:
        return ()
    if parsed.index:
        return tuple(("manifests", child.digest) for child in parsed.children)
    return tuple(("blobs", blob.digest) for blob in parsed.blobs)


class ManifestReferences:
    """:func:`manifest_references` of recently served manifests, parsed once per digest and
    media type (plain state; at most :data:`MAX_KEPT_REFERENCES` references kept, the least
    recently asked dropped first)."""

    def __init__(self, limit: int = MAX_KEPT_REFERENCES) -> None:
        self.limit = limit
        self._known: OrderedDict[tuple[str, str], tuple[tuple[str, str], ...]] = OrderedDict()
        self._count = 0

    def of(self, digest: str, media_type: str, body: bytes) -> tuple[tuple[str, str], ...]:
        key = (digest, media_type)
        found = self._known.get(key)
        if found is not None:
            self._known.move_to_end(key)
            return found
        found = manifest_references(body, media_type)
        self._known[key] = found
        self._count += len(found) + 1
        while self._count > self.limit and self._known:
            _key, dropped = self._known.popitem(last=False)
            self._count -= len(dropped) + 1
        return found


def vouched_paths(
    name: str, references: Iterable[tuple[str, str]], linked: Callable[[str], bool]
) -> Iterator[str]:
    """The upstream paths in repository ``name`` that a manifest's confirmation vouches for:
    each reference (:func:`manifest_references`) the upstream has served in that repository
    (``linked``, given the digest).

    The upstream serves a path to a client when the client may pull the repository and the
    repository holds the digest. A confirmed manifest shows the first (the registry just
    served the repository to these credentials). For the second, a registry accepts a manifest
    only once the repository holds what it names (distribution answers MANIFEST_BLOB_UNKNOWN),
    and keeps what a manifest it holds names; but that is a registry's habit, not the
    protocol's rule (an index may be accepted without some platforms, a foreign layer lives
    elsewhere), so only a digest the upstream was seen to serve in that very repository is
    vouched for. A confirmation carried this way expires with the manifest's own
    (``Confirmations.carry``): a pull of a cached image asks the upstream once, for its tag,
    instead of once more for every manifest and layer."""
    for kind, digest in references:
        if linked(digest):
            yield f"/v2/{name}/{kind}/{digest}"


# -- tags ---------------------------------------------------------------------------------------


class TagKey(NamedTuple):
    """A tag's cached answer: per repository (with its registry) and per kind of client. (A
    tuple, as ``ConfirmationKey``: looked up for every manifest asked by tag.)"""

    repository: str
    tag: str
    accepted: frozenset[str]  # the manifest media types the client accepts


def tag_fresh(checked_at: float | None, now: float, ttl: float) -> bool:
    """Whether a tag revalidated at ``checked_at`` may skip revalidation for ``ttl`` (its
    ``--manifest-ttl``, :func:`tag_ttl`)."""
    return checked_at is not None and now - checked_at < ttl


DEFAULT_MANIFEST_TTL = 60.0  # --manifest-ttl for tags no rule names

# A tag pattern: the characters of a tag (distribution's grammar, [\w][\w.-]{0,127}), and "*".
_TAG_PATTERN = re.compile(r"[A-Za-z0-9_.*-]{1,128}")


@dataclass(frozen=True)
class TtlRule:
    """``--manifest-ttl PATTERN=DURATION``: a cached tag matching ``pattern`` is served without
    revalidation for ``seconds``. The pattern is a tag, or a glob where ``*`` stands for any run
    of characters (``*`` alone: every tag)."""

    pattern: str
    seconds: float


def check_tag_pattern(pattern: str) -> str:
    """``pattern`` if it is a tag or a tag glob, else ValueError saying what a pattern is."""
    if not _TAG_PATTERN.fullmatch(pattern):
        raise ValueError(
            f"not a tag pattern: {pattern!r} (a tag, or a glob of tag characters and *, "
            "e.g. latest, nightly-*, *)"
        )
    return pattern


@functools.lru_cache(maxsize=256)
def _glob(pattern: str) -> re.Pattern[str]:
    return re.compile(".*".join(re.escape(part) for part in pattern.split("*")))


def _specificity(pattern: str) -> tuple[bool, int]:
    # a whole tag beats every glob; among globs, the one that spells out more of the tag
    return "*" not in pattern, len(pattern) - pattern.count("*")


def tag_ttl(tag: str, rules: Sequence[TtlRule], default: float) -> float:
    """How long ``tag``'s cached answer may skip revalidation: the seconds of the most specific
    rule it matches (a whole tag over any glob, then the glob with more literal characters, then
    the earlier rule), else ``default`` (the ``*`` rule). Order-independent on purpose: a TOML
    table written ``{ "*" = "24h", "latest" = "60s" }`` means what it says."""
    best: TtlRule | None = None
    for rule in rules:
        if not _glob(rule.pattern).fullmatch(tag):
            continue
        if best is None or _specificity(rule.pattern) > _specificity(best.pattern):
            best = rule
    return default if best is None else best.seconds


def hit_needs_hashing(
    *, whole: bool, unchanged: bool, verified_ago: float | None, reverify_after: float
) -> bool:
    """Whether a reader of a cached blob hashes what it serves (and keeps the last byte back
    until the digest matches).

    ``unchanged``: the file was verified in this process and its identity (inode, size, mtime,
    ctime) is the same; ``verified_ago``: seconds since. Anything written into, truncated or
    replaced through the file system changes the identity, and is hashed at once. What the
    identity cannot see, damage below the file system (bit rot), is caught by hashing a whole
    blob again once its verification is ``reverify_after`` old (0: every whole read hashes,
    about 0.6 CPU-seconds per GiB, as much as sending it). A range is served unhashed from any
    unchanged file: checking it means hashing the whole blob around it."""
    if not unchanged or verified_ago is None:
        return True
    return whole and verified_ago >= reverify_after


# seconds: how coarsely a file system's timestamps may tick. Whole-second timestamps (ext3, HFS+,
# FAT's 2 s): two seconds. Sub-second ones tick with the kernel's coarse clock, one jiffy (4 ms
# at HZ=250, 10 ms at 100), or exFAT's 10 ms: a tenth of a second covers them with room.
COARSE_TICK = 2.0
FINE_TICK = 0.1


def identity_settled(ctime_ns: int, now_ns: int) -> bool:
    """Whether a file last changed at ``ctime_ns`` (its ``st_ctime_ns``; ``now_ns``: the wall
    clock) would show a write made from now on in its identity: the timestamp tick of that
    change has passed. A write within the same tick could leave ctime, and so the identity,
    as it is. A timestamp with a sub-second part comes from a file system that keeps them; one
    without (or, once in a billion, a fine one that landed on a whole second) gets the whole
    seconds' wait."""
    tick = FINE_TICK if ctime_ns % 1_000_000_000 else COARSE_TICK
    return now_ns - ctime_ns >= tick * 1e9


def tag_current(cached_digest: str, head_digest: bytes | None) -> bool:
    """Whether the upstream's HEAD says the tag still names the cached manifest."""
    return head_digest is not None and head_digest.decode("latin-1") == cached_digest


def manifest_verified(reference: str, body_digest: str, claimed: str | None) -> bool:
    """Whether a manifest body may be kept: it hashes to the digest it was asked by (if asked by
    digest) and to the ``Docker-Content-Digest`` the upstream sent (if any)."""
    if reference.startswith("sha256:") and reference != body_digest:
        return False
    return claimed is None or claimed == body_digest


# -- negative answers --------------------------------------------------------------------------

DEFAULT_NEGATIVE_TTL = 30.0  # --negative-ttl: how long an upstream's 404 to a manifest is kept
ANYONE = "*"  # NegativeKey.credentials of an answer that anyone would get


@dataclass(frozen=True)
class NegativeKey:
    """A 404 the upstream gave to a manifest request, and whom it may be repeated to.

    Per registry and upstream path (tag or digest), per set of accepted manifest types (a
    registry answers 404 to a client that takes none of the types it has, and 200 to another),
    and per ``credentials``: the hash :func:`confirmation_key` makes of the client's
    Authorization (the very same credentials get the same answer), or :data:`ANYONE`."""

    registry: str  # "" for the default registry
    path: str  # /v2/<repository>/manifests/<reference>
    accepted: frozenset[str]
    credentials: str


def remember_negative(status: int, *, primary: bool, ttl: float) -> bool:
    """Whether an upstream's answer to a manifest request is kept as a negative answer: only a
    404, only the primary upstream's (a fallback may answer with credentials of its own, or
    lag behind), and only with ``--negative-ttl`` above 0. Never a 401 or 403 (they depend on
    the credentials), a 429 or a 5xx (they say "not now", not "no such manifest")."""
    return ttl > 0 and primary and status == 404


def share_negative(readability: Readability | None, anonymous_status: int, wall_now: float) -> bool:
    """Whether a 404 may be repeated to anyone, whatever their credentials: the repository is one
    anyone may read (so no 404 in it hides a private repository, which some registries answer
    with 404 rather than 401), and an anonymous client asking the same (same Accept) got 404
    too (so it was not the first client's own credentials that made it one)."""
    return anonymous_status == 404 and anonymously_readable(readability, wall_now)


# -- manifests in flight -----------------------------------------------------------------------


@immutable
class FetchKey:
    """One upstream manifest fetch as the upstream sees it, whoever's credentials go with it."""

    registry: str  # "" for the default registry
    path: str  # /v2/<repository>/manifests/<reference>
    accepted: frozenset[str]  # the manifest media types the client accepts (see TagKey)


def may_share_fetch(leader: ConfirmationKey, follower: ConfirmationKey, *, stored: bool) -> bool:
    """Whether a request that waited on another's fetch of the same manifest may take its answer:
    only a verified, stored answer, and only with the very same credentials for the same registry
    and path (the upstream would have answered it alike). Any other decides again: a cache hit
    after its own access check, or a fetch of its own if the leader got nothing."""
    return stored and leader == follower


def fits_in_memory(used: int, size: int, limit: int) -> bool:
    """Whether ``size`` more bytes of manifests may be buffered while ``used`` are: within the
    limit, or alone (a manifest larger than the limit still works when nothing else is in
    flight)."""
    return used == 0 or used + size <= limit


def fetch_share(limit: int, largest: int) -> int:
    """The bytes of manifests one client address may have in flight at once: a quarter of the
    whole, but always room for the largest manifest, so any one manifest can be fetched."""
    return max(limit // 4, largest)


def admit_fetches(
    limit: int,
    share: int,
    used: int,
    used_by: Mapping[str, int],
    waiting: Sequence[tuple[str, int]],
) -> list[int]:
    """The indices of ``waiting`` (``(client, size)``, oldest first) whose fetch may start now.

    First come, first served within the whole ``limit``; a waiter whose own client is at its
    ``share`` is passed over (it could not start anyway), so one address's queue never holds up
    another address's manifest. A fetch alone always fits (``fits_in_memory``)."""
    chosen: list[int] = []
    mine = dict(used_by)
    passed_over: set[str] = set()  # a client's later waiters never overtake its earlier ones
    for index, (client, size) in enumerate(waiting):
        if client in passed_over or not fits_in_memory(mine.get(client, 0), size, share):
            passed_over.add(client)
            continue
        if not fits_in_memory(used, size, limit):
            break  # the oldest that fits its share waits for room: nobody overtakes it
        chosen.append(index)
        used += size
        mine[client] = mine.get(client, 0) + size
    return chosen


# -- who may read a repository anonymously ----------------------------------------------------


@dataclass(frozen=True)
class Readability:
    """What the upstream said when asked anonymously for a repository, and when (wall clock)."""

    anonymous: bool
    learned_at: float


def _age(readability: Readability, wall_now: float) -> float:
    return wall_now - readability.learned_at


def anonymously_readable(readability: Readability | None, wall_now: float) -> bool:
    """Whether anyone may read the repository, by an answer still within the window (a clock
    set back by more than the window counts as expired too)."""
    if readability is None or not readability.anonymous:
        return False
    return -READABILITY_WINDOW < _age(readability, wall_now) < READABILITY_WINDOW


def should_probe(readability: Readability | None, wall_now: float) -> bool:
    """Whether to ask (again) whether anyone may read the repository."""
    if readability is None:
        return True
    age = _age(readability, wall_now)
    return not 0 <= age < READABILITY_REFRESH


def stale_allowed(readability: Readability | None, linked: bool, wall_now: float) -> bool:
    """Whether a cached answer may go out unconfirmed while the upstream cannot answer: only a
    digest the upstream served in this repository, and only while anyone may read it."""
    return linked and anonymously_readable(readability, wall_now)


def ping_stale_allowed(readabilities: Iterable[Readability], wall_now: float) -> bool:
    """Whether ``/v2/`` may be answered 200 while the upstream is down: only if some repository
    can be served stale at all."""
    return any(anonymously_readable(r, wall_now) for r in readabilities)


# -- the decision -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServeCache:
    """Answer from the cache; this client may read it."""


@dataclass(frozen=True)
class AskUpstream:
    """Ask the primary upstream with the client's credentials, then decide again."""


@dataclass(frozen=True)
class Fill:
    """Fetch it from the upstream for this client and keep a copy."""


@dataclass(frozen=True)
class Forward:
    """Send the client's request upstream as it is; pass the answer on."""


@dataclass(frozen=True)
class ServeStale:
    """Answer from the cache unconfirmed: the upstream cannot answer, and anyone may read it."""


Decision = ServeCache | AskUpstream | Fill | Forward | ServeStale


@immutable
class CacheRequest:
    """The facts about one blob or manifest request, as the driver found them."""

    kind: Kind
    method: str  # GET or HEAD
    has_range: bool
    cached: bool  # the cache holds it (a blob: or is filling it) in a form this client takes
    confirmed: bool  # this client's access was confirmed within the TTL
    by_digest: bool = True  # a manifest asked by digest (blobs always are)
    tag_fresh: bool = False  # a tag revalidated within --manifest-ttl
    # stale_allowed(...) for this repository and digest: found out only once the upstream could
    # not answer (the first decision never needs it; it costs two look-ups per hit)
    stale_ok: bool = False
    tag_current: bool = False  # after ALLOWED: the upstream's digest for the tag is the cached one


def decide(facts: CacheRequest, asked: UpstreamVerdict | None = None) -> Decision:
    """What to do with a blob or manifest request; ``asked``: the access check's verdict."""
    if not facts.cached:
        return _miss(facts)
    fresh = facts.kind is Kind.BLOB or facts.by_digest or facts.tag_fresh
    if asked is None:
        return ServeCache() if facts.confirmed and fresh else AskUpstream()
    if asked is UpstreamVerdict.DENIED:
        return Forward()
    if asked is UpstreamVerdict.UNAVAILABLE:
        return ServeStale() if facts.stale_ok else Forward()
    if facts.kind is Kind.MANIFEST and not facts.by_digest and not facts.tag_current:
        return _miss(facts)  # the tag moved: fetch the manifest it names now (one GET)
    return ServeCache()


def _miss(facts: CacheRequest) -> Decision:
    # only a plain GET of the whole thing is worth keeping; probes and resumes go through
    if facts.method == "GET" and not facts.has_range:
        return Fill()
    return Forward()


def after_upstream(status: int | None, *, cached: bool, stale_ok: bool) -> ServeStale | Forward:
    """What to do with the upstream's answer to a forwarded or filling request (``None``: no
    answer at all): the cached copy while it cannot answer and stale is allowed, else its answer."""
    unavailable = status is None or upstream_unavailable(status)
    return ServeStale() if unavailable and cached and stale_ok else Forward()


def keep_manifest(
    method: str, status: int, length: int | None, media_type: bytes | None, limit: int
) -> bool:
    """Whether an upstream manifest answer is one the cache keeps a copy of."""
    return (
        method == "GET"
        and status == 200
        and length is not None
        and length <= limit
        and media_type is not None
    )
