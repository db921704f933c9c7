"""Header rules, as in Go's ``httputil.ReverseProxy``: what crosses the proxy and what does not.

Header lists are h11's: ``(name, value)`` byte pairs with lowercase names. Hop-by-hop headers
(RFC 9110 section 7.6.1) and every token named in ``Connection`` describe one connection, not the
message, so they are dropped in both directions; framing toward each side is then decided afresh
by h11 from the ``Content-Length`` or ``Transfer-Encoding`` we set. Forwarding headers from the
client are never trusted: they are stripped and set from what we saw ourselves.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence

Headers = list[tuple[bytes, bytes]]

_NAME = operator.itemgetter(0)
_NO_TOKENS: frozenset[bytes] = frozenset()

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

# Set by us toward the upstream; whatever a client sent under these names is dropped.
FORWARDING = frozenset(
    {b"forwarded", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-real-ip"}
)

# Request headers that only make sense on the client's hop. ``expect`` is answered by us (h11
# sends no ``100 Continue`` on its own, and we read the body before talking upstream).
# ``hubproxy-peer`` marks a request between two instances (--peer): never sent to an upstream.
CLIENT_HOP_ONLY = frozenset({b"host", b"expect", b"content-length", b"hubproxy-peer"})


def get_header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """Return the first value of ``name`` (lowercase), or None."""
    # (a plain loop: cheaper than any C-level search built of map and compress, measured)
    for key, value in headers:
        if key == name:
            return value
    return None


def get_all(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    """Return every value of ``name`` (lowercase), in order."""
    return [value for key, value in headers if key == name]


def connection_tokens(headers: Sequence[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Return the lowercase header names listed in any ``Connection`` header."""
    if b"connection" not in map(_NAME, headers):  # (in C: most requests have none)
        return _NO_TOKENS
    tokens = _NO_TOKENS
    for key, value in headers:
        if key == b"connection":
            tokens = tokens | _tokens_in(value)
    return tokens


@functools.lru_cache(maxsize=64)
def _tokens_in(value: bytes) -> frozenset[bytes]:
    """The names one ``Connection`` value lists. Remembered: nearly every answer a registry
    sends says ``keep-alive`` (or ``close``), twice per passed request; bounded whatever a peer
    sends."""
    return frozenset(t.strip().lower() for t in value.split(b",") if t.strip())


def strip_hop_by_hop(headers: Sequence[tuple[bytes, bytes]]) -> Headers:
    """Drop hop-by-hop headers and the headers named in ``Connection``."""
    named = connection_tokens(headers)
    return [(k, v) for k, v in headers if k not in HOP_BY_HOP and k not in named]


def upstream_request_headers(
    client_headers: Sequence[tuple[bytes, bytes]],
    *,
    host: bytes,
    client_ip: str,
    client_proto: str,
    authorization: bytes | None,
    body_length: int | None,
    chunked_body: bool,
) -> Headers:
    """Build the headers of the request we send upstream from the client's request headers.

    The client's own ``Authorization`` never passes as such: ``authorization`` is what this
    attempt sends (``flow`` decides it: the client's upstream credential to the origin it
    addressed, or nothing). ``Accept`` and everything end-to-end pass verbatim.
    """
    out: Headers = [(b"host", host)]
    for key, value in strip_hop_by_hop(client_headers):
        if key in FORWARDING or key.startswith(b"x-forwarded-") or key in CLIENT_HOP_ONLY:
            continue
        if key == b"authorization":
            continue
        out.append((key, value))
    if authorization is not None:
        out.append((b"authorization", authorization))
    if body_length is not None:
        out.append((b"content-length", b"%d" % body_length))
    elif chunked_body:
        out.append((b"transfer-encoding", b"chunked"))
    ip = client_ip.encode("ascii", "replace")
    out.append((b"x-forwarded-for", ip))
    out.append((b"x-real-ip", ip))
    out.append((b"x-forwarded-proto", client_proto.encode("ascii")))
    return out


def client_response_headers(upstream_headers: Sequence[tuple[bytes, bytes]]) -> Headers:
    """Build the headers we send the client from the upstream response's headers.

    ``Content-Length`` stays (h11 then frames the body with it); without it h11 chooses chunked
    framing for HTTP/1.1 clients or close-delimited for HTTP/1.0 ones.
    """
    headers = strip_hop_by_hop(upstream_headers)
    if get_header(upstream_headers, b"transfer-encoding") is not None:
        # RFC 9112 section 6.3: Transfer-Encoding overrides Content-Length, and an
        # intermediary must remove the latter: we re-frame the decoded body ourselves
        headers = [(k, v) for k, v in headers if k != b"content-length"]
    return headers


def replace_header(headers: Headers, name: bytes, value: bytes) -> Headers:
    """Return ``headers`` with every ``name`` header replaced by one ``name: value``."""
    out = [(k, v) for k, v in headers if k != name]
    out.append((name, value))
    return out


def lax_framing(head: bytes) -> str | None:
    """Why a request head that h11 accepted leniently must still be refused, or None.

    h11 reads a bare LF as a line end and unfolds obsolete line folding (RFC 9112 sections 2.2
    and 5.2 allow both). A proxy in front of other parsers is safer refusing them: another hop
    could read the same bytes differently (request smuggling).
    """
    # (counts and find, not a copy without the CRLFs and ``in``: CPython's ``bytes in bytes``
    # first tries its operand as an integer, and formats the TypeError it then drops)
    line_ends = head.count(b"\r\n")
    if head.count(b"\n") != line_ends:
        return "bare LF in the request head"
    if head.count(b"\r") != line_ends:
        return "bare CR in the request head"
    # every line ends in CRLF now: one that starts with white space follows a CRLF
    if head.find(b"\r\n ") >= 0 or head.find(b"\r\n\t") >= 0:
        return "obsolete line folding in the request head"
    return None
