"""Where a client's request goes: a pure function from request line to :class:`Route`.

The registry API lives under ``/v2/`` (distribution's API spec); names and references are matched
against distribution's own grammar, so nothing we forward contains percent-escapes, ``..`` or empty
segments. Docker Hub keeps official images under ``library/``: ``docker pull mirror/nginx`` asks
for ``/v2/nginx/...`` and a token for ``repository:nginx:pull``, which Docker Hub refuses, so for a
Docker Hub upstream a one-component name gets ``library/`` in the path (and in token scopes:
``registries.rewrite_token_query``).
"""

from __future__ import annotations

import enum
import functools
import re
from dataclasses import dataclass

from .errors import ClientProtocolError, RouteNotFound
from .registries import upstream_name

# distribution/reference/regexp.go
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_NAME = rf"{_COMPONENT}(?:/{_COMPONENT})*"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_DIGEST = r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]{32,}"
_UPLOAD_ID = r"[A-Za-z0-9_=-][A-Za-z0-9_=.-]*"  # never a dot segment
_V2_RESOURCE = re.compile(
    rf"/v2/(?P<name>{_NAME})/(?P<rest>"
    rf"manifests/(?:{_TAG}|{_DIGEST})"
    rf"|blobs/{_DIGEST}"
    rf"|blobs/uploads/(?:{_UPLOAD_ID})?"
    rf"|tags/list"
    rf"|referrers/{_DIGEST})"
)
# /token/N for the default registry, /token/<registry>/N for the others (see registries.py)
_TOKEN = re.compile(
    r"/token/(?:(?P<registry>[a-z0-9][a-z0-9.:-]{0,252})/)?(?P<key>[a-z0-9][a-z0-9.-]{0,63})"
)
MAX_NAME_LENGTH = 255  # distribution's NameTotalLengthMax
# Routes remembered by target: the same manifests and layers are asked for again and again
# (every client of an image, every pull), and matching the grammar above costs a few
# microseconds of backtracking per request. Bounded: 256 targets of at most --max-target bytes.
ROUTES_REMEMBERED = 256


class RouteKind(enum.Enum):
    REGISTRY = "registry"  # /v2/... to the registry upstreams (with failover)
    TOKEN = "token"  # a token request to the realm learned from an upstream's challenge
    SEARCH = "search"  # /v1/search to Docker Hub's index


@dataclass(frozen=True)
class Route:
    kind: RouteKind
    target: str  # the request target to send upstream ("/v2/library/nginx/manifests/latest")
    repository: str | None = None  # the upstream's repository name, for /v2/<name>/... routes
    realm_key: str | None = None  # which upstream's realm, for token routes
    blob_digest: str | None = None  # the digest of a /v2/<name>/blobs/<digest> route
    manifest_reference: str | None = None  # the tag or digest of a /v2/<name>/manifests/ route
    registry: str | None = None  # which registry (None: the default); see registries.py


def route_request(method: str, target: str, *, library_prefix: bool) -> Route:
    """Map a request to a :class:`Route`; raise RouteNotFound or ClientProtocolError."""
    return _route_target(target, library_prefix)


@functools.lru_cache(maxsize=ROUTES_REMEMBERED)
def _route_target(target: str, library_prefix: bool) -> Route:
    # (a refusal is raised afresh each time: lru_cache keeps only what returned)
    if not target.startswith("/"):
        # absolute-form and authority-form targets are for forward proxies; we are not one
        raise ClientProtocolError("request target must be a path (this is not a forward proxy)")
    path, sep, query = target.partition("?")
    suffix = sep + query
    if path in ("/v2", "/v2/"):
        return Route(RouteKind.REGISTRY, "/v2/" + suffix)
    if path == "/v2/_catalog":
        return Route(RouteKind.REGISTRY, path + suffix)
    if path.startswith("/v2/"):
        match = _V2_RESOURCE.fullmatch(path)
        if match is None or len(match["name"]) > MAX_NAME_LENGTH:
            raise RouteNotFound(f"not a registry API path: {_printable(path)}")
        name = upstream_name(match["name"], library_prefix=library_prefix)
        rest = match["rest"]
        digest = reference = None
        if rest.startswith("blobs/") and not rest.startswith("blobs/uploads/"):
            digest = rest.removeprefix("blobs/")
        elif rest.startswith("manifests/"):
            reference = rest.removeprefix("manifests/")
        return Route(
            RouteKind.REGISTRY,
            f"/v2/{name}/{rest}{suffix}",
            repository=name,
            blob_digest=digest,
            manifest_reference=reference,
        )
    if path == "/v1/search":
        return Route(RouteKind.SEARCH, path + suffix)
    token = _TOKEN.fullmatch(path)
    if token is not None:
        return Route(RouteKind.TOKEN, suffix, realm_key=token["key"], registry=token["registry"])
    raise RouteNotFound(f"no such endpoint on this registry mirror: {_printable(path)}")


def without_query_param(query: str, name: str) -> str:
    """``query`` without every ``name=...`` parameter, the rest byte-exact."""
    return "&".join(p for p in query.split("&") if p and p.partition("=")[0] != name)


def route_label(route: Route) -> str:
    """What a route is, for the requests metric: ping, manifest, blob, tags, upload, token,
    search, or other."""
    if route.kind is RouteKind.TOKEN:
        return "token"
    if route.kind is RouteKind.SEARCH:
        return "search"
    if route.blob_digest is not None:
        return "blob"
    if route.manifest_reference is not None:
        return "manifest"
    path = route.target.partition("?")[0]
    if route.repository is None:
        return "ping" if path.rstrip("/") == "/v2" else "other"
    if path.endswith("/tags/list"):
        return "tags"
    if "/blobs/uploads/" in path:
        return "upload"
    return "other"


def _printable(text: str, limit: int = 200) -> str:
    """Return a bounded, printable rendering of client input for error messages and logs."""
    cleaned = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return cleaned + ("..." if len(text) > limit else "")
