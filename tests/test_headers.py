"""Tests for hubproxy.policy.headers: what crosses the proxy in each direction.

Rules from RFC 9110 section 7.6.1 (hop-by-hop headers and the ``Connection`` list), RFC 9112
section 6.3 (framing), Go's httputil.ReverseProxy (the list, and forwarding headers set by the
proxy itself) and PROTOCOL.md (Accept verbatim, Docker-Content-Digest, WWW-Authenticate and the
rate-limit headers must reach the client).
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hubproxy.policy.headers import (
    HOP_BY_HOP,
    Headers,
    client_response_headers,
    connection_tokens,
    get_all,
    get_header,
    lax_framing,
    replace_header,
    strip_hop_by_hop,
    upstream_request_headers,
)

STANDARD_HOP_BY_HOP = [
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"proxy-authenticate",
    b"proxy-authorization",
    b"te",
    b"trailer",
    b"transfer-encoding",
    b"upgrade",
]

ACCEPT_1 = (
    b"application/vnd.docker.distribution.manifest.v2+json, "
    b"application/vnd.docker.distribution.manifest.list.v2+json;q=0.9"
)
ACCEPT_2 = b"application/vnd.oci.image.manifest.v1+json"
ACCEPT_3 = b"application/vnd.oci.image.index.v1+json, */*;q=0.1"


def names(headers: Headers) -> list[bytes]:
    return [k for k, _ in headers]


def build(
    client: Headers,
    *,
    authorization: bytes | None = None,
    body_length: int | None = None,
    chunked_body: bool = False,
) -> Headers:
    return upstream_request_headers(
        client,
        host=b"registry-1.docker.io",
        client_ip="192.0.2.7",
        client_proto="https",
        authorization=authorization,
        body_length=body_length,
        chunked_body=chunked_body,
    )


# ---------------------------------------------------------------- hop-by-hop


def test_standard_list_matches_go_reverse_proxy() -> None:
    assert frozenset(STANDARD_HOP_BY_HOP) == HOP_BY_HOP


@pytest.mark.parametrize("name", STANDARD_HOP_BY_HOP)
def test_strip_drops_each_standard_hop_by_hop_header(name: bytes) -> None:
    headers = [(b"accept", b"*/*"), (name, b"x"), (b"docker-content-digest", b"sha256:1")]
    assert strip_hop_by_hop(headers) == [
        (b"accept", b"*/*"),
        (b"docker-content-digest", b"sha256:1"),
    ]


@pytest.mark.parametrize(
    ("connection_values", "dropped"),
    [
        ([b"close"], set()),
        ([b"keep-alive, X-Custom"], {b"x-custom"}),
        ([b"X-CUSTOM"], {b"x-custom"}),
        ([b" x-custom ,, x-other\t"], {b"x-custom", b"x-other"}),
        ([b"x-custom", b"X-Other"], {b"x-custom", b"x-other"}),  # several Connection headers
        ([b","], set()),
        ([b""], set()),
    ],
)
def test_strip_drops_tokens_named_in_connection(
    connection_values: list[bytes], dropped: set[bytes]
) -> None:
    headers: Headers = [(b"connection", v) for v in connection_values]
    headers += [(b"x-custom", b"1"), (b"x-other", b"2"), (b"x-kept", b"3")]
    out = strip_hop_by_hop(headers)
    assert set(names(out)) == {b"x-custom", b"x-other", b"x-kept"} - dropped
    assert connection_tokens(headers) >= dropped


def test_strip_keeps_order_and_duplicates() -> None:
    headers = [(b"a", b"1"), (b"b", b"2"), (b"a", b"3"), (b"te", b"trailers"), (b"c", b"4")]
    assert strip_hop_by_hop(headers) == [(b"a", b"1"), (b"b", b"2"), (b"a", b"3"), (b"c", b"4")]


_NAMES = st.sampled_from(
    [*STANDARD_HOP_BY_HOP, b"accept", b"x-a", b"x-b", b"authorization", b"range", b"etag"]
)
_HEADERS = st.lists(st.tuples(_NAMES, st.binary(max_size=12)), max_size=10)


@given(_HEADERS, st.lists(st.sampled_from([b"x-a", b"X-B", b"range", b"close"]), max_size=3))
def test_property_strip(headers: Headers, named: list[bytes]) -> None:
    headers = [*headers, (b"connection", b", ".join(named))]
    out = strip_hop_by_hop(headers)
    # every Connection header counts, the generated ones included
    lowered = {
        token.strip().lower()
        for key, value in headers
        if key == b"connection"
        for token in value.split(b",")
        if token.strip()
    }
    for key, _ in out:
        assert key not in HOP_BY_HOP
        assert key not in lowered
    # everything else passes, in order
    assert out == [(k, v) for k, v in headers if k not in HOP_BY_HOP and k not in lowered]
    assert strip_hop_by_hop(out) == out


# ---------------------------------------------------------------- toward the upstream


def test_upstream_host_and_forwarding_headers() -> None:
    out = build(
        [
            (b"host", b"mirror.example.com"),
            (b"x-forwarded-for", b"6.6.6.6"),
            (b"x-forwarded-proto", b"gopher"),
            (b"x-forwarded-host", b"evil.example"),
            (b"forwarded", b"for=6.6.6.6;host=evil"),
            (b"x-real-ip", b"6.6.6.6"),
            (b"user-agent", b"docker/27.0"),
        ]
    )
    assert out[0] == (b"host", b"registry-1.docker.io")
    assert get_all(out, b"host") == [b"registry-1.docker.io"]
    assert get_all(out, b"x-forwarded-for") == [b"192.0.2.7"]
    assert get_all(out, b"x-real-ip") == [b"192.0.2.7"]
    assert get_all(out, b"x-forwarded-proto") == [b"https"]
    assert get_all(out, b"x-forwarded-host") == []
    assert get_all(out, b"forwarded") == []
    assert get_header(out, b"user-agent") == b"docker/27.0"


@pytest.mark.parametrize(
    "name",
    [b"x-forwarded-port", b"x-forwarded-prefix", b"x-forwarded-server", b"x-forwarded-ssl"],
)
def test_upstream_drops_every_client_x_forwarded_header(name: bytes) -> None:
    out = build([(name, b"spoofed"), (b"accept", b"*/*")])
    assert get_all(out, name) == []


@pytest.mark.parametrize("given", [b"Bearer upstream", None])
def test_authorization_is_what_the_flow_decided_never_the_clients_own(
    given: bytes | None,
) -> None:
    # the client's header may be a sealed mirror token: only the decided credential goes out
    client = [(b"authorization", b"Bearer hp1.sealed"), (b"accept", b"*/*")]
    out = build(client, authorization=given)
    assert get_all(out, b"authorization") == ([given] if given else [])
    assert get_header(out, b"accept") == b"*/*"


def test_proxy_authorization_never_goes_upstream() -> None:
    out = build([(b"proxy-authorization", b"Basic eA=="), (b"proxy-connection", b"keep-alive")])
    assert get_all(out, b"proxy-authorization") == []
    assert get_all(out, b"proxy-connection") == []


def test_accept_headers_verbatim_and_in_order() -> None:
    client = [
        (b"accept", ACCEPT_1),
        (b"user-agent", b"containerd/1.7"),
        (b"accept", ACCEPT_2),
        (b"accept", ACCEPT_3),
    ]
    out = build(client)
    assert get_all(out, b"accept") == [ACCEPT_1, ACCEPT_2, ACCEPT_3]


def test_end_to_end_request_headers_pass() -> None:
    client = [
        (b"range", b"bytes=100-"),
        (b"if-none-match", b'"sha256:abc"'),
        (b"user-agent", b"skopeo/1.13"),
        (b"docker-distribution-api-version", b"registry/2.0"),
    ]
    out = build(client)
    for key, value in client:
        assert get_all(out, key) == [value]


@pytest.mark.parametrize(
    ("body_length", "chunked", "content_length", "transfer_encoding"),
    [
        (None, False, [], []),
        (0, False, [b"0"], []),
        (1234, False, [b"1234"], []),
        (None, True, [], [b"chunked"]),
        (10, True, [b"10"], []),  # a known length wins
    ],
)
def test_framing_as_asked(
    body_length: int | None,
    chunked: bool,
    content_length: list[bytes],
    transfer_encoding: list[bytes],
) -> None:
    client = [
        (b"content-length", b"999"),
        (b"transfer-encoding", b"gzip, chunked"),
        (b"expect", b"100-continue"),
        (b"te", b"trailers"),
        (b"connection", b"keep-alive, te"),
        (b"keep-alive", b"timeout=5"),
        (b"upgrade", b"h2c"),
    ]
    out = build(client, body_length=body_length, chunked_body=chunked)
    assert get_all(out, b"content-length") == content_length
    assert get_all(out, b"transfer-encoding") == transfer_encoding
    for name in (b"expect", b"te", b"connection", b"keep-alive", b"upgrade"):
        assert get_all(out, name) == []


def test_connection_named_headers_do_not_go_upstream() -> None:
    out = build(
        [
            (b"connection", b"X-Secret, Authorization"),
            (b"x-secret", b"1"),
            (b"authorization", b"Basic eA=="),
        ]
    )
    assert get_all(out, b"x-secret") == []
    assert get_all(out, b"authorization") == []


@given(_HEADERS, st.booleans())
def test_property_upstream_headers(client: Headers, send_authorization: bool) -> None:
    out = build(client, authorization=b"Bearer decided" if send_authorization else None)
    assert out[0] == (b"host", b"registry-1.docker.io")
    assert len(get_all(out, b"host")) == 1
    for key, _ in out:
        assert key not in HOP_BY_HOP
    expected = [b"Bearer decided"] if send_authorization else []
    assert get_all(out, b"authorization") == expected
    assert get_all(out, b"x-forwarded-for") == [b"192.0.2.7"]
    assert get_all(out, b"accept") == get_all(strip_hop_by_hop(client), b"accept")


# ---------------------------------------------------------------- toward the client


def test_client_response_headers_keep_registry_headers() -> None:
    upstream = [
        (b"content-type", b"application/vnd.docker.distribution.manifest.v2+json"),
        (b"content-length", b"1234"),
        (b"docker-content-digest", b"sha256:" + b"a" * 64),
        (b"docker-distribution-api-version", b"registry/2.0"),
        (b"etag", b'"sha256:aaaa"'),
        (b"www-authenticate", b'Bearer realm="https://auth.docker.io/token"'),
        (b"ratelimit-limit", b"100;w=21600"),
        (b"ratelimit-remaining", b"20;w=21600"),
        (b"docker-ratelimit-source", b"192.0.2.7"),
        (b"retry-after", b"60"),
        (b"content-range", b"bytes 100-1233/1234"),
        (b"accept-ranges", b"bytes"),
        (b"location", b"/v2/library/nginx/blobs/uploads/x"),
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
    ]
    assert client_response_headers(upstream) == upstream


def test_client_response_headers_drop_hop_by_hop() -> None:
    upstream = [
        (b"connection", b"keep-alive, X-Upstream-Debug"),
        (b"keep-alive", b"timeout=5"),
        (b"x-upstream-debug", b"1"),
        (b"transfer-encoding", b"chunked"),
        (b"trailer", b"x-checksum"),
        (b"proxy-authenticate", b"Basic"),
        (b"upgrade", b"h2c"),
        (b"docker-content-digest", b"sha256:1"),
    ]
    assert client_response_headers(upstream) == [(b"docker-content-digest", b"sha256:1")]


def test_client_response_headers_drop_content_length_next_to_transfer_encoding() -> None:
    upstream = [
        (b"transfer-encoding", b"chunked"),
        (b"content-length", b"100"),
        (b"docker-content-digest", b"sha256:1"),
    ]
    assert get_all(client_response_headers(upstream), b"content-length") == []


# ---------------------------------------------------------------- small helpers


def test_get_header_and_get_all() -> None:
    headers = [(b"a", b"1"), (b"b", b"2"), (b"a", b"3")]
    assert get_header(headers, b"a") == b"1"
    assert get_header(headers, b"z") is None
    assert get_all(headers, b"a") == [b"1", b"3"]
    assert get_all(headers, b"z") == []


def test_replace_header() -> None:
    headers = [(b"a", b"1"), (b"b", b"2"), (b"a", b"3")]
    assert replace_header(headers, b"a", b"9") == [(b"b", b"2"), (b"a", b"9")]
    assert replace_header(headers, b"c", b"0") == [*headers, (b"c", b"0")]
    assert headers == [(b"a", b"1"), (b"b", b"2"), (b"a", b"3")]  # not mutated


@pytest.mark.parametrize(
    ("head", "problem"),
    [
        (b"GET / HTTP/1.1\r\nhost: a\r\n\r\n", None),
        (b"GET / HTTP/1.1\r\nhost: a\r\nx: a b\tc\r\n\r\n", None),
        (b"GET / HTTP/1.1\nhost: a\n\n", "bare LF in the request head"),
        (b"GET / HTTP/1.1\r\nhost: a\n\r\n", "bare LF in the request head"),
        (b"GET / HTTP/1.1\r\nhost: a\rb\r\n\r\n", "bare CR in the request head"),
        (b"GET / HTTP/1.1\r\nx: 1\r\n folded\r\n\r\n", "obsolete line folding in the request head"),
        (
            b"GET / HTTP/1.1\r\nx: 1\r\n\tfolded\r\n\r\n",
            "obsolete line folding in the request head",
        ),
    ],
)
def test_lax_framing(head: bytes, problem: str | None) -> None:
    assert lax_framing(head) == problem


def _lax_framing_by_copy(head: bytes) -> str | None:
    """The rule as first written: the head without its CRLFs, searched."""
    unbroken = head.replace(b"\r\n", b"")
    if b"\n" in unbroken:
        return "bare LF in the request head"
    if b"\r" in unbroken:
        return "bare CR in the request head"
    if b"\r\n " in head or b"\r\n\t" in head:
        return "obsolete line folding in the request head"
    return None


@given(st.lists(st.sampled_from([b"a", b"\r", b"\n", b"\r\n", b" ", b"\t", b":"]), max_size=40))
def test_lax_framing_counts_as_the_copy_searched(pieces: list[bytes]) -> None:
    """Counting line ends (no copy, no ``in``) finds what searching a copy without the CRLFs
    found, for every mix of CR, LF, white space and text."""
    head = b"".join(pieces)
    assert lax_framing(head) == _lax_framing_by_copy(head)
