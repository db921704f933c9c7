"""Tests for hubproxy.policy.routing: request target -> Route.

Everything here is pure: tables of request targets (including hostile ones) and hypothesis
properties. What a mirror must do comes from /work/shared/PROTOCOL.md and distribution's API spec:
``/v2/`` and the resource endpoints reach the registry, one-component names get ``library/`` when
mirroring Docker Hub (in the path; token scopes are tested in test_registries.py), queries pass
byte-exact, and nothing the router forwards can change meaning on the way (no percent-escapes,
dot segments or empty segments).
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hubproxy.policy.errors import ClientProtocolError, ProxyError, RouteNotFound
from hubproxy.policy.routing import (
    MAX_NAME_LENGTH,
    ROUTES_REMEMBERED,
    Route,
    RouteKind,
    _route_target,
    route_request,
)

DIGEST = "sha256:" + "a" * 64
OTHER_DIGEST = "sha512:" + "b" * 128
UUID = "3f6c1b2e-6f1a-4e0c-9d1c-2b8a3f4d5e6f"

# Registry error codes of the distribution spec (plus UNAVAILABLE, see PROTOCOL.md).
REGISTRY_CODES = frozenset(
    {
        "BLOB_UNKNOWN",
        "BLOB_UPLOAD_INVALID",
        "BLOB_UPLOAD_UNKNOWN",
        "DIGEST_INVALID",
        "MANIFEST_BLOB_UNKNOWN",
        "MANIFEST_INVALID",
        "MANIFEST_UNKNOWN",
        "NAME_INVALID",
        "NAME_UNKNOWN",
        "SIZE_INVALID",
        "UNAUTHORIZED",
        "DENIED",
        "UNSUPPORTED",
        "TOOMANYREQUESTS",
        "UNAVAILABLE",
    }
)


def registry(target: str, *, library_prefix: bool = True, method: str = "GET") -> Route:
    route = route_request(method, target, library_prefix=library_prefix)
    assert route.kind is RouteKind.REGISTRY, route
    return route


def try_route(target: str, *, library_prefix: bool) -> Route | ProxyError:
    try:
        return route_request("GET", target, library_prefix=library_prefix)
    except ProxyError as error:
        return error


def remove_dot_segments(path: str) -> str:
    """RFC 3986 section 5.2.4, which any intermediary or upstream may apply to a path."""
    out: list[str] = []
    segments = path.split("/")
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment == ".":
            if last:
                out.append("")
        elif segment == "..":
            if len(out) > 1:
                out.pop()
            if last:
                out.append("")
        else:
            out.append(segment)
    return "/".join(out)


# ---------------------------------------------------------------- the registry API


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/v2/", "/v2/"),
        ("/v2", "/v2/"),
        ("/v2/?x=1", "/v2/?x=1"),
        ("/v2?ns=docker.io", "/v2/?ns=docker.io"),
        ("/v2/_catalog", "/v2/_catalog"),
        ("/v2/_catalog?n=100&last=b", "/v2/_catalog?n=100&last=b"),
    ],
)
def test_base_and_catalog(target: str, expected: str) -> None:
    for prefix in (True, False):
        route = registry(target, library_prefix=prefix)
        assert route.target == expected
        assert route.repository is None


@pytest.mark.parametrize(
    ("method", "target", "expected", "repository"),
    [
        # manifests by tag and by digest, GET and HEAD
        (
            "GET",
            "/v2/nginx/manifests/latest",
            "/v2/library/nginx/manifests/latest",
            "library/nginx",
        ),
        ("HEAD", "/v2/nginx/manifests/1.27", "/v2/library/nginx/manifests/1.27", "library/nginx"),
        (
            "GET",
            f"/v2/nginx/manifests/{DIGEST}",
            f"/v2/library/nginx/manifests/{DIGEST}",
            "library/nginx",
        ),
        (
            "GET",
            f"/v2/nginx/manifests/{OTHER_DIGEST}",
            f"/v2/library/nginx/manifests/{OTHER_DIGEST}",
            "library/nginx",
        ),
        (
            "GET",
            "/v2/library/nginx/manifests/latest",
            "/v2/library/nginx/manifests/latest",
            "library/nginx",
        ),
        (
            "GET",
            "/v2/samalba/my-app/manifests/v1.0_rc-1",
            "/v2/samalba/my-app/manifests/v1.0_rc-1",
            "samalba/my-app",
        ),
        ("GET", "/v2/a/b/c/d/manifests/X", "/v2/a/b/c/d/manifests/X", "a/b/c/d"),
        ("GET", "/v2/a.b/c__d/manifests/x", "/v2/a.b/c__d/manifests/x", "a.b/c__d"),
        # a repository may be called "manifests" or "library"
        (
            "GET",
            "/v2/foo/manifests/manifests/latest",
            "/v2/foo/manifests/manifests/latest",
            "foo/manifests",
        ),
        ("GET", "/v2/library/manifests/1", "/v2/library/library/manifests/1", "library/library"),
        # blobs
        ("GET", f"/v2/nginx/blobs/{DIGEST}", f"/v2/library/nginx/blobs/{DIGEST}", "library/nginx"),
        ("HEAD", f"/v2/foo/bar/blobs/{DIGEST}", f"/v2/foo/bar/blobs/{DIGEST}", "foo/bar"),
        # uploads (pushes go through the same router)
        ("POST", "/v2/nginx/blobs/uploads/", "/v2/library/nginx/blobs/uploads/", "library/nginx"),
        (
            "POST",
            f"/v2/me/app/blobs/uploads/?mount={DIGEST}&from=library/nginx",
            f"/v2/me/app/blobs/uploads/?mount={DIGEST}&from=library/nginx",
            "me/app",
        ),
        (
            "PATCH",
            f"/v2/nginx/blobs/uploads/{UUID}",
            f"/v2/library/nginx/blobs/uploads/{UUID}",
            "library/nginx",
        ),
        (
            "PUT",
            f"/v2/me/app/blobs/uploads/{UUID}?_state=abc%3D&digest={DIGEST}",
            f"/v2/me/app/blobs/uploads/{UUID}?_state=abc%3D&digest={DIGEST}",
            "me/app",
        ),
        (
            "DELETE",
            f"/v2/me/app/blobs/uploads/{UUID}",
            f"/v2/me/app/blobs/uploads/{UUID}",
            "me/app",
        ),
        ("PUT", "/v2/me/app/manifests/latest", "/v2/me/app/manifests/latest", "me/app"),
        # tags, referrers
        ("GET", "/v2/nginx/tags/list", "/v2/library/nginx/tags/list", "library/nginx"),
        (
            "GET",
            "/v2/nginx/tags/list?n=10&last=1.2",
            "/v2/library/nginx/tags/list?n=10&last=1.2",
            "library/nginx",
        ),
        (
            "GET",
            f"/v2/me/app/referrers/{DIGEST}",
            f"/v2/me/app/referrers/{DIGEST}",
            "me/app",
        ),
        (
            "GET",
            f"/v2/nginx/referrers/{DIGEST}?artifactType=application%2Fvnd.example",
            f"/v2/library/nginx/referrers/{DIGEST}?artifactType=application%2Fvnd.example",
            "library/nginx",
        ),
    ],
)
def test_registry_resources(method: str, target: str, expected: str, repository: str) -> None:
    route = registry(target, method=method)
    assert route.target == expected
    assert route.repository == repository


@pytest.mark.parametrize(
    "target",
    [
        "/v2/nginx/manifests/latest",
        f"/v2/nginx/blobs/{DIGEST}",
        "/v2/nginx/blobs/uploads/",
        "/v2/nginx/tags/list?n=1",
        f"/v2/nginx/referrers/{DIGEST}",
    ],
)
def test_no_library_prefix_leaves_names_alone(target: str) -> None:
    route = registry(target, library_prefix=False)
    assert route.target == target
    assert route.repository == "nginx"


@pytest.mark.parametrize(
    "query",
    [
        "?ns=docker.io",
        "?ns=ghcr.io&x=%2F%2e%2e%2F",
        "?a=b+c&a=d&&=&%00",
        "?",
        "??x=/../..//",
        "?q=%zz%",
        "?Ümlaut=ü",
    ],
)
def test_query_string_is_kept_byte_exact(query: str) -> None:
    route = registry("/v2/nginx/manifests/latest" + query)
    assert route.target == "/v2/library/nginx/manifests/latest" + query
    assert registry("/v2/" + query).target == "/v2/" + query


def test_name_length_limit() -> None:
    half = "a" * 127
    name = f"{half}/{half}"  # exactly 255 characters
    assert len(name) == MAX_NAME_LENGTH
    assert registry(f"/v2/{name}/tags/list").repository == name
    with pytest.raises(RouteNotFound):
        route_request("GET", f"/v2/{name}a/tags/list", library_prefix=True)
    with pytest.raises(RouteNotFound):
        route_request("GET", "/v2/" + "a" * 256 + "/tags/list", library_prefix=False)


# ---------------------------------------------------------------- search and token


@pytest.mark.parametrize(
    "target", ["/v1/search?q=nginx&n=25", "/v1/search", "/v1/search?q=%2F..%2F"]
)
def test_search(target: str) -> None:
    route = route_request("GET", target, library_prefix=True)
    assert route.kind is RouteKind.SEARCH
    assert route.target == target


@pytest.mark.parametrize(
    ("target", "key", "query"),
    [
        ("/token/0", "0", ""),
        (
            "/token/0?service=registry.docker.io&scope=repository:nginx:pull",
            "0",
            "?service=registry.docker.io&scope=repository:nginx:pull",
        ),
        ("/token/1?scope=a&scope=b&scope=a", "1", "?scope=a&scope=b&scope=a"),
        ("/token/12?x=%2F%zz+y", "12", "?x=%2F%zz+y"),
    ],
)
def test_token(target: str, key: str, query: str) -> None:
    route = route_request("GET", target, library_prefix=True)
    assert route.kind is RouteKind.TOKEN
    assert route.realm_key == key
    assert route.target == query  # the raw query, untouched by routing


# ---------------------------------------------------------------- what is refused


@pytest.mark.parametrize(
    "target",
    [
        "/",
        "/v1/",
        "/v1/_ping",
        "/v1/search/",
        "/V2/",
        "/v2/nginx",
        "/v2/nginx/",
        "/v2/nginx/manifests",
        "/v2/nginx/manifests/",
        "/v2/nginx/manifests/latest/",
        "/v2/nginx/tags",
        "/v2/nginx/tags/list/",
        "/v2/nginx/blobs/uploads",  # clients always send the trailing slash
        "/v2/nginx/blobs/latest",  # blobs only by digest
        "/v2/nginx/blobs/sha256:abc",  # digest too short
        "/v2/nginx/referrers/latest",
        "/v2/_catalog/",
        "/v2/_catalog/x",
        "/token",
        "/token/",
        "/token/0/",
        "/token/0/../1",
        "/token/-",
        "/token/%30",
        "/metrics/../v2/",
        "/favicon.ico",
        "/v2../v2/",
        "/v20/",
    ],
)
def test_unknown_endpoints_are_404_with_a_registry_code(target: str) -> None:
    with pytest.raises(RouteNotFound) as info:
        route_request("GET", target, library_prefix=True)
    assert info.value.status == 404
    assert info.value.code in REGISTRY_CODES


@pytest.mark.parametrize(
    "target",
    [
        "http://evil/v2/",
        "https://registry-1.docker.io/v2/library/nginx/manifests/latest",
        "evil.com:443",
        "*",
        "",
        "v2/",
        "?/v2/",
        " /v2/",
    ],
)
def test_non_origin_form_targets_are_400(target: str) -> None:
    with pytest.raises(ClientProtocolError) as info:
        route_request("GET", target, library_prefix=True)
    assert info.value.status == 400
    assert info.value.code in REGISTRY_CODES


HOSTILE_NAMES = [
    "ngi%6Ex",  # percent-encoded
    "library%2Fnginx",
    "%2e%2e/etc",
    "..",
    "../library/nginx",
    "library/../nginx",
    "library/./nginx",
    ".",
    "a//b",
    "/nginx",
    "nginx/",
    "Nginx",
    "library/NGINX",
    "ngïnx",
    "nginx\u200b",
    "\uff4eginx",  # fullwidth n
    "ngi\x00nx",
    "nginx\r\nx-evil: 1",
    "ngi nx",
    "ngi\tnx",
    "-nginx",
    "nginx-",
    "_nginx",
    "ngi..nx",
    "ngi___nx",
    "ngi:nx",
    "ngi@nx",
    "a" * 256,
    "/".join(["a" * 50] * 6),  # 305 characters in components of 50
]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
@pytest.mark.parametrize(
    "rest", ["manifests/latest", f"blobs/{DIGEST}", "tags/list", "blobs/uploads/"]
)
def test_hostile_names_are_rejected(name: str, rest: str) -> None:
    target = f"/v2/{name}/{rest}"
    with pytest.raises(ProxyError) as info:
        route_request("GET", target, library_prefix=True)
    assert info.value.status in (400, 404)
    assert info.value.code in REGISTRY_CODES
    # the error message may be logged and sent: it must stay printable and bounded
    assert info.value.message.isprintable()
    assert len(info.value.message) < 300


@pytest.mark.parametrize(
    "target",
    [
        "/v2/nginx/manifests/..",
        "/v2/nginx/manifests/.",
        "/v2/nginx/manifests/-latest",
        "/v2/nginx/manifests/.latest",
        "/v2/nginx/manifests/" + "a" * 129,  # tags are at most 128 characters
        "/v2/nginx/manifests/lat%65st",
        "/v2/nginx/manifests/latest%00",
        "/v2/nginx/manifests/latest\x00",
        "/v2/nginx/manifests/sha256:" + "A" * 64 + "/x",
        "/v2/nginx/blobs/sha256:" + "a" * 64 + "/..",
        "/v2/nginx/blobs/SHA256:" + "a" * 64,
        "/v2/nginx/blobs/sha256:" + "a" * 31,
        "/v2/nginx/blobs/sha256:" + "a" * 64 + "%2F",
        "/v2/nginx/blobs/uploads/a/b",
        "/v2/nginx/blobs/uploads/a%2Fb",
        "/v2/nginx/blobs/uploads//",
    ],
)
def test_hostile_references_are_rejected(target: str) -> None:
    with pytest.raises(ProxyError) as info:
        route_request("GET", target, library_prefix=True)
    assert info.value.status in (400, 404)


@pytest.mark.parametrize("upload_id", ["..", "."])
def test_upload_id_dot_segments_are_rejected(upload_id: str) -> None:
    route = try_route(f"/v2/nginx/blobs/uploads/{upload_id}", library_prefix=True)
    if isinstance(route, ProxyError):
        return
    path = route.target.partition("?")[0]
    assert remove_dot_segments(path) == path, route


def test_remove_dot_segments_helper() -> None:
    assert remove_dot_segments("/a/b/../c") == "/a/c"
    assert remove_dot_segments("/a/b/..") == "/a/"
    assert remove_dot_segments("/a/./b") == "/a/b"
    assert remove_dot_segments("/v2/") == "/v2/"


# ---------------------------------------------------------------- properties

_SEGMENTS = st.sampled_from(
    [
        "v2",
        "nginx",
        "library",
        "manifests",
        "blobs",
        "uploads",
        "tags",
        "list",
        "referrers",
        "_catalog",
        "latest",
        DIGEST,
        UUID,
        "..",
        ".",
        "",
        "%2e%2e",
        "%2F",
        "%00",
        "a%20b",
        "A",
        "é",
        "\x00",
        "\n",
        "a b",
        "a..b",
        "a--b",
        "a__b",
        "a:5000",
        "x" * 130,
    ]
)
_HOSTILE_PATHS = st.builds(
    lambda parts, tail: "/v2/" + "/".join(parts) + tail,
    st.lists(_SEGMENTS, min_size=0, max_size=8),
    st.sampled_from(["", "/", "?x=1", "?ns=docker.io&a=%2F..//", "#frag"]),
)
_ANY_PATHS = st.one_of(
    _HOSTILE_PATHS,
    st.text(max_size=80).map(lambda t: "/v2/" + t),
    st.text(alphabet="abv2/._-:%?", max_size=60).map(lambda t: "/" + t),
)


@given(_ANY_PATHS, st.booleans())
def test_property_registry_targets_are_clean(target: str, library_prefix: bool) -> None:
    route = try_route(target, library_prefix=library_prefix)
    if isinstance(route, ProxyError):
        assert route.status in (400, 404)
        assert route.code in REGISTRY_CODES
        return
    if route.kind is not RouteKind.REGISTRY:
        return
    path, _, query = route.target.partition("?")
    assert path.startswith("/v2/")
    assert "%" not in path
    assert "//" not in path
    assert "/../" not in path
    assert "/./" not in path
    assert re.fullmatch(r"[A-Za-z0-9._:/=+-]*", path), path
    # the query passes byte-exact
    assert query == target.partition("?")[2]


_COMPONENT = st.from_regex(r"[a-z0-9]{1,8}(?:[._-][a-z0-9]{1,4}){0,2}", fullmatch=True)
_NAMES = st.lists(_COMPONENT, min_size=1, max_size=4).map("/".join)
_REFS = st.one_of(
    st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True),
    st.just(DIGEST),
)
_QUERIES = st.one_of(
    st.just(""),
    st.text(alphabet="abc=&%/.+?#:", max_size=20).map(lambda q: "?" + q),
)


@given(_NAMES, _REFS, _QUERIES, st.booleans())
def test_property_valid_manifest_requests_route(
    name: str, ref: str, query: str, library_prefix: bool
) -> None:
    target = f"/v2/{name}/manifests/{ref}{query}"
    route = route_request("HEAD", target, library_prefix=library_prefix)
    expected = f"library/{name}" if library_prefix and "/" not in name else name
    assert route.kind is RouteKind.REGISTRY
    assert route.repository == expected
    assert route.target == f"/v2/{expected}/manifests/{ref}{query}"


def test_routes_are_remembered_within_a_bound_and_refusals_raised_each_time() -> None:
    target = "/v2/library/alpine/manifests/3.20"
    first = route_request("GET", target, library_prefix=True)
    assert route_request("HEAD", target, library_prefix=True) is first  # (the method plays no part)
    assert route_request("GET", target, library_prefix=False) == Route(
        RouteKind.REGISTRY, target, repository="library/alpine", manifest_reference="3.20"
    )
    for n in range(2 * ROUTES_REMEMBERED):
        route_request("GET", f"/v2/x/manifests/t{n}", library_prefix=True)
    assert _route_target.cache_info().currsize <= ROUTES_REMEMBERED
    for _ in range(2):
        with pytest.raises(RouteNotFound):
            route_request("GET", "/v2/UPPER/manifests/x", library_prefix=True)
