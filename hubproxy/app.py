"""Assemble and run hubproxy: the proxy, its server, signals and the startup line."""

from __future__ import annotations

import contextlib
import errno
import gc
import ipaddress
import logging
import secrets
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import trio

from .cache.bucket import BucketBudget
from .cache.claims import Claims
from .cache.confirmshare import ConfirmationShare
from .cache.manifests import DATABASE, ManifestStore
from .cache.objects import StoreUnusable, open_object_store
from .cache.peering import find_peers
from .cache.pullthrough import PullThrough
from .cache.shared import SharedStore
from .cache.sharedstate import SharedState
from .cache.store import BlobStore, describe_disk
from .config import Config
from .forwarder import Forwarder, build_pool
from .net.board import ConnectionBoard
from .net.buffers import BODIES
from .net.ktls import ktls_clause
from .net.pool import Connector
from .net.server import Server
from .net.streams import CertificateError, certificate_validity
from .ops.admintoken import AdminTokenError, read_admin_token
from .ops.memory import give_back_memory
from .ops.metrics import HubMetrics
from .ops.operations import Operations
from .ops.peersecret import read_peer_keys
from .ops.trends import sample_trends
from .ops.usersfile import UsersFileError, load_users
from .ops.workermetrics import WorkerMetrics
from .policy.access import RateLimiter
from .policy.accounting import PullAccounting
from .policy.admission import Admission, LoginThrottle
from .policy.credentials import Authenticator
from .policy.registries import Registry
from .policy.sealing import TokenSealer
from .policy.sizes import describe_size
from .prefetch import PrefetchSchedule
from .proxy import Proxy
from .tokens import TokenEndpoint
from .workers import WorkerRole, await_supervisor_gone, report_ready

log = logging.getLogger("hubproxy")


class CacheDirError(Exception):
    """The cache directory cannot be created or read."""


class StartupError(Exception):
    """hubproxy cannot start; the message is the one line that says why and what to do."""


@dataclass(frozen=True)
class App:
    """A running hubproxy: what tests and embedders can look at."""

    server: Server
    proxy: Proxy
    prefetch: PrefetchSchedule | None = None  # the config file's prefetch list, if any


