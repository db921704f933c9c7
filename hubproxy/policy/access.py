"""Who may use an exposed mirror, for which images, and how often: pure access policies.

Three independent checks, each a small value built once from configuration and then only queried:

* :class:`NetworkList`: client addresses allowed to connect (CIDR networks). An empty list allows
  everyone, which is the right default for a mirror on localhost or a trusted LAN.
* :class:`ImageRules`: which ``registry/repository`` names may be pulled, from allow and deny globs.
  ``*`` matches within one path component, ``**`` across components (``library/*``,
  ``myorg/**``). A pattern whose first component names a registry host by the rule request paths
  use (``registries.looks_like_host``: docker's reference grammar) is matched against that registry
  (``ghcr.io/myorg/*``, ``*.gcr.io/**``); any other pattern covers Docker Hub only. A registry's
  other names fold into its own (``index.docker.io`` into ``docker.io``, ``k8s.gcr.io`` into
  ``registry.k8s.io``) and Docker Hub's one-component names mean ``library/<name>``, on both
  sides, so ``nginx`` and ``docker.io/library/nginx`` are the same rule.
* :class:`RateLimiter`: a token bucket per client, answering "go" or "retry after N seconds".

Nothing here reads a clock or touches a socket: the caller passes the client address and ``now``
(a monotonic time), so every rule is testable with plain tables.
"""

from __future__ import annotations

import functools
import ipaddress
import math
import re
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from .registries import (
    DEFAULT_REGISTRY,
    canonical_registry,
    looks_like_host_pattern,
    normalize_image,
    upstream_name,
)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# The IPv4-mapped block (RFC 4291 section 2.5.5.2): a dual-stack socket reports IPv4 peers as
# ::ffff:a.b.c.d, which must match the IPv4 networks an operator wrote.
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
CLIENT_KEYS_REMEMBERED = 4096  # addresses whose client_key is kept (a pure function: LRU)


# --- client networks -------------------------------------------------------------------------


@dataclass(frozen=True)
class NetworkList:
    """Client networks allowed to use the mirror. An empty list allows every client."""

    networks: tuple[Network, ...] = ()

    def allows(self, client_ip: str) -> bool:
        """Is ``client_ip`` (as a socket reports it) inside one of the networks?

        An address that does not parse is refused, even when the list is empty: a peer address
        we cannot read is a bug or an exotic transport, never a reason to open the door.
        """
        try:
            address = ipaddress.ip_address(client_ip)
        except ValueError:
            return False
        if not self.networks:
            return True
        candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [address]
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            candidates.append(address.ipv4_mapped)
        return any(
            candidate.version == network.version and candidate in network
            for network in self.networks
            for candidate in candidates
        )


def parse_network(text: str) -> Network:
    """Parse one CIDR (``10.0.0.0/8``, ``2001:db8::/32``) or bare address (a /32 or /128)."""
    entry = text.strip()
    try:
        network = ipaddress.ip_network(entry, strict=True)
    except ValueError as exc:
        hint = ""
        try:
            # A common slip is writing a host inside the network ("10.1.2.3/8"); name the fix.
            hint = f" (did you mean {ipaddress.ip_network(entry, strict=False)}?)"
        except ValueError:
            pass
        raise ValueError(f"invalid network {text!r}: {exc}{hint}") from exc
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED):
        # ::ffff:10.0.0.0/104 means 10.0.0.0/8; store it the way client addresses are compared.
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def parse_networks(texts: Iterable[str]) -> NetworkList:
    """Build a :class:`NetworkList`; raise ValueError naming the first bad entry."""
    return NetworkList(tuple(parse_network(text) for text in texts))


@functools.lru_cache(maxsize=CLIENT_KEYS_REMEMBERED)
def client_key(client_ip: str) -> str:
    """The key an address's limits are counted under: an IPv4 address (also as IPv4-mapped
    IPv6, ``::ffff:a.b.c.d``), or an IPv6 address's /64 (RFC 7421: one host or site is given a
    whole /64, so per-address limits by full IPv6 address would be no limits at all). Text
    that is no address is its own key. Remembered for the last few thousand addresses: every
    request asks it two or three times, and parsing an address is dearer than looking it up."""
    try:
        address = ipaddress.ip_address(client_ip.partition("%")[0])
    except ValueError:
        return client_ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


# --- image rules -----------------------------------------------------------------------------

_PATTERN_CHARS = re.compile(r"[a-z0-9._/*:-]+")


@dataclass(frozen=True)
class ImagePattern:
    """One compiled glob. ``registry`` is None for patterns over Docker Hub repositories."""

    text: str
    registry: re.Pattern[str] | None
    repository: re.Pattern[str]

    def matches(self, registry: str, repository: str) -> bool:
        if self.registry is None:
            if registry != DEFAULT_REGISTRY:
                return False
        elif self.registry.fullmatch(registry) is None:
            return False
        return self.repository.fullmatch(repository) is not None


@dataclass(frozen=True)
class ImageRules:
    """Allow and deny globs over image names. Deny wins; no allow patterns means allow all."""

    allow: tuple[ImagePattern, ...] = ()
    deny: tuple[ImagePattern, ...] = ()

    def permits(self, registry: str, repository: str) -> bool:
        """May ``repository`` of ``registry`` (``docker.io``, ``ghcr.io``, ...) be pulled?"""
        registry, repository = normalize_image(registry, repository)
        if any(pattern.matches(registry, repository) for pattern in self.deny):
            return False
        if not self.allow:
            return True
        return any(pattern.matches(registry, repository) for pattern in self.allow)


