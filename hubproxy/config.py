"""Frozen configuration: everything the running proxy needs, parsed and checked once at start."""

from __future__ import annotations

from dataclasses import dataclass, field

from .net.pacing import BandwidthCaps
from .net.settings import Limits, ListenerSettings, Timeouts
from .policy.access import ImageRules, NetworkList
from .policy.accounting import DEFAULT_TOP, DEFAULT_WINDOW
from .policy.cachepolicy import DEFAULT_MANIFEST_TTL, DEFAULT_NEGATIVE_TTL, TtlRule
from .policy.prefetch import ImageRef, Platform
from .policy.proxies import UpstreamProxy
from .policy.registries import (
    DEFAULT_REGISTRY,
    DOCKER_HUB_HOSTS,
    Registry,
    RegistryTable,
    build_table,
)
from .policy.urls import Url

__all__ = ["Config", "Limits", "ListenerSettings", "Timeouts"]


@dataclass(frozen=True)
class Config:
    listen_host: str = "127.0.0.1"
    listen_port: int = 5000
    cert: str | None = None
    key: str | None = None
    ktls: bool = False  # --ktls: the kernel encrypts for clients where it can (net.ktls)
    upstreams: tuple[Url, ...] = ()  # the primary first, then fallbacks
    index_url: Url | None = None  # Docker Hub's index, for /v1/search
    library_prefix: bool = True
    public_url: str | None = None
    upstream_ca: str | None = None
    upstream_proxy: UpstreamProxy | None = None
    max_redirects: int = 5
    rate_limit_rest: float = 60.0
    unreachable_rest: float = 10.0
    pool_max_idle_per_origin: int = 32
    pool_max_per_origin: int = 100  # connections open to one upstream origin at once
    pool_max_per_client: int = 0  # of those, held by one client address; 0: a quarter
    pool_reserve_small: int = 0  # of those, never taken by blob transfers; 0: a tenth
    max_connections: int = 1024  # client connections; more are refused (503 on plain HTTP)
    max_connections_per_client: int = 128  # client connections from one address (IPv6: /64)
    max_pending_per_client: int = 16  # requests of one address worked on before their answer
    client_bandwidth: int | None = None  # bytes/s to one client address; None: no cap
    total_bandwidth: int | None = None  # bytes/s to all clients (this process: / workers)
    workers: int = 1  # processes on the listening port (SO_REUSEPORT); 1: no supervisor
    cache_dir: str | None = None  # None: no cache
    cache_size: int = 20 << 30
    reverify_after: float = 24 * 3600.0  # a whole hit verified longer ago is hashed again
    cache_store: str | None = None  # s3://bucket/prefix shared by instances (cache/shared.py)
    cache_store_size: int | None = None  # the bucket's budget (cache/bucket.py); None: none
    s3_endpoint: str | None = None  # a non-AWS store's endpoint URL
    peers: tuple[Url, ...] = ()  # every instance's mirror URL, this one's too (cache/peering.py)
    peer_timeout: float = 2.0  # connect + answer head from a peer, else the upstream is asked
    peer_ca: str | None = None  # extra CA certificates for the peers' TLS (the system store too)
    peer_secret_file: str | None = None  # the peers' shared secret: mirror tokens open on all
    redirect_hits: bool = False  # hits on blobs in cache_store: a 307 to a presigned URL
    manifest_cache_size: int = 64 << 20  # bytes of manifest bodies kept
    manifest_cache_entries: int = 50_000  # manifests, tags, links, repositories (each) kept
    manifest_ttl: float = DEFAULT_MANIFEST_TTL  # a tag no rule names is not revalidated this long
    manifest_ttl_rules: tuple[TtlRule, ...] = ()  # tag patterns with TTLs of their own
    negative_ttl: float = DEFAULT_NEGATIVE_TTL  # an upstream's 404 to a manifest is kept; 0: off
    manifest_memory: int = 32 << 20  # bytes of manifests buffered from upstreams at once
    # bytes of blob-body buffers, all workers together (net.buffers); None: the process keeps
    # its default (in-process servers, tests); the command line always gives a number
    body_memory: int | None = None
    timeouts: Timeouts = field(default_factory=Timeouts)
    limits: Limits = field(default_factory=Limits)
    # access control (policy.access, policy.admission); empty means open to everyone
    allow: NetworkList = field(default_factory=NetworkList)  # client networks served at all
    # networks that may read /metrics, /healthz, /readyz and /
    ops_allow: NetworkList = field(default_factory=NetworkList)
    # mirror users (scrypt hashes): clients must log in. The path, not the users: the file is
    # read when the proxy starts and again on SIGHUP.
    users_file: str | None = None
    # the admin API's token file (None: the API is off); read at start, kept as a digest
    admin_token_file: str | None = None
    images: ImageRules = field(default_factory=ImageRules)  # globs served, refused; empty: all
    client_rate_limit: float = 0.0  # requests per second per client address; 0: off
    client_burst: int = 200  # requests a client may make at once before the rate applies
    login_failures: int = 10  # wrong mirror passwords per address per minute; then 429; 0: off
    # several registries (policy.registries): the default one, Docker Hub, is built from the
    # fields above (upstreams, library_prefix, upstream_ca, upstream_proxy); these are the others
    registries: tuple[Registry, ...] = ()
    host_map: tuple[tuple[str, str], ...] = ()  # client-facing host name -> registry name
    default_login: tuple[str, str] | None = field(default=None, repr=False)
    allow_shared_login: bool = False  # operator logins without --allow/--users: on purpose
    # --only-listed-registries: ``registries`` holds only what the operator named (settings.py
    # left the other built-ins out); kept to say so when refusing one
    only_listed_registries: bool = False
    # the prefetch list (hubproxy.prefetch): images fetched at start and every interval (0: only
    # at start); the platforms taken from a multi-platform image (None: all of them)
    prefetch: tuple[ImageRef, ...] = ()
    prefetch_interval: float = 6 * 3600.0
    prefetch_platforms: tuple[Platform, ...] | None = (Platform("linux", "amd64"),)
    # pull accounting (policy.accounting): the window pulls are counted over, clients and
    # images named per table (the rest are "other")
    accounting_window: float = DEFAULT_WINDOW
    accounting_top: int = DEFAULT_TOP

    @property
    def listener(self) -> ListenerSettings:
        """What the listener and its client connections need, and nothing else."""
        return ListenerSettings(
            listen_host=self.listen_host,
            listen_port=self.listen_port,
            cert=self.cert,
            key=self.key,
            ktls=self.ktls,
            timeouts=self.timeouts,
            limits=self.limits,
            max_connections=self.max_connections,
            max_connections_per_client=self.max_connections_per_client,
            max_pending_per_client=self.max_pending_per_client,
            reuse_port=self.workers > 1,
            bandwidth=BandwidthCaps(
                self.client_bandwidth,
                # each worker paces its own clients: the line's total is split between them
                self.total_bandwidth // self.workers if self.total_bandwidth else None,
            ),
        )

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
        return build_table(
            default, self.registries, self.host_map, listed_only=self.only_listed_registries
        )
