"""Which registry a request is for: the registry table and the three ways clients address one.

One hubproxy serves Docker Hub, ghcr.io, quay.io, registry.k8s.io and the rest through one
endpoint, however the client names the registry (``../shared/PROTOCOL.md``):

1. containerd, with a ``_default`` ``hosts.toml``, adds ``?ns=<registry>`` to every request:
   ``/v2/owner/image/manifests/tag?ns=ghcr.io``;
2. ``docker pull mirror.example.com/ghcr.io/owner/image`` puts the registry first in the path:
   ``/v2/ghcr.io/owner/image/manifests/tag`` (podman's ``registries.conf`` mirrors with a path
   do the same);
3. a host name per registry, ``ghcr.mirror.example.com``, mapped by the operator's host map;
4. none of these: the default registry (Docker Hub).

:func:`address` normalises all of them, before anything else happens, into the registry and
the request target that registry would see (``ns`` removed, the path prefix removed). A name
that is not in the table is refused with a registry error: the mirror never connects to a host
a client named.

Token requests need the same care. A docker client pulling ``mirror/ghcr.io/owner/image`` pings
``/v2/`` first, gets the *default* registry's challenge, and asks that realm for a token with
``scope=repository:ghcr.io/owner/image:pull``. :func:`token_registry` reads the registry out of
the scope, so the request goes to ghcr.io's token service with the scope it understands
(``repository:owner/image:pull``) and ghcr.io's own ``service``.

Pure functions over the frozen table; the proxy does the I/O.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from urllib.parse import quote, unquote

from .errors import ClientProtocolError, RouteNotFound
from .urls import Url

DEFAULT_REGISTRY = "docker.io"

# name, primary upstream, other names clients use for it
BUILTIN_REGISTRIES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (
        "docker.io",
        "https://registry-1.docker.io",
        ("registry-1.docker.io", "index.docker.io", "registry.hub.docker.com"),
    ),
    ("ghcr.io", "https://ghcr.io", ()),
    ("quay.io", "https://quay.io", ()),
    ("registry.k8s.io", "https://registry.k8s.io", ("k8s.gcr.io",)),  # k8s.gcr.io was frozen
    ("gcr.io", "https://gcr.io", ()),
    ("nvcr.io", "https://nvcr.io", ()),
    ("mcr.microsoft.com", "https://mcr.microsoft.com", ()),
)


@dataclass(frozen=True)
class Registry:
    """One registry the mirror serves, with how to reach it."""

    name: str  # how clients name it: "docker.io", "ghcr.io"
    upstreams: tuple[Url, ...]  # the primary first, then fallbacks
    library_prefix: bool = False  # Docker Hub's library/ for one-component names
    aliases: tuple[str, ...] = ()
    upstream_ca: str | None = None  # extra CA file for this registry's origins
    upstream_proxy: Url | None = None  # CONNECT proxy for this registry's origins
    login: tuple[str, str] | None = field(default=None, repr=False)  # operator's credentials


@dataclass(frozen=True)
class RegistryTable:
    registries: tuple[Registry, ...]
    default: str = DEFAULT_REGISTRY
    host_map: tuple[tuple[str, str], ...] = ()  # client-facing host name -> registry name

    def find(self, name: str) -> Registry | None:
        """The registry called ``name`` (or one of its aliases), ignoring case."""
        wanted = name.lower()
        for registry in self.registries:
            if registry.name == wanted or wanted in registry.aliases:
                return registry
        return None

    @functools.cached_property
    def default_registry(self) -> Registry:
        registry = self.find(self.default)
        if registry is None:
            raise ValueError(f"the default registry {self.default!r} is not in the table")
        return registry

    def index_of(self, registry: Registry) -> int:
        return self.registries.index(registry)


@dataclass(frozen=True)
class Addressed:
    registry: Registry
    target: str  # the request target as that registry sees it
    how: str  # "ns", "path", "host" or "default": for logs and tests


_HOST_NAME = re.compile(
    r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
    r"(?::[0-9]{1,5})?"
)


def looks_like_host(component: str) -> bool:
    """docker's rule (reference.splitDockerDomain): a first path component with a dot or a
    colon, or ``localhost``, names a registry; anything else is a repository namespace. It
    must also be shaped like a host name (``..`` is a hostile path, not a registry)."""
    named = "." in component or ":" in component or component == "localhost"
    return named and _HOST_NAME.fullmatch(component) is not None


def _ns_values(query: str) -> tuple[list[str], str]:
    """The ``ns`` values of a query and the query without them (the rest byte-exact)."""
    values, rest = [], []
    for pair in query.split("&"):
        key, sep, value = pair.partition("=")
        if key == "ns" and sep:
            values.append(unquote(value))
        elif pair:
            rest.append(pair)
    return values, "&".join(rest)


def _unknown(name: str) -> RouteNotFound:
    shown = "".join(c if c.isprintable() else "?" for c in name[:100])
    return RouteNotFound(f"registry {shown!r} is not served by this mirror", code="NAME_UNKNOWN")


def address(table: RegistryTable, target: str, host_header: str | None) -> Addressed:
    """Which registry a ``/v2/`` request is for, and its target for that registry.

    Raises RouteNotFound for a registry that is not in the table (never a request to a host
    the client named) and ClientProtocolError for contradictory ``ns`` parameters.
    """
    path, sep, query = target.partition("?")
    values, rest_query = _ns_values(query) if sep else ([], "")
    if values:
        if len(set(values)) > 1:
            raise ClientProtocolError("more than one ns parameter")
        registry = table.find(values[0])
        if registry is None:
            raise _unknown(values[0])
        return Addressed(registry, path + ("?" + rest_query if rest_query else ""), "ns")
    if path.startswith("/v2/"):
        first, slash, rest = path.removeprefix("/v2/").partition("/")
        if slash and looks_like_host(first):
            registry = table.find(first)
            if registry is None:
                raise _unknown(first)
            return Addressed(registry, f"/v2/{rest}" + (sep + query), "path")
    if host_header and table.host_map:
        host = host_header.rsplit(":", 1)[0] if not host_header.endswith("]") else host_header
        for mapped_host, name in table.host_map:
            if host.lower() == mapped_host:
                registry = table.find(name)
                if registry is not None:
                    return Addressed(registry, target, "host")
    return Addressed(table.default_registry, target, "default")


def token_registry(table: RegistryTable, addressed: Registry, query: str) -> tuple[Registry, str]:
    """Which registry a token request is really for, and its query for that registry.

    Scopes naming a registry first (``repository:ghcr.io/owner/image:pull``, what docker sends
    for a path-prefix pull) choose that registry and lose the prefix; a ``service`` parameter is
    dropped when the registry changes (the caller sets the right one). Scopes naming two
    different registries are refused. Without such a scope the token path's registry stays.
    """
    chosen: Registry | None = None
    pairs = query.split("&") if query else []
    for index, pair in enumerate(pairs):
        key, sep, raw = pair.partition("=")
        if key != "scope" or not sep:
            continue
        items, changed = [], False
        for item in unquote(raw.replace("+", " ")).split(" "):
            kind, sep1, rest = item.partition(":")
            name, sep2, actions = rest.rpartition(":")
            first, slash, remainder = name.partition("/")
            if sep1 and sep2 and kind.split("(")[0] == "repository" and slash:
                if looks_like_host(first):
                    registry = table.find(first)
                    if registry is None:
                        raise _unknown(first)
                    if chosen is not None and registry != chosen:
                        raise ClientProtocolError("one token request for two registries")
                    chosen = registry
                    item, changed = f"{kind}:{remainder}:{actions}", True
            items.append(item)
        if changed:
            pairs[index] = "scope=" + quote(" ".join(items), safe=":/,*()")
    if chosen is None:
        return addressed, query
    if chosen != addressed:
        pairs = [p for p in pairs if p.partition("=")[0] != "service"]
    return chosen, "&".join(pairs)
