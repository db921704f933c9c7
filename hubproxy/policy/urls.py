"""Absolute URLs as the proxy needs them: an origin to connect to and a request target to send."""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import quote, urljoin, urlsplit

DEFAULT_PORTS = {"http": 80, "https": 443}
_TARGET_SAFE = "!$&'()*+,/:;=?@[]~%"  # RFC 3986 reserved + "%": existing escapes stay as sent


class Origin(NamedTuple):
    """Scheme, host and port: what a connection (and a keep-alive pool slot) is for. (A
    tuple: the pool's key, hashed and compared in C several times per upstream exchange.)"""

    scheme: str
    host: str  # lowercase; an IPv6 literal without brackets
    port: int

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @property
    def authority(self) -> str:
        """``host[:port]`` as written in a URL or a ``Host`` header (default port omitted)."""
        return _authority(self.scheme, self.host, self.port)

    def __str__(self) -> str:
        return f"{self.scheme}://{self.authority}"


@functools.lru_cache(maxsize=1024)
def _authority(scheme: str, host: str, port: int) -> str:
    # (remembered: asked several times per upstream exchange, of a handful of origins)
    host = f"[{host}]" if ":" in host else host
    if DEFAULT_PORTS[scheme] == port:
        return host
    return f"{host}:{port}"


@dataclass(frozen=True)
class Url:
    """An absolute http(s) URL split into the origin and the origin-form request target."""

    origin: Origin
    target: str  # "/path?query", never empty

    def __str__(self) -> str:
        return f"{self.origin}{self.target}"


def parse_url(text: str) -> Url:
    """Parse an absolute http or https URL; raise ValueError for anything else."""
    parts = urlsplit(text.strip())
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise ValueError(f"not an http or https URL: {text!r}")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"credentials in URLs are not supported: {text!r}")
    host = (parts.hostname or "").lower()
    if not host:
        raise ValueError(f"URL has no host: {text!r}")
    port = parts.port if parts.port is not None else DEFAULT_PORTS[scheme]
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    # what browsers and Go's client do: a request target must be ASCII without spaces
    target = quote(target, safe=_TARGET_SAFE)
    return Url(Origin(scheme, host, port), target)


def base_url(text: str) -> Url:
    """Parse an upstream base URL (``--upstream``/``--fallback``); raise ValueError if unusable."""
    url = parse_url(text)
    if "?" in url.target:
        raise ValueError(f"an upstream URL cannot have a query: {text!r}")
    return url


def resolve(base: Url, location: str) -> Url:
    """Resolve a ``Location`` (absolute, or relative per RFC 3986) against ``base``."""
    location = location.strip()
    if _ABSOLUTE_HTTP.fullmatch(location):
        # the registry's redirect to its CDN, once per blob: joining it to the base would
        # give it back as it is, after three parses more
        return parse_url(location)
    return parse_url(urljoin(str(base), location))


# an http(s) URL with an authority: what urljoin returns as it is, whatever the base
# (``https:///x`` and ``https:x`` have none: joined, they take the base's). Without white
# space (urlsplit drops tabs and newlines, joining may leave a space at the end that is then
# stripped) and without ";" (joining drops one no parameters follow): those take the long way.
_ABSOLUTE_HTTP = re.compile(r"https?://[^/?#\\\s;][^\s;]*", re.IGNORECASE)


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
