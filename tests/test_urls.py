"""Tests for hubproxy.policy.urls: absolute URLs split into an origin and an origin-form target.

These URLs come from the command line (upstreams, the proxy) and from upstream responses (a
redirect's Location, a challenge's realm). What comes out must be something we can connect to and
put on a request line: http or https only, no credentials, a host, a port, a target that starts
with "/" (RFC 9112 section 3.2.1) made of the characters a request-target may hold.
"""

from __future__ import annotations

import re
import urllib.parse

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hubproxy.policy.urls import DEFAULT_PORTS, Origin, Url, is_ip_literal, parse_url, resolve

# RFC 9112 origin-form: absolute-path [ "?" query ], visible ASCII without spaces
REQUEST_TARGET = re.compile(r"/[\x21-\x7e]*")


@pytest.mark.parametrize(
    ("text", "scheme", "host", "port", "target"),
    [
        ("https://registry-1.docker.io", "https", "registry-1.docker.io", 443, "/"),
        ("https://registry-1.docker.io/", "https", "registry-1.docker.io", 443, "/"),
        ("http://registry.local", "http", "registry.local", 80, "/"),
        ("http://127.0.0.1:5000/v2/", "http", "127.0.0.1", 5000, "/v2/"),
        ("https://h:443/x", "https", "h", 443, "/x"),
        ("http://h:443/x", "http", "h", 443, "/x"),
        ("https://h:80", "https", "h", 80, "/"),
        ("HTTPS://Registry-1.Docker.IO/V2/", "https", "registry-1.docker.io", 443, "/V2/"),
        # IPv6 literals lose their brackets in Origin.host
        ("http://[::1]:8080/x?y", "http", "::1", 8080, "/x?y"),
        ("https://[2001:DB8::1]/", "https", "2001:db8::1", 443, "/"),
        ("https://[::ffff:192.0.2.1]:5000", "https", "::ffff:192.0.2.1", 5000, "/"),
        # queries are kept, fragments are not part of a request
        (
            "https://auth.docker.io/token?service=x&scope=a",
            "https",
            "auth.docker.io",
            443,
            "/token?service=x&scope=a",
        ),
        ("https://h?q=1", "https", "h", 443, "/?q=1"),
        ("https://h/p#frag", "https", "h", 443, "/p"),
        (
            "https://production.cloudflare.docker.com/registry-v2/docker/registry/v2/blobs/"
            "sha256/aa/aaaa/data?verify=1700000000-abc%2Bdef%3D",
            "https",
            "production.cloudflare.docker.com",
            443,
            "/registry-v2/docker/registry/v2/blobs/sha256/aa/aaaa/data"
            "?verify=1700000000-abc%2Bdef%3D",
        ),
        ("  https://h/x  ", "https", "h", 443, "/x"),
    ],
)
def test_parse_url(text: str, scheme: str, host: str, port: int, target: str) -> None:
    url = parse_url(text)
    assert url.origin == Origin(scheme, host, port)
    assert url.target == target
    assert url.origin.tls is (scheme == "https")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "registry-1.docker.io",
        "localhost:5000",
        "//registry-1.docker.io/v2/",
        "/v2/",
        "ftp://h/x",
        "file:///etc/passwd",
        "socks5://proxy:1080",
        "ws://h/",
        "javascript:alert(1)",
        "data:text/plain,hi",
        "https://",
        "https:///path",
        "http://:80/",
        "https://user:pass@h/",
        "https://user@h/",
        "https://:pass@h/",
        "https://h:99999/",
        "https://h:-1/",
        "https://h:port/",
        "https://h:80:80/",
        "https://[::1/",
        "https://[zz]/",
    ],
)
def test_parse_url_rejects(text: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the contract is ValueError
        parse_url(text)


@pytest.mark.parametrize(
    "location",
    ["https://cdn.example/a b", "https://cdn.example/bl\u00f6b", "/data?x=\u00e4", "/a\x7fb"],
)
def test_resolved_targets_are_valid_request_targets(location: str) -> None:
    base = parse_url("https://registry-1.docker.io/v2/library/nginx/blobs/sha256:abc")
    try:
        url = resolve(base, location)
    except ValueError:
        return  # refusing is fine too
    assert REQUEST_TARGET.fullmatch(url.target), url.target


@pytest.mark.parametrize(
    ("origin", "authority", "text"),
    [
        (
            Origin("https", "registry-1.docker.io", 443),
            "registry-1.docker.io",
            "https://registry-1.docker.io",
        ),
        (Origin("https", "h", 8443), "h:8443", "https://h:8443"),
        (Origin("http", "h", 80), "h", "http://h"),
        (Origin("http", "h", 443), "h:443", "http://h:443"),
        (Origin("https", "h", 80), "h:80", "https://h:80"),
        (Origin("http", "::1", 5000), "[::1]:5000", "http://[::1]:5000"),
        (Origin("https", "2001:db8::1", 443), "[2001:db8::1]", "https://[2001:db8::1]"),
        (Origin("http", "127.0.0.1", 80), "127.0.0.1", "http://127.0.0.1"),
    ],
)
def test_origin_authority(origin: Origin, authority: str, text: str) -> None:
    assert origin.authority == authority
    assert str(origin) == text
    assert parse_url(text).origin == origin


def test_url_str_round_trips() -> None:
    for text in ["https://h/x?y=1", "http://[::1]:5000/v2/", "https://h:8443/"]:
        assert str(parse_url(text)) == text


BLOB = parse_url("https://registry-1.docker.io/v2/library/nginx/blobs/sha256:abc")


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        (
            "https://production.cloudflare.docker.com/registry-v2/data?verify=1-sig",
            "https://production.cloudflare.docker.com/registry-v2/data?verify=1-sig",
        ),
        (
            "/v2/library/nginx/blobs/sha256:def",
            "https://registry-1.docker.io/v2/library/nginx/blobs/sha256:def",
        ),
        # RFC 3986 4.2: a relative path whose first segment has a colon needs "./"
        ("./sha256:def", "https://registry-1.docker.io/v2/library/nginx/blobs/sha256:def"),
        ("../x", "https://registry-1.docker.io/v2/library/nginx/x"),
        ("../../../../../x", "https://registry-1.docker.io/x"),
        ("//cdn.example/p?q", "https://cdn.example/p?q"),
        ("?part=2", "https://registry-1.docker.io/v2/library/nginx/blobs/sha256:abc?part=2"),
        ("HTTP://CDN.Example:8080/D", "http://cdn.example:8080/D"),
        ("https://[::1]:9000/bucket/key", "https://[::1]:9000/bucket/key"),
        ("  /trimmed  ", "https://registry-1.docker.io/trimmed"),
        ("https://cdn.example", "https://cdn.example/"),
    ],
)
def test_resolve(location: str, expected: str) -> None:
    assert str(resolve(BLOB, location)) == expected


