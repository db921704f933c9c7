"""``--redirect-hits``: which blob hits are answered with a 307 to a presigned URL of the
shared store (``--cache-store``), so that their bytes go from the bucket to the client and not
through the mirror (distribution's ``redirect`` storage option). Pure functions over plain
values; the I/O is in ``cache/shared.py`` (the store lookup, the signing) and
``cache/pullthrough.py`` (the answer).

A redirect is only ever the answer to a request the access rules already let through as a hit
(``cachepolicy.decide`` said ServeCache or ServeStale): a client the upstream refuses gets its
refusal as before, never a URL.

What changes with it: the mirror no longer sees the bytes of a redirected hit, so it cannot
verify them before their last byte leaves (what it does for every hit it streams). A blob
changed in the bucket behind its back then reaches the client, whose own check refuses it:
registry clients verify the digest of every blob they pull (moby, containerd, containers/image
all do; the digest is in the URL they asked and in ``Docker-Content-Digest``). That is why the
option is off by default.
"""

from __future__ import annotations

import urllib.parse

from .cachepolicy import Decision, ServeCache, ServeStale
from .headers import Headers

# How long a presigned URL works. Short, because it is a bearer capability: anyone holding it
# reads that blob without passing the access rules, so a URL that leaks (a proxy log, a shell
# history) must be useless soon. A few minutes is plenty: the client follows the redirect at
# once, and S3 checks the expiry when a request starts, not while its body flows, so a large
# layer that takes longer to download still completes (a resumed Range request after the
# expiry comes back to the mirror and gets a fresh URL).
PRESIGN_EXPIRY = 300.0
# How long the instance trusts that the store holds a blob it committed, read or looked up
# there, before it asks the store again (one HEAD): a blob deleted from the bucket meanwhile
# (evicted by another instance, removed by hand) gets clients a 404 from the store for at most
# this long; a hot blob costs one HEAD a minute, not one per pull.
KNOWN_FOR = 60.0
# Blobs known to be in the store: one entry each (a 64-character key and a time, about 150
# bytes), the least recently known dropped first; beyond it a hit only costs a HEAD.
KNOWN_ENTRIES = 20_000


def may_redirect(*, enabled: bool, method: str, from_peer: bool) -> bool:
    """Whether a blob request could be answered with a redirect if it turns out a hit held in
    the store: ``--redirect-hits`` on, a GET (whole or a Range: S3 honours ``Range`` on a
    presigned URL, and clients send it again after the redirect), and not from a peer (it
    asked for the bytes, to fill its own cache for its own clients). A HEAD is answered by
    the mirror as before: it has no bytes to spare, and clients read its headers."""
    return enabled and method == "GET" and not from_peer


def known_in_store(known_at: float | None, now: float) -> bool:
    """Whether a blob noted in the store at ``known_at`` (None: never) counts as there now."""
    return known_at is not None and now - known_at < KNOWN_FOR


def redirect_hit(decision: Decision, *, candidate: bool, in_store: bool) -> bool:
    """Answer with a redirect: a candidate request (:func:`may_redirect`) for a blob the store
    holds, once the access rules let it through as a hit (``decision``: ServeCache, or
    ServeStale while the upstream cannot say); anything else is answered as before."""
    return candidate and in_store and isinstance(decision, ServeCache | ServeStale)


def redirect_headers(url: str, digest: str) -> Headers:
    """The head of a redirected hit (307: the client repeats the same GET, Range included,
    at ``url``). ``no-store``: the URL expires within minutes, so no cache between the client
    and the mirror may keep the redirect."""
    return [
        (b"location", url.encode("ascii")),
        (b"docker-content-digest", digest.encode("ascii")),
        (b"content-length", b"0"),
        (b"cache-control", b"no-store"),
        (b"docker-distribution-api-version", b"registry/2.0"),
    ]


def loggable_url(url: str) -> str:
    """A presigned URL as a log line may show it: without its query, which carries the
    signature (anyone holding the whole URL can read the blob until it expires)."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
