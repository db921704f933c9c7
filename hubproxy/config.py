"""Frozen configuration: everything the running proxy needs, parsed and checked once at start."""

from __future__ import annotations

from dataclasses import dataclass, field

from .policy.access import ImageRules, NetworkList
from .policy.registries import (
    DEFAULT_REGISTRY,
    DOCKER_HUB_HOSTS,
    Registry,
    RegistryTable,
    build_table,
)
from .policy.urls import Url


@dataclass(frozen=True)
class Timeouts:
    handshake: float = 10.0  # TLS handshake of a new client connection
    request_head: float = 30.0  # the first request head after connecting (slow-loris guard)
    keepalive_idle: float = 60.0  # between requests on a kept-alive client connection
    client_idle: float = 120.0  # a client that neither sends nor accepts a byte mid-transfer
    connect: float = 10.0  # TCP connect + TLS handshake (+ CONNECT) toward an upstream
    upstream_idle: float = 60.0  # an upstream that sends no byte (head or body) for this long
    upstream_keepalive: float = 30.0  # idle pooled upstream connections are dropped after this
    shutdown_grace: float = 30.0  # in-flight transfers get this long after SIGINT/SIGTERM


@dataclass(frozen=True)
class Limits:
    max_head_size: int = 64 * 1024  # request line + headers, bytes; beyond it: 431
    max_headers: int = 100  # header fields per request; beyond it: 431
    max_target: int = 8 * 1024  # request target, bytes; beyond it: 414


@dataclass(frozen=True)
class Config:
    listen_host: str = "127.0.0.1"
    listen_port: int = 5000
    cert: str | None = None
    key: str | None = None
    upstreams: tuple[Url, ...] = ()  # the primary first, then fallbacks
    index_url: Url | None = None  # Docker Hub's index, for /v1/search
    library_prefix: bool = True
    public_url: str | None = None
    upstream_ca: str | None = None
    upstream_proxy: Url | None = None
    max_redirects: int = 5
    rate_limit_rest: float = 60.0
    unreachable_rest: float = 10.0
    pool_max_idle_per_origin: int = 32
    pool_max_per_origin: int = 100
    max_connections: int = 1024  # client connections; more are refused (503 on plain HTTP)
    cache_dir: str | None = None  # None: no cache
    cache_size: int = 20 << 30
    manifest_ttl: float = 60.0  # a tag is not revalidated for this long
    timeouts: Timeouts = Timeouts()
    limits: Limits = Limits()
    # access control (policy.access, policy.admission); empty means open to everyone
    allow: NetworkList = field(default_factory=NetworkList)  # client networks served at all
    # networks that may read /metrics, /healthz, /readyz and /
    ops_allow: NetworkList = field(default_factory=NetworkList)
    # mirror users (scrypt hashes): clients must log in. The path, not the users: the file is
    # read when the proxy starts and again on SIGHUP.
    users_file: str | None = None
    images: ImageRules = field(default_factory=ImageRules)  # globs served, refused; empty: all
    client_rate_limit: float = 0.0  # requests per second per client address; 0: off
    client_burst: int = 200  # requests a client may make at once before the rate applies
    # several registries (policy.registries): the default one, Docker Hub, is built from the
    # fields above (upstreams, library_prefix, upstream_ca, upstream_proxy); these are the others
    registries: tuple[Registry, ...] = ()
    host_map: tuple[tuple[str, str], ...] = ()  # client-facing host name -> registry name
    default_login: tuple[str, str] | None = field(default=None, repr=False)
    allow_shared_login: bool = False  # operator logins without --allow/--users: on purpose

    @property
    def tls(self) -> bool:
        return self.cert is not None

    def registry_table(self) -> RegistryTable:
        """Every registry served: the default one (Docker Hub, by all its host names) from the
        single-upstream fields, then the others (see :func:`registries.build_table`)."""
        default = Registry(
            name=DEFAULT_REGISTRY,
            upstreams=self.upstreams,
            library_prefix=self.library_prefix,
            aliases=tuple(sorted(DOCKER_HUB_HOSTS - {DEFAULT_REGISTRY})),
            upstream_ca=self.upstream_ca,
            upstream_proxy=self.upstream_proxy,
            login=self.default_login,
        )
        return build_table(default, self.registries, self.host_map)