@pytest.mark.parametrize(
    "location",
    [
        "ftp://cdn.example/x",
        "https://user:pw@cdn.example/x",
        "mailto:a@b",
        "sha256:def",  # an absolute URI with the scheme "sha256"
        "https://h:0x1/",
    ],
)
def test_resolve_rejects(location: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the contract is ValueError
        resolve(BLOB, location)


@pytest.mark.parametrize(
    "location",
    [
        "https://cdn.example/registry-v2/data?verify=1-sig&x=%2F",
        "HTTPS://CDN.example:443/a;p?q#frag",
        "http://cdn.example:8080/a/../b/./c",
        "https://cdn.example?q",
        "https://cdn.example#f",
        "https:///x",
        "https:/x",
        "https:x",
        "http://[::1]:9/x",
        "https://h/a b\tc",
        "https://h\\x/y",
        "https://h:0x1/",
        "https://user@h/",
    ],
)
def test_an_absolute_location_resolves_as_joined(location: str) -> None:
    """The shortcut for absolute URLs (no join) gives what joining gives, or refuses alike."""
    resolved, joined = _resolved_and_joined(location)
    assert resolved == joined


@given(
    st.sampled_from(["https://", "http://", "HTTP://", "https:", "https:/", "//", "/", ""]),
    st.text(alphabet="ab:/?#@[]%;.\\ \t\r\n\x0b\u30001\u00e9", max_size=20),
)
def test_any_location_resolves_as_joined(prefix: str, rest: str) -> None:
    resolved, joined = _resolved_and_joined(prefix + rest)
    assert resolved == joined


def _resolved_and_joined(location: str) -> tuple[Url | None, Url | None]:
    """``resolve(BLOB, location)``, and the URL joining it to BLOB gives (None: refused)."""
    try:
        joined: Url | None = parse_url(urllib.parse.urljoin(str(BLOB), location.strip()))
    except ValueError:
        joined = None
    try:
        resolved: Url | None = resolve(BLOB, location)
    except ValueError:
        resolved = None
    return resolved, joined


def test_resolve_relative_keeps_an_ipv6_origin() -> None:
    base = parse_url("http://[::1]:5000/v2/x/blobs/sha256:1")
    assert resolve(base, "/cdn/data").origin == Origin("http", "::1", 5000)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", True),
        ("::1", True),
        ("2001:db8::1", True),
        ("localhost", False),
        ("[::1]", False),
        ("1.2.3", False),
        ("", False),
    ],
)
def test_is_ip_literal(host: str, expected: bool) -> None:
    assert is_ip_literal(host) is expected


_HOSTS = st.one_of(
    st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?(\.[a-z0-9]{1,8}){0,3}", fullmatch=True),
    st.ip_addresses().map(str),
)
_PATHS = st.from_regex(r"(/[A-Za-z0-9._~%!$&'()*+,;=:@-]{0,10}){0,4}", fullmatch=True)
_QUERY = st.one_of(st.just(""), st.from_regex(r"\?[A-Za-z0-9=&%+/:._-]{1,20}", fullmatch=True))


@given(st.sampled_from(sorted(DEFAULT_PORTS)), _HOSTS, st.integers(1, 65535), _PATHS, _QUERY)
def test_property_parse_url(scheme: str, host: str, port: int, path: str, query: str) -> None:
    bracketed = f"[{host}]" if ":" in host else host
    url = parse_url(f"{scheme}://{bracketed}:{port}{path}{query}")
    assert url.origin == Origin(scheme, host.lower(), port)
    assert url.target == (path or "/") + query
    assert REQUEST_TARGET.fullmatch(url.target)
    # the canonical string parses to the same URL
    assert parse_url(str(url)) == url
    assert isinstance(url, Url)
