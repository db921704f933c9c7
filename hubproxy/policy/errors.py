"""The one error family of hubproxy.

Every failure a client can be told about is a :class:`ProxyError` carrying the HTTP status and the
registry error code to answer with (distribution's JSON error format). Foreign errors (trio, ssl,
OS, h11) are translated into this family at the I/O edge with ``raise ... from exc``, so the
proxy logic only ever handles these.
"""

from __future__ import annotations

import json


class ProxyError(Exception):
    """A failure that ends one request, with the status and registry code to report it with."""

    status: int = 502
    code: str = "UNAVAILABLE"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers  # extra response headers: a challenge, a Retry-After
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code


class ClientProtocolError(ProxyError):
    """The client broke HTTP or registry rules (malformed request, bad name): 400, then close."""

    status = 400
    code = "UNSUPPORTED"


class RouteNotFound(ProxyError):
    """The path is not something a registry mirror serves."""

    status = 404
    code = "UNSUPPORTED"


class RegistryNotServed(RouteNotFound):
    """A request for a registry the mirror does not serve (not in its table, or switched off by
    ``--only-listed-registries``): 404 ``NAME_UNKNOWN``, as for any name a registry lacks."""

    code = "NAME_UNKNOWN"

    def __init__(self, message: str, *, registry: str) -> None:
        super().__init__(message)
        self.registry = registry  # printable, at most 100 characters: for the log line


class ManifestUnknown(ProxyError):
    """The upstream answered 404 for this manifest a moment ago (the negative cache, within
    ``--negative-ttl``): the same 404 again, without asking it."""

    status = 404
    code = "MANIFEST_UNKNOWN"


class NotCached(RouteNotFound):
    """``hubproxy cache rm|refresh`` or the admin API named an image, tag or digest the cache
    does not hold: 404."""

    code = "NAME_UNKNOWN"


class BadImageName(ClientProtocolError):
    """An image reference that does not parse (``hubproxy cache``, the admin API): 400."""

    code = "NAME_INVALID"


class AccessDenied(ProxyError):
    """This mirror's own access rules refuse the request (network, image, or user)."""

    status = 403
    code = "DENIED"


class MirrorUnauthorized(ProxyError):
    """The mirror requires its own login and the client sent none we accept: 401 with a
    challenge (in ``headers``) that leads the client to log in."""

    status = 401
    code = "UNAUTHORIZED"


class ClientRateLimited(ProxyError):
    """The client went over its --client-rate-limit: 429 with Retry-After."""

    status = 429
    code = "TOOMANYREQUESTS"


class MirrorBusy(ProxyError):
    """A limit this mirror shares among all its clients is reached for now (no pooled
    connection to an origin came free in time, no room for another manifest in memory): 503
    with a Retry-After (in ``headers``). It says nothing about the upstream, so it is never a
    reason to rest it or to fail over."""

    status = 503
    code = "UNAVAILABLE"


class UpstreamUnavailable(ProxyError):
    """The upstream could not be reached, refused TLS, or broke the protocol."""

    status = 502
    code = "UNAVAILABLE"


class UpstreamProxyFailed(UpstreamUnavailable):
    """The upstream proxy (``--upstream-proxy``, ``--registry-proxy``: HTTP CONNECT or SOCKS5)
    refused the tunnel or broke its handshake; the message names the proxy, the target and the
    reason, never the proxy's login."""


class UpstreamTimeout(UpstreamUnavailable):
    """The upstream did not connect or answer within the configured timeout."""

    status = 504


class TooManyRedirects(UpstreamUnavailable):
    """The upstream's redirects did not end within the hop limit (a loop, most likely)."""


class CacheFillFailed(UpstreamUnavailable):
    """The fill a reader depended on failed (upstream error or digest mismatch).

    ``resumable``: the upstream was fine and only our disk failed (full, say), so a reader may
    finish its transfer from the upstream instead.
    """

    def __init__(self, message: str, *, resumable: bool = False) -> None:
        super().__init__(message)
        self.resumable = resumable


class RangeNotSatisfiable(ProxyError):
    """A Range wholly beyond the blob (RFC 9110 section 15.5.17)."""

    status = 416
    code = "UNSUPPORTED"


# What happens to a client connection rather than an answer: these are not ProxyErrors, because
# no registry error can be sent any more.


class ClientGone(Exception):
    """The client went away or stopped reading; nothing more can be sent to it."""


class ResponseAborted(Exception):
    """The response was started and cannot be completed: the connection must be cut (Go's
    ``http.ErrAbortHandler``), so the client never takes a truncated body for a whole one."""


def error_body(code: str, message: str) -> bytes:
    """Return the registry JSON error document for one error."""
    document = {"errors": [{"code": code, "message": message, "detail": None}]}
    return json.dumps(document, separators=(",", ":")).encode()


class PrefetchFailed(ProxyError):
    """``hubproxy prefetch`` could not fetch an image (or a part of it): the message says what
    failed and what to do. Never answered to a client; ``status`` is the answer that failed."""

    status = 502
    code = "UNAVAILABLE"
