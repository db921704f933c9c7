"""Registry facts and the registry a request is for: the one owner of registry knowledge.

Everything hubproxy knows about registries as such lives here, so that a request path, a token
scope and an operator's image glob can never disagree about the same name:

* the built-in table (Docker Hub with its host names and upstream, ghcr.io, quay.io, ...) and
  :func:`build_table`, which puts the default registry in front of the others;
* :func:`looks_like_host`: docker's rule for "this first path component names a registry", used
  for request paths, token scopes and (as :func:`looks_like_host_pattern`) image globs;
* :func:`upstream_name` and :func:`normalize_image`: Docker Hub's implied ``library/``;
* the token scope grammar (:class:`Scope`, :func:`parse_scope`, :func:`format_scope`) and the
  scope rewriting of token queries.

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
a client named. With ``--only-listed-registries`` the built-in registries the operator named
nothing about are left out of the table (:func:`listed_registries`), so they are refused alike.

Token requests need the same care. A docker client pulling ``mirror/ghcr.io/owner/image`` pings
``/v2/`` first, gets the *default* registry's challenge, and asks that realm for a token with
``scope=repository:ghcr.io/owner/image:pull``. :func:`token_registry` reads the registry out of
the scope, so the request goes to ghcr.io's token service with the scope it understands
(``repository:owner/image:pull``) and ghcr.io's own ``service``.

Pure functions over the frozen table; the proxy does the I/O.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from urllib.parse import quote, unquote

from .errors import ClientProtocolError, RegistryNotServed
from .proxies import UpstreamProxy
from .urls import Url
from .values import immutable

# --- facts -----------------------------------------------------------------------------------

# Docker Hub, the registry docker's reference grammar assumes when a name has no host
# (distribution/reference normalize.go: defaultDomain).
DEFAULT_REGISTRY = "docker.io"
# Every name of Docker Hub's registry API: clients, containerd's ns= and image globs use any.
DOCKER_HUB_HOSTS = frozenset(
    {"docker.io", "registry-1.docker.io", "index.docker.io", "registry.hub.docker.com"}
)
DOCKER_HUB_UPSTREAM = "https://registry-1.docker.io"
DOCKER_HUB_INDEX = "https://index.docker.io"  # /v1/search, for 'docker search'

# name, primary upstream, other names clients use for it
BUILTIN_REGISTRIES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (DEFAULT_REGISTRY, DOCKER_HUB_UPSTREAM, tuple(sorted(DOCKER_HUB_HOSTS - {DEFAULT_REGISTRY}))),
    ("ghcr.io", "https://ghcr.io", ()),
    ("quay.io", "https://quay.io", ()),
    ("registry.k8s.io", "https://registry.k8s.io", ("k8s.gcr.io",)),  # k8s.gcr.io was frozen
    ("gcr.io", "https://gcr.io", ()),
    ("nvcr.io", "https://nvcr.io", ()),
    ("mcr.microsoft.com", "https://mcr.microsoft.com", ()),
)


_CANONICAL = {alias: name for name, _, aliases in BUILTIN_REGISTRIES for alias in aliases}


def canonical_registry(name: str) -> str:
    """The name a registry goes by in the table: lower case, a built-in registry's other names
    folded into its own (``index.docker.io`` is ``docker.io``, ``k8s.gcr.io`` is
    ``registry.k8s.io``), the way :meth:`RegistryTable.find` resolves them."""
    lowered = name.lower()
    return _CANONICAL.get(lowered, lowered)


def is_docker_hub(url: Url) -> bool:
    """Is ``url`` one of Docker Hub's own hosts (which want ``library/`` for official images)?"""
    return url.origin.host in DOCKER_HUB_HOSTS


# --- the table -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Registry:
    """One registry the mirror serves, with how to reach it."""

    name: str  # how clients name it: "docker.io", "ghcr.io"
    upstreams: tuple[Url, ...]  # the primary first, then fallbacks
    library_prefix: bool = False  # Docker Hub's library/ for one-component names
    aliases: tuple[str, ...] = ()
    upstream_ca: str | None = None  # extra CA file for this registry's origins
    upstream_proxy: UpstreamProxy | None = None  # CONNECT or SOCKS5 proxy for its origins
    login: tuple[str, str] | None = field(default=None, repr=False)  # operator's credentials


@dataclass(frozen=True)
class RegistryTable:
    registries: tuple[Registry, ...]
    default: str = DEFAULT_REGISTRY
    host_map: tuple[tuple[str, str], ...] = ()  # client-facing host name -> registry name
    # --only-listed-registries: the built-in registries the operator named nothing about are
    # not in the table (only changes what a refusal says)
    listed_only: bool = False

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