async def serve(
    config: Config,
    *,
    handle_signals: bool = False,
    probe_upstreams: bool = False,
    role: WorkerRole | None = None,
    task_status: trio.TaskStatus[App] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run hubproxy until cancelled (or, with ``handle_signals``, until SIGINT/SIGTERM).

    On a signal the listeners close, idle keep-alive connections are dropped and in-flight
    transfers get ``timeouts.shutdown_grace`` seconds to finish. ``probe_upstreams``: check in
    the background that each configured upstream answers, one line each (the program does;
    tests that count upstream requests do not want it). ``role``: this process is one of
    ``--workers N``, started by the supervisor (``hubproxy.workers``).

    Raises StartupError (certificate, listening socket) or CacheDirError before serving.
    """
    if config.cert is not None:
        _check_certificate_dates(config.cert)
    try:
        server = Server(config.listener)
    except CertificateError as exc:  # the files changed since the configuration was read
        raise StartupError(str(exc)) from exc
    if role is not None:  # connections spread evenly over the workers (policy.balance)
        server.board = ConnectionBoard(role.run_dir, role.index, role.count)
        server.board.publish(0)  # serving from now on: a share of the connections is ours
    peers = None
    if config.peers and config.cache_dir is not None:
        try:
            peers = await find_peers(config)
        except ValueError as exc:
            raise StartupError(str(exc)) from None
    shared_store = None
    if config.cache_store is not None and config.cache_dir is not None:
        # --workers: the workers open one state.db at once; replacing it under them is unsafe,
        # so only a single process starts from the store's snapshot (and saves one)
        shared_store = await start_shared_store(config, Path(config.cache_dir), seed=role is None)
    proxy = build_proxy(config, server=server, shared=role is not None, shared_store=shared_store)
    if proxy.pullthrough is not None:
        proxy.pullthrough.peers = peers  # only a serving mirror asks its peers
    try:
        await server.bind()  # before any nursery, so the error is not in an ExceptionGroup
    except OSError as exc:
        raise StartupError(listen_problem(config.listen_host, config.listen_port, exc)) from exc
    # everything loaded at start (modules, the cache's indexes) is never scanned again by the
    # cyclic garbage collector: a full collection then walks only what requests made since
    gc.freeze()
    try:
        # the pool's sweeper and its watch on upstream I/O (and the check of the upstreams at
        # start) run as long as the server does (the inner nursery ends when a drain does, and
        # must not wait for them)
        async with trio.open_nursery() as sweeping:
            await sweeping.start(proxy.pool.sweep)
            sweeping.start_soon(proxy.pool.stalls.run)  # the upstream idle timeout
            await sweeping.start(give_back_memory)
            if proxy.pullthrough is not None and proxy.pullthrough.shared_state is not None:
                sweeping.start_soon(proxy.pullthrough.shared_state.run)
            try:
                async with trio.open_nursery() as nursery:
                    proxy.forwarder.background = nursery
                    blobs = proxy.pullthrough.blobs if proxy.pullthrough is not None else None
                    if blobs is not None and isinstance(blobs.claims, Claims):
                        blobs.claims.nursery = nursery  # following other workers' fills
                    await nursery.start(server.serve, proxy.handle)
                    if role is None or role.index == 0:  # one startup line for all workers
                        _log_startup(config, server, proxy)
                    if handle_signals:
                        reloading = trio.CancelScope()
                        # a worker ignores SIGINT: the terminal sends it to every worker, and
                        # the supervisor passes it on as SIGTERM (one stop, not two)
                        stops = (signal.SIGTERM,) if role else (signal.SIGINT, signal.SIGTERM)
                        nursery.start_soon(
                            _stop_on_signal, server, nursery.cancel_scope, reloading, stops
                        )
                        nursery.start_soon(_reload_on_hangup, server, proxy, reloading)
                    if role is not None:
                        await _join_workers(role, proxy, sweeping)
                    if probe_upstreams and (role is None or role.index == 0):  # once
                        # in the background: a NAS may boot before its network
                        # beside the sweeper, so a shutdown right after start does not wait for it
                        sweeping.start_soon(proxy.forwarder.probe_at_start)
                    # the status page's trends: a sample a minute, the whole mirror's figures
                    sweeping.start_soon(
                        sample_trends, proxy.metrics.trends, proxy.operations.families
                    )
                    schedule = None
                    if role is None or role.index == 0:  # one worker fetches the list
                        schedule = prefetch_schedule(config, proxy, server)
                    if schedule is not None:
                        sweeping.start_soon(schedule.run)
                    if shared_store is not None and shared_store.budget is not None:
                        # --cache-store-size: access times written, the bucket swept (on a
                        # schedule by one worker of --workers N: each sweep lists the bucket)
                        shared_store.budget.periodic = role is None or role.index == 0
                        await sweeping.start(shared_store.budget.run)
                    task_status.started(App(server, proxy, schedule))
            finally:
                sweeping.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await proxy.pool.aclose()
            if proxy.pullthrough is not None:  # its writer commits what is pending
                await trio.to_thread.run_sync(proxy.pullthrough.manifests.close)
                if shared_store is not None and config.cache_dir is not None and role is None:
                    # the state a new instance on an empty directory starts from
                    database = Path(config.cache_dir) / DATABASE
                    await trio.to_thread.run_sync(shared_store.save_state, database)


async def start_shared_store(config: Config, cache_dir: Path, *, seed: bool) -> SharedStore:
    """``--cache-store`` at start: open it, check that it refuses a second create-only put
    (StartupError if not, or if it cannot be reached), and (``seed``) let an empty cache
    directory begin from its manifest state; before the stores open."""
    shared_store = open_shared_store(config)
    (cache_dir / "tmp").mkdir(parents=True, exist_ok=True)
    try:
        # a name of its own: with --workers every worker checks at once
        await shared_store.check(cache_dir / "tmp" / f"store-probe.{secrets.token_hex(6)}")
        if config.redirect_hits:
            await shared_store.check_presigning()
    except StoreUnusable as exc:
        raise StartupError(str(exc)) from exc
    except OSError as exc:
        raise CacheDirError(str(cache_dir)) from exc
    if seed:
        await trio.to_thread.run_sync(shared_store.seed_state, cache_dir / DATABASE)
    if config.cache_store_size is not None:
        shared_store.budget = BucketBudget(shared_store, config.cache_store_size)
    budget = ""
    if config.cache_store_size is not None:
        budget = (
            f"; kept within {describe_size(config.cache_store_size)}, least recently used "
            "evicted first"
        )
    log.info(
        "cache store: %s (verified blobs are committed there create-only%s)",
        shared_store.objects.description,
        budget,
    )
    return shared_store


def open_shared_store(config: Config) -> SharedStore:
    """``--cache-store``: the shared object store (StartupError: the S3 client is not
    installed, or the URL is unusable)."""
    assert config.cache_store is not None
    try:
        return SharedStore(open_object_store(config.cache_store, config.s3_endpoint))
    except StoreUnusable as exc:
        raise StartupError(str(exc)) from exc


def prefetch_schedule(config: Config, proxy: Proxy, server: Server) -> PrefetchSchedule | None:
    """The config file's ``prefetch`` list, if there is one, a cache, and an interval (0: off)."""
    if not config.prefetch or config.prefetch_interval <= 0 or proxy.pullthrough is None:
        return None
    return PrefetchSchedule(
        proxy,
        server,
        config.prefetch,
        interval=config.prefetch_interval,
        platforms=config.prefetch_platforms,
    )


# one key per process for the stamps of mirror users (see Authenticator.stamp): a reload builds
# a new Authenticator with the same key, so only changed or removed users lose their tokens
_STAMP_KEY = secrets.token_bytes(32)
# the key sealing mirror tokens; None: a random one per TokenSealer
_SEALING_KEY: bytes | None = None


def share_keys(keys: bytes) -> None:
    """A worker of ``--workers N``: seal tokens and stamp users with the supervisor's keys (64
    bytes), which every worker shares: a token one worker issued opens in every other, where
    the client's next connection may land. Called once, before anything is built."""
    global _STAMP_KEY, _SEALING_KEY
    _SEALING_KEY, _STAMP_KEY = keys[:32], keys[32:]


def _keys(config: Config) -> tuple[bytes | None, bytes]:
    """(the token sealing key, the users' stamp key): derived from --peer-secret-file when
    given, so every instance has the same ones; else this process's (or the supervisor's)."""
    if config.peer_secret_file is not None:
        try:
            return read_peer_keys(config.peer_secret_file)
        except AdminTokenError as exc:  # the file changed since the configuration was read
            raise StartupError(f"--peer-secret-file: {exc}") from None
    return _SEALING_KEY, _STAMP_KEY


def build_admission(config: Config, users: dict[str, str] | None = None) -> Admission:
    """The admission rules from the configuration, whose networks and image rules are parsed
    already (``users`` overrides reading the users file)."""
    if users is None and config.users_file is not None:
        users = load_users(config.users_file)
    return Admission(
        networks=config.allow,
        ops_networks=config.ops_allow,
        images=config.images,
        limiter=RateLimiter(config.client_rate_limit, config.client_burst),
        authenticator=(
            Authenticator(users, stamp_key=_keys(config)[1]) if users is not None else None
        ),
        logins=LoginThrottle(config.login_failures),
    )


def build_proxy(
    config: Config,
    *,
    server: Server | None = None,
    connector: Connector | None = None,
    shared: bool = False,
    shared_store: SharedStore | None = None,
) -> Proxy:
    """Assemble the parts of a mirror; ``connector`` replaces how upstream streams are opened
    (tests use memory streams); ``shared``: the cache directory is shared with other worker
    processes. Raises CacheDirError if the cache cannot be opened."""
    table = config.registry_table()
    metrics = HubMetrics()
    metrics.accounting = PullAccounting(config.accounting_window, top=config.accounting_top)
    forwarder = Forwarder(config, table, build_pool(config, table, connector), metrics)
    pullthrough = None
    if config.cache_dir is not None:
        blobs = BlobStore(Path(config.cache_dir), config.cache_size)
        blobs.reverify_after = config.reverify_after
        if shared:
            # a follower gives up on a fill whose file stops growing for longer than the
            # owner itself waits for its upstream (--read-timeout)
            blobs.claims = Claims(blobs.tmp_dir, idle=2 * config.timeouts.upstream_idle)
        manifests = ManifestStore(
            Path(config.cache_dir),
            max_bytes=config.manifest_cache_size,
            max_entries=config.manifest_cache_entries,
        )
        blobs.shared = shared_store  # only a serving mirror (serve) shares its blobs
        try:
            blobs.open()
            manifests.open()
        except OSError as exc:
            raise CacheDirError(config.cache_dir) from exc
        pullthrough = PullThrough(
            forwarder, blobs, manifests, config.manifest_ttl, config.manifest_ttl_rules
        )
        if shared_store is not None:  # manifests and tags in the store too, while running
            pullthrough.shared_state = manifests.sink = SharedState(shared_store, blobs.tmp_dir)
    admission = build_admission(config)
    operations = Operations(forwarder, pullthrough, server)
    if config.admin_token_file is not None:
        try:
            operations.admin.token = read_admin_token(config.admin_token_file)
        except AdminTokenError as exc:
            raise StartupError(f"--admin-token-file: {exc}") from None
    return Proxy(
        forwarder,
        admission,
        TokenEndpoint(forwarder, TokenSealer(_keys(config)[0]), admission.images),
        operations,
        index_url=config.index_url,
        pullthrough=pullthrough,
    )


async def _join_workers(role: WorkerRole, proxy: Proxy, nursery: trio.Nursery) -> None:
    """A worker of ``--workers N``: answer the others' scrapes, sum theirs into ours, stop when
    the supervisor is gone, and tell it this worker serves."""
    shared = WorkerMetrics(proxy.forwarder.metrics, role.run_dir, role.index, role.count)
    shared.refresh = proxy.operations.refresh_gauges
    proxy.operations.workers = shared
    await nursery.start(shared.serve)
    if proxy.pullthrough is not None:  # a pull's confirmations, whichever worker it reaches
        await nursery.start(_share_confirmations, role, proxy.pullthrough)
    nursery.start_soon(_stop_when_orphaned, role)
    await report_ready(role)


async def _share_confirmations(
    role: WorkerRole,
    pullthrough: PullThrough,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Send the access confirmations passed on here, and the blob verifications made here, to
    the other workers, and keep theirs (``cache.confirmshare``); started once this worker's
    socket is bound, before it serves."""
    try:
        share = ConfirmationShare(role.run_dir, role.index, role.count)
    except OSError as exc:  # a mirror without it asks the upstream a little more; still serves
        log.warning(
            "worker %d cannot share access confirmations with the others (%s): each asks "
            "the upstream for itself",
            role.index,
            exc,
        )
        task_status.started()
        return
    pullthrough.share_confirmations = share.send
    pullthrough.blobs.share_verification = share.send_verified
    task_status.started()
    try:
        await share.receive(pullthrough.keep_shared, pullthrough.blobs.keep_verified)
    finally:
        pullthrough.share_confirmations = None
        pullthrough.blobs.share_verification = None
        share.close()


async def _stop_when_orphaned(role: WorkerRole) -> None:
    await await_supervisor_gone(role)
    log.warning("the supervisor is gone: stopping worker %d", role.index)
    signal.raise_signal(signal.SIGTERM)  # the stop a signal makes, drain and all


async def _stop_on_signal(
    server: Server,
    scope: trio.CancelScope,
    reloading: trio.CancelScope,
    stops: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM),
) -> None:
    with trio.open_signal_receiver(*stops) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            if server.draining:
                log.warning("%s again: stopping now", name)
                scope.cancel()
                return
            log.info(
                "%s: no longer accepting; in-flight transfers have %gs to finish",
                name,
                server.settings.timeouts.shutdown_grace,
            )
            server.shutdown()
            reloading.cancel()  # the nursery ends when the drain does
            return


async def _reload_on_hangup(server: Server, proxy: Proxy, scope: trio.CancelScope) -> None:
    with scope, trio.open_signal_receiver(signal.SIGHUP) as signals:
        async for _ in signals:
            reload(server, proxy)


def reload(server: Server, proxy: Proxy) -> None:
    """SIGHUP: read the certificate and key again (an ACME client renewed them), and the users
    file. Connections already open are not touched; unusable files leave the old ones in use."""
    config = proxy.forwarder.config
    if config.cert is not None:
        try:
            validity, now = certificate_validity(config.cert), time.time()
            if validity is not None and validity.not_after < now:
                # clients would refuse it, while the old one may still be good for a while
                raise CertificateError(validity.problem(now, config.cert) or "expired")
            server.reload_certificate()
        except CertificateError as exc:
            log.error(
                "SIGHUP: cannot load the certificate: %s; still serving the old one "
                "(fix the files and send SIGHUP again)",
                exc,
            )
        else:
            log.info("SIGHUP: reloaded the certificate from %s", config.cert)
    if config.users_file is not None:
        try:
            users = load_users(config.users_file)
        except UsersFileError as exc:
            log.error("SIGHUP: cannot read the users file: %s; still using the old users", exc)
        else:
            stamp_key = _STAMP_KEY
            with contextlib.suppress(StartupError):  # unreadable now: new stamps would differ
                stamp_key = _keys(config)[1]
            proxy.admission.reload_users(Authenticator(users, stamp_key=stamp_key))
            log.info("SIGHUP: reloaded %d mirror users from %s", len(users), config.users_file)


def _check_certificate_dates(cert: str) -> None:
    """Refuse to start with an expired certificate: every client would fail its handshake,
    while the mirror looked healthy. A certificate not valid yet gets a warning only: the
    usual cause is a clock that is not set yet (a box without a battery-backed clock, before
    NTP), and it heals by itself once it is."""
    validity = certificate_validity(cert)
    if validity is None:
        return
    now = time.time()
    problem = validity.problem(now, cert)
    if problem is None:
        return
    if now > validity.not_after:
        raise StartupError(f"{problem}, then start again")
    log.warning("%s", problem)


def listen_problem(host: str, port: int, exc: OSError) -> str:
    """The one line for a listening socket that could not be opened: what failed, and only
    the advice that fits the error."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    what = f"cannot listen on {where}"
    if isinstance(exc, socket.gaierror):
        return f"{what}: {host} is not an address or a name this machine can resolve"
    if exc.errno == errno.EADDRINUSE:
        return f"{what}: the port is in use by another program"
    if exc.errno == errno.EADDRNOTAVAIL:
        return (
            f"{what}: {host} is not an address of this machine "
            "(listen on one it has, or on 0.0.0.0 for all of them)"
        )
    if exc.errno in (errno.EACCES, errno.EPERM) and 0 < port < 1024:
        return (
            f"{what}: ports below 1024 need root or the CAP_NET_BIND_SERVICE capability "
            "(the systemd unit grants it with AmbientCapabilities=CAP_NET_BIND_SERVICE), "
            "or listen on a port from 1024 up"
        )
    return f"{what}: {exc.strerror or exc}"


def _access_summary(config: Config, proxy: Proxy) -> str:
    """Who may use the mirror, for the startup line."""
    parts = []
    if config.allow.networks:
        parts.append("allow " + ", ".join(str(n) for n in config.allow.networks))
    authenticator = proxy.admission.authenticator
    if authenticator is not None:
        parts.append(f"mirror users ({len(authenticator.names)})")
    return " and ".join(parts) or "open to everyone"


def _reachable_beyond_this_machine(server: Server) -> bool:
    return any(not ipaddress.ip_address(host).is_loopback for host, _ in server.bound)


def _log_startup(config: Config, server: Server, proxy: Proxy) -> None:
    scheme = "https" if config.tls else "http"
    where = ", ".join(
        f"{scheme}://[{h}]:{p}" if ":" in h else f"{scheme}://{h}:{p}" for h, p in server.bound
    )
    if config.workers > 1:
        where += f" ({config.workers} workers)"
    upstream = str(config.upstreams[0]) if config.upstreams else "-"
    fallbacks = ", ".join(str(u) for u in config.upstreams[1:]) or "none"
    cache = _cache_clause(config, proxy)
    table = config.registry_table()
    others = "; ".join(
        _registry_line(registry, table.host_map) for registry in table.registries[1:]
    )
    access = _access_summary(config, proxy)
    log.info(
        "hubproxy listening on %s; upstream %s; fallbacks %s; library/ prefix %s; %s; "
        "access: %s; other registries: %s; %s; body buffers %s%s",
        where,
        upstream,
        fallbacks,
        "on" if config.library_prefix else "off",
        cache,
        access,
        others or "none",
        ktls_clause(asked=config.ktls and config.tls),
        describe_size(BODIES.budget),
        " per worker" if config.workers > 1 else "",
    )
    if not config.allow.networks and config.users_file is None:
        if _reachable_beyond_this_machine(server):
            log.warning(
                "hubproxy on %s is open to everyone: anyone who can reach it can pull through "
                "it, on this mirror's upstream rate limit; restrict it with --allow NETWORK or "
                "--users FILE",
                where,
            )


def _cache_clause(config: Config, proxy: Proxy | None) -> str:
    """``cache DIR (up to 20 GiB; 79 GiB free on its disk)``: the bound as read, and what the
    disk's free space makes of it (a short disk used to disable the cache without a word)."""
    if not config.cache_dir:
        return "no cache"
    bound = f"up to {describe_size(config.cache_size)}"
    blobs = proxy.pullthrough.blobs if proxy is not None and proxy.pullthrough else None
    if blobs is not None:
        verdict = blobs.check_disk()  # and the WARNING of a short disk, from the same reading
        if verdict is None:
            bound += "; free space on its disk unknown"
        else:
            bound = describe_disk(config.cache_size, verdict)
    return f"cache {config.cache_dir} ({bound})"


def _registry_line(registry: Registry, host_map: tuple[tuple[str, str], ...]) -> str:
    """``ghcr.io at https://ghcr.io (fallbacks https://w.example; host ghcr.mirror.example)``."""
    details = []
    if len(registry.upstreams) > 1:
        details.append("fallbacks " + ", ".join(str(u) for u in registry.upstreams[1:]))
    hosts = [host for host, name in host_map if name == registry.name]
    if hosts:
        details.append("host " + ", ".join(hosts))
    if registry.login is not None:
        details.append("operator login")
    extra = f" ({'; '.join(details)})" if details else ""
    return f"{registry.name} at {registry.upstreams[0]}{extra}"