def _component_regex(component: str) -> str:
    # "*" stays inside one path component; "**" written inside a component ("a**") may cross.
    parts = re.split(r"(\*\*|\*)", component)
    return "".join(
        ".*" if part == "**" else "[^/]*" if part == "*" else re.escape(part) for part in parts
    )


def _glob_regex(glob: str) -> re.Pattern[str]:
    """Compile a repository glob. A whole ``**`` component matches any number of components:
    zero or more in the middle or at the start (``a/**/b`` matches ``a/b``), one or more at the
    end (``myorg/**`` matches everything below ``myorg``, like git's ignore globs)."""
    components = glob.split("/")
    out: list[str] = []
    separator = ""
    for index, component in enumerate(components):
        if component == "**":
            if index == len(components) - 1:
                out.append(separator + r"[^/]+(?:/[^/]+)*")
            else:
                out.append(separator + r"(?:[^/]+/)*")
                separator = ""  # the group above already ends with "/"
                continue
        else:
            out.append(separator + _component_regex(component))
        separator = "/"
    return re.compile("".join(out))


def parse_image_pattern(text: str) -> ImagePattern:
    """Compile one pattern such as ``library/*``, ``myorg/**`` or ``ghcr.io/myorg/*``."""
    if not text or not _PATTERN_CHARS.fullmatch(text):
        raise ValueError(
            f"invalid image pattern {text!r}: use lowercase letters, digits and . _ - / : * "
            "(no spaces)"
        )
    components = text.split("/")
    if "" in components:
        raise ValueError(f"invalid image pattern {text!r}: empty path component")
    host: str | None = None
    if looks_like_host_pattern(components[0]):
        host, components = components[0], components[1:]
        if not components:
            raise ValueError(
                f"invalid image pattern {text!r}: no repository after the registry "
                f"(for a whole registry write {text}/**)"
            )
        # Requests are checked under the registry's table name, so a rule written with another
        # name of it must be too: "k8s.gcr.io/x" is "registry.k8s.io/x", "docker.io/x" is "x".
        host = canonical_registry(host)
        if host == DEFAULT_REGISTRY:
            host = None
    repository = "/".join(components)
    if host is None and "**" not in repository:
        # Docker Hub names "nginx" as "library/nginx"; a one-component pattern means the same
        # (but "**" alone is every Docker Hub repository, not "library/**").
        repository = upstream_name(repository, library_prefix=True)
    # A registry is one host[:port] without "/", so "*" and "**" both stay inside it.
    registry = None if host is None else re.compile(_component_regex(host))
    return ImagePattern(text, registry, _glob_regex(repository))


def parse_image_rules(allow: Iterable[str], deny: Iterable[str]) -> ImageRules:
    """Compile allow and deny globs; raise ValueError naming the first bad pattern."""
    return ImageRules(
        allow=tuple(parse_image_pattern(text) for text in allow),
        deny=tuple(parse_image_pattern(text) for text in deny),
    )


# --- per-client rate limit -------------------------------------------------------------------


class RateLimiter:
    """A token bucket per client: ``burst`` requests at once, refilled at ``rate`` per second.

    Memory is bounded: a client whose bucket is full again is indistinguishable from one never
    seen, so it is forgotten (checked from the least recently seen end, a few at a time); beyond
    ``max_clients`` buckets the least recently seen client is forgotten too, getting a full
    bucket back, which errs on the side of serving. This is mutable state used from the trio
    thread; it is not meant to be shared between threads.
    """

    def __init__(self, rate: float, burst: int, max_clients: int = 10000) -> None:
        if math.isnan(rate):
            raise ValueError("rate limit: rate must be a number")
        if rate > 0 and burst < 1:
            raise ValueError(f"rate limit: burst must be at least 1, not {burst}")
        if max_clients < 1:
            raise ValueError(f"rate limit: max_clients must be at least 1, not {max_clients}")
        self.rate = rate
        self.burst = burst
        self.max_clients = max_clients
        # client -> (tokens left, time they were counted); least recently seen first.
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def __len__(self) -> int:
        return len(self._buckets)

    def check(self, client: str, now: float) -> float:
        """Take one token for ``client``: 0.0 if the request may go, else the seconds until a
        token will be there (round up for ``Retry-After``, RFC 9110 section 10.2.3)."""
        if self.rate <= 0:
            return 0.0
        self._forget_full(now)
        entry = self._buckets.pop(client, None)
        if entry is None:
            tokens = float(self.burst)
        else:
            left, since = entry
            # max(): a clock going backwards must not drain the bucket.
            tokens = min(float(self.burst), left + max(0.0, now - since) * self.rate)
        if tokens >= 1.0:
            tokens -= 1.0
            wait = 0.0
        else:
            wait = (1.0 - tokens) / self.rate
        while len(self._buckets) >= self.max_clients:
            self._buckets.popitem(last=False)
        self._buckets[client] = (tokens, now)
        return wait

    def _forget_full(self, now: float) -> None:
        # Oldest first, stopping at the first bucket still refilling: each bucket is dropped once,
        # so this costs O(1) amortized per check and memory tracks only recently active clients.
        while self._buckets:
            tokens, since = next(iter(self._buckets.values()))
            if tokens + (now - since) * self.rate < self.burst:
                break
            self._buckets.popitem(last=False)