def build_table(
    default: Registry,
    others: Iterable[Registry],
    host_map: Iterable[tuple[str, str]],
    *,
    listed_only: bool = False,
) -> RegistryTable:
    """The table of every registry served: ``default`` first (a request that names no registry
    goes there), then ``others`` in order, where one with the default's name gives way to
    ``default``. ``host_map``: client-facing host name (lowercase) -> registry name;
    ``listed_only``: ``others`` are only those the operator listed (the refusal says so)."""
    rest = tuple(registry for registry in others if registry.name != default.name)
    return RegistryTable(
        (default, *rest), default=default.name, host_map=tuple(host_map), listed_only=listed_only
    )


def listed_registries(
    builtin: Iterable[str], named: Iterable[str], registries: Iterable[Registry]
) -> list[Registry]:
    """``--only-listed-registries``: of ``registries``, those not ``builtin`` (the operator
    added them) and the built-in ones the operator ``named`` (any registry flag or table)."""
    builtin_names, named_names = frozenset(builtin), frozenset(named)
    return [r for r in registries if r.name not in builtin_names or r.name in named_names]


# --- names -----------------------------------------------------------------------------------

_HOST_NAME = re.compile(
    r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
    r"(?::[0-9]{1,5})?"
)


def looks_like_host(component: str) -> bool:
    """Does the first path component of a name (``ghcr.io`` in ``ghcr.io/owner/app``) name a
    registry rather than a Docker Hub namespace?

    docker's rule (distribution/reference ``splitDockerDomain``): it does when it has a dot or a
    colon or is ``localhost``. It must also be shaped like ``host[:port]``: ``..`` or ``a..b``
    is a hostile path, not a registry, and stays a (refused) Docker Hub name everywhere.
    docker also takes an upper-case component (``Foo/app``) for a host; here registry names are
    case-insensitive (``GHCR.IO`` is ``ghcr.io``, and image globs are lower case), so the answer
    must not depend on case: an upper-case namespace is refused anyway, as an invalid name.
    """
    named = "." in component or ":" in component or component.lower() == "localhost"
    return named and _HOST_NAME.fullmatch(component) is not None


def looks_like_host_pattern(component: str) -> bool:
    """:func:`looks_like_host` for the first component of an image glob, where ``*`` stands for
    part of a host name (``*.gcr.io``, ``localhost:*``). For a component without ``*`` the
    answer is exactly :func:`looks_like_host`'s, so a glob and a request path agree."""
    # A "*" can always be filled with a digit, which fits anywhere in a label or a port.
    return looks_like_host(component.replace("*", "0"))


def upstream_name(name: str, *, library_prefix: bool) -> str:
    """Insert ``library/`` before a one-component name when the upstream is Docker Hub."""
    if library_prefix and "/" not in name:
        return "library/" + name
    return name


def normalize_image(registry: str, repository: str) -> tuple[str, str]:
    """Canonical ``(registry, repository)``: the registry by its table name
    (:func:`canonical_registry`), and Docker Hub's one-component names given their implied
    ``library/``."""
    registry = canonical_registry(registry)
    return registry, upstream_name(repository, library_prefix=registry == DEFAULT_REGISTRY)


# --- token scopes ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Scope:
    """One item of a token request's ``scope`` (distribution's token auth spec):
    ``type[(class)]:name:actions``, e.g. ``repository:library/nginx:pull,push``."""

    kind: str  # the resource type as sent, class included: "repository", "repository(plugin)"
    name: str  # may hold a colon: "localhost:5000/app"
    actions: tuple[str, ...]  # as sent, in order; () for an empty action list

    @property
    def resource_type(self) -> str:
        """The type without its class: ``repository`` for ``repository(plugin)``."""
        return self.kind.partition("(")[0]


def parse_scope(item: str) -> Scope | None:
    """Parse one scope item, or None when it is not ``type:name:actions`` with a type and a
    name. The name is everything between the first and the last colon, since a registry host
    with a port puts a colon inside it. ``format_scope(parse_scope(item)) == item`` always."""
    kind, sep1, rest = item.partition(":")
    name, sep2, actions = rest.rpartition(":")
    if not (sep1 and sep2 and kind and name):
        return None
    return Scope(kind, name, tuple(actions.split(",")) if actions else ())


def format_scope(scope: Scope) -> str:
    """The scope item text of ``scope``: the inverse of :func:`parse_scope`."""
    return f"{scope.kind}:{scope.name}:{','.join(scope.actions)}"


def _scope_params(query: str) -> Iterator[tuple[int, str]]:
    """The index among ``&``-separated pairs and the decoded value of each ``scope=``."""
    for index, pair in enumerate(query.split("&") if query else ()):
        key, sep, raw = pair.partition("=")
        if key == "scope" and sep:
            # a form-encoded query: "+" is a space, and spaces separate scope items
            yield index, unquote(raw.replace("+", " "))


def query_scopes(query: str) -> list[Scope]:
    """Every scope item that parses, from every ``scope=`` parameter of a raw query, in order."""
    return [
        scope
        for _, value in _scope_params(query)
        for item in value.split(" ")
        if (scope := parse_scope(item)) is not None
    ]


