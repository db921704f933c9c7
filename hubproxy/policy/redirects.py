"""Redirect policy: which upstream redirects hubproxy follows itself, and where credentials go.

Docker Hub answers a blob GET with 307 to a pre-signed CDN URL. Clients must only ever talk to the
mirror, so the mirror follows such redirects itself (GET and HEAD only: a redirected upload is the
client's business) and hands the client the final response as if the upstream had served it.
The upstream is trusted, so any host is followed; the client's ``Authorization`` however goes
only to the origin the client addressed through us: S3-style storage rejects a request carrying
one (``400 Missing x-amz-content-sha256``), and Go's client drops it on cross-host redirects too.
"""

from __future__ import annotations

from .urls import Origin, Url, resolve

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
FOLLOWED_METHODS = frozenset({"GET", "HEAD"})


def redirect_target(method: str, status: int, location: str | None, current: Url) -> Url | None:
    """Return the URL to follow for this response, or None when the response is final.

    Raises ValueError when the upstream sent a redirect with an unusable ``Location``.
    """
    if method not in FOLLOWED_METHODS or status not in REDIRECT_STATUSES:
        return None
    if not location:
        raise ValueError(f"upstream answered {status} without a Location header")
    return resolve(current, location)


def may_send_authorization(addressed: Origin, target: Origin) -> bool:
    """Whether the client's credentials may go to ``target``: only to the origin it addressed."""
    return addressed == target


def client_location(location: str, upstream: Url, current: Url) -> str:
    """Rewrite a ``Location`` we pass to the client (uploads, not followed) to stay on the mirror.

    A URL on the upstream's origin (relative ones included) becomes the origin-relative path the
    client would use through us: the upstream's base path (a Worker mounted under a prefix) is
    removed. So does one with the same authority (host and port as sent in ``Host``) but the other
    scheme: distribution builds absolute upload URLs from ``X-Forwarded-Proto`` and ``Host``
    (its ``urlbuilder``), so behind a plain-HTTP mirror it answers ``http://<upstream host>/...``,
    which a client would otherwise speak plain HTTP to. Anything else passes unchanged.
    """
    try:
        target = resolve(current, location)
    except ValueError:
        return location
    ours = upstream.origin
    if target.origin != ours and (
        target.origin.host != ours.host or target.origin.authority != ours.authority
    ):
        return location
    prefix = upstream.target.rstrip("/")
    if prefix and target.target.startswith(prefix + "/"):
        return target.target[len(prefix) :]
    return target.target