def _replace_items(value: str, fn: Callable[[Scope], Scope | None]) -> str:
    items = []
    for item in value.split(" "):
        scope = parse_scope(item)
        if scope is None:
            items.append(item)  # not a scope: passed on as it came
            continue
        replaced = fn(scope)
        if replaced is not None:
            items.append(format_scope(replaced))
    return " ".join(items)


def replace_query_scopes(query: str, fn: Callable[[Scope], Scope | None]) -> str:
    """``query`` with every scope item of every ``scope=`` parameter replaced by ``fn(scope)``.

    ``fn`` returning None drops the item, and a ``scope`` parameter left empty is dropped. Items
    that do not parse, parameters whose scopes did not change and all other parameters stay
    byte-exact and in place; a changed ``scope`` is re-encoded.
    """
    pairs: list[str | None] = [*query.split("&")] if query else []
    for index, value in _scope_params(query):
        rewritten = _replace_items(value, fn)
        if rewritten != value:
            pairs[index] = "scope=" + quote(rewritten, safe=":/,*()") if rewritten else None
    return "&".join(pair for pair in pairs if pair is not None)


def rewrite_scope(scope: str, *, library_prefix: bool) -> str:
    """Give the one-component repository names of a (decoded, space-separated) scope value
    Docker Hub's ``library/`` when ``library_prefix``; everything else stays as it came."""
    return _replace_items(scope, _with_library) if library_prefix else scope


def rewrite_token_query(query: str, *, library_prefix: bool) -> str:
    """Rewrite the ``scope`` parameters of a token request's query for an upstream that wants
    ``library/`` (see :func:`rewrite_scope`), leaving the rest byte-exact."""
    return replace_query_scopes(query, _with_library) if library_prefix else query


def _with_library(scope: Scope) -> Scope:
    if scope.resource_type != "repository":
        return scope
    return dataclasses.replace(scope, name=upstream_name(scope.name, library_prefix=True))


def _scope_host(scope: Scope) -> tuple[str, str] | None:
    """The registry a repository scope names first (``ghcr.io`` in ``ghcr.io/owner/app``) and
    the name without it; None for a scope that names no registry."""
    first, slash, remainder = scope.name.partition("/")
    if scope.resource_type == "repository" and slash and looks_like_host(first):
        return first, remainder
    return None


# --- addressing ------------------------------------------------------------------------------


@immutable
class Addressed:
    registry: Registry
    target: str  # the request target as that registry sees it
    how: str  # "ns", "path", "host" or "default": for logs and tests


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


def _unknown(table: RegistryTable, name: str) -> RegistryNotServed:
    shown = "".join(c if c.isprintable() else "?" for c in name[:100])
    message = f"registry {shown!r} is not served by this mirror"
    if table.listed_only:
        message += " (it serves only the registries its operator listed)"
    return RegistryNotServed(message, registry=shown)


def not_served_line(table: RegistryTable, refused: RegistryNotServed, client: str) -> str:
    """The debug log line for a request refused because its registry is not served."""
    why = (
        "not listed while --only-listed-registries is on"
        if table.listed_only
        else "not among the registries served"
    )
    return f"registry {refused.registry!r} asked for by {client} refused: {why}"


def address(table: RegistryTable, target: str, host_header: str | None) -> Addressed:
    """Which registry a ``/v2/`` request is for, and its target for that registry.

    Raises RegistryNotServed for a registry that is not in the table (never a request to a host
    the client named) and ClientProtocolError for contradictory ``ns`` parameters.
    """
    path, sep, query = target.partition("?")
    values, rest_query = _ns_values(query) if sep else ([], "")
    if values:
        if len(set(values)) > 1:
            raise ClientProtocolError("more than one ns parameter")
        registry = table.find(values[0])
        if registry is None:
            raise _unknown(table, values[0])
        return Addressed(registry, path + ("?" + rest_query if rest_query else ""), "ns")
    if path.startswith("/v2/"):
        first, slash, rest = path.removeprefix("/v2/").partition("/")
        if slash and looks_like_host(first):
            registry = table.find(first)
            if registry is None:
                raise _unknown(table, first)
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
    for scope in query_scopes(query):
        named = _scope_host(scope)
        if named is None:
            continue
        registry = table.find(named[0])
        if registry is None:
            raise _unknown(table, named[0])
        if chosen is not None and registry != chosen:
            raise ClientProtocolError("one token request for two registries")
        chosen = registry
    if chosen is None:
        return addressed, query

    def without_host(scope: Scope) -> Scope:
        named = _scope_host(scope)
        return scope if named is None else dataclasses.replace(scope, name=named[1])

    query = replace_query_scopes(query, without_host)
    if chosen != addressed:
        query = "&".join(p for p in query.split("&") if p.partition("=")[0] != "service")
    return chosen, query
